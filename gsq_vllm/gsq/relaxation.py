"""The Gumbel-Softmax relaxation of one weight matrix.

Every weight ``w[i, j]`` is a soft mixture of the grid values its logits stand for:

    w_soft = s[i, j // G] * sum_k softmax((kappa * l[i, j, k] + g[i, j, k]) / tau) * v[i, j, k]

with fresh Gumbel noise ``g`` each step (a soft sample, not straight-through).

Memory and speed: the K-way softmax (K floats per weight) is never stored. :class:`_SoftCodes`
keeps only the logits, the int8 initial codes and a noise seed, and recomputes noise and
softmax in backward. The noise comes from a counter-based hash of (seed, element index), so a
replay is exact and costs no generator state. The candidate values (``code + shift`` for local
grids) and the off-grid mask are rebuilt from the int8 codes inside the same expression. With
``fused=True`` both passes run as one ``torch.compile``-d loop each (about 8x faster than eager
on a CPU, where the eager version is a dozen passes over ``[out, in, K]``); eager is the
reference and the fallback when no compiler is available.
"""

from __future__ import annotations

import torch

from gsq_vllm.gsq.fusion import MaybeCompiled
from gsq_vllm.gsq.grids import LOCAL_SHIFTS, Grid

_MASK32 = 0xFFFFFFFF


def _hash_uniform(shape: torch.Size, seed: torch.Tensor, device: torch.device) -> torch.Tensor:
    """Uniform(0, 1) from a 32-bit integer hash of (element index, seed): replayable, stateless.

    Multipliers stay below 2**31 so every product fits in int64 (no overflow, same result
    eager and compiled). 23 random bits per sample: ``(k + 0.5) / 2**23`` is exact in float32,
    so a sample is never 0 or 1 (24 bits would round the top value up to 1.0, and log(-log 1) = inf).
    """
    count = 1
    for size in shape:
        count *= size
    x = torch.arange(count, dtype=torch.int64, device=device).view(shape)
    x = (x + seed * 0x3C6EF35F) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK32
    x = x ^ (x >> 15)
    return _unit_interval(x)


