"""Tensor-core kernel (``tl.dot``): tiled GEMM for prefill and split-K for small batches.

Each program loads the packed words of a ``[BLOCK_K, BLOCK_N]`` weight tile once (aligned, N
contiguous), repeats each word for its codes in registers, shifts the codes out and turns them
into fp16/bf16 without an int-to-float conversion (the code is OR-ed into the mantissa of 1024.0
or 128.0, then the base is subtracted). Times the group's scale, the tile goes with a
``[BLOCK_M, BLOCK_K]`` activation tile to ``tl.dot`` (wgmma on Hopper, mma on Ampere) with an
fp32 accumulator. The same kernel serves 3 <= M <= 16 with ``BLOCK_M = 16`` and ``SPLIT_K > 1``:
there the weight stream dominates and split-K gives enough programs to fill the GPU; the shares
then meet in an fp32 buffer through atomic adds.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl



def _configs(shapes) -> list:
    return [
        triton.Config(
            {"BLOCK_M": bm, "BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk, "GROUP_M": 8},
            num_warps=w,
            num_stages=s,
        )
        for bm, bn, bk, sk, w, s in shapes
    ]


# Prefill: big tiles for tensor-core throughput. Hopper has 228 KB of shared memory per SM,
# Ampere (A100) 164 KB, so Hopper takes the 128x256 tiles and deeper pipelines.
PREFILL_CONFIGS = {
    "ampere": _configs(
        [
            (128, 128, 32, 1, 4, 4),
            (128, 128, 64, 1, 8, 3),
            (64, 128, 64, 1, 4, 4),
            (128, 64, 64, 1, 4, 4),
            (64, 64, 64, 1, 4, 3),
        ]
    ),
    "hopper": _configs(
        [
            (128, 256, 64, 1, 8, 3),
            (128, 128, 64, 1, 8, 4),
            (128, 128, 64, 1, 4, 4),
            (64, 256, 64, 1, 4, 4),
            (64, 128, 64, 1, 4, 4),
            (128, 128, 128, 1, 8, 3),
        ]
    ),
}
# Small batches (3..16 rows): one 16-row tile; the work is spread over N and K instead.
SPLITK_CONFIGS = {
    "ampere": _configs(
        [
            (16, 64, 128, 4, 4, 3),
            (16, 128, 128, 4, 4, 3),
            (16, 64, 64, 8, 4, 4),
            (16, 128, 64, 2, 4, 4),
            (16, 256, 64, 2, 8, 3),
        ]
    ),
    "hopper": _configs(
        [
            (16, 64, 128, 4, 4, 4),
            (16, 128, 128, 4, 4, 4),
            (16, 64, 128, 8, 4, 4),
            (16, 128, 64, 8, 4, 4),
            (16, 256, 128, 2, 8, 3),
        ]
    ),
}
# Fixed configurations for the interpreter, where autotuning would only cost time.
INTERPRETER_CONFIGS = {
    "prefill": {"BLOCK_M": 32, "BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 1, "GROUP_M": 4},
    "splitk": {"BLOCK_M": 16, "BLOCK_N": 32, "BLOCK_K": 32, "SPLIT_K": 2, "GROUP_M": 1},
}
AUTOTUNE_KEY = ["m_bucket", "N", "K", "BITS", "GROUP_SIZE"]


@triton.jit
def _repeat_rows(tile, REPEAT: tl.constexpr):
    """``[R, C]`` -> ``[R * REPEAT, C]``, each row repeated ``REPEAT`` times in a row."""
    rows: tl.constexpr = tile.shape[0]
    cols: tl.constexpr = tile.shape[1]
    repeated = tl.broadcast_to(tile[:, None, :], (rows, REPEAT, cols))
    return tl.reshape(repeated, (rows * REPEAT, cols))


@triton.jit
def _codes_as_float(unsigned, dtype: tl.constexpr, OFFSET: tl.constexpr):
    """Unsigned codes (< 256) -> signed codes in fp16/bf16 without an int-to-float conversion:
    OR-ed into the mantissa of 1024.0 (fp16) or 128.0 (bf16), then the float minus that base and
    the code offset is the signed code, exactly."""
    if dtype == tl.float16:
        as_float = (unsigned | 0x6400).to(tl.int16).to(tl.float16, bitcast=True)
        return as_float - (1024.0 + OFFSET)
    else:
        as_float = (unsigned | 0x4300).to(tl.int16).to(tl.bfloat16, bitcast=True)
        return as_float - (128.0 + OFFSET)


@triton.jit
def gemm_kernel(
    x_ptr,
    low_ptr,
    high_ptr,
    scales_ptr,
    out_ptr,
    M,
    N,
    K,
    m_bucket,  # only an autotuning key: M rounded up to a power of two
    stride_xm,
    stride_om,
    BITS: tl.constexpr,
    LOW_BITS: tl.constexpr,  # bits per code in the low plane: 2 (2- and 3-bit weights) or 4
    GROUP_SIZE: tl.constexpr,
    DOT_IN_FP32: tl.constexpr,  # the interpreter's bf16 tl.dot is wrong; it gets fp32 operands
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):
    # Programs sweep GROUP_M row tiles per column tile so that weight tiles are reused from L2.
    pid = tl.program_id(0)
    pid_k = tl.program_id(1)
    tiles_m = tl.cdiv(M, BLOCK_M)
    tiles_n = tl.cdiv(N, BLOCK_N)
    band = GROUP_M * tiles_n
    first_m = (pid // band) * GROUP_M
    band_rows = tl.minimum(tiles_m - first_m, GROUP_M)
    pid_m = first_m + (pid % band) % band_rows
    pid_n = (pid % band) // band_rows

    WORD_CODES: tl.constexpr = 32 // LOW_BITS
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_k = tl.arange(0, BLOCK_K)
    low_rows = tl.arange(0, BLOCK_K // WORD_CODES)
    high_rows = tl.arange(0, BLOCK_K // 32)
    m_valid = offs_m < M
    n_valid = offs_n < N
    low_shift = ((offs_k % WORD_CODES) * LOW_BITS)[:, None]
    slot = offs_k % 32  # 3-bit: position in the high-plane word's permuted order
    high_shift = (16 * (slot // 16) + 2 * (slot % 8) + (slot % 16) // 8)[:, None]

    steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        k = k0 + offs_k
        a = tl.load(
            x_ptr + offs_m[:, None] * stride_xm + k[None, :],
            mask=m_valid[:, None] & (k < K)[None, :],
            other=0.0,
        )
        # Load each packed word once ([BLOCK_K // codes_per_word, BLOCK_N]), then repeat it for
        # its codes in registers: loading it once per code would also repeat it in the shared
        # memory that the software pipeline stages loads through.
        low_row = k0 // WORD_CODES + low_rows
        low = tl.load(
            low_ptr + low_row[:, None] * N + offs_n[None, :],
            mask=(low_row * WORD_CODES < K)[:, None] & n_valid[None, :],
            other=0,
        )
        unsigned = (_repeat_rows(low, WORD_CODES) >> low_shift) & ((1 << LOW_BITS) - 1)
        if BITS == 3:
            high_row = k0 // 32 + high_rows
            high = tl.load(
                high_ptr + high_row[:, None] * N + offs_n[None, :],
                mask=(high_row * 32 < K)[:, None] & n_valid[None, :],
                other=0,
            )
            unsigned = unsigned | (((_repeat_rows(high, 32) >> high_shift) & 1) << 2)
        if BLOCK_K <= GROUP_SIZE:  # the whole step lies in one group: one scale per column
            scale = tl.load(scales_ptr + (k0 // GROUP_SIZE) * N + offs_n, mask=n_valid, other=0.0)
            scale = scale[None, :]
        else:
            group = k0 // GROUP_SIZE + tl.arange(0, BLOCK_K // GROUP_SIZE)
            scale = tl.load(
                scales_ptr + group[:, None] * N + offs_n[None, :],
                mask=(group * GROUP_SIZE < K)[:, None] & n_valid[None, :],
                other=0.0,
            )
            scale = _repeat_rows(scale, GROUP_SIZE)
        if DOT_IN_FP32:
            weight = (unsigned - (1 << (BITS - 1))).to(tl.float32) * scale.to(tl.float32)
            acc = tl.dot(a.to(tl.float32), weight, acc, input_precision="ieee")
        else:
            codes = _codes_as_float(unsigned, a.dtype, 1 << (BITS - 1))
            acc = tl.dot(a, codes * scale.to(a.dtype), acc)
    out = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :]
    out_valid = m_valid[:, None] & n_valid[None, :]
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=out_valid)
    else:
        tl.atomic_add(out, acc, mask=out_valid)


def _tuned_kernels() -> dict:
    tuned = {}
    for arch in ("ampere", "hopper"):
        tuned["prefill", arch] = triton.autotune(
            configs=PREFILL_CONFIGS[arch], key=AUTOTUNE_KEY
        )(gemm_kernel)
        tuned["splitk", arch] = triton.autotune(
            configs=SPLITK_CONFIGS[arch], key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"]
        )(gemm_kernel)
    return tuned


TUNED = _tuned_kernels()


def gemm(
    x: torch.Tensor, weight, split_k: bool = False, config: dict | None = None
) -> torch.Tensor:
    """``x [M, K]`` (contiguous, fp16/bf16) times the packed weight -> ``[M, N]`` in ``x.dtype``.

    ``split_k=False``: the prefill tiling, written straight to the output. ``split_k=True``: the
    small-batch variant, which accumulates in an fp32 buffer. ``config`` (BLOCK_M, BLOCK_N,
    BLOCK_K, SPLIT_K, GROUP_M, num_warps, num_stages) skips autotuning; its SPLIT_K must be 1
    unless ``split_k`` is set.
    """
    from gsq_vllm.kernels.common import autotune_arch, interpreting, m_bucket

    M, K = x.shape
    N = weight.out_features
    variant = "splitk" if split_k else "prefill"
    if config is None and interpreting():
        config = INTERPRETER_CONFIGS[variant]
    if config is not None and config["SPLIT_K"] > 1 and not split_k:
        raise ValueError("a SPLIT_K > 1 configuration needs split_k=True (an fp32 buffer)")
    # The interpreter rounds fp32 -> bf16 inside a kernel wrongly, so there torch casts instead.
    interpreted_bf16 = interpreting() and x.dtype == torch.bfloat16
    if split_k:
        out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
    else:
        out_dtype = torch.float32 if interpreted_bf16 else x.dtype
        out = torch.empty(M, N, dtype=out_dtype, device=x.device)
    args = (
        x,
        weight.low_plane,
        weight.high_plane if weight.high_plane is not None else weight.low_plane,
        weight.scales,
        out,
        M,
        N,
        K,
        m_bucket(M),
        x.stride(0),
        out.stride(0),
    )
    meta = dict(
        BITS=weight.bits,
        LOW_BITS=weight.low_bits,
        GROUP_SIZE=weight.group_size,
        DOT_IN_FP32=interpreted_bf16,
    )

    def grid(opts):
        tiles = triton.cdiv(M, opts["BLOCK_M"]) * triton.cdiv(N, opts["BLOCK_N"])
        return (tiles, opts["SPLIT_K"])

    if config is None:
        TUNED[variant, autotune_arch(x.device)][grid](*args, **meta)
    else:
        gemm_kernel[grid(config)](*args, **meta, **config)
    return out.to(x.dtype)
