"""benchmarks/head_quantization.py's quantized head: a weight on the grid it names, and GPTQ's
error under the calibration Hessian below round-to-nearest's (the reason its rows exist)."""

from __future__ import annotations

import torch


def test_gptq_head_beats_round_to_nearest_on_correlated_inputs():
    import head_quantization  # benchmarks/ is on sys.path (tests/conftest.py)

    generator = torch.Generator().manual_seed(0)
    weight = torch.randn(96, 128, generator=generator) * 0.05
    inputs = torch.randn(2048, 16, generator=generator) @ torch.randn(16, 128, generator=generator)  # low-rank: GPTQ's case
    inputs += 0.1 * torch.randn(2048, 128, generator=generator)
    hessian = inputs.T @ inputs / inputs.shape[0]
    errors = {}
    for method in ("rtn", "gptq"):
        dense = head_quantization.quantized_head(weight, 4, 64, method, hessian)
        groups = dense.reshape(96 * 2, 64)
        assert max(len(torch.unique(group)) for group in groups) <= 16  # a 4-bit grid times one scale a group
        difference = dense - weight
        errors[method] = torch.einsum("oi,ij,oj->", difference, hessian, difference).item()
    assert errors["gptq"] < 0.8 * errors["rtn"], errors
