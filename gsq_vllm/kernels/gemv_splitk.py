"""Decode kernel for one or two rows: split-K GEMV on CUDA cores, fp32 multiply-adds.

At M = 1 a matmul is a stream over the weight, so the goal is to keep memory busy while
spending as few instructions as possible per code: on an H100 a 2-bit weight arrives about as
fast as four instructions a code can retire. Each program owns ``BLOCK_N`` output columns (4 to
8 adjacent ones per thread) and one ``1 / SPLIT_K`` share of K; the shares add up in an fp32
scratch that belongs to the weight, and the last share to arrive writes the output and zeroes
the scratch again: one kernel launch per call, nothing to fill or cast around it.

Per step it loads ``[BLOCK_K // 16, BLOCK_N]`` low-plane words (N contiguous: 16-byte loads,
nothing loaded twice) and reads each word as two 16-bit halves. Within a half, code ``j`` sits
at bit ``2j`` (``4j`` for 4-bit). Rather than shifting every code down and converting it, the
kernel leaves it in place and ORs it into the mantissa of the fp32 ``2**23`` (0x4B000000): the
float is then exactly ``2**23 + u * 2**(2j)``. Per code that is one and (mask and magic as one
immediate), one subtraction of ``2**23 + offset * 2**(2j)`` and one fused multiply-add with
``x * 2**-(2j)``, unrolled over the slots so every constant is an immediate. For 3-bit the high
plane's permuted order (see gsq_vllm.packing) puts each code's third bit at ``2j + 2`` after one
shift per word; even and odd slots then each get one merged view, so 3-bit costs one more
and/or per two codes. Scales are applied once per step (or per word when a step spans groups).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl


FLOAT_TWO_POW_23 = tl.constexpr(0x4B000000)  # bits of the fp32 2**23; its mantissa is all zero

# (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages). Each thread owns 4 to 8 adjacent columns
# (BLOCK_N = 128 to 256 per warp): 16-byte loads, and every activation it loads serves 4 to 8
# codes. SPLIT_K multiplies the programs so that one row keeps every SM busy (A100: 108 SMs,
# H100/H200: 132); the compiled inner loop costs about 4 instructions per 2-bit code.
AMPERE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, sk, w, s in [
        (512, 64, 8, 2, 3),
        (512, 64, 16, 2, 3),
        (1024, 64, 8, 4, 3),
        (512, 128, 8, 4, 2),
        (256, 128, 8, 2, 3),
        (256, 64, 16, 1, 3),
    ]
]
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, sk, w, s in [
        (1024, 64, 8, 4, 3),
        (1024, 64, 16, 4, 3),
        (512, 64, 16, 2, 3),
        (512, 64, 32, 2, 4),
        (512, 128, 8, 4, 3),
        (256, 128, 16, 2, 3),
        (256, 64, 32, 1, 4),
        (1024, 128, 4, 8, 3),
    ]
]
# One small fixed configuration for the interpreter, where autotuning would only cost time.
INTERPRETER_CONFIG = {"BLOCK_N": 32, "BLOCK_K": 64, "SPLIT_K": 2, "num_warps": 4, "num_stages": 1}
AUTOTUNE_KEY = ["m_bucket", "N", "K", "BITS", "GROUP_SIZE"]


@triton.jit
def gemv_splitk_kernel(
    x_ptr,
    low_ptr,
    high_ptr,
    scales_ptr,
    out_ptr,
    partial_ptr,  # fp32 [>= M, N], all zero between calls: where the K shares add up
    arrivals_ptr,  # int32 [>= M * cdiv(N, BLOCK_N)], all zero between calls (BLOCK_N >= 16)
    M,
    N,
    K,
    m_bucket,  # only an autotuning key: M rounded up to a power of two
    stride_xm,
    stride_om,
    magic,  # FLOAT_TWO_POW_23 at run time: one register, not a constant rebuilt at every use
    BITS: tl.constexpr,
    LOW_BITS: tl.constexpr,  # bits per code in the low plane: 2 (2- and 3-bit weights) or 4
    GROUP_SIZE: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    SPLIT_K: tl.constexpr,
):
    pid_m = tl.program_id(0)  # fastest: the rows of one weight tile run side by side (L2 reuse)
    pid_n = tl.program_id(1)
    pid_k = tl.program_id(2)
    SLOTS: tl.constexpr = 16 // LOW_BITS  # codes in one 16-bit half of a low-plane word
    WORD_CODES: tl.constexpr = 2 * SLOTS
    ROWS: tl.constexpr = BLOCK_K // WORD_CODES  # low-plane words per column per step
    CODE_OFFSET: tl.constexpr = 1 << (BITS - 1)

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    rows = tl.arange(0, ROWS)
    steps = tl.cdiv(K, BLOCK_K)
    steps_per_split = tl.cdiv(steps, SPLIT_K)
    k_begin = pid_k * steps_per_split * BLOCK_K
    k_end = tl.minimum(k_begin + steps_per_split * BLOCK_K, K)
    x_row = x_ptr + pid_m * stride_xm
    acc = tl.zeros([BLOCK_N], dtype=tl.float32)
    for k0 in range(k_begin, k_end, BLOCK_K):
        row_start = k0 + rows * WORD_CODES  # first code of each low-plane word
        row_valid = row_start < K
        tile_valid = row_valid[:, None] & n_valid[None, :]
        low_words = tl.load(
            low_ptr + (row_start // WORD_CODES)[:, None] * N + offs_n[None, :],
            mask=tile_valid,
            other=0,
        )
        if BITS == 3:
            # one high-plane word serves two low-plane words: the word's parity picks the half
            high_words = tl.load(
                high_ptr + (row_start // 32)[:, None] * N + offs_n[None, :],
                mask=tile_valid,
                other=0,
            )
            high_words = high_words >> ((rows % 2) * 16)[:, None]
        # Unrolled over the codes of a word, so that masks and offsets are immediates and each
        # code costs one and/or, one subtraction and one fused multiply-add into row_sums.
        row_sums = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for half in tl.static_range(2):
            # (v | MAGIC) & (MAGIC | mask) == MAGIC | (v & mask): one and, with an immediate
            low_view = (low_words >> (16 * half)) | magic
            if BITS == 3:
                # The third bit of slot j sits at 2j + 2, on the next slot's low bits; even and
                # odd slots do not overlap, so each gets one view holding all three bits.
                high_view = high_words << (2 - half)
                even_view = (low_view & (FLOAT_TWO_POW_23 | 0x3333)) | (high_view & 0x4444)
                odd_view = (low_view & (FLOAT_TWO_POW_23 | 0xCCCC)) | (high_view & 0x11110)
            for slot in tl.static_range(SLOTS):
                if BITS == 3:
                    if slot % 2 == 0:
                        bits = even_view & (FLOAT_TWO_POW_23 | (7 << (2 * slot)))
                    else:
                        bits = odd_view & (FLOAT_TWO_POW_23 | (7 << (2 * slot)))
                else:
                    mask = ((1 << LOW_BITS) - 1) << (slot * LOW_BITS)
                    bits = low_view & (FLOAT_TWO_POW_23 | mask)
                # float(2**23 + u * 2**shift) - (2**23 + offset * 2**shift) = code * 2**shift
                weight = bits.to(tl.float32, bitcast=True)
                weight = weight - (8388608.0 + CODE_OFFSET * (1 << (slot * LOW_BITS)))
                x_k = tl.load(x_row + row_start + (half * SLOTS + slot), mask=row_valid, other=0.0)
                x_k = x_k.to(tl.float32) * (1.0 / (1 << (slot * LOW_BITS)))
                row_sums += weight * x_k[:, None]
        if BLOCK_K <= GROUP_SIZE:  # the whole step lies in one group: one scale per column
            scale = tl.load(scales_ptr + (k0 // GROUP_SIZE) * N + offs_n, mask=n_valid, other=0.0)
            acc += tl.sum(row_sums, axis=0) * scale.to(tl.float32)
        else:  # one scale per (word, column); words never straddle groups
            scale = tl.load(
                scales_ptr + (row_start // GROUP_SIZE)[:, None] * N + offs_n[None, :],
                mask=tile_valid,
                other=0.0,
            )
            acc += tl.sum(row_sums * scale.to(tl.float32), axis=0)
    out = out_ptr + pid_m * stride_om + offs_n
    if SPLIT_K == 1:
        tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=n_valid)
    else:
        # The last share to arrive writes the output and leaves the scratch zeroed for the next
        # call, so no separate zero-fill or cast kernel runs (they would cost as much as this
        # kernel at M = 1). The barrier and the acq_rel counter order every thread's adds before
        # the count; the last program reads the sums from L2 (.cg).
        partial = partial_ptr + pid_m * N + offs_n
        tl.atomic_add(partial, acc, mask=n_valid, sem="relaxed")
        tl.debug_barrier()
        arrivals = arrivals_ptr + pid_m * tl.num_programs(1) + pid_n
        if tl.atomic_add(arrivals, 1, sem="acq_rel") == SPLIT_K - 1:
            total = tl.load(partial, mask=n_valid, other=0.0, cache_modifier=".cg")
            tl.store(out, total.to(out_ptr.dtype.element_ty), mask=n_valid)
            tl.store(partial, tl.zeros_like(total), mask=n_valid)
            tl.atomic_xchg(arrivals, 0, sem="relaxed")


def _tuned_kernels() -> dict:
    return {
        arch: triton.autotune(configs=configs, key=AUTOTUNE_KEY)(gemv_splitk_kernel)
        for arch, configs in (("ampere", AMPERE_CONFIGS), ("hopper", HOPPER_CONFIGS))
    }


TUNED = _tuned_kernels()


def gemv_splitk(x: torch.Tensor, weight, config: dict | None = None) -> torch.Tensor:
    """``x [M, K]`` (contiguous, fp16/bf16) times the packed weight -> ``[M, N]`` in ``x.dtype``.

    ``config`` (BLOCK_N, BLOCK_K, SPLIT_K, num_warps, num_stages) skips autotuning; by default the
    interpreter runs :data:`INTERPRETER_CONFIG` and a GPU autotunes for its architecture.
    """
    from gsq_vllm.kernels.common import autotune_arch, interpreting, m_bucket

    M, K = x.shape
    N = weight.out_features
    # The interpreter rounds fp32 -> bf16 inside a kernel wrongly, so there torch casts instead.
    interpreted_bf16 = interpreting() and x.dtype == torch.bfloat16
    out = torch.empty(M, N, dtype=torch.float32 if interpreted_bf16 else x.dtype, device=x.device)
    scratch = weight.split_k_scratch
    if scratch is not None and M <= scratch[0].shape[0]:
        partial, arrivals = scratch
    else:  # none kept with the weight, or too few rows: a fresh one (one zero-fill more)
        partial = torch.zeros(M, N, dtype=torch.float32, device=x.device)
        arrivals = torch.zeros(M * triton.cdiv(N, 16), dtype=torch.int32, device=x.device)
    args = (
        x,
        weight.low_plane,
        weight.high_plane if weight.high_plane is not None else weight.low_plane,
        weight.scales,
        out,
        partial,
        arrivals,
        M,
        N,
        K,
        m_bucket(M),
        x.stride(0),
        out.stride(0),
        FLOAT_TWO_POW_23.value,
    )
    meta = dict(
        BITS=weight.bits,
        LOW_BITS=weight.low_bits,
        GROUP_SIZE=weight.group_size,
        enable_fp_fusion=True,  # one FFMA per code; Triton 3.10 stops fusing by default
    )
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is not None and config["BLOCK_N"] < 16:
        raise ValueError("BLOCK_N must be at least 16 (the split-K counters are sized for it)")
    if config is None:

        def grid(opts):
            return (M, triton.cdiv(N, opts["BLOCK_N"]), opts["SPLIT_K"])

        TUNED[autotune_arch(x.device)][grid](*args, **meta)
    else:
        grid = (M, triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        gemv_splitk_kernel[grid](*args, **meta, **config)
    return out.to(x.dtype)
