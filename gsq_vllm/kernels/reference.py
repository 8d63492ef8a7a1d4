"""Pure-torch references for the GSQ kernels: dequantize, then an ordinary matmul.

The kernels must match these up to floating-point rounding; tests and the benchmark's
correctness sweep compare against them. Nothing here needs Triton or a GPU.
"""

from __future__ import annotations

import torch

from gsq_vllm.packing import unpack_kernel_planes


def dequantize(codes: torch.Tensor, scales: torch.Tensor, group_size: int) -> torch.Tensor:
    """Signed codes ``[N, K]`` and scales ``[N, K // group_size]`` -> fp32 weight ``[N, K]``."""
    return codes.to(torch.float32) * scales.to(torch.float32).repeat_interleave(group_size, dim=1)


def reference_matmul(
    x: torch.Tensor,
    codes: torch.Tensor,
    scales: torch.Tensor,
    group_size: int,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ dequantize(codes, scales).T`` computed in fp32 and rounded to ``x.dtype``; the bias
    is then added in ``x.dtype``, as the kernels' callers (and vLLM) do."""
    out = (x.to(torch.float32) @ dequantize(codes, scales, group_size).t()).to(x.dtype)
    return out if bias is None else out + bias.to(x.dtype)


def reference_from_planes(x: torch.Tensor, weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    """The reference computed from a :class:`~gsq_vllm.kernels.GSQPackedWeight` (kernel layout)."""
    codes = unpack_kernel_planes(weight.low_plane, weight.high_plane, weight.bits)
    return reference_matmul(x, codes, weight.scales.t(), weight.group_size, bias)
