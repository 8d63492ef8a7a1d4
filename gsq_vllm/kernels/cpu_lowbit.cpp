// GSQ's native CPU kernels for 2/3-bit weights: a weight-only GEMM that reads the codes straight
// from their bit planes (2 or 3 bits a weight in memory, no int4 widening), and a one-pass
// dequantiser that feeds a dense GEMM for large batches.
//
// Ops (TORCH_LIBRARY gsq_cpu, at the end of this file; N = 16 * low_plane.size(0)):
//   lowbit_mm(x [M, K], low_plane, high_plane?, scales, bits, group_size) -> [M, N], x's dtype
//   lowbit_dense_mm(same arguments) -> [M, N]: the weight rebuilt, then one dense GEMM
//   lowbit_dequantize_t(low_plane, high_plane?, scales, bits, group_size, dtype) -> [K, N] fp32/bf16
//   isa() -> the best instruction set this CPU (and GSQ_VLLM_CPU_ISA) allows
// x is fp32, bf16 or fp16; bits 2 or 3; group_size G in {32, 64, 128}, dividing K.
//
// Weight layout (check_planes checks it; gsq_vllm/kernels/cpu_lowbit.py's prepare() builds it from
// the ``cpu`` plane layout of gsq_vllm/kernels/planes.py, which owns it): blocks of 16 output rows,
// each block's words contiguous, so that one thread reads its block front to back (with N
// contiguous, each of a block's 64-byte loads would touch a new 4 KiB page):
//   low_plane  int32 [N/16, K/16, 16]: lane r of word [b][w] holds codes of output row n = 16b + r
//   high_plane int32 [N/16, K/32, 16], 3-bit only (else absent)
//   scales     fp32  [N/16, K/G, 16]: scales[b][g][r] scales group g of output row 16b + r
// 2-bit: word w holds codes k = 16w .. 16w+15, code i = k%16 = 2j + p at bit 16p + 2j: even and
// odd codes in the two 16-bit halves, so one 16-bit shift puts a pair (k, k+1) in the low bits of
// both halves (the bf16 pair an AMX tile multiply takes) and one 32-bit shift any one code.
// 3-bit: a chunk of 32 codes c = k%32 fills three words, a = low word 2t, b = low word 2t+1 and
// c = high word t (t = k/32): code c < 30 whole in word c/10 at bit 3(c%10) (+2 in the high word);
// codes 30 and 31 with their low two bits at bits 30-31 of a and b, their third bits at bits 0
// and 1 of the high word. A code's bits side by side: one shift puts it anywhere.
// The unsigned code u = code + 2^(bits-1); weight[n][k] = scale * (u - 2^(bits-1)).
//
// One SIMD lane is one output row (16 per AVX-512 register, 8 per AVX2 register). Shifting the
// rows' words puts one code in each lane's low bits, and one permute turns those bits into the
// grid level through a small table that repeats with the code's period (no masking).
// * fp32 path (AVX2+FMA; x widened to fp32): 32-bit lanes, one code per lane per step, FMA with
//   x[m][k] broadcast. The result equals dequantise-then-matmul in fp32 up to the order of the
//   additions.
// * offset path (any activation dtype on AVX-512F, below the AMX row count; the default there):
//   the code's bits placed in the mantissa of 1.0f make the float 1 + u * 2^-e with one bitwise
//   instruction, x comes prescaled by 2^e and each group's sum corrected by a per-row constant
//   (gemm_block_512: faster than a table lookup, a little less precise).
// * pair-table path (one row of 2-bit codes on AVX-512F, batch-1 decode): x's pair sums
//   x[k] * level + x[k + 2] * level' in 16-entry fp32 tables built once per call, looked up by
//   each nibble of two codes (gemv_blocks_lut_512): one shift, permute and add per two weights.
// * AMX path (bf16 activations, 3 rows or more, CPUs with AMX tiles): the codes unpacked to bf16
//   levels, pairs (k, k+1) in the two 16-bit halves of a lane, stored as a 16 x 32 bf16 weight
//   tile per 32 inputs, and one tile multiply (tdpbf16ps) for up to 16 rows: the unpacking is paid
//   once per weight instead of once per four rows. Beyond 16 rows, each block is unpacked once into
//   a per-thread buffer, its scales applied and rounded to bf16 (the numbers of lowbit_dense_mm's
//   rebuilt weight), and multiplied by every 32 rows (then 16) two blocks at a time, the bf16
//   results written straight from the tiles: prefill included.
// Sums run per group in several independent accumulators (FMA latency), then are scaled by the
// 16 output rows' scales into the total.
//
// ISA: chosen per call from the CPU (GSQ_VLLM_CPU_ISA=avx2 forces the AVX2 path, =avx512 AVX-512F
// without the bf16 instructions (dense_mm's GEMM in fp32), =avx512-bf16 no AMX, =none no path at
// all; for tests); the Python side refuses CPUs with neither AVX-512F nor AVX2+FMA. The AMX path
// also asks for AVX512_VBMI (every AMX CPU has it).

#include <torch/library.h>
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cpuid.h>
#include <sys/syscall.h>
#include <unistd.h>

#include <cstdint>
#include <cstdlib>
#include <cmath>
#include <cstring>
#include <tuple>
#include <mutex>
#include <string>
#include <utility>

// AMX intrinsics: GCC 11+ and clang 12+ (the set-up's compiler has them; another one builds without)
#if (defined(__clang__) && __clang_major__ >= 12) || (!defined(__clang__) && defined(__GNUC__) && __GNUC__ >= 11)
#define GSQ_BUILD_AMX 1
#else
#define GSQ_BUILD_AMX 0
#endif

