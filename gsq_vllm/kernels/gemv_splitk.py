"""Decode kernel for one or two rows: split-K GEMV on CUDA cores, fp32 multiply-adds.

At M = 1 a matmul is a stream over the weight, so the only goal is to keep memory busy while
spending as few instructions as possible per code (on an H100 a 2-bit weight arrives faster than
four instructions a code can retire). Each program owns ``BLOCK_N`` output columns and one
``1 / SPLIT_K`` share of K; the shares meet in an fp32 buffer through atomic adds.

Per step it loads ``[BLOCK_K // 16, BLOCK_N]`` low-plane words (N contiguous: whole cache lines,
no repeated loads) and reads each word as two 16-bit halves. Within a half, code ``j`` sits at
bit ``2j`` (``4j`` for 4-bit). Instead of shifting every code down, the kernel leaves it in place
and ORs the half-word into the mantissa of the fp32 ``2**23`` (0x4B000000): the float's value is
then ``2**23 + u * 2**(2j)`` exactly, so one and/or, one subtraction (of ``2**23`` plus the code
offset) and one fused multiply-add with ``x * 2**-(2j)`` handle a code. For 3-bit the high plane's
permuted order (see gsq_vllm.packing) puts each code's third bit at ``2j + 2`` after one shift
per word, so it joins with one more and/or. Scales are applied once per 16 codes.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from gsq_vllm.kernels.reference import reference_from_planes

FLOAT_TWO_POW_23 = tl.constexpr(0x4B000000)  # bits of the fp32 2**23; its mantissa is all zero

# Ampere (A100: 108 SMs, 40 MB L2) and Hopper (H100/H200: 132 SMs, 50 MB L2). Wide BLOCK_N keeps
# loads coalesced; SPLIT_K multiplies the programs so that one row fills every SM.
AMPERE_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, sk, w, s in [
        (64, 128, 4, 2, 2),
        (64, 256, 4, 4, 2),
        (128, 128, 2, 4, 2),
        (128, 128, 4, 4, 3),
        (128, 256, 2, 4, 2),
        (256, 64, 4, 4, 3),
        (256, 128, 2, 8, 2),
        (64, 128, 8, 2, 3),
    ]
]
HOPPER_CONFIGS = [
    triton.Config({"BLOCK_N": bn, "BLOCK_K": bk, "SPLIT_K": sk}, num_warps=w, num_stages=s)
    for bn, bk, sk, w, s in [
        (64, 128, 8, 2, 3),
        (64, 256, 4, 4, 3),
        (128, 128, 4, 4, 3),
        (128, 256, 4, 4, 3),
        (128, 128, 8, 4, 4),
        (256, 128, 4, 8, 3),
        (256, 256, 2, 8, 3),
        (128, 512, 2, 8, 2),
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
    M,
    N,
    K,
    m_bucket,  # only an autotuning key: M rounded up to a power of two
    stride_xm,
    stride_om,
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

    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_valid = offs_n < N
    rows = tl.arange(0, ROWS)
    slots = tl.arange(0, SLOTS)
    slot_shift = slots * LOW_BITS
    low_mask = ((1 << LOW_BITS) - 1) << slot_shift
    high_mask = 4 << slot_shift  # 3-bit: where the third bit lands, two above the low bits
    place = tl.exp2(slot_shift.to(tl.float32))  # 2**shift: the weight of a code left in place
    # float(0x4B000000 | u << shift) - (2**23 + offset * 2**shift) == (u - offset) * 2**shift
    magic_and_offset = 8388608.0 + (1 << (BITS - 1)) * place
    x_unplace = 1.0 / place

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
        scale = tl.load(
            scales_ptr + (row_start // GROUP_SIZE)[:, None] * N + offs_n[None, :],
            mask=tile_valid,
            other=0.0,
        ).to(tl.float32)
        row_sums = tl.zeros([ROWS, BLOCK_N], dtype=tl.float32)
        for half in tl.static_range(2):
            bits = (low_words >> (16 * half))[:, None, :] & low_mask[None, :, None]
            if BITS == 3:
                high_view = high_words << (2 - half)
                bits = bits | (high_view[:, None, :] & high_mask[None, :, None])
            weights = (bits | FLOAT_TWO_POW_23).to(tl.float32, bitcast=True)
            weights = weights - magic_and_offset[None, :, None]
            k_index = row_start[:, None] + half * SLOTS + slots[None, :]
            xs = tl.load(x_row + k_index, mask=row_valid[:, None], other=0.0).to(tl.float32)
            xs = xs * x_unplace[None, :]
            row_sums += tl.sum(weights * xs[:, :, None], axis=1)
        acc += tl.sum(row_sums * scale, axis=0)
    tl.atomic_add(out_ptr + pid_m * stride_om + offs_n, acc, mask=n_valid)


def _tuned_kernels() -> dict:
    return {
        arch: triton.autotune(configs=configs, key=AUTOTUNE_KEY, reset_to_zero=["out_ptr"])(
            gemv_splitk_kernel
        )
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
    out = torch.zeros(M, N, dtype=torch.float32, device=x.device)
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
    meta = dict(BITS=weight.bits, LOW_BITS=weight.low_bits, GROUP_SIZE=weight.group_size)
    if config is None and interpreting():
        config = INTERPRETER_CONFIG
    if config is None:

        def grid(opts):
            return (M, triton.cdiv(N, opts["BLOCK_N"]), opts["SPLIT_K"])

        TUNED[autotune_arch(x.device)][grid](*args, **meta)
    else:
        grid = (M, triton.cdiv(N, config["BLOCK_N"]), config["SPLIT_K"])
        gemv_splitk_kernel[grid](*args, **meta, **config)
    return out.to(x.dtype)


def reference(x: torch.Tensor, weight) -> torch.Tensor:
    """What :func:`gemv_splitk` computes, in plain torch."""
    return reference_from_planes(x, weight)
