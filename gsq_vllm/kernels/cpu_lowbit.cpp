// GSQ's native CPU kernels: a weight-only GEMM that reads 2/3-bit codes straight from their bit
// planes (no int4 widening), and a one-pass dequantiser for large batches.
//
// Layout (gsq_vllm/kernels/planes.py, shared with the Triton kernels), N contiguous:
//   low_plane  int32 [K/16, N]: code k of row n at bits 2*(k%16) of low_plane[k/16][n]
//   high_plane int32 [K/32, N] (3-bit only): the code's third bit, slot c = k%32 at bit
//              16*(c/16) + 2*(c%8) + (c%16)/8 of high_plane[k/32][n]
//   scales     fp32  [K/G, N]
// The unsigned code u = code + 2^(bits-1); weight[n][k] = scales[k/G][n] * (u - 2^(bits-1)).
//
// One SIMD lane is one output row: 16 rows per AVX-512 register, 8 per AVX2 register. For each
// k, shifting the 16 rows' plane words right by 2*(k%16) leaves each row's code in the low bits,
// and one permute (vpermps) turns those bits into the float grid level through a small table
// that repeats with the code's period, so no masking is needed for 2-bit codes. The level is then
// multiplied with x[m][k] (broadcast) into a per-group sum; at the end of each group the sum is
// scaled by the 16 rows' scales. fp32 arithmetic throughout: the result equals dequantise-then-
// matmul up to the order of the additions.
//
// ISA: chosen per call from the CPU (AVX-512F, else AVX2+FMA; GSQ_VLLM_CPU_ISA=avx2 forces the
// AVX2 path, for tests); the Python side refuses CPUs with neither.

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cstdint>
#include <cstdlib>
#include <cstring>
#include <string>
#include <utility>

namespace {

enum class Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2 };

Isa detect_isa() {
  __builtin_cpu_init();
  const char* forced = std::getenv("GSQ_VLLM_CPU_ISA");
  bool avx512 = __builtin_cpu_supports("avx512f");
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  if (forced && std::strcmp(forced, "avx2") == 0) avx512 = false;
  if (forced && std::strcmp(forced, "none") == 0) avx512 = avx2 = false;
  return avx512 ? Isa::kAvx512 : (avx2 ? Isa::kAvx2 : Isa::kNone);
}

const char* isa_name(Isa isa) {
  return isa == Isa::kAvx512 ? "avx512" : (isa == Isa::kAvx2 ? "avx2" : "none");
}

// bit of the high plane's word that holds slot c (see the layout above)
constexpr int high_bit(int c) { return 16 * (c / 16) + 2 * (c % 8) + (c % 16) / 8; }

#define GSQ_INLINE inline __attribute__((always_inline))

// f(0), f(1), ..., f(N-1) with compile-time indices, inlined into the caller (and its ISA)
template <typename F, int... I>
GSQ_INLINE void unroll_impl(F&& f, std::integer_sequence<int, I...>) {
  (f(std::integral_constant<int, I>{}), ...);
}
template <int N, typename F>
GSQ_INLINE void unroll(F&& f) {
  unroll_impl(std::forward<F>(f), std::make_integer_sequence<int, N>{});
}

// Rows of x handled per pass over a block of the weight: one group sum and one total per row
// must stay in registers.
constexpr int kMaxRows = 4;

// ------------------------------------------------------------------------------------ AVX-512

#pragma GCC push_options
#pragma GCC target("avx512f")  // everything down to pop_options, lambdas included

template <int BITS>
inline __m512 level_table_512() {
  if constexpr (BITS == 2) {
    return _mm512_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1, -2, -1, 0, 1);
  } else {
    return _mm512_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3, -4, -3, -2, -1, 0, 1, 2, 3);
  }
}

// The 16 rows' levels for slot t (0..15) of a low word, whose 32-slot high word is `high` and
// which is the `half`-th (0 or 1) 16-slot half of that high word.
template <int BITS, int HALF, int T>
inline __m512 levels_512(__m512i low, __m512i high, __m512 table) {
  __m512i index = T ? _mm512_srli_epi32(low, 2 * T) : low;
  if constexpr (BITS == 3) {
    constexpr int bit = high_bit(16 * HALF + T);
    __m512i up = bit >= 2 ? _mm512_srli_epi32(high, bit - 2) : _mm512_slli_epi32(high, 2 - bit);
    index = _mm512_ternarylogic_epi32(index, up, _mm512_set1_epi32(3), 0xE4);  // mask ? index : up
  }
  return _mm512_permutexvar_ps(index, table);
}