namespace {

enum class Isa { kNone = 0, kAvx2 = 1, kAvx512 = 2, kAvx512Bf16 = 3, kAmx = 4 };

// AMX tiles with bf16 (CPUID.7.0:EDX bits 22 and 24), and the kernel's permission for this process
// to use the tile registers (Linux 5.16+ asks for it once; a refusal means no AMX, not an error).
bool amx_usable() {
  static const bool usable = [] {
    unsigned eax, ebx, ecx, edx;
    if (!GSQ_BUILD_AMX || !__get_cpuid_count(7, 0, &eax, &ebx, &ecx, &edx)) return false;
    if (!((edx >> 22) & 1) || !((edx >> 24) & 1) || !((ecx >> 1) & 1)) return false;  // + AVX512_VBMI
    return syscall(SYS_arch_prctl, 0x1023 /* ARCH_REQ_XCOMP_PERM */, 18 /* XFEATURE_XTILEDATA */) == 0;
  }();
  return usable;
}

Isa detect_isa() {
  __builtin_cpu_init();
  bool avx512 = __builtin_cpu_supports("avx512f");
  bool bf16 = avx512 && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512bf16");
  bool avx2 = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  bool amx = bf16;  // checked last: asking for the permission is a system call
  if (const char* forced = std::getenv("GSQ_VLLM_CPU_ISA")) {
    if (std::strcmp(forced, "avx512-bf16") == 0) amx = false;
    if (std::strcmp(forced, "avx512") == 0) amx = bf16 = false;
    if (std::strcmp(forced, "avx2") == 0) amx = avx512 = bf16 = false;
    if (std::strcmp(forced, "none") == 0) amx = avx512 = bf16 = avx2 = false;
  }
  amx = amx && amx_usable();
  return amx ? Isa::kAmx : bf16 ? Isa::kAvx512Bf16 : avx512 ? Isa::kAvx512 : avx2 ? Isa::kAvx2 : Isa::kNone;
}

const char* isa_name(Isa isa) {
  switch (isa) {
    case Isa::kAmx: return "amx";
    case Isa::kAvx512Bf16: return "avx512-bf16";
    case Isa::kAvx512: return "avx512";
    case Isa::kAvx2: return "avx2";
    default: return "none";
  }
}

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

// The cpu layout's bit positions (planes.py). 2-bit: slot s = 2j + p of a 16-code word.
constexpr int low_shift(int s) { return 16 * (s % 2) + 2 * (s / 2); }
// 3-bit: code c < 30 of a chunk sits whole in word c / 10 (a, b, high) from this bit
constexpr int code3_bit(int c) { return 3 * (c % 10) + (c >= 20 ? 2 : 0); }

// Rows of x per pass over a block of the weight (AVX2 has 16 registers, AVX-512 32), and
// independent accumulators per row: 8 in all, enough to hide the FMA latency.
// AVX2 by width: 3-bit codes in the previous layout cost seven instructions to decode, which 8 rows
// shared (AVX2 cap, 8 rows of 1536^2: 0.33 ms with 4 rows a pass, 0.29 ms with 8); at 2 bits 8 rows
// are 3-5% slower than 4 (registers run out). Today's 3-bit codes decode in two, as 2-bit ones do;
// the 8 rows a pass were not measured again.
constexpr int kRows512 = 4;
constexpr int kRows256 = 8;  // the most rows_256 gives
constexpr int rows_256(int bits) { return bits == 3 ? 8 : 4; }
constexpr int chains(int rows) { return 8 / rows; }
// How far ahead (in 16-lane words of the low plane) the GEMM that reads codes as floats prefetches
constexpr int kPrefetchWords = 16;
// From this many rows of bf16 x on, AMX tiles beat decoding in registers (one 4096^2 2-bit layer,
// one core, against a bf16 dot-product path slower than today's codes read as floats: 1 row
// 0.53 ms vs 0.73 ms with tiles, 2 rows 0.80 vs 0.78 ms,
// 8 rows 2.75 vs 0.92 ms)
constexpr int kAmxMinRows = 3;
// Blocks of 16 outputs unpacked at a time for many rows: about 1 MiB of bf16, which stays in L2
inline int64_t unpacked_batch(int64_t K) { return std::max<int64_t>(1, (int64_t(1) << 20) / (K * 16 * 2)); }

// Levels of a code, repeated with the code's period over the permute's index bits.
template <int BITS>
constexpr float level(int index) { return BITS == 2 ? float((index & 3) - 2) : float((index & 7) - 4); }

// ------------------------------------------------------------------------------------ AVX-512

#pragma GCC push_options
#pragma GCC target("avx512f")  // everything down to pop_options, lambdas included

template <int BITS>
inline __m512 table_512() {
  alignas(64) float values[16];
  for (int i = 0; i < 16; ++i) values[i] = level<BITS>(i);
  return _mm512_load_ps(values);
}

template <int S>
GSQ_INLINE __m512i shift_512(__m512i v) {  // v << S (S < 0: a logical right shift by -S)
  if constexpr (S > 0) return _mm512_slli_epi32(v, S);
  else if constexpr (S < 0) return _mm512_srli_epi32(v, -S);
  else return v;
}

// Code C (0-31) of a 32-code chunk in the low bits of each lane (anything above them), from the
// chunk's words: w0, w1 from the low plane, hi from the high plane (3-bit).
template <int BITS, int C>
GSQ_INLINE __m512i code_index_512(__m512i w0, __m512i w1, __m512i hi) {
  if constexpr (BITS == 2) return shift_512<-low_shift(C % 16)>(C < 16 ? w0 : w1);
  else if constexpr (C < 30) return shift_512<-code3_bit(C)>(C < 10 ? w0 : C < 20 ? w1 : hi);
  else if constexpr (C == 30) return _mm512_or_si512(_mm512_srli_epi32(w0, 30), _mm512_slli_epi32(hi, 2));
  else return _mm512_ternarylogic_epi32(_mm512_srli_epi32(w1, 30), _mm512_slli_epi32(hi, 1), _mm512_set1_epi32(4), 0xF8);
}

// The 16 rows' levels of code C of a chunk
template <int BITS, int C>
GSQ_INLINE __m512 level_512(__m512i w0, __m512i w1, __m512i hi, __m512 table) {
  return _mm512_permutexvar_ps(code_index_512<BITS, C>(w0, w1, hi), table);  // uses the index's low 4 bits
}

// ---- codes read as floats (AVX-512F, any activation dtype widened to fp32)
// A code u in mantissa bits b .. b+bits-1 of 1.0f reads as the float 1 + u * 2^(b-23): one bitwise
// instruction ((view & mask) | 1.0f, vpternlogd) makes 16 rows' values of a code, where the table
// path spends a shift and a permute. Each code is read from one of a few shifted views of its word:
// 2-bit, four views per 16 codes, b in {15, 17, 19, 21}; 3-bit, four views per 10 codes, b in
// {14, 17, 20} (a chunk's codes 30 and 31, split over two words, take two instructions more each).
// x comes prescaled, xs[k] = x[k] * 2^(23 - b) (exact), so value * xs = xs + u x, and each group's
// sum is corrected once per row by corr = the group's sum of (xs + 2^(bits-1) x): what remains is
// the sum of (u - 2^(bits-1)) x, the level times x. The price is precision: the fp32 sums carry
// terms up to 2^8 (2-bit) or 2^9 (3-bit) times the products they stand for, so their rounding
// error is about that much above the table path's (2-bit, random bf16 x, K = 8192: max error 1e-5
// of max |y|, 0.6% of bf16 outputs one unit off the exact product's rounding; exactly
// representable inputs stay exact).
// Why: on Sapphire Rapids-class cores vdpbf16ps issues once per two cycles and the fp32 FMA twice
// per cycle, so FMAs fed by one bitwise instruction per 16 weights beat both a bf16 dot-product
// path and the table path below the tiles' row count (8192^2, 2 cores, one row: 2-bit 0.80 ms vs
// 1.06 ms with vdpbf16ps; 3-bit, one core, codes in L2: 40 vs 27 G weights/s against vdpbf16ps on
// the previous 3-bit layout, whose third bits sat in a plane of their own).
constexpr int offset_view(int s) { return low_shift(s) / 8; }  // 2-bit: code bits 0-6, 8-14, 16-22, 24-30
constexpr int kOffsetViewShift[4] = {15, 7, -1, -9};               // left shift of each view (< 0: right)
constexpr int offset_bit(int s) { return low_shift(s) + kOffsetViewShift[offset_view(s)]; }
// 3-bit: view v of word w (a, b, high), shifted left by this, has its codes 3v .. 3v+2 at bits 14, 17, 20
constexpr int offset_view_shift3(int w, int v) { return 14 - 9 * v - (w == 2 ? 2 : 0); }
constexpr int offset_bit3(int c) { return c < 30 ? 14 + 3 * (c % 10 % 3) : 14; }
// The mantissa bit where code c of a 32-code chunk is read
template <int BITS>
constexpr int offset_bit_of(int c) { return BITS == 2 ? offset_bit(c % 16) : offset_bit3(c); }

// The 32 codes of a chunk read as floats: f(code C as an integral constant, its 16 rows' values).
template <int BITS, typename F>
GSQ_INLINE void offset_values_512(__m512i w0, __m512i w1, __m512i hi, F&& f) {
  const __m512i one = _mm512_set1_epi32(0x3F800000);
  auto read = [&](__m512i view, auto c) {
    const __m512i mask = _mm512_set1_epi32(((1 << BITS) - 1) << offset_bit_of<BITS>(c));
    f(c, _mm512_castsi512_ps(_mm512_ternarylogic_epi32(view, one, mask, 0xEC)));  // (view & mask) | one
  };
  if constexpr (BITS == 2) {
    const __m512i words[2] = {w0, w1};
    unroll<2>([&](auto h) {
      __m512i views[4];
      unroll<4>([&](auto v) { views[v] = shift_512<kOffsetViewShift[v]>(words[h]); });
      unroll<16>([&](auto s) { read(views[offset_view(s)], std::integral_constant<int, 16 * h + s>{}); });
    });
  } else {
    const __m512i words[3] = {w0, w1, hi};
    unroll<3>([&](auto w) {
      __m512i views[4];
      unroll<4>([&](auto v) { views[v] = shift_512<offset_view_shift3(w, v)>(words[w]); });
      unroll<10>([&](auto i) { read(views[i / 3], std::integral_constant<int, 10 * w + i>{}); });
    });
    // code 30: bits 30-31 of a to 14-15, bit 0 of the high word to 16; code 31 likewise from b and bit 1
    read(_mm512_or_si512(_mm512_srli_epi32(w0, 16), _mm512_slli_epi32(hi, 16)), std::integral_constant<int, 30>{});
    read(_mm512_ternarylogic_epi32(_mm512_srli_epi32(w1, 16), _mm512_slli_epi32(hi, 15), _mm512_set1_epi32(3 << 14), 0xE4),
         std::integral_constant<int, 31>{});  // bits 14-15 from b, the others from the high word
  }
}

// y[m][n0:n0+16] for ROWS rows of prescaled fp32 x, the whole K: codes read as floats, each
// group's sum corrected by corr [rows, K/group] (see above).
template <int BITS, int ROWS>
void gemm_block_512(const float* x, int64_t ldx, int64_t K, const int32_t* low, const int32_t* high,
                    const float* scales, int64_t N, int64_t group, float* y, int64_t ldy, int64_t n0,
                    const float* corr, int64_t ldc) {
  constexpr int CH = chains(ROWS);
  __m512 total[ROWS];
  for (int r = 0; r < ROWS; ++r) total[r] = _mm512_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 sum[ROWS][CH];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < CH; ++c) sum[r][c] = _mm512_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      // the codes 1 KiB ahead (8192^2, 2 cores, 3-bit on vdpbf16ps: 1.24 ms vs 1.38 ms without)
      _mm_prefetch(reinterpret_cast<const char*>(low + (k / 16 + kPrefetchWords) * 16), _MM_HINT_T0);
      _mm_prefetch(reinterpret_cast<const char*>(low + (k / 16 + kPrefetchWords + 1) * 16), _MM_HINT_T0);
      if (BITS == 3) _mm_prefetch(reinterpret_cast<const char*>(high + (k / 32 + kPrefetchWords / 2) * 16), _MM_HINT_T0);
      const __m512i w0 = _mm512_loadu_si512(low + (k / 16) * 16), w1 = _mm512_loadu_si512(low + (k / 16 + 1) * 16);
      const __m512i hi = BITS == 3 ? _mm512_loadu_si512(high + (k / 32) * 16) : _mm512_setzero_si512();
      const float* xk = x + k;
      offset_values_512<BITS>(w0, w1, hi, [&](auto c, __m512 value) {
        for (int r = 0; r < ROWS; ++r)
          sum[r][c % CH] = _mm512_fmadd_ps(value, _mm512_set1_ps(xk[r * ldx + c]), sum[r][c % CH]);
      });
    }
    const __m512 scale = _mm512_loadu_ps(scales + g * 16);
    for (int r = 0; r < ROWS; ++r) {
      __m512 acc = sum[r][0];
      for (int c = 1; c < CH; ++c) acc = _mm512_add_ps(acc, sum[r][c]);
      acc = _mm512_sub_ps(acc, _mm512_set1_ps(corr[r * ldc + g]));
      total[r] = _mm512_fmadd_ps(acc, scale, total[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm512_storeu_ps(y + r * ldy + n0, total[r]);
}

// ---- one row of 2-bit codes through tables of pair sums (AVX-512F)
// One row of x leaves the path above instruction-bound (a bitwise instruction and an FMA per 16
// weights, both on the two vector ports: 37 G weights/s on one core, codes in L2). Here the two
// codes of each 4-bit nibble of a word, (k, k + 2), look up x[k] * level + x[k + 2] * level' in a
// 16-entry fp32 table built once per call from x: one shift, one permute and one add per two
// weights (48-52 G weights/s there), and the sums are plain fp32 (no offset, no correction).
// Nibble j holds slots lut_slot(j) and lut_slot(j) + 2 of its word: bits 4j and 4j + 2 (even slots,
// low half) or 16 + 4(j - 4) and 18 + 4(j - 4) (odd slots, high half) of the cpu layout.
// Each table (64 bytes) serves kLutBlocks blocks, read side by side: a table per block, read from L2
// for every 64 bytes of codes, crowded out the codes' own reads from memory, and tables kept in L1
// by passes over chunks of K broke the codes' streams. Each block's prefetch runs on into the block
// it is followed by in the next pass. Against the path above, same process, turns in random order,
// 2 cores, one row, a decode step's 2-bit layers fresh from memory each call: 1B shapes (16 layers)
// 16.2 ms against 18.4, 8B shapes (6 layers) 18.1 against 26.0 (1.13x, 1.43x).
constexpr int lut_slot(int j) { return j < 4 ? 4 * j : 4 * (j - 4) + 1; }
constexpr int64_t kLutBlocks = 4;
constexpr int64_t kLutPrefetchWords = 48;  // 3 KiB ahead in each block (16 or 96: 3-8% slower)

// tables [K/16 words][8 nibbles][16]: entry u + 4v of nibble j = x[k] (u - 2) + x[k + 2] (v - 2)
// with k = 16w + lut_slot(j)
void build_pair_tables_512(const float* x, int64_t K, float* tables) {
  alignas(64) float first[16], second[16];
  for (int i = 0; i < 16; ++i) first[i] = float((i & 3) - 2), second[i] = float((i >> 2) - 2);
  const __m512 a = _mm512_load_ps(first), b = _mm512_load_ps(second);
  for (int64_t w = 0; w < K / 16; ++w) {
    unroll<8>([&](auto j) {
      const float* xk = x + 16 * w + lut_slot(j);
      const __m512 t = _mm512_fmadd_ps(_mm512_set1_ps(xk[2]), b, _mm512_mul_ps(_mm512_set1_ps(xk[0]), a));
      _mm512_store_ps(tables + (8 * w + j) * 16, t);
    });
  }
}

// y[16b:16b+16] = one row's sums for BLOCKS consecutive blocks (b0, b0 + 1, ...), each table
// loaded once for all of them
template <int BLOCKS>
void gemv_blocks_lut_512(const float* tables, int64_t K, const int32_t* low, const float* scales, int64_t group,
                         float* y) {
  __m512 total[BLOCKS];
  for (int b = 0; b < BLOCKS; ++b) total[b] = _mm512_setzero_ps();
  constexpr int CH = BLOCKS >= 4 ? 1 : 4 / BLOCKS;  // independent sums per block
  for (int64_t g = 0; g < K / group; ++g) {
    __m512 sum[BLOCKS][CH];
    for (int b = 0; b < BLOCKS; ++b)
      for (int c = 0; c < CH; ++c) sum[b][c] = _mm512_setzero_ps();
    for (int64_t w = g * group / 16; w < (g + 1) * group / 16; ++w) {
      __m512i word[BLOCKS];
      // ahead in each block, then into the block it is followed by in the next pass (BLOCKS on)
      const int64_t ahead = w + kLutPrefetchWords, past = ahead >= K / 16 ? BLOCKS * K - K : 0;
      for (int b = 0; b < BLOCKS; ++b) {
        _mm_prefetch(reinterpret_cast<const char*>(low + b * K + past + ahead * 16), _MM_HINT_T0);
        word[b] = _mm512_loadu_si512(low + b * K + w * 16);
      }
      const float* tw = tables + w * 8 * 16;
      unroll<8>([&](auto j) {
        const __m512 table = _mm512_load_ps(tw + 16 * j);
        for (int b = 0; b < BLOCKS; ++b)
          sum[b][j % CH] = _mm512_add_ps(sum[b][j % CH], _mm512_permutexvar_ps(shift_512<-4 * int(j)>(word[b]), table));
      });
    }
    for (int b = 0; b < BLOCKS; ++b) {
      __m512 acc = sum[b][0];
      for (int c = 1; c < CH; ++c) acc = _mm512_add_ps(acc, sum[b][c]);
      total[b] = _mm512_fmadd_ps(acc, _mm512_loadu_ps(scales + b * (K / group) * 16 + g * 16), total[b]);
    }
  }
  for (int b = 0; b < BLOCKS; ++b) _mm512_storeu_ps(y + 16 * b, total[b]);
}

GSQ_INLINE __m256i to_bf16_512(__m512 value) {  // round to nearest even (finite values only)
  __m512i bits = _mm512_castps_si512(value);
  const __m512i odd = _mm512_and_si512(_mm512_srli_epi32(bits, 16), _mm512_set1_epi32(1));
  bits = _mm512_srli_epi32(_mm512_add_epi32(bits, _mm512_add_epi32(odd, _mm512_set1_epi32(0x7FFF))), 16);
  return _mm512_cvtepi32_epi16(bits);
}

// wt[k0:k0+32][n0:n0+16*BLOCKS] = scale * level, fp32 or bf16, for BLOCKS consecutive blocks of 16
// outputs (block stride: K words of the low plane, K/2 of the high one, K/group*16 scales). Two
// blocks of bf16 make one whole 64-byte line per row: no partially written lines.
template <int BITS, bool BF16, int BLOCKS>
void dequantize_chunk_512(int64_t k0, const int32_t* low, const int32_t* high, const float* scales,
                          int64_t K, int64_t group, int64_t N, void* out, int64_t n0) {
  const __m512 table = table_512<BITS>();
  __m512 scale[BLOCKS];
  __m512i w0[BLOCKS], w1[BLOCKS], hi[BLOCKS];
  for (int b = 0; b < BLOCKS; ++b) {
    scale[b] = _mm512_loadu_ps(scales + b * (K / group) * 16 + (k0 / group) * 16);
    w0[b] = _mm512_loadu_si512(low + b * K + (k0 / 16) * 16);
    w1[b] = _mm512_loadu_si512(low + b * K + (k0 / 16 + 1) * 16);
    hi[b] = BITS == 3 ? _mm512_loadu_si512(high + b * (K / 2) + (k0 / 32) * 16) : _mm512_setzero_si512();
  }
  unroll<32>([&](auto c) {
    const int64_t row = k0 + c;
    __m512 value[BLOCKS];
    for (int b = 0; b < BLOCKS; ++b) value[b] = _mm512_mul_ps(level_512<BITS, c>(w0[b], w1[b], hi[b], table), scale[b]);
    if constexpr (BF16 && BLOCKS == 2) {
      const __m512i both = _mm512_inserti64x4(_mm512_castsi256_si512(to_bf16_512(value[0])), to_bf16_512(value[1]), 1);
      _mm512_storeu_si512(static_cast<uint16_t*>(out) + row * N + n0, both);
    } else if constexpr (BF16) {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(static_cast<uint16_t*>(out) + row * N + n0), to_bf16_512(value[0]));
    } else {
      for (int b = 0; b < BLOCKS; ++b) _mm512_storeu_ps(static_cast<float*>(out) + row * N + n0 + 16 * b, value[b]);
    }
  });
}

#pragma GCC pop_options

// ------------------------------------- bf16 code pairs (for the AMX tiles: AMX CPUs have AVX512_VBMI)

#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vbmi")

// Pairs of codes (k, k+1) as bf16 levels in the two 16-bit halves of each lane (the VNNI order a
// tile multiply reads), 16 rows in the lanes, through one vpermw (which reads 5 index bits) per
// pair and a 32-entry table. 2-bit: a 16-bit shift puts pairs (k, k+1) and (k+2, k+3) in the low
// bits of both halves; SLOT 0's table reads bits 0-1, SLOT 1's bits 2-3, so one shift serves two
// pairs. 3-bit: one table for every pair, repeating every 8 (the bits above a code are ignored).
template <int BITS, int SLOT>
inline __m512i pair_table_bf16() {
  alignas(64) uint16_t values[32];
  for (int i = 0; i < 32; ++i) {
    const int code = BITS == 3 ? (i & 7) : SLOT == 0 ? (i & 3) : ((i >> 2) & 3);
    const float v = level<BITS>(code);
    uint32_t bits;
    std::memcpy(&bits, &v, 4);
    values[i] = uint16_t(bits >> 16);  // small integers are exact in bf16
  }
  return _mm512_load_si512(values);
}

struct PairTables {
  __m512i even, odd;  // 3-bit: the same table twice
};

template <int BITS>
inline PairTables pair_tables_bf16() {
  return {pair_table_bf16<BITS, 0>(), pair_table_bf16<BITS, 1>()};
}

// 3-bit pair P (codes 2P, 2P+1 of a chunk): code 2P in bits 0-2 of each lane's low half, code 2P+1
// in bits 16-18 (anything above them): one vpmultishiftqb, which copies the byte at any bit offset
// of a 64-bit word (two lanes) to each byte.
template <int P>
GSQ_INLINE __m512i pair_index_3bit(__m512i w0, __m512i w1, __m512i hi) {
  if constexpr (P < 15) {
    constexpr int64_t bit = code3_bit(2 * P);  // code 2P+1 sits three bits above code 2P
    constexpr int64_t offsets = bit | (bit + 3) << 16 | (bit + 32) << 32 | (bit + 35) << 48;
    return _mm512_multishift_epi64_epi8(_mm512_set1_epi64(offsets), 2 * P < 10 ? w0 : 2 * P < 20 ? w1 : hi);
  } else {  // codes 30 and 31: low bits from a and b, third bits from bits 0 and 1 of the high word
    const __m512i even = _mm512_or_si512(_mm512_srli_epi32(w0, 30), _mm512_slli_epi32(hi, 2));
    const __m512i odd = _mm512_ternarylogic_epi32(_mm512_srli_epi32(w1, 14), _mm512_slli_epi32(hi, 17),
                                                  _mm512_set1_epi32(3 << 16), 0xE4);  // bits 16-17 from b
    return _mm512_mask_blend_epi16(0xAAAAAAAA, even, odd);
  }
}

// The 16 bf16 pairs of the 32-code chunk at k of a block, stored as w[pair][16 rows x 2]: the
// weight tile a tile multiply reads. (It stores rather than hand each pair to a callback: a lambda
// from the AMX functions, compiled for more instruction sets, could not be inlined here.)
template <int BITS>
GSQ_INLINE void unpack_chunk(int64_t k, const int32_t* low, const int32_t* high, const PairTables& t, uint16_t* w) {
  auto f = [&](auto p, __m512i levels) { _mm512_store_si512(w + p * 32, levels); };
  const __m512i w0 = _mm512_loadu_si512(low + (k / 16) * 16), w1 = _mm512_loadu_si512(low + (k / 16 + 1) * 16);
  if constexpr (BITS == 2) {
    const __m512i words[2] = {w0, w1};
    unroll<2>([&](auto h) {
      unroll<4>([&](auto q) {  // pairs 8h + 2q and 8h + 2q + 1
        const __m512i index = q ? _mm512_srli_epi16(words[h], 4 * q) : words[h];
        f(std::integral_constant<int, 8 * h + 2 * q>{}, _mm512_permutexvar_epi16(index, t.even));
        f(std::integral_constant<int, 8 * h + 2 * q + 1>{}, _mm512_permutexvar_epi16(index, t.odd));
      });
    });
  } else {
    const __m512i hi = _mm512_loadu_si512(high + (k / 32) * 16);
    unroll<16>([&](auto p) { f(p, _mm512_permutexvar_epi16(pair_index_3bit<p>(w0, w1, hi), t.even)); });
  }
}

#pragma GCC pop_options

// --------------------------------------------------------------------------------------- AVX2

#pragma GCC push_options
#pragma GCC target("avx2,fma")

template <int BITS>
inline __m256 table_256() {
  alignas(32) float values[8];
  for (int i = 0; i < 8; ++i) values[i] = level<BITS>(i);
  return _mm256_load_ps(values);
}

template <int S>
GSQ_INLINE __m256i shift_256(__m256i v) {  // v << S (S < 0: a logical right shift by -S)
  if constexpr (S > 0) return _mm256_slli_epi32(v, S);
  else if constexpr (S < 0) return _mm256_srli_epi32(v, -S);
  else return v;
}

// The 8 rows' levels of code C of a chunk (see code_index_512)
template <int BITS, int C>
GSQ_INLINE __m256 level_256(__m256i w0, __m256i w1, __m256i hi, __m256 table) {
  __m256i index;
  if constexpr (BITS == 2) index = shift_256<-low_shift(C % 16)>(C < 16 ? w0 : w1);
  else if constexpr (C < 30) index = shift_256<-code3_bit(C)>(C < 10 ? w0 : C < 20 ? w1 : hi);
  else if constexpr (C == 30) index = _mm256_or_si256(_mm256_srli_epi32(w0, 30), _mm256_slli_epi32(hi, 2));
  else index = _mm256_or_si256(_mm256_srli_epi32(w1, 30), _mm256_and_si256(_mm256_slli_epi32(hi, 1), _mm256_set1_epi32(4)));
  return _mm256_permutevar8x32_ps(table, index);  // uses the index's low 3 bits
}

// The chunk at k0 of a half block (8 lanes): its three words (the high one zero at 2 bits)
GSQ_INLINE void chunk_words_256(int64_t k0, const int32_t* low, const int32_t* high, __m256i& w0, __m256i& w1, __m256i& hi) {
  w0 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + (k0 / 16) * 16));
  w1 = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(low + (k0 / 16 + 1) * 16));
  hi = high ? _mm256_loadu_si256(reinterpret_cast<const __m256i*>(high + (k0 / 32) * 16)) : _mm256_setzero_si256();
}

