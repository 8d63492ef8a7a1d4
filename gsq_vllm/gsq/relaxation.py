"""The Gumbel-Softmax relaxation of one weight matrix.

Every weight ``w[i, j]`` is a soft mixture of the grid values its K logits stand for:

    w_soft = s[i, j // G] * sum_k softmax_k((kappa * l[k, i, j] + g[k, i, j]) / tau) * v[k, i, j]

with fresh Gumbel noise ``g`` each step (a soft sample, not straight-through). ``v`` is a grid
level (full relaxation: ternary, 2-bit) or the initial code plus a shift (local: 3/4-bit), and
candidates that leave the grid get probability 0.

Memory and speed: the K-way softmax is never stored. :class:`_SoftCodes` keeps only the logits,
the int8 initial codes and a noise seed, and recomputes noise and softmax in backward; the noise
is a counter-based hash of (seed, element index), so a replay is exact and costs no generator
state. The logits are stored candidate-major, ``[K, out, in]``, and the K candidates are unrolled
in the kernel (:func:`_kernels`): every operation is then elementwise over the weights, which a
compiler vectorises (4-5x faster on a CPU than a softmax over a trailing dimension of 5). With
``fused=True`` forward and backward each run as one ``torch.compile``-d loop; eager PyTorch runs
the same code, and is the fallback when no compiler is available.
"""

from __future__ import annotations

import functools

import torch

from gsq_vllm.gsq.fusion import MaybeCompiled
from gsq_vllm.gsq.grids import Grid

_MASK32 = 0xFFFFFFFF