// y[m][n0:n0+16] for ROWS rows of x: the whole K.
template <int BITS, int ROWS>
void block_512(const float* x, int64_t ldx, int64_t K, const int32_t* low, const int32_t* high,
                          const float* scales, int64_t N, int64_t group, float* y, int64_t ldy, int64_t n0) {
  const __m512 table = level_table_512<BITS>();
  __m512 total[ROWS];
  for (int r = 0; r < ROWS; ++r) total[r] = _mm512_setzero_ps();
  const int64_t groups = K / group;
  for (int64_t g = 0; g < groups; ++g) {
    __m512 sum[ROWS];
    for (int r = 0; r < ROWS; ++r) sum[r] = _mm512_setzero_ps();
    // 32 slots per step: two low words and (3-bit) one high word
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      __m512i hiword = _mm512_setzero_si512();
      if constexpr (BITS == 3) hiword = _mm512_loadu_si512(high + (k / 32) * N + n0);
      unroll<2>([&](auto half) {
        const __m512i word = _mm512_loadu_si512(low + (k / 16 + half) * N + n0);
        const float* xk = x + k + 16 * half;
        unroll<16>([&](auto t) {
          const __m512 level = levels_512<BITS, half, t>(word, hiword, table);
          for (int r = 0; r < ROWS; ++r) sum[r] = _mm512_fmadd_ps(level, _mm512_set1_ps(xk[r * ldx + t]), sum[r]);
        });
      });
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * N + n0);
    for (int r = 0; r < ROWS; ++r) total[r] = _mm512_fmadd_ps(sum[r], scale, total[r]);
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * ldy + n0, total[r]);
}

// The dequantised, transposed weight wt[k][n0:n0+16] = scale * level, fp32 or bf16.
template <int BITS, bool BF16>
void dequantize_block_512(int64_t K, const int32_t* low, const int32_t* high, const float* scales,
                                     int64_t N, int64_t group, void* out, int64_t n0) {
  const __m512 table = level_table_512<BITS>();
  for (int64_t k = 0; k < K; k += 32) {
    const __m512 scale = _mm512_loadu_ps(scales + (k / group) * N + n0);
    __m512i hiword = _mm512_setzero_si512();
    if constexpr (BITS == 3) hiword = _mm512_loadu_si512(high + (k / 32) * N + n0);
    unroll<2>([&](auto half) {
      const __m512i word = _mm512_loadu_si512(low + (k / 16 + half) * N + n0);
      unroll<16>([&](auto t) {
        const __m512 value = _mm512_mul_ps(levels_512<BITS, half, t>(word, hiword, table), scale);
        const int64_t row = k + 16 * half + t;
        if constexpr (BF16) {
          // round to nearest even (no NaNs here: finite scales times small integers)
          __m512i bits = _mm512_castps_si512(value);
          __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
          bits = _mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF)));
          __m256i half_words = _mm512_cvtepi32_epi16(_mm512_srli_epi32(bits, 16));
          _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + row * N + n0), half_words);
        } else {
          _mm512_storeu_ps(static_cast<float*>(out) + row * N + n0, value);
        }
      });
    });
  }
}

#pragma GCC pop_options

// --------------------------------------------------------------------------------------- AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <int BITS>
inline __m256 level_table_256() {
  if constexpr (BITS == 2) {
    return _mm256_setr_ps(-2, -1, 0, 1, -2, -1, 0, 1);
  } else {
    return _mm256_setr_ps(-4, -3, -2, -1, 0, 1, 2, 3);
  }
}

template <int BITS, int HALF, int T>
inline __m256 levels_256(__m256i low, __m256i high, __m256 table) {
  __m256i index = T ? _mm256_srli_epi32(low, 2 * T) : low;
  if constexpr (BITS == 3) {
    constexpr int bit = high_bit(16 * HALF + T);
    __m256i up = bit >= 2 ? _mm256_srli_epi32(high, bit - 2) : _mm256_slli_epi32(high, 2 - bit);
    index = _mm256_or_si256(_mm256_and_si256(index, _mm256_set1_epi32(3)), _mm256_and_si256(up, _mm256_set1_epi32(4)));
  }
  return _mm256_permutevar8x32_ps(table, index);  // uses the index's low 3 bits
}