template <int BITS, int ROWS>
void gemm_block_256(const float* x, int64_t ldx, int64_t K, const int32_t* low, const int32_t* high,
                    const float* scales, int64_t N, int64_t group, float* y, int64_t ldy, int64_t n0) {
  constexpr int CH = chains(ROWS);
  const __m256 table = table_256<BITS>();
  __m256 total[ROWS];
  for (int r = 0; r < ROWS; ++r) total[r] = _mm256_setzero_ps();
  for (int64_t g = 0; g < K / group; ++g) {
    __m256 sum[ROWS][CH];
    for (int r = 0; r < ROWS; ++r)
      for (int c = 0; c < CH; ++c) sum[r][c] = _mm256_setzero_ps();
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      __m256i w0, w1, hi;
      chunk_words_256(k, low, BITS == 3 ? high : nullptr, w0, w1, hi);
      const float* xk = x + k;
      unroll<32>([&](auto c) {
        const __m256 value = level_256<BITS, c>(w0, w1, hi, table);
        for (int r = 0; r < ROWS; ++r)
          sum[r][c % CH] = _mm256_fmadd_ps(value, _mm256_set1_ps(xk[r * ldx + c]), sum[r][c % CH]);
      });
    }
    const __m256 scale = _mm256_loadu_ps(scales + g * 16);
    for (int r = 0; r < ROWS; ++r) {
      __m256 acc = sum[r][0];
      for (int c = 1; c < CH; ++c) acc = _mm256_add_ps(acc, sum[r][c]);
      total[r] = _mm256_fmadd_ps(acc, scale, total[r]);
    }
  }
  for (int r = 0; r < ROWS; ++r) _mm256_storeu_ps(y + r * ldy + n0, total[r]);
}

