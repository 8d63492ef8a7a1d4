import pytest
import torch

from gsq_vllm.gsq import dequantize, full_range_scales, get_grid, initial_scales, rtn_quantize, symmetric_scales


@pytest.mark.parametrize("name,levels", [("ternary", [-1, 0, 1]), (2, [-2, -1, 0, 1]), (3, list(range(-4, 4)))])
def test_grid_levels(name, levels):
    assert get_grid(name).levels.tolist() == levels


def test_unsupported_grid_is_refused():
    with pytest.raises(ValueError, match="unsupported GSQ grid 5"):
        get_grid(5)


@pytest.mark.parametrize("bits", ["ternary", 2, 3, 4])
def test_rtn_codes_on_grid_and_all_zero_groups_get_finite_scales(bits):
    grid = get_grid(bits)
    weight = torch.randn(8, 128)
    weight[:, :64] = 0.0  # an all-zero group in every row
    codes, scales = rtn_quantize(weight, grid, 64)
    assert torch.isfinite(scales).all() and (scales.abs() > 0).all()
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert (codes[:, :64] == 0).all()


def test_symmetric_scale_matches_compressed_tensors_rule():
    weight = torch.tensor([[3.0, -1.5, 0.0, 0.75]])
    assert symmetric_scales(weight, get_grid(2), 4).item() == pytest.approx(3.0 / 1.5)
    assert symmetric_scales(weight, get_grid("ternary"), 4).item() == pytest.approx(3.0)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_full_range_scale_puts_the_largest_weight_on_the_wide_end(bits):
    grid = get_grid(bits)
    weight = torch.tensor([[0.5, -0.1, 2.0, 0.3], [-3.0, 1.0, 0.2, 0.0]])
    scales = full_range_scales(weight, grid, 4)
    # row 0: largest weight +2.0 -> negative scale, 2.0 = qmin * s; row 1: -3.0 -> positive scale
    assert scales[0, 0].item() == pytest.approx(2.0 / grid.qmin) and scales[0, 0] < 0
    assert scales[1, 0].item() == pytest.approx(-3.0 / grid.qmin) and scales[1, 0] > 0
    codes, _ = rtn_quantize(weight, grid, 4)
    assert codes[0, 2] == grid.qmin and codes[1, 0] == grid.qmin
    exact = dequantize(codes, scales)
    assert exact[0, 2].item() == pytest.approx(2.0) and exact[1, 0].item() == pytest.approx(-3.0)


def test_full_range_scale_is_never_worse_than_the_clipped_rule_on_gaussian_weights():
    weight = torch.randn(256, 512, generator=torch.Generator().manual_seed(0))
    for bits in (2, 3):
        grid = get_grid(bits)
        errors = {rule: (dequantize(*rtn_quantize(weight, grid, 64, rule)) - weight).square().mean().item()
                  for rule in ("full_range", "symmetric")}
        assert errors["full_range"] < errors["symmetric"], (bits, errors)


def test_unknown_scale_rule_is_named():
    with pytest.raises(ValueError, match="unknown scale rule 'clip'"):
        initial_scales(torch.ones(1, 4), get_grid(2), 4, "clip")
