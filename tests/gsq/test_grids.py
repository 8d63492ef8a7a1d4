import pytest
import torch

from gsq_vllm.gsq import get_grid, rtn_quantize, symmetric_scales


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
    assert torch.isfinite(scales).all() and (scales > 0).all()
    assert codes.min() >= grid.qmin and codes.max() <= grid.qmax
    assert (codes[:, :64] == 0).all()


def test_symmetric_scale_matches_compressed_tensors_rule():
    weight = torch.tensor([[3.0, -1.5, 0.0, 0.75]])
    assert symmetric_scales(weight, get_grid(2), 4).item() == pytest.approx(3.0 / 1.5)
    assert symmetric_scales(weight, get_grid("ternary"), 4).item() == pytest.approx(3.0)