// wt[k0:k0+32][n0:n0+8] (half a block: the pointers point at its lanes).
template <int BITS, bool BF16>
void dequantize_chunk_256(int64_t k0, const int32_t* low, const int32_t* high, const float* scales,
                          int64_t N, int64_t group, void* out, int64_t n0) {
  const __m256 table = table_256<BITS>();
  const __m256 scale = _mm256_loadu_ps(scales + (k0 / group) * 16);
  __m256i w0, w1, hi;
  chunk_words_256(k0, low, BITS == 3 ? high : nullptr, w0, w1, hi);
  unroll<32>([&](auto c) {
    const __m256 value = _mm256_mul_ps(level_256<BITS, c>(w0, w1, hi, table), scale);
    const int64_t row = k0 + c;
    if constexpr (BF16) {
      __m256i bits = _mm256_castps_si256(value);
      const __m256i odd = _mm256_and_si256(_mm256_srli_epi32(bits, 16), _mm256_set1_epi32(1));
      bits = _mm256_srli_epi32(_mm256_add_epi32(bits, _mm256_add_epi32(odd, _mm256_set1_epi32(0x7FFF))), 16);
      // 8 dwords -> 8 words: pack within 128-bit lanes, then bring the two lanes' halves together
      const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(bits, bits), 0x08);
      _mm_storeu_si128(reinterpret_cast<__m128i*>(static_cast<uint16_t*>(out) + row * N + n0),
                       _mm256_castsi256_si128(packed));
    } else {
      _mm256_storeu_ps(static_cast<float*>(out) + row * N + n0, value);
    }
  });
}

