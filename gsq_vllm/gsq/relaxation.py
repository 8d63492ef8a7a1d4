"""The Gumbel-Softmax relaxation of one weight matrix.

Every weight ``w[i, j]`` is a soft mixture of the grid values its logits stand for:

    w_soft = s[i, j // G] * sum_k softmax((kappa * l[i, j, k] + g[i, j, k]) / tau) * v[i, j, k]

with fresh Gumbel noise ``g`` each step (a soft sample, not straight-through). The K-way softmax is
the memory hog (K floats per weight, kept for backward by plain autograd); :class:`_SoftCodes`
keeps only the logits and the noise seed and recomputes noise and softmax in backward.
"""

from __future__ import annotations

import torch

from gsq_vllm.gsq.grids import Grid


def gumbel_noise(shape: torch.Size, seed: int, device: torch.device) -> torch.Tensor:
    """Reproducible Gumbel(0, 1) noise: the same seed gives the same noise (replayed in backward)."""
    generator = torch.Generator(device=device).manual_seed(seed)
    uniform = torch.rand(shape, generator=generator, device=device, dtype=torch.float32)
    return -torch.log(-torch.log(uniform.clamp(1e-10, 1.0 - 1e-7)))


def _softmax_weights(logits, mask, kappa, tau, seed, noisy):
    z = kappa * logits.to(torch.float32)
    if noisy:
        z = z + gumbel_noise(logits.shape, seed, logits.device)
    z = z / tau
    if mask is not None:
        z = z + mask
    return torch.softmax(z, dim=-1)


class _SoftCodes(torch.autograd.Function):
    """sum_k softmax((kappa*l + g)/tau)_k * v_k, with the softmax recomputed in backward."""

    @staticmethod
    def forward(ctx, logits, values, mask, kappa: float, tau: float, seed: int, noisy: bool):
        probs = _softmax_weights(logits, mask, kappa, tau, seed, noisy)
        soft = (probs * values).sum(-1)
        ctx.save_for_backward(logits, values, mask if mask is not None else torch.empty(0))
        ctx.has_mask = mask is not None
        ctx.params = (kappa, tau, seed, noisy)
        return soft

    @staticmethod
    def backward(ctx, grad_soft):
        logits, values, mask = ctx.saved_tensors
        kappa, tau, seed, noisy = ctx.params
        probs = _softmax_weights(logits, mask if ctx.has_mask else None, kappa, tau, seed, noisy)
        soft = (probs * values).sum(-1, keepdim=True)
        # d soft / d l_k = kappa / tau * p_k * (v_k - soft)
        grad_logits = grad_soft.unsqueeze(-1) * (kappa / tau) * probs * (values - soft)
        return grad_logits.to(logits.dtype), None, None, None, None, None, None


class RelaxedWeight(torch.nn.Module):
    """Learnable logits and per-group scales for one Linear weight ``[out, in]``.

    The logits start centred on the initial codes ``c0`` (GPTQ's or RTN's):
    ``logit_std * (N(0, 1) + prior_strength * centred(-(v_k - c0)^2 / 2))``. With the defaults
    (0.01, 6) neighbouring levels start 3 noise-std apart, so the noise alone flips a few percent
    of the argmax codes; the optimiser's start is the soft sample around ``c0``, and the result
    is only kept if it beats ``c0`` (see ``optimize._finish``).
    """

    def __init__(
        self,
        grid: Grid,
        codes: torch.Tensor,
        scales: torch.Tensor,
        *,
        logit_std: float = 0.01,
        prior_strength: float = 6.0,
        logits_dtype: torch.dtype = torch.float32,
        generator: torch.Generator | None = None,
    ):
        super().__init__()
        out_features, in_features = codes.shape
        if in_features % scales.shape[1]:
            raise ValueError(f"scales {tuple(scales.shape)} do not tile a weight of shape {tuple(codes.shape)}")
        self.grid = grid
        self.group_size = in_features // scales.shape[1]
        values, mask = grid.candidate_values(codes if grid.relaxation == "local" else None)
        values = values.to(codes.device)
        self.register_buffer("values", values)  # [K] (full) or [out, in, K] (local)
        self.register_buffer("mask", mask)
        self.register_buffer("initial_codes", codes.to(torch.int8))
        base = codes.to(torch.float32).unsqueeze(-1)
        prior = -((values - base) ** 2) / 2
        if mask is not None:
            prior = prior.masked_fill(torch.isinf(mask), 0.0)
        prior = prior - prior.mean(-1, keepdim=True)
        noise = torch.randn(prior.shape, generator=generator, device=codes.device) if generator is not None else torch.randn_like(prior)
        self.logits = torch.nn.Parameter((logit_std * (noise + prior_strength * prior)).to(logits_dtype))
        self.scales = torch.nn.Parameter(scales.detach().to(torch.float32).clone())

    def _expanded_scales(self) -> torch.Tensor:
        return self.scales.repeat_interleave(self.group_size, dim=1)

    def soft_weight(self, kappa: float, tau: float, seed: int) -> torch.Tensor:
        """A Gumbel-Softmax sample of the weight (differentiable in logits and scales)."""
        soft_codes = _SoftCodes.apply(self.logits, self.values, self.mask, kappa, tau, seed, True)
        return soft_codes * self._expanded_scales()

    @torch.no_grad()
    def hard_codes(self) -> torch.Tensor:
        """The final codes: argmax of the logits (no noise), on the grid by construction."""
        logits = self.logits.to(torch.float32)
        if self.mask is not None:
            logits = logits + self.mask
        choice = logits.argmax(-1, keepdim=True)
        values = self.values if self.values.ndim > 1 else self.values.expand(*logits.shape)
        codes = values.gather(-1, choice).squeeze(-1)
        return codes.clamp(self.grid.qmin, self.grid.qmax).to(torch.int8)

    @torch.no_grad()
    def hard_weight(self, codes: torch.Tensor | None = None) -> torch.Tensor:
        codes = self.hard_codes() if codes is None else codes
        return codes.to(torch.float32) * self._expanded_scales()