template <int BITS, int ROWS>
void block_256(const float* x, int64_t ldx, int64_t K, const int32_t* low, const int32_t* high,
                        const float* scales, int64_t N, int64_t group, float* y, int64_t ldy, int64_t n0) {
  const __m256 table = level_table_256<BITS>();
  __m256 total[ROWS];
  for (int r = 0; r < ROWS; ++r) total[r] = _mm256_setzero_ps();
  const int64_t groups = K / group;
  for (int64_t g = 0; g < groups; ++g) {
    __m256 sum[ROWS];
    for (int r = 0; r < ROWS; ++r) sum[r] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      __m256i hiword = _mm256_setzero_si256();
      if constexpr (BITS == 3) hiword = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + (k / 32) * N + n0));
      unroll<2>([&](auto half) {
        const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + (k / 16 + half) * N + n0));
        const float* xk = x + k + 16 * half;
        unroll<16>([&](auto t) {
          const __m256 level = levels_256<BITS, half, t>(word, hiword, table);
          for (int r = 0; r < ROWS; ++r) sum[r] = _mm256_fmadd_ps(level, _mm256_set1_ps(xk[r * ldx + t]), sum[r]);
        });
      });
    }
    const __m256 scale = _mm256_loadu_ps(scales + g * N + n0);
    for (int r = 0; r < ROWS; ++r) total[r] = _mm256_fmadd_ps(sum[r], scale, total[r]);
  }
  for (int r = 0; r < ROWS; ++r) _mm256_storeu_ps(y + r * ldy + n0, total[r]);
}

template <int BITS, bool BF16>
void dequantize_block_256(int64_t K, const int32_t* low, const int32_t* high, const float* scales,
                                   int64_t N, int64_t group, void* out, int64_t n0) {
  const __m256 table = level_table_256<BITS>();
  for (int64_t k = 0; k < K; k += 32) {
    const __m256 scale = _mm256_loadu_ps(scales + (k / group) * N + n0);
    __m256i hiword = _mm256_setzero_si256();
    if constexpr (BITS == 3) hiword = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + (k / 32) * N + n0));
    unroll<2>([&](auto half) {
      const __m256i word = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + (k / 16 + half) * N + n0));
      unroll<16>([&](auto t) {
        const __m256 value = _mm256_mul_ps(levels_256<BITS, half, t>(word, hiword, table), scale);
        const int64_t row = k + 16 * half + t;
        if constexpr (BF16) {
          __m256i bits = _mm256_castps_si256(value);
          __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
          bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
          // 8 dwords -> 8 words: pack within lanes, then gather the two lanes' low halves
          __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
          _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + row * N + n0),
                           _mm256_castsi256_si128(packed));
        } else {
          _mm256_storeu_ps(static_cast<float*>(out) + row * N + n0, value);
        }
      });
    });
  }
}

#pragma GCC pop_options

// ------------------------------------------------------------------------------------ dispatch

template <int BITS>
void gemm_rows(Isa isa, const float* x, int64_t ldx, int64_t rows, int64_t K, const int32_t* low,
               const int32_t* high, const float* scales, int64_t N, int64_t group, float* y, int64_t n0) {
  for (int64_t m = 0; m < rows; m += kMaxRows) {
    const int64_t count = std::min<int64_t>(kMaxRows, rows - m);
    const float* xm = x + m * ldx;
    float* ym = y + m * N;
    unroll<kMaxRows>([&](auto r) {
      if (count != r + 1) return;
      if (isa == Isa::kAvx512) {
        block_512<BITS, r + 1>(xm, ldx, K, low, high, scales, N, group, ym, N, n0);
      } else {
        block_256<BITS, r + 1>(xm, ldx, K, low, high, scales, N, group, ym, N, n0);
        block_256<BITS, r + 1>(xm, ldx, K, low, high, scales, N, group, ym, N, n0 + 8);
      }
    });
  }
}