#pragma GCC pop_options


// ---------------------------------------------------------------------- AMX (bf16 x, 3+ rows)

#if GSQ_BUILD_AMX
#pragma GCC push_options
#pragma GCC target("avx512f,avx512bw,avx512vbmi,avx512bf16,amx-tile,amx-bf16")

// Tiles: 0 and 1 = a group's fp32 sums [rows x 16] (groups in turn), 2 and 3 = x [rows x 32 bf16],
// 4 and 5 = the weight chunk [16 pairs x 16 outputs x 2] (chunks in turn): tiles are not renamed,
// so alternating them lets one chunk's loads start while the previous multiply runs.
struct alignas(64) TileConfig {
  uint8_t palette = 1, start_row = 0, reserved[14] = {};
  uint16_t colsb[16] = {};
  uint8_t rows[16] = {};
};

void load_tile_config(int64_t rows) {
  TileConfig config;
  for (int t = 0; t < 8; ++t) {
    config.rows[t] = uint8_t(t < 4 ? rows : 16);
    config.colsb[t] = 64;
  }
  asm volatile("" : : "r"(&config) : "memory");  // GCC 12 drops the stores: it does not see ldtilecfg read them
  _tile_loadconfig(&config);
}

void release_tiles() { _tile_release(); }

// sums tile C += x[:, k:k+32] (rows of x at xk, stride ldx) @ the unpacked chunk w; T = turn of tiles
template <int C, int T>
GSQ_INLINE void tile_multiply(const uint16_t* xk, int64_t ldx, const uint16_t* w) {
  // GCC's tile intrinsics declare no memory operands: without this barrier it may drop or move the
  // stores above past the tile load that reads them. (They also take literal tile numbers.)
  asm volatile("" : : : "memory");
  if constexpr (T == 0) {
    _tile_loadd(2, xk, ldx * 2);
    _tile_loadd(4, w, 64);
    if constexpr (C == 0) _tile_dpbf16ps(0, 2, 4);
    else _tile_dpbf16ps(1, 2, 4);
  } else {
    _tile_loadd(3, xk, ldx * 2);
    _tile_loadd(5, w, 64);
    if constexpr (C == 0) _tile_dpbf16ps(0, 3, 5);
    else _tile_dpbf16ps(1, 3, 5);
  }
}

// y[0:rows][n0:n0+16] = sum over the groups of scale * (the group's chunks multiplied into a sums
// tile); ``chunk(C, T, k)`` multiplies the 32 inputs from k into sums tile C with tiles of turn T.
// Each group's sums are scaled into the total once the next group's multiplies are issued.
template <typename Chunk>
GSQ_INLINE void amx_groups(int64_t rows, int64_t K, int64_t group, const float* scales, float* y, int64_t ldy,
                           int64_t n0, Chunk&& chunk) {
  alignas(64) float sums[16 * 16];
  __m512 total[16];
  for (int r = 0; r < 16; ++r) total[r] = _mm512_setzero_ps();
  const int64_t groups = K / group;
  auto finish = [&](int64_t g) {
    if (g % 2) _tile_stored(1, sums, 64);
    else _tile_stored(0, sums, 64);
    asm volatile("" : : : "memory");  // the loads below read what the tile store wrote
    const __m512 scale = _mm512_loadu_ps(scales + g * 16);
    for (int64_t r = 0; r < rows; ++r) total[r] = _mm512_fmadd_ps(_mm512_load_ps(sums + 16 * r), scale, total[r]);
  };
  auto run_group = [&](int64_t g, auto c) {
    if constexpr (c == 0) _tile_zero(0);
    else _tile_zero(1);
    for (int64_t k = g * group; k < (g + 1) * group; k += 32) {
      if ((k / 32) % 2) chunk(c, std::integral_constant<int, 1>{}, k);
      else chunk(c, std::integral_constant<int, 0>{}, k);
    }
  };
  for (int64_t g = 0; g < groups; ++g) {
    if (g % 2) run_group(g, std::integral_constant<int, 1>{});
    else run_group(g, std::integral_constant<int, 0>{});
    if (g > 0) finish(g - 1);
  }
  finish(groups - 1);
  for (int64_t r = 0; r < rows; ++r) _mm512_storeu_ps(y + r * ldy + n0, total[r]);
}

// y[0:rows][n0:n0+16] for 3..16 rows of bf16 x (tiles configured for ``rows``): each chunk of
// codes is unpacked right before its multiply, so unpacking and tile work overlap.
template <int BITS>
void gemm_block_amx(const uint16_t* x, int64_t rows, int64_t ldx, int64_t K, const int32_t* low, const int32_t* high,
                    const float* scales, int64_t group, float* y, int64_t ldy, int64_t n0) {
  const PairTables tables = pair_tables_bf16<BITS>();
  alignas(64) uint16_t weight[2][16 * 32];
  amx_groups(rows, K, group, scales, y, ldy, n0, [&](auto c, auto t, int64_t k) {
    unpack_chunk<BITS>(k, low, high, tables, weight[t]);
    tile_multiply<c, t>(x + k, ldx, weight[t]);
  });
}

