"""The integer grids GSQ can target, and how each one is relaxed.

One table for every width (no class per bit width): a grid is its levels, the number of bits it
is stored in, and which logits parameterise it.

* ``full`` relaxation: one logit per grid level (ternary, 2-bit: K = 3 or 4).
* ``local`` relaxation: K = 5 logits for the shifts {-2, -1, 0, +1, +2} around the initial code
  (3- and 4-bit grids are too wide for a logit per level to be cheap); shifts that leave the grid
  are masked out.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

LOCAL_SHIFTS = (-2, -1, 0, 1, 2)


@dataclass(frozen=True)
class Grid:
    name: str
    qmin: int
    qmax: int
    storage_bits: int  # bits per code on disk (ternary is stored as 2-bit)
    relaxation: str  # "full" or "local"

    @property
    def levels(self) -> torch.Tensor:
        return torch.arange(self.qmin, self.qmax + 1, dtype=torch.float32)

    @property
    def num_candidates(self) -> int:
        return self.qmax - self.qmin + 1 if self.relaxation == "full" else len(LOCAL_SHIFTS)

    @property
    def scale_divisor(self) -> float:
        """absmax / scale_divisor is the symmetric round-to-nearest scale (compressed-tensors' rule)."""
        return max(-self.qmin, self.qmax) if self.qmin == -self.qmax else (self.qmax - self.qmin) / 2

    def candidate_values(self, base_codes: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Values each logit stands for, and an additive mask (-inf off the grid) or None.

        Full relaxation: the levels, shape [K]. Local: base code + shift, shape [..., K].
        """
        if self.relaxation == "full":
            return self.levels, None
        if base_codes is None:
            raise ValueError(f"grid {self.name}: local relaxation needs the initial codes")
        shifts = torch.tensor(LOCAL_SHIFTS, dtype=torch.float32, device=base_codes.device)
        values = base_codes.to(torch.float32).unsqueeze(-1) + shifts
        mask = torch.zeros_like(values)
        mask.masked_fill_((values < self.qmin) | (values > self.qmax), float("-inf"))
        return values, mask


GRIDS = {
    "ternary": Grid("ternary", -1, 1, storage_bits=2, relaxation="full"),
    "int2": Grid("int2", -2, 1, storage_bits=2, relaxation="full"),
    "int3": Grid("int3", -4, 3, storage_bits=3, relaxation="local"),
    "int4": Grid("int4", -8, 7, storage_bits=4, relaxation="local"),
}


def get_grid(name_or_bits: str | int) -> Grid:
    """``"ternary"``, ``"int2"``.., or a bit width (2, 3, 4)."""
    key = f"int{name_or_bits}" if isinstance(name_or_bits, int) else str(name_or_bits)
    if key not in GRIDS:
        raise ValueError(
            f"unsupported GSQ grid {name_or_bits!r}: expected ternary or 2, 3, 4 bits ({', '.join(GRIDS)})"
        )
    return GRIDS[key]


def symmetric_scales(weight: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """Round-to-nearest symmetric scales ``[out, in / group_size]``; all-zero groups get a tiny scale, never 0."""
    out_features, in_features = weight.shape
    groups = weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)
    scales = groups.abs().amax(dim=-1) / grid.scale_divisor
    return scales.clamp_min(torch.finfo(torch.float16).tiny)


def quantize_to_grid(weight: torch.Tensor, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest grid codes (int8) of ``weight`` for given per-group scales."""
    group_size = weight.shape[1] // scales.shape[1]
    expanded = scales.repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round(weight.to(torch.float32) / expanded), grid.qmin, grid.qmax).to(torch.int8)


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    group_size = codes.shape[1] // scales.shape[1]
    return codes.to(torch.float32) * scales.to(torch.float32).repeat_interleave(group_size, dim=1)


def rtn_quantize(weight: torch.Tensor, grid: Grid, group_size: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes int8, scales fp32). The ablation baseline and a GPTQ-free init."""
    scales = symmetric_scales(weight, grid, group_size)
    return quantize_to_grid(weight, scales, grid), scales
