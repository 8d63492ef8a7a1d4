"""GPTQ on a GSQ grid: the start GSQ trains from, in plain torch.

GPTQ (Frantar et al. 2022) rounds one input column at a time and spreads each column's rounding
error over the columns not yet rounded, weighted by the inverse calibration Hessian. Ours differs
from a generic int-scheme GPTQ in two ways that matter for GSQ:

* it rounds onto the GSQ grid itself (ternary included), so the error of every clamp is fed
  back; rounding on the int2 grid and clamping to {-1, 0, 1} afterwards would leave it
  uncompensated;
* the per-group scales are given (and may be negative: see :func:`gsq_vllm.gsq.grids.full_range_scales`),
  so the codes and the scales GSQ starts from belong together exactly.

``act_order`` quantizes columns by decreasing Hessian diagonal while the groups stay contiguous
in the original column order (what llmcompressor calls ``actorder: static``), so the output is an
ordinary group-wise checkpoint with no ``g_idx``.
"""

from __future__ import annotations

import torch

from gsq_vllm.gsq.grids import Grid

__all__ = ["accumulate_hessian", "gptq_quantize", "damped_hessian"]


def accumulate_hessian(hessian: torch.Tensor | None, inputs: torch.Tensor) -> torch.Tensor:
    """Add ``X^T X`` of a batch of Linear inputs ``[..., in]`` to a running fp32 sum (or start one)."""
    x = inputs.detach().reshape(-1, inputs.shape[-1]).to(torch.float32)
    update = x.T @ x
    return update if hessian is None else hessian.add_(update.to(hessian.device))


def damped_hessian(hessian: torch.Tensor, dampening: float) -> torch.Tensor:
    """``H + dampening * mean(diag H) * I`` (fp32 copy); inputs that were always zero get a unit diagonal."""
    if dampening < 0:
        raise ValueError(f"dampening must be >= 0, got {dampening}")
    hessian = hessian.to(torch.float32).clone()
    diag = torch.diagonal(hessian)
    diag[diag == 0] = 1.0
    diag.add_(dampening * diag.mean())
    return hessian


def gptq_quantize(
    weight: torch.Tensor,
    hessian: torch.Tensor,
    scales: torch.Tensor,
    grid: Grid,
    *,
    dampening: float = 0.01,
    block_size: int = 128,
    act_order: bool = True,
) -> torch.Tensor:
    """GPTQ codes (int8, ``[out, in]``) of ``weight`` on ``grid`` for fixed per-group ``scales``.

    ``hessian`` is the (unnormalised or normalised) calibration Hessian ``X^T X`` of the layer's
    inputs; ``dampening`` is the fraction of its mean diagonal added before factorising
    (0 is honoured: a singular Hessian then raises).
    """
    out_features, in_features = weight.shape
    if hessian.shape != (in_features, in_features):
        raise ValueError(f"Hessian {tuple(hessian.shape)} does not match a weight with {in_features} input features")
    if in_features % scales.shape[1] or scales.shape[0] != out_features:
        raise ValueError(f"scales {tuple(scales.shape)} do not tile a weight of shape {tuple(weight.shape)}")
    group_size = in_features // scales.shape[1]
    work = weight.detach().to(torch.float32).clone()
    h = damped_hessian(hessian, dampening)
    work[:, torch.diagonal(hessian) == 0] = 0.0  # inputs that never fire: nothing to reproduce
    column_scales = scales.detach().to(torch.float32).repeat_interleave(group_size, dim=1)
    order = torch.argsort(torch.diagonal(h), descending=True) if act_order else torch.arange(in_features)
    work, column_scales, h = work[:, order], column_scales[:, order], h[order][:, order]
    factor, info = torch.linalg.cholesky_ex(h)
    if info.item() != 0:
        raise ValueError("the calibration Hessian is not positive definite at this dampening; raise dampening")
    # upper Cholesky factor of H^-1: row i holds the error-propagation weights of column i
    inverse = torch.linalg.cholesky(torch.cholesky_inverse(factor), upper=True)
    codes = torch.empty_like(work)
    for start in range(0, in_features, block_size):
        stop = min(start + block_size, in_features)
        block = work[:, start:stop].clone()
        errors = torch.empty_like(block)
        block_inverse = inverse[start:stop, start:stop]
        for i in range(stop - start):
            column, scale = block[:, i], column_scales[:, start + i]
            code = torch.clamp(torch.round(column / scale), grid.qmin, grid.qmax)
            codes[:, start + i] = code
            error = (column - code * scale) / block_inverse[i, i]
            block[:, i:] -= error[:, None] * block_inverse[i, i:][None, :]
            errors[:, i] = error
        work[:, stop:] -= errors @ inverse[start:stop, stop:]
    restored = torch.empty_like(codes)
    restored[:, order] = codes
    return restored.to(torch.int8)