// The block's whole weight unpacked once into ``out`` (K/32 chunks of 16 x 32 bf16) with its scales
// applied and rounded to bf16, as the dense path rebuilds it: for many rows, where one sums tile
// then runs down all of K.
template <int BITS>
void unpack_block_scaled(int64_t K, int64_t group, const int32_t* low, const int32_t* high, const float* scales,
                         uint16_t* out) {
  const PairTables tables = pair_tables_bf16<BITS>();
  alignas(64) uint16_t order[32];
  for (int i = 0; i < 32; ++i) order[i] = uint16_t(i % 2 ? 16 + i / 2 : i / 2);  // (lo_n, hi_n) pairs
  const __m512i interleave = _mm512_load_si512(order);
  for (int64_t k = 0; k < K; k += 32) {
    uint16_t* w = out + (k / 32) * 512;
    unpack_chunk<BITS>(k, low, high, tables, w);
    const __m512 scale = _mm512_loadu_ps(scales + (k / group) * 16);
    for (int r = 0; r < 16; ++r) {
      const __m512i pair = _mm512_load_si512(w + r * 32);
      const __m512 lo = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_slli_epi32(pair, 16)), scale);
      const __m512 hi = _mm512_mul_ps(_mm512_castsi512_ps(_mm512_and_si512(pair, _mm512_set1_epi32(-65536))), scale);
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(hi, lo);  // lo in elements 0-15, hi in 16-31
      _mm512_store_si512(w + r * 32, _mm512_permutexvar_epi16(interleave, both));
    }
  }
}

// y0, y1 (row strides ldy0, ldy1) = the rows of x times two blocks from
// unpack_block_scaled (w0, w1). A tile multiply's result takes tens of cycles, so one chain of
// multiplies down K waits on itself: two blocks give two independent chains that share each x tile.
// Tiles: 0, 1 = the blocks' sums; 2, 3 = x (chunks in turn); 4, 5 / 6, 7 = the blocks' weights.
GSQ_INLINE void multiply_two_blocks_scaled(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w0,
                                           const uint16_t* w1, float* y0, float* y1, int64_t ldy0,
                                           int64_t ldy1) {
  _tile_zero(0);
  _tile_zero(1);
  for (int64_t k = 0; k < K; k += 64) {
    const int64_t c = (k / 32) * 512;
    _tile_loadd(2, x + k, ldx * 2);
    _tile_loadd(4, w0 + c, 64);
    _tile_loadd(5, w1 + c, 64);
    _tile_dpbf16ps(0, 2, 4);
    _tile_dpbf16ps(1, 2, 5);
    if (k + 32 < K) {
      _tile_loadd(3, x + k + 32, ldx * 2);
      _tile_loadd(6, w0 + c + 512, 64);
      _tile_loadd(7, w1 + c + 512, 64);
      _tile_dpbf16ps(0, 3, 6);
      _tile_dpbf16ps(1, 3, 7);
    }
  }
  _tile_stored(0, y0, ldy0 * 4);
  _tile_stored(1, y1, ldy1 * 4);
  asm volatile("" : : : "memory");
}

// The same for 32 rows of x (x0: rows 0-15, x0 + 16 ldx: rows 16-31) and two blocks: four sums
// tiles, so each x or weight tile loaded feeds two multiplies (four loads per four multiplies
// instead of three per two: the tile loads, not the multiplies, bound the 16-row version).
// Tiles (all 16 rows): 0-3 = sums (rows 0-15 x w0, rows 0-15 x w1, rows 16-31 x w0, 16-31 x w1),
// 4, 5 = the two halves of x, 6, 7 = the two blocks' weights.
GSQ_INLINE void multiply_2x2_blocks_scaled(const uint16_t* x, int64_t ldx, int64_t K, const uint16_t* w0,
                                           const uint16_t* w1, float* y0, float* y1, int64_t ldy0, int64_t ldy1) {
  _tile_zero(0);
  _tile_zero(1);
  _tile_zero(2);
  _tile_zero(3);
  for (int64_t k = 0; k < K; k += 32) {
    const int64_t c = (k / 32) * 512;
    _tile_loadd(4, x + k, ldx * 2);
    _tile_loadd(6, w0 + c, 64);
    _tile_dpbf16ps(0, 4, 6);
    _tile_loadd(5, x + 16 * ldx + k, ldx * 2);
    _tile_dpbf16ps(2, 5, 6);
    _tile_loadd(7, w1 + c, 64);
    _tile_dpbf16ps(1, 4, 7);
    _tile_dpbf16ps(3, 5, 7);
  }
  _tile_stored(0, y0, ldy0 * 4);
  _tile_stored(1, y1, ldy1 * 4);
  _tile_stored(2, y0 + 16 * ldy0, ldy0 * 4);
  _tile_stored(3, y1 + 16 * ldy1, ldy1 * 4);
  asm volatile("" : : : "memory");
}

// rows x cols (16 or 32) fp32 sums from a staging buffer (row stride 32) to the bf16 output,
// rounded to nearest even as Tensor.to(bfloat16) rounds: no fp32 [M, N] result to write, read back
// and convert (for a 512-row prefill of a 576 -> 1536 layer that pass cost as much as a fifth of
// the multiply).
GSQ_INLINE void store_rows_bf16(const float* stage, int64_t rows, int cols, uint16_t* y, int64_t ldy) {
  for (int64_t r = 0; r < rows; ++r) {
    const __m512 lo = _mm512_load_ps(stage + 32 * r);
    if (cols == 32) {
      const __m512i both = (__m512i)_mm512_cvtne2ps_pbh(_mm512_load_ps(stage + 32 * r + 16), lo);
      _mm512_storeu_si512(y + r * ldy, both);
    } else {
      _mm256_storeu_si256(reinterpret_cast<__m256i*>(y + r * ldy), (__m256i)_mm512_cvtneps_pbh(lo));
    }
  }
}

// More than 16 rows: each block is unpacked once (blocks in batches of about 1 MiB of bf16, which
// stay in L2) and multiplied by every pass of 32 rows (then 16), blocks taking the sums tiles in
// pairs; the sums go through a small staging buffer into the bf16 output y.
template <int BITS>
void gemm_many_rows_amx(const uint16_t* x, int64_t M, int64_t K, const int32_t* low, const int32_t* high,
                        const float* scales, int64_t N, int64_t group, uint16_t* y, int64_t begin, int64_t end,
                        uint16_t* unpacked) {
  const int64_t per_block = K * 16, batch = unpacked_batch(K);
  alignas(64) float stage[32 * 32];  // [rows][two blocks' 16 outputs]
  for (int64_t b0 = begin; b0 < end; b0 += batch) {
    const int64_t b1 = std::min(end, b0 + batch);
    for (int64_t b = b0; b < b1; ++b)
      unpack_block_scaled<BITS>(K, group, low + b * K, high ? high + b * (K / 2) : nullptr,
                                scales + b * (K / group) * 16, unpacked + (b - b0) * per_block);
    int64_t configured = 0;
    for (int64_t m = 0; m < M;) {
      const int64_t rows = M - m >= 32 ? 32 : std::min<int64_t>(16, M - m);  // passes of 32 rows, then 16
      const int64_t tile_rows = std::min<int64_t>(16, rows);
      if (tile_rows != configured) {
        load_tile_config(tile_rows);
        configured = tile_rows;
      }
      for (int64_t b = b0; b < b1; b += 2) {  // an odd last block is paired with itself (half stored)
        const bool pair = b + 1 < b1;
        const uint16_t* w0 = unpacked + (b - b0) * per_block;
        const uint16_t* w1 = pair ? w0 + per_block : w0;
        if (rows == 32) multiply_2x2_blocks_scaled(x + m * K, K, K, w0, w1, stage, stage + 16, 32, 32);
        else multiply_two_blocks_scaled(x + m * K, K, K, w0, w1, stage, stage + 16, 32, 32);
        store_rows_bf16(stage, rows, pair ? 32 : 16, y + m * N + 16 * b, N);
      }
      m += rows;
    }
  }
  release_tiles();
}

#pragma GCC pop_options
#else
void load_tile_config(int64_t) {}
void release_tiles() {}
template <int BITS>
void gemm_block_amx(const uint16_t*, int64_t, int64_t, int64_t, const int32_t*, const int32_t*, const float*, int64_t,
                    float*, int64_t, int64_t) {}
template <int BITS>
void gemm_many_rows_amx(const uint16_t*, int64_t, int64_t, const int32_t*, const int32_t*, const float*, int64_t,
                        int64_t, uint16_t*, int64_t, int64_t, uint16_t*) {}
#endif

// ------------------------------------------------------------------------------------ dispatch