def _unit_interval(hashed: torch.Tensor) -> torch.Tensor:
    """32-bit hash values -> floats strictly inside (0, 1)."""
    return ((hashed >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def gumbel_noise(shape: torch.Size, seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, 1) noise, a pure function of ``seed``: the same seed gives the same noise."""
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    return -torch.log(-torch.log(_hash_uniform(torch.Size(shape), seed, device)))


def _probabilities(logits, base, offsets, qmin: int, qmax: int, kappa, tau, seed):
    """Softmax weights over the candidates, and the candidate values.

    ``values = base[..., None] + offsets``: local grids pass the initial codes as ``base`` and the
    shifts as ``offsets``; full grids pass a zero ``base`` and the levels. Off-grid candidates
    get probability 0.
    """
    values = base.to(torch.float32).unsqueeze(-1) + offsets
    z = (kappa * logits.to(torch.float32) + gumbel_noise(logits.shape, seed, logits.device)) / tau
    z = torch.where((values < qmin) | (values > qmax), float("-inf"), z)
    return torch.softmax(z, dim=-1), values


def _soft_codes_forward(logits, base, offsets, qmin: int, qmax: int, kappa, tau, seed):
    probs, values = _probabilities(logits, base, offsets, qmin, qmax, kappa, tau, seed)
    return (probs * values).sum(-1)


def _soft_codes_backward(grad_soft, logits, base, offsets, qmin: int, qmax: int, kappa, tau, seed):
    probs, values = _probabilities(logits, base, offsets, qmin, qmax, kappa, tau, seed)
    soft = (probs * values).sum(-1, keepdim=True)
    # d soft / d l_k = kappa / tau * p_k * (v_k - soft)
    return (grad_soft.unsqueeze(-1) * (kappa / tau) * probs * (values - soft)).to(logits.dtype)


_forward_kernel = MaybeCompiled(_soft_codes_forward)
_backward_kernel = MaybeCompiled(_soft_codes_backward)


class _SoftCodes(torch.autograd.Function):
    """sum_k softmax((kappa*l + g)/tau)_k * v_k, with noise and softmax recomputed in backward."""

    @staticmethod
    def forward(ctx, logits, base, offsets, qmin: int, qmax: int, kappa, tau, seed, fused: bool):
        ctx.save_for_backward(logits, base, offsets, kappa, tau, seed)
        ctx.grid, ctx.fused = (qmin, qmax), fused
        return _forward_kernel(logits, base, offsets, qmin, qmax, kappa, tau, seed, fused=fused)

    @staticmethod
    def backward(ctx, grad_soft):
        logits, base, offsets, kappa, tau, seed = ctx.saved_tensors
        grad = _backward_kernel(grad_soft.contiguous(), logits, base, offsets, *ctx.grid, kappa, tau, seed, fused=ctx.fused)
        return grad, None, None, None, None, None, None, None, None


class RelaxedWeight(torch.nn.Module):
    """Learnable logits and per-group scales for one Linear weight ``[out, in]``.

    The logits start centred on the initial codes ``c0`` (GPTQ's or RTN's):
    ``logit_std * (N(0, 1) + prior_strength * centred(-(v_k - c0)^2 / 2))``. With kappa 100 a
    neighbouring level starts ``100 * 0.01 * prior_strength / 2`` below ``c0`` in the softmax, so
    the Gumbel noise re-samples about ``2 / (1 + exp(that gap))`` of the codes each step: 9% with
    the authors' strength 6 (fine for their ~1000 steps), under 1% with our default 12, which a
    60-step budget needs (benchmarks/results/ablation_gsq_start.md). The result is only kept if
    it beats ``c0`` (see ``optimize._finish``).
    """

    def __init__(
        self,
        grid: Grid,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        logit_std: float = 0.01,
        prior_strength: float = 12.0,
        logits_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
        fused: bool = False,
    ):
        super().__init__()
        out_features, in_features = codes.shape
        if in_features % scales.shape[1]:
            raise ValueError(f"scales {tuple(scales.shape)} do not tile a weight of shape {tuple(codes.shape)}")
        self.grid, self.fused = grid, fused
        self.group_size = in_features // scales.shape[1]
        local = grid.relaxation == "local"
        offsets = torch.tensor(LOCAL_SHIFTS, dtype=torch.float32) if local else grid.levels
        self.register_buffer("offsets", offsets.to(codes.device))  # [K]
        self.register_buffer("initial_codes", codes.to(torch.int8))
        # what the candidates are added to: the initial codes (local) or zero (full grid)
        self.register_buffer("base", self.initial_codes if local else torch.zeros((), dtype=torch.int8, device=codes.device))
        values, off_grid = self.candidates()
        prior = (-((values - codes.to(torch.float32).unsqueeze(-1)) ** 2) / 2).masked_fill(off_grid, 0.0)
        prior = prior - prior.mean(-1, keepdim=True)
        noise = torch.randn(prior.shape, generator=generator, device=codes.device) if generator is not None else torch.randn_like(prior)
        self.logits = torch.nn.Parameter((logit_std * (noise + prior_strength * prior)).to(logits_dtype))
        self.scales = torch.nn.Parameter(scales.detach().to(torch.float32).clone())

    @property
    def num_candidates(self) -> int:
        return self.offsets.numel()

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate values ``[out, in, K]`` and where they leave the grid (for inspection and argmax)."""
        values = (self.base.to(torch.float32).unsqueeze(-1) + self.offsets).expand(*self.initial_codes.shape, -1)
        return values, (values < self.grid.qmin) | (values > self.grid.qmax)

    def _expanded_scales(self) -> torch.Tensor:
        return self.scales.repeat_interleave(self.group_size, dim=1)

    def soft_codes(self, kappa: float, tau: float, seed: int) -> torch.Tensor:
        """A Gumbel-Softmax sample of the codes (differentiable in the logits)."""
        device = self.logits.device
        return _SoftCodes.apply(
            self.logits, self.base, self.offsets, self.grid.qmin, self.grid.qmax,
            torch.tensor(float(kappa), device=device), torch.tensor(float(tau), device=device),
            torch.tensor(int(seed), dtype=torch.int64, device=device), self.fused,
        )

    def soft_weight(self, kappa: float, tau: float, seed: int) -> torch.Tensor:
        """A Gumbel-Softmax sample of the weight (differentiable in logits and scales)."""
        return self.soft_codes(kappa, tau, seed) * self._expanded_scales()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The final codes: argmax of the logits (no noise), on the grid by construction."""
        values, off_grid = self.candidates()
        choice = self.logits.to(torch.float32).masked_fill(off_grid, float("-inf")).argmax(-1, keepdim=True)
        codes = values.gather(-1, choice).squeeze(-1)
        return codes.clamp(self.grid.qmin, self.grid.qmax).to(torch.int8)

    @torch.no_grad()
    def hard_weight(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.hard_codes() if codes is None else codes
        return codes.to(torch.float32) * self._expanded_scales()