void check_planes(const at::Tensor& low, const c10::optional<at::Tensor>& high, const at::Tensor& scales,
                  int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3, "gsq_cpu: bits must be 2 or 3, got ", bits);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "gsq_cpu: group size must be 32, 64 or 128, got ", group);
  TORCH_CHECK(low.dtype() == at::kInt && low.dim() == 2 && low.is_contiguous(), "gsq_cpu: low_plane must be contiguous int32 [K/16, N]");
  const int64_t N = low.size(1);
  TORCH_CHECK(N % 16 == 0, "gsq_cpu: N must be a multiple of 16, got ", N);
  TORCH_CHECK(K % group == 0 && low.size(0) * 16 == K, "gsq_cpu: low_plane ", low.sizes(), " does not hold K = ", K, " in groups of ", group);
  TORCH_CHECK(scales.dtype() == at::kFloat && scales.is_contiguous() && scales.dim() == 2 && scales.size(0) == K / group && scales.size(1) == N,
              "gsq_cpu: scales must be contiguous fp32 [K/group, N] = [", K / group, ", ", N, "], got ", scales.sizes());
  if (bits == 3) {
    TORCH_CHECK(high.has_value() && high->dtype() == at::kInt && high->is_contiguous() && high->dim() == 2 &&
                    high->size(0) * 32 == K && high->size(1) == N,
                "gsq_cpu: 3-bit weights need a contiguous int32 high_plane [K/32, N]");
  } else {
    TORCH_CHECK(!high.has_value(), "gsq_cpu: a high_plane comes with 3-bit weights only");
  }
}

Isa usable_isa() {
  const Isa isa = detect_isa();
  TORCH_CHECK(isa != Isa::kNone, "gsq_cpu: this CPU has neither AVX-512F nor AVX2+FMA");
  return isa;
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& low, const c10::optional<at::Tensor>& high,
                     const at::Tensor& scales, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "gsq_cpu: x must be 2-D [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = low.size(1);
  check_planes(low, high, scales, bits, group, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "gsq_cpu: x must be fp32, bf16 or fp16, got ", x.scalar_type());
  const Isa isa = usable_isa();
  const at::Tensor xf = x.to(at::kFloat).contiguous();
  at::Tensor y = at::empty({M, N}, xf.options());
  const float* xp = xf.data_ptr<float>();
  const int32_t* lp = low.data_ptr<int32_t>();
  const int32_t* hp = bits == 3 ? high->data_ptr<int32_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  const int64_t blocks = N / 16;
  // each block of 16 rows reads 16 * K / 4 bytes or more of codes: a few blocks per task
  const int64_t grain = std::max<int64_t>(1, 16384 / std::max<int64_t>(K, 1));
  at::parallel_for(0, blocks, grain, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      if (bits == 2) {
        gemm_rows<2>(isa, xp, K, M, K, lp, hp, sp, N, group, yp, 16 * b);
      } else {
        gemm_rows<3>(isa, xp, K, M, K, lp, hp, sp, N, group, yp, 16 * b);
      }
    }
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

at::Tensor lowbit_dequantize_t(const at::Tensor& low, const c10::optional<at::Tensor>& high, const at::Tensor& scales,
                               int64_t bits, int64_t group, at::ScalarType dtype) {
  const int64_t K = low.size(0) * 16, N = low.size(1);
  check_planes(low, high, scales, bits, group, K);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gsq_cpu: dequantise to fp32 or bf16, got ", dtype);
  const Isa isa = usable_isa();
  at::Tensor out = at::empty({K, N}, low.options().dtype(dtype));
  const int32_t* lp = low.data_ptr<int32_t>();
  const int32_t* hp = bits == 3 ? high->data_ptr<int32_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  void* op = out.data_ptr();
  const bool bf16 = dtype == at::kBFloat16;
  at::parallel_for(0, N / 16, 1, [&](int64_t begin, int64_t end) {
    for (int64_t b = begin; b < end; ++b) {
      const int64_t n0 = 16 * b;
      unroll<2>([&](auto three) {
        unroll<2>([&](auto half) {
          constexpr int B = three ? 3 : 2;
          constexpr bool H = half;
          if ((bits == 3) != bool(three) || bf16 != H) return;
          if (isa == Isa::kAvx512) {
            dequantize_block_512<B, H>(K, lp, hp, sp, N, group, op, n0);
          } else {
            dequantize_block_256<B, H>(K, lp, hp, sp, N, group, op, n0);
            dequantize_block_256<B, H>(K, lp, hp, sp, N, group, op, n0 + 8);
          }
        });
      });
    }
  });
  return out;
}

std::string isa() { return isa_name(detect_isa()); }

}  // namespace

TORCH_LIBRARY(gsq_cpu, m) {
  m.def("lowbit_mm(Tensor x, Tensor low_plane, Tensor? high_plane, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("lowbit_dequantize_t(Tensor low_plane, Tensor? high_plane, Tensor scales, int bits, int group_size, ScalarType dtype) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(gsq_cpu, CPU, m) {
  m.impl("lowbit_mm", &lowbit_mm);
  m.impl("lowbit_dequantize_t", &lowbit_dequantize_t);
}