// One block of 16 output rows, every row of x, in passes of up to ROWS rows. The plane and scale
// pointers point at the block (blocked layout: 16 words per k-row, see check_planes). On AVX-512,
// x is prescaled for the offset path of gemm_block_512 and corr is its [rows, K/group].
template <int BITS>
void gemm_block(Isa isa, const void* x, int64_t rows, int64_t K, const int32_t* low, const int32_t* high,
                const float* scales, int64_t N, int64_t group, float* y, int64_t n0, const float* corr) {
  const int64_t step = isa == Isa::kAvx2 ? rows_256(BITS) : kRows512;
  for (int64_t m = 0; m < rows; m += step) {
    const int64_t count = std::min<int64_t>(step, rows - m);
    float* ym = y + m * N;
    unroll<std::max(kRows512, kRows256)>([&](auto r) {
      constexpr int R = r + 1;
      if (count != R) return;
      if constexpr (R <= kRows512) {
        if (isa != Isa::kAvx2) {
          gemm_block_512<BITS, R>(static_cast<const float*>(x) + m * K, K, K, low, high, scales, N, group, ym, N, n0,
                                  corr + m * (K / group), K / group);
          return;
        }
      }
      if constexpr (R <= rows_256(BITS)) {
        const float* xm = static_cast<const float*>(x) + m * K;
        gemm_block_256<BITS, R>(xm, K, K, low, high, scales, N, group, ym, N, n0);
        gemm_block_256<BITS, R>(xm, K, K, low + 8, high ? high + 8 : nullptr, scales + 8, N, group, ym, N, n0 + 8);
      }
    });
  }
}

// (xs, corr) for the offset path of gemm_block_512: xs = x * 2^(23 - offset bit of k % 32) (exact),
// corr [M, K/group] = the group's sum of xs + 2^(bits-1) x, summed in double and rounded once.
std::pair<at::Tensor, at::Tensor> prescale_for_offset(const at::Tensor& x, int64_t group, int64_t bits) {
  const int64_t M = x.size(0), K = x.size(1), groups = K / group;
  float factor[32];
  unroll<32>([&](auto c) { factor[c] = std::ldexp(1.0f, 23 - (bits == 2 ? offset_bit_of<2>(c) : offset_bit_of<3>(c))); });
  const double half = double(1 << (bits - 1));
  at::Tensor xs = at::empty({M, K}, x.options().dtype(at::kFloat));
  at::Tensor corr = at::empty({M, groups}, x.options().dtype(at::kFloat));
  const float* xp = x.data_ptr<float>();
  float* sp = xs.data_ptr<float>();
  float* cp = corr.data_ptr<float>();
  for (int64_t m = 0; m < M; ++m) {
    for (int64_t g = 0; g < groups; ++g) {
      double sum = 0.0;
      for (int64_t k = g * group; k < (g + 1) * group; ++k) {
        const float value = xp[m * K + k];
        sp[m * K + k] = value * factor[k % 32];
        sum += double(value) * (double(factor[k % 32]) + half);
      }
      cp[m * groups + g] = float(sum);
    }
  }
  return {xs, corr};
}

// Blocked layout (gsq_vllm/kernels/cpu_lowbit.py): each block of 16 output rows holds its words
// contiguously, so one thread reads its block's codes front to back:
//   low [N/16, K/16, 16] int32, high [N/16, K/32, 16] int32 (3-bit), scales [N/16, K/G, 16] fp32.
void check_planes(const at::Tensor& low, const c10::optional<at::Tensor>& high, const at::Tensor& scales,
                  int64_t bits, int64_t group, int64_t K) {
  TORCH_CHECK(bits == 2 || bits == 3, "gsq_cpu: bits must be 2 or 3, got ", bits);
  TORCH_CHECK(group == 32 || group == 64 || group == 128, "gsq_cpu: group size must be 32, 64 or 128, got ", group);
  TORCH_CHECK(low.dtype() == at::kInt && low.dim() == 3 && low.size(2) == 16 && low.is_contiguous(),
              "gsq_cpu: low_plane must be contiguous int32 [N/16, K/16, 16], got ", low.dtype(), " ", low.sizes());
  const int64_t blocks = low.size(0);
  TORCH_CHECK(K % group == 0 && low.size(1) * 16 == K, "gsq_cpu: low_plane ", low.sizes(), " does not hold K = ", K,
              " in groups of ", group);
  TORCH_CHECK(scales.dtype() == at::kFloat && scales.is_contiguous() && scales.dim() == 3 && scales.size(0) == blocks &&
                  scales.size(1) == K / group && scales.size(2) == 16,
              "gsq_cpu: scales must be contiguous fp32 [N/16, K/group, 16] = [", blocks, ", ", K / group, ", 16], got ",
              scales.dtype(), " ", scales.sizes());
  if (bits == 3) {
    TORCH_CHECK(high.has_value() && high->dtype() == at::kInt && high->is_contiguous() && high->dim() == 3 &&
                    high->size(0) == blocks && high->size(1) * 32 == K && high->size(2) == 16,
                "gsq_cpu: 3-bit weights need a contiguous int32 high_plane [N/16, K/32, 16]");
  } else {
    TORCH_CHECK(!high.has_value(), "gsq_cpu: a high_plane comes with 3-bit weights only");
  }
}

Isa usable_isa() {
  const Isa isa = detect_isa();
  TORCH_CHECK(isa != Isa::kNone, "gsq_cpu: this CPU has neither AVX-512F nor AVX2+FMA");
  return isa;
}

// A per-thread, 64-byte aligned buffer of at least ``count`` values of T (one buffer per T), kept
// between calls (a fresh allocation per call would page-fault on every use).
template <typename T>
T* thread_scratch(int64_t count) {
  struct Buffer {
    T* data = nullptr;
    int64_t size = 0;
    ~Buffer() { std::free(data); }
  };
  thread_local Buffer buffer;
  if (buffer.size < count) {
    std::free(buffer.data);
    const int64_t bytes = (count * int64_t(sizeof(T)) + 63) / 64 * 64;
    buffer.data = static_cast<T*>(std::aligned_alloc(64, bytes));
    TORCH_CHECK(buffer.data != nullptr, "gsq_cpu: out of memory for ", bytes, " bytes of scratch");
    buffer.size = count;
  }
  return buffer.data;
}