def _hash_uniform(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    """Uniform(0, 1) from a 32-bit integer hash of (int64 element index, seed): replayable, stateless.

    Multipliers stay below 2**31 so every product fits in int64 (no overflow, same result
    eager and compiled).
    """
    x = (index + seed * 0x3C6EF35F) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _MASK32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _MASK32
    x = x ^ (x >> 16)
    x = (x * 0x297A2D39) & _MASK32
    x = x ^ (x >> 15)
    return _unit_interval(x)


def _unit_interval(hashed: torch.Tensor) -> torch.Tensor:
    """32-bit hash values -> floats strictly inside (0, 1).

    23 random bits: ``(k + 0.5) / 2**23`` is exact in float32, so a sample is never 0 or 1
    (24 bits would round the top value up to 1.0, and log(-log 1) = inf).
    """
    return ((hashed >> 9).to(torch.float32) + 0.5) * (1.0 / 8388608.0)


def _gumbel(index: torch.Tensor, seed: torch.Tensor) -> torch.Tensor:
    return -torch.log(-torch.log(_hash_uniform(index, seed)))


def gumbel_noise(shape: torch.Size | tuple[int, ...], seed: int | torch.Tensor, device: torch.device | str = "cpu") -> torch.Tensor:
    """Gumbel(0, 1) noise, a pure function of ``seed``: the same seed gives the same noise.

    Element ``i`` of the flattened tensor is the hash of ``i``, so the noise of ``[K, out, in]``
    logits is what the relaxation kernels draw for them.
    """
    seed = torch.as_tensor(seed, dtype=torch.int64, device=device)
    count = 1
    for size in shape:
        count *= size
    return _gumbel(torch.arange(count, dtype=torch.int64, device=device), seed).view(*shape)


@functools.lru_cache(maxsize=None)
def _kernels(offsets: tuple[int, ...], local: bool, qmin: int, qmax: int) -> tuple[MaybeCompiled, MaybeCompiled]:
    """Forward and backward of the soft codes for one grid, the K candidates unrolled.

    Arguments of both: ``logits [K, N]``, ``base [N]`` int8 initial codes (local grids), 0-d
    tensors ``kappa``, ``tau`` and the int64 noise ``seed``.
    """

    def terms(logits, base, kappa, tau, seed):
        count = base.shape[0]
        index = torch.arange(count, dtype=torch.int64, device=logits.device)
        start = base.to(torch.float32)
        values, scores = [], []
        for k, offset in enumerate(offsets):
            value = start + offset if local else torch.full_like(start, float(offset))
            score = (kappa * logits[k].to(torch.float32) + _gumbel(index + k * count, seed)) / tau
            if local:
                score = torch.where((value < qmin) | (value > qmax), float("-inf"), score)
            values.append(value)
            scores.append(score)
        top = scores[0]
        for score in scores[1:]:
            top = torch.maximum(top, score)
        # candidates more than e^30 less likely than the best count as exactly 0: their e^-90-sized
        # weights would otherwise leave denormal floats in the soft weights, and x86 matrix
        # products with denormal inputs run several times slower
        weights = [torch.where(score - top > -30.0, torch.exp(score - top), 0.0) for score in scores]
        total = weights[0]
        for weight in weights[1:]:
            total = total + weight
        soft = weights[0] * values[0]
        for weight, value in zip(weights[1:], values[1:]):
            soft = soft + weight * value
        return values, weights, total, soft / total

    def forward(logits, base, kappa, tau, seed):
        return terms(logits, base, kappa, tau, seed)[3]

    def backward(grad_soft, logits, base, kappa, tau, seed):
        values, weights, total, soft = terms(logits, base, kappa, tau, seed)
        # d soft / d l_k = kappa / tau * p_k * (v_k - soft)
        factor = grad_soft * (kappa / tau) / total
        return torch.stack([(factor * weight * (value - soft)).to(logits.dtype) for weight, value in zip(weights, values)])

    forward.__name__ = backward.__name__ = f"soft_codes_{'local' if local else 'full'}_{len(offsets)}"
    return MaybeCompiled(forward), MaybeCompiled(backward)


class _SoftCodes(torch.autograd.Function):
    """sum_k softmax((kappa*l + g)/tau)_k * v_k, with noise and softmax recomputed in backward."""

    @staticmethod
    def forward(ctx, logits, base, kappa, tau, seed, grid: Grid, fused: bool):
        flat_logits, flat_base = logits.flatten(1), base.flatten()
        ctx.save_for_backward(flat_logits, flat_base, kappa, tau, seed)
        ctx.grid, ctx.fused, ctx.shape = grid, fused, logits.shape
        forward_kernel, _ = _kernels(grid.candidate_offsets, grid.relaxation == "local", grid.qmin, grid.qmax)
        return forward_kernel(flat_logits, flat_base, kappa, tau, seed, fused=fused).view(logits.shape[1:])

    @staticmethod
    def backward(ctx, grad_soft):
        logits, base, kappa, tau, seed = ctx.saved_tensors
        grid = ctx.grid
        _, backward_kernel = _kernels(grid.candidate_offsets, grid.relaxation == "local", grid.qmin, grid.qmax)
        grad = backward_kernel(grad_soft.reshape(-1), logits, base, kappa, tau, seed, fused=ctx.fused)
        return grad.view(ctx.shape), None, None, None, None, None, None


class RelaxedWeight(torch.nn.Module):
    """Learnable logits ``[K, out, in]`` and per-group scales (as a log-gain) for one Linear weight.

    The logits start centred on the initial codes ``c0`` (GPTQ's or RTN's):
    ``logit_std * (N(0, 1) + prior_strength * centred(-(v_k - c0)^2 / 2))``. With kappa 100 a
    neighbouring level starts ``100 * 0.01 * prior_strength / 2`` below ``c0`` in the softmax, so
    the Gumbel noise re-samples about ``2 / (1 + exp(that gap))`` of the codes each step: 9% with
    the authors' strength 6 (fine for their ~1000 steps), under 1% with our default 12, which a
    short budget needs (benchmarks/results/ablation_start_smollm2.md). The result is only kept if
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
        if in_features % scales.shape[1] or scales.shape[0] != out_features:
            raise ValueError(f"scales {tuple(scales.shape)} do not tile a weight of shape {tuple(codes.shape)}")
        self.grid, self.fused = grid, fused
        self.group_size = in_features // scales.shape[1]
        self.register_buffer("initial_codes", codes.to(torch.int8))
        values, off_grid = self.candidates()
        prior = (-((values - codes.to(torch.float32)) ** 2) / 2).masked_fill(off_grid, 0.0)
        prior = prior - prior.mean(0, keepdim=True)
        noise = torch.randn(prior.shape, generator=generator, device=codes.device) if generator is not None else torch.randn_like(prior)
        self.logits = torch.nn.Parameter((logit_std * (noise + prior_strength * prior)).to(logits_dtype))
        # scales are learned as a log-gain on the initial (possibly negative) scales: a step of the
        # optimiser then moves every scale by the same relative amount, whatever the model's
        # weight magnitudes, and a scale never crosses zero.
        self.register_buffer("initial_scales", scales.detach().to(torch.float32).clone())
        self.log_gain = torch.nn.Parameter(torch.zeros_like(self.initial_scales))

    @property
    def num_candidates(self) -> int:
        return self.grid.num_candidates

    @property
    def scales(self) -> torch.Tensor:
        """The current per-group scales ``[out, in / group_size]`` (differentiable in ``log_gain``)."""
        return self.initial_scales * torch.exp(self.log_gain)

    def candidates(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Candidate values ``[K, out, in]`` and where they leave the grid (for inspection and argmax)."""
        offsets = torch.tensor(self.grid.candidate_offsets, dtype=torch.float32, device=self.initial_codes.device)
        base = self.initial_codes.to(torch.float32) if self.grid.relaxation == "local" else torch.zeros_like(self.initial_codes, dtype=torch.float32)
        values = base.unsqueeze(0) + offsets.view(-1, 1, 1)
        return values, (values < self.grid.qmin) | (values > self.grid.qmax)

    def _expanded_scales(self) -> torch.Tensor:
        return self.scales.repeat_interleave(self.group_size, dim=1)

    def soft_codes(self, kappa: float, tau: float, seed: int) -> torch.Tensor:
        """A Gumbel-Softmax sample of the codes (differentiable in the logits)."""
        device = self.logits.device
        return _SoftCodes.apply(
            self.logits, self.initial_codes,
            torch.tensor(float(kappa), device=device), torch.tensor(float(tau), device=device),
            torch.tensor(int(seed), dtype=torch.int64, device=device), self.grid, self.fused,
        )

    def soft_weight(self, kappa: float, tau: float, seed: int) -> torch.Tensor:
        """A Gumbel-Softmax sample of the weight (differentiable in logits and scales)."""
        return self.soft_codes(kappa, tau, seed) * self._expanded_scales()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The final codes: argmax of the logits (no noise), on the grid by construction."""
        values, off_grid = self.candidates()
        logits = self.logits.to(torch.float32).masked_fill(off_grid, float("-inf"))
        best, codes = logits[0], values[0]
        for k in range(1, logits.shape[0]):  # elementwise over the weights: fast, unlike argmax(0)
            better = logits[k] > best
            best, codes = torch.where(better, logits[k], best), torch.where(better, values[k], codes)
        return codes.clamp(self.grid.qmin, self.grid.qmax).to(torch.int8)

    @torch.no_grad()
    def hard_weight(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.hard_codes() if codes is None else codes
        return codes.to(torch.float32) * self._expanded_scales()
