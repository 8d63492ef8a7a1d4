"""Pure-torch references for the GSQ kernels: dequantize, then an ordinary matmul.

The kernels must match these up to floating-point rounding; tests and the benchmark's
correctness sweep compare against them. Nothing here needs Triton or a GPU.
"""

from __future__ import annotations

import torch

from gsq_vllm.kernels.planes import unpack_kernel_planes
from gsq_vllm.packing import code_range
from gsq_vllm.weight_format import dequantize


def reference_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(codes, scales).T`` computed in fp32 and rounded to ``x.dtype``; the bias
    is then added in ``x.dtype``, as the kernels' callers (and vLLM) do."""
    if codes.shape[1] != scales.shape[1] * group_size:
        raise ValueError(f"scales {tuple(scales.shape)} and group size {group_size} do not tile codes {tuple(codes.shape)}")
    out = (x.to(torch.float32) @ dequantize(codes, scales).t()).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def reference_from_planes(
    x: torch.Tensor, weight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """The reference computed from a :class:`~gsq_vllm.kernels.GSQPackedWeight` (kernel layout)."""
    codes = unpack_kernel_planes(weight.low_plane, weight.high_plane, weight.bits)
    return reference_matmul(x, codes, weight.scales.t(), weight.group_size, bias)


def exact_problem(
    m: int,
    n: int,
    k: int,
    bits: int,
    group_size: int,
    dtype: torch.dtype,
    seed: int = 0,
    scale_dtype: torch.dtype = torch.float16,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random ``(codes [n, k], scales [n, k // group_size], x [m, k])`` on which a correct kernel
    equals :func:`reference_matmul` bit for bit.

    Scales are powers of two of both signs and activations multiples of 1/8 in [-4, 4], so every
    product and partial sum is exact in fp32 (for k up to a few thousand) whatever the order of
    summation, and the one final rounding to ``dtype`` is the same as the reference's. A single
    misplaced code then shows up as a mismatch instead of hiding in a tolerance.
    """
    gen = torch.Generator().manual_seed(seed)
    low, high = code_range(bits)
    codes = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
    exponents = torch.randint(-5, -1, (n, k // group_size), generator=gen).to(torch.float32)
    signs = torch.randint(0, 2, (n, k // group_size), generator=gen).to(torch.float32) * 2 - 1
    scales = (signs * torch.exp2(exponents)).to(scale_dtype)
    x = (torch.randint(-32, 33, (m, k), generator=gen).to(torch.float32) / 8).to(dtype)
    return codes, scales, x
