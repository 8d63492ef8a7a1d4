import pytest
import torch

from gsq_vllm.gsq import RelaxedWeight, get_grid, gumbel_noise, rtn_quantize


def explicit_soft_weight(relaxed: RelaxedWeight, kappa: float, tau: float, seed: int) -> torch.Tensor:
    """The relaxation written out with plain autograd (stores the softmax)."""
    values, off_grid = relaxed.candidates()
    z = (kappa * relaxed.logits.float() + gumbel_noise(relaxed.logits.shape, seed, relaxed.logits.device)) / tau
    soft = (torch.softmax(z.masked_fill(off_grid, float("-inf")), 0) * values).sum(0)
    return soft * relaxed.scales.repeat_interleave(relaxed.group_size, dim=1)


@pytest.mark.parametrize("bits", ["ternary", 2, 3])
def test_recomputed_backward_matches_autograd(bits):
    grid = get_grid(bits)
    weight = torch.randn(6, 64, generator=torch.Generator().manual_seed(0))
    codes, scales = rtn_quantize(weight, grid, 32)
    relaxed = RelaxedWeight(grid, codes, scales, logit_std=0.3, prior_strength=1.0,
                            generator=torch.Generator().manual_seed(0))
    upstream = torch.randn(6, 64)
    grads = []
    for fn in (lambda: relaxed.soft_weight(3.0, 0.7, seed=11), lambda: explicit_soft_weight(relaxed, 3.0, 0.7, 11)):
        relaxed.zero_grad()
        out = fn()
        (out * upstream).sum().backward()
        grads.append((out.detach(), relaxed.logits.grad.clone(), relaxed.log_gain.grad.clone()))
    for ours, reference in zip(grads[0], grads[1]):
        torch.testing.assert_close(ours, reference, rtol=1e-4, atol=1e-5)
    assert grads[0][1].abs().sum() > 0


def test_finite_differences_on_one_logit():
    """The analytic gradient of one soft weight against a central difference in one of its logits
    (a single weight keeps the float32 rounding of the difference far below its size)."""
    grid = get_grid(2)
    codes, scales = rtn_quantize(torch.randn(2, 32, generator=torch.Generator().manual_seed(0)), grid, 32)
    relaxed = RelaxedWeight(grid, codes, scales, logit_std=0.5, prior_strength=1.0,
                            generator=torch.Generator().manual_seed(1))
    relaxed.soft_weight(2.0, 1.0, seed=5)[0, 3].backward()
    analytic = relaxed.logits.grad[1, 0, 3].item()
    eps = 1e-3
    with torch.no_grad():
        relaxed.logits[1, 0, 3] += eps
        up = relaxed.soft_weight(2.0, 1.0, seed=5)[0, 3].item()
        relaxed.logits[1, 0, 3] -= 2 * eps
        down = relaxed.soft_weight(2.0, 1.0, seed=5)[0, 3].item()
    assert abs(analytic) > 1e-3
    assert analytic == pytest.approx((up - down) / (2 * eps), rel=1e-2)


@pytest.mark.parametrize("bits", ["ternary", 2, 3, 4])
def test_initial_argmax_is_centred_on_the_initial_codes(bits):
    grid = get_grid(bits)
    codes, scales = rtn_quantize(torch.randn(64, 128, generator=torch.Generator().manual_seed(0)), grid, 64)
    relaxed = RelaxedWeight(grid, codes, scales, generator=torch.Generator().manual_seed(0))
    agree = (relaxed.hard_codes() == codes).float().mean().item()
    assert agree > 0.9  # the init's Gaussian jitter flips a few percent (gap 3 vs noise std 1.4)
    exact = RelaxedWeight(grid, codes, scales, logit_std=0.01, prior_strength=1e3)
    assert torch.equal(exact.hard_codes(), codes)


def test_local_relaxation_never_leaves_the_grid():
    grid = get_grid(3)
    codes = torch.tensor([[-4, 3, 0, -3]], dtype=torch.int8)
    relaxed = RelaxedWeight(grid, codes, torch.ones(1, 1))
    with torch.no_grad():
        relaxed.logits.normal_(0, 10)
    hard = relaxed.hard_codes()
    assert hard.min() >= -4 and hard.max() <= 3


def test_gumbel_noise_is_replayable_and_gumbel_distributed():
    first, again, other = (gumbel_noise((200_000,), seed) for seed in (3, 3, 4))
    assert torch.equal(first, again)
    assert not torch.equal(first, other)
    # Gumbel(0, 1): mean = Euler's gamma, variance = pi^2 / 6
    assert first.mean().item() == pytest.approx(0.5772, abs=0.01)
    assert first.var().item() == pytest.approx(1.6449, abs=0.03)
    assert abs(torch.corrcoef(torch.stack([first[:-1], first[1:]]))[0, 1].item()) < 0.01


def test_gumbel_noise_is_finite_at_the_extremes_of_the_hash():
    from gsq_vllm.gsq import relaxation

    # every 32-bit hash value, the largest and smallest included, maps strictly inside (0, 1)
    extremes = torch.tensor([0, 1, 511, 512, 2**32 - 513, 2**32 - 1], dtype=torch.int64)
    uniform = relaxation._unit_interval(extremes)
    assert (uniform > 0).all() and (uniform < 1).all()
    for seed in range(8):  # many samples: about 10 per seed would hit the top value with 24 bits
        assert torch.isfinite(relaxation.gumbel_noise((5, 1 << 21), seed)).all()


@pytest.mark.parametrize("bits", ["ternary", 2, 3])
def test_fused_relaxation_matches_eager(bits):
    """The torch.compile-d forward and backward compute the same numbers as eager PyTorch."""
    grid = get_grid(bits)
    weight = torch.randn(48, 128, generator=torch.Generator().manual_seed(0))
    codes, scales = rtn_quantize(weight, grid, 64)
    upstream = torch.randn(48, 128)
    results = []
    for fused in (False, True):
        relaxed = RelaxedWeight(grid, codes, scales, logit_std=0.3, prior_strength=1.0,
                                generator=torch.Generator().manual_seed(0), fused=fused)
        out = relaxed.soft_weight(3.0, 0.7, seed=11)
        (out * upstream).sum().backward()
        results.append((out.detach(), relaxed.logits.grad, relaxed.log_gain.grad))
    for eager, fused in zip(*results):
        torch.testing.assert_close(fused, eager, rtol=1e-4, atol=1e-5)
