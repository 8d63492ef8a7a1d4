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

from gsq_vllm.weight_format import code_range
from gsq_vllm.weight_format import dequantize  # noqa: F401  (re-exported: the one dequantisation)

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
    def candidate_offsets(self) -> tuple[int, ...]:
        """What each logit stands for: a level (full) or a shift added to the initial code (local)."""
        return tuple(range(self.qmin, self.qmax + 1)) if self.relaxation == "full" else LOCAL_SHIFTS

    @property
    def num_candidates(self) -> int:
        return len(self.candidate_offsets)

    @property
    def scale_divisor(self) -> float:
        """absmax / scale_divisor is the symmetric round-to-nearest scale (compressed-tensors' rule)."""
        return max(-self.qmin, self.qmax) if self.qmin == -self.qmax else (self.qmax - self.qmin) / 2


GRIDS = {
    "ternary": Grid("ternary", -1, 1, storage_bits=2, relaxation="full"),
    "int2": Grid("int2", *code_range(2), storage_bits=2, relaxation="full"),
    "int3": Grid("int3", *code_range(3), storage_bits=3, relaxation="local"),
    "int4": Grid("int4", *code_range(4), storage_bits=4, relaxation="local"),
}


def get_grid(name_or_bits: str | int) -> Grid:
    """``"ternary"``, ``"int2"``.., or a bit width (2, 3, 4)."""
    key = f"int{name_or_bits}" if isinstance(name_or_bits, int) else str(name_or_bits)
    if key not in GRIDS:
        raise ValueError(
            f"unsupported GSQ grid {name_or_bits!r}: expected ternary or 2, 3, 4 bits ({', '.join(GRIDS)})"
        )
    return GRIDS[key]


SCALE_RULES = ("full_range", "symmetric")


def symmetric_scales(weight: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """compressed-tensors' symmetric rule: ``absmax / scale_divisor``, ``[out, in / group_size]``.

    On the asymmetric int grids this clips: the grid spans ``[qmin * s, qmax * s]`` with
    ``qmax * s < absmax`` (2-bit: a group whose largest weight is positive reaches only 0.67 of it).
    All-zero groups get a tiny scale, never 0.
    """
    groups = _groups(weight, group_size)
    scales = groups.abs().amax(dim=-1) / grid.scale_divisor
    return scales.clamp_min(torch.finfo(torch.float16).tiny)


def full_range_scales(weight: torch.Tensor, grid: Grid, group_size: int) -> torch.Tensor:
    """Signed scales that put each group's largest-magnitude weight exactly on the grid's wide end.

    On the asymmetric grids (one more negative level than positive) the scale takes the sign that
    maps that weight to ``qmin``: negative when it is positive. Nothing is clipped, and the extra
    level sits on the side of the group's largest outlier. Symmetric grids (ternary) get
    ``absmax / qmax``. Magnitudes are at least fp16's smallest normal number.
    """
    groups = _groups(weight, group_size)
    extreme = groups.gather(-1, groups.abs().argmax(dim=-1, keepdim=True)).squeeze(-1)
    if grid.qmin == -grid.qmax:
        scales = extreme.abs() / grid.qmax
    else:
        scales = extreme / grid.qmin
    tiny = torch.finfo(torch.float16).tiny
    return torch.where(scales.abs() < tiny, torch.full_like(scales, tiny), scales)


def initial_scales(weight: torch.Tensor, grid: Grid, group_size: int, rule: str = "full_range") -> torch.Tensor:
    """Per-group scales by ``rule``: ``full_range`` (default, signed) or ``symmetric`` (compressed-tensors')."""
    if rule == "full_range":
        return full_range_scales(weight, grid, group_size)
    if rule == "symmetric":
        return symmetric_scales(weight, grid, group_size)
    raise ValueError(f"unknown scale rule {rule!r}; expected one of {SCALE_RULES}")


def _groups(weight: torch.Tensor, group_size: int) -> torch.Tensor:
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"group size {group_size} does not divide the {in_features} input features")
    return weight.detach().to(torch.float32).reshape(out_features, in_features // group_size, group_size)


def quantize_to_grid(weight: torch.Tensor, scales: torch.Tensor, grid: Grid) -> torch.Tensor:
    """Nearest grid codes (int8) of ``weight`` for given per-group scales."""
    group_size = weight.shape[1] // scales.shape[1]
    expanded = scales.repeat_interleave(group_size, dim=1)
    return torch.clamp(torch.round(weight.to(torch.float32) / expanded), grid.qmin, grid.qmax).to(torch.int8)


def rtn_quantize(
    weight: torch.Tensor, grid: Grid, group_size: int, rule: str = "full_range"
) -> tuple[torch.Tensor, torch.Tensor]:
    """Round-to-nearest: (codes int8, scales fp32). The ablation baseline and a GPTQ-free init."""
    scales = initial_scales(weight, grid, group_size, rule)
    return quantize_to_grid(weight, scales, grid), scales