at::Tensor lowbit_mm(const at::Tensor& x, const at::Tensor& low, const c10::optional<at::Tensor>& high,
                     const at::Tensor& scales, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "gsq_cpu: x must be 2-D [M, K], got ", x.sizes());
  const int64_t M = x.size(0), K = x.size(1), N = low.size(0) * 16;
  check_planes(low, high, scales, bits, group, K);
  TORCH_CHECK(x.scalar_type() == at::kFloat || x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kHalf,
              "gsq_cpu: x must be fp32, bf16 or fp16, got ", x.scalar_type());
  Isa isa = usable_isa();
  if (isa >= Isa::kAvx512Bf16 && x.scalar_type() != at::kBFloat16) isa = Isa::kAvx512;
  // one row of 2-bit codes on AVX-512: tables of pair sums (gemv_blocks_lut_512)
  const bool lut = isa >= Isa::kAvx512 && bits == 2 && M == 1;
  // AVX-512 below the tiles' row count: codes read as floats (gemm_block_512)
  const bool offset = isa >= Isa::kAvx512 && !lut && !(isa == Isa::kAmx && M >= kAmxMinRows);
  // the tiles read bf16 x as it is; the other paths read fp32 (bf16/fp16 widened, exactly)
  const bool bf16_x = isa >= Isa::kAvx512Bf16 && !offset && !lut;
  at::Tensor xin = bf16_x ? x.contiguous() : x.to(at::kFloat).contiguous();
  at::Tensor corr;
  if (offset) std::tie(xin, corr) = prescale_for_offset(xin, group, bits);
  const float* cp = offset ? corr.data_ptr<float>() : nullptr;
  const void* xp = xin.data_ptr();
  const int32_t* lp = low.data_ptr<int32_t>();
  const int32_t* hp = bits == 3 ? high->data_ptr<int32_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  // a task is a few blocks of 16 output rows: at least ~16 KiB of codes
  const int64_t grain = std::max<int64_t>(1, 16384 * 8 / (16 * bits * std::max<int64_t>(K, 1)));
  if (isa == Isa::kAmx && M > 16) {  // bf16 x (see above): bf16 y straight from the tiles
    at::Tensor out = at::empty({M, N}, x.options());
    uint16_t* op = reinterpret_cast<uint16_t*>(out.data_ptr());
    at::parallel_for(0, N / 16, grain, [&](int64_t begin, int64_t end) {
      const uint16_t* xb = static_cast<const uint16_t*>(xp);
      uint16_t* unpacked = thread_scratch<uint16_t>(std::min(end - begin, unpacked_batch(K)) * K * 16);
      if (bits == 2) gemm_many_rows_amx<2>(xb, M, K, lp, hp, sp, N, group, op, begin, end, unpacked);
      else gemm_many_rows_amx<3>(xb, M, K, lp, hp, sp, N, group, op, begin, end, unpacked);
    });
    return out;
  }
  at::Tensor y = at::empty({M, N}, x.options().dtype(at::kFloat));
  float* yp = y.data_ptr<float>();
  if (lut) {
    float* tables = thread_scratch<float>(K * 8);  // the calling thread's; the workers only read them
    build_pair_tables_512(static_cast<const float*>(xp), K, tables);
    at::parallel_for(0, N / 16, grain, [&](int64_t begin, int64_t end) {
      for (int64_t b = begin; b < end;) {
        const int64_t count = std::min<int64_t>(kLutBlocks, end - b);
        const int32_t* lb = lp + b * K;
        const float* sb = sp + b * (K / group) * 16;
        if (count >= 4) gemv_blocks_lut_512<4>(tables, K, lb, sb, group, yp + 16 * b);
        else if (count >= 2) gemv_blocks_lut_512<2>(tables, K, lb, sb, group, yp + 16 * b);
        else gemv_blocks_lut_512<1>(tables, K, lb, sb, group, yp + 16 * b);
        b += count >= 4 ? 4 : count >= 2 ? 2 : 1;
      }
    });
    return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
  }
  at::parallel_for(0, N / 16, grain, [&](int64_t begin, int64_t end) {
    // here with AMX at most 16 rows: from kAmxMinRows rows on through the tiles, fewer read as floats
    const bool tiles = isa == Isa::kAmx && M >= kAmxMinRows;
    if (tiles) load_tile_config(M);
    for (int64_t b = begin; b < end; ++b) {
      const int32_t* lb = lp + b * K;  // K/16 words of 16 lanes
      const int32_t* hb = hp ? hp + b * (K / 2) : nullptr;
      const float* sb = sp + b * (K / group) * 16;
      if (tiles && bits == 2) {
        gemm_block_amx<2>(static_cast<const uint16_t*>(xp), M, K, K, lb, hb, sb, group, yp, N, 16 * b);
      } else if (tiles) {
        gemm_block_amx<3>(static_cast<const uint16_t*>(xp), M, K, K, lb, hb, sb, group, yp, N, 16 * b);
      } else if (bits == 2) {
        gemm_block<2>(isa, xp, M, K, lb, hb, sb, N, group, yp, 16 * b, cp);
      } else {
        gemm_block<3>(isa, xp, M, K, lb, hb, sb, N, group, yp, 16 * b, cp);
      }
    }
    if (tiles) release_tiles();
  });
  return x.scalar_type() == at::kFloat ? y : y.to(x.scalar_type());
}

// wt [K, N] (fp32 or bf16, contiguous) = the weight, transposed.
void dequantize_into(const at::Tensor& low, const c10::optional<at::Tensor>& high, const at::Tensor& scales,
                     int64_t bits, int64_t group, at::Tensor& out) {
  const int64_t K = low.size(1) * 16, N = low.size(0) * 16;
  const Isa isa = usable_isa();
  const int32_t* lp = low.data_ptr<int32_t>();
  const int32_t* hp = bits == 3 ? high->data_ptr<int32_t>() : nullptr;
  const float* sp = scales.data_ptr<float>();
  void* op = out.data_ptr();
  const bool bf16 = out.scalar_type() == at::kBFloat16;
  // a task is a chunk of 32 input rows across every output: the stores run along whole rows of wt
  // (a block of 16 outputs down all K would store at a power-of-two stride, which thrashes L1)
  const int64_t blocks = N / 16;
  at::parallel_for(0, K / 32, 1, [&](int64_t begin, int64_t end) {
    for (int64_t chunk = begin; chunk < end; ++chunk) {
      const int64_t k0 = 32 * chunk;
      for (int64_t b = 0; b < blocks;) {
        const int32_t* lb = lp + b * K;
        const int32_t* hb = hp ? hp + b * (K / 2) : nullptr;
        const float* sb = sp + b * (K / group) * 16;
        const bool pair = isa != Isa::kAvx2 && bf16 && b + 1 < blocks;
        unroll<4>([&](auto variant) {
          constexpr int B = variant / 2 ? 3 : 2;
          constexpr bool H = variant % 2;
          if (bits != B || bf16 != H) return;
          if (isa == Isa::kAvx2) {
            dequantize_chunk_256<B, H>(k0, lb, hb, sb, N, group, op, 16 * b);
            dequantize_chunk_256<B, H>(k0, lb + 8, hb ? hb + 8 : nullptr, sb + 8, N, group, op, 16 * b + 8);
          } else if (pair) {
            dequantize_chunk_512<B, H, 2>(k0, lb, hb, sb, K, group, N, op, 16 * b);
          } else {
            dequantize_chunk_512<B, H, 1>(k0, lb, hb, sb, K, group, N, op, 16 * b);
          }
        });
        b += pair ? 2 : 1;
      }
    }
  });
}

at::Tensor lowbit_dequantize_t(const at::Tensor& low, const c10::optional<at::Tensor>& high, const at::Tensor& scales,
                               int64_t bits, int64_t group, at::ScalarType dtype) {
  const int64_t K = low.size(1) * 16, N = low.size(0) * 16;
  check_planes(low, high, scales, bits, group, K);
  TORCH_CHECK(dtype == at::kFloat || dtype == at::kBFloat16, "gsq_cpu: dequantise to fp32 or bf16, got ", dtype);
  at::Tensor out = at::empty({K, N}, low.options().dtype(dtype));
  dequantize_into(low, high, scales, bits, group, out);
  return out;
}

// y = x @ wt for many rows: the weight is rebuilt into a scratch buffer kept between calls (a fresh
// allocation of that size costs a page fault per 4 KiB, more than the rebuild itself), then one
// dense GEMM (oneDNN). The buffer never leaves this op, so a compiled graph cannot see it aliased.
at::Tensor lowbit_dense_mm(const at::Tensor& x, const at::Tensor& low, const c10::optional<at::Tensor>& high,
                           const at::Tensor& scales, int64_t bits, int64_t group) {
  TORCH_CHECK(x.dim() == 2, "gsq_cpu: x must be 2-D [M, K], got ", x.sizes());
  const int64_t K = x.size(1), N = low.size(0) * 16;
  check_planes(low, high, scales, bits, group, K);
  // bf16 GEMMs only where the CPU multiplies bf16 natively: elsewhere PyTorch's bf16 fallback is
  // orders of magnitude slower than fp32 (oneDNN capped at AVX2, 128 x 4096 x 4096: 11.5 s vs 20 ms)
  const bool bf16_gemm = x.scalar_type() == at::kBFloat16 && usable_isa() >= Isa::kAvx512Bf16;
  const at::ScalarType dtype = bf16_gemm ? at::kBFloat16 : at::kFloat;
  static std::mutex mutex;
  static at::Tensor scratch;
  std::lock_guard<std::mutex> lock(mutex);
  if (!scratch.defined() || scratch.scalar_type() != dtype || scratch.numel() < K * N) {
    scratch = at::Tensor();  // free the old one first
    scratch = at::empty({K * N}, low.options().dtype(dtype));
  }
  at::Tensor wt = scratch.narrow(0, 0, K * N).view({K, N});
  dequantize_into(low, high, scales, bits, group, wt);
  at::Tensor y = at::mm(x.to(dtype), wt);
  return y.scalar_type() == x.scalar_type() ? y : y.to(x.scalar_type());
}

std::string isa() { return isa_name(detect_isa()); }

}  // namespace

TORCH_LIBRARY(gsq_cpu, m) {
  m.def("lowbit_mm(Tensor x, Tensor low_plane, Tensor? high_plane, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("lowbit_dequantize_t(Tensor low_plane, Tensor? high_plane, Tensor scales, int bits, int group_size, ScalarType dtype) -> Tensor");
  m.def("lowbit_dense_mm(Tensor x, Tensor low_plane, Tensor? high_plane, Tensor scales, int bits, int group_size) -> Tensor");
  m.def("isa() -> str", &isa);
}

TORCH_LIBRARY_IMPL(gsq_cpu, CPU, m) {
  m.impl("lowbit_mm", &lowbit_mm);
  m.impl("lowbit_dequantize_t", &lowbit_dequantize_t);
  m.impl("lowbit_dense_mm", &lowbit_dense_mm);
}
