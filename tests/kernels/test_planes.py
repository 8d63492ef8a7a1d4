"""The kernel layout in gsq_vllm.kernels.planes: exact round trip and the documented bit positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq_vllm.kernels.planes import pack_kernel_planes, unpack_kernel_planes
from gsq_vllm.packing import PackingError, code_range, pack_codes, unpack_codes


def random_codes(n: int, k: int, bits: int, seed: int) -> torch.Tensor:
    low, high = code_range(bits)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)


@settings(max_examples=60, deadline=None)
@given(
    bits=st.sampled_from([2, 3, 4]),
    n=st.integers(1, 12),
    k_units=st.integers(1, 12),
    seed=st.integers(0, 2**16),
)
def test_round_trip(bits, n, k_units, seed):
    codes = random_codes(n, 32 * k_units, bits, seed)
    low, high = pack_kernel_planes(codes, bits)
    assert low.dtype == torch.int32
    assert low.shape == (32 * k_units // (8 if bits == 4 else 16), n)
    assert (high is None) == (bits != 3)
    if high is not None:
        assert high.shape == (k_units, n)
    assert torch.equal(unpack_kernel_planes(low, high, bits), codes)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_from_checkpoint_codes(bits):
    """Checkpoint packing -> codes -> kernel planes -> codes is the identity."""
    codes = random_codes(7, 96, bits, seed=bits)
    checkpoint = pack_codes(codes, bits)
    unpacked = unpack_codes(checkpoint, bits, 96)
    assert torch.equal(unpack_kernel_planes(*pack_kernel_planes(unpacked, bits), bits), codes)


def documented_position(bits: int, k: int) -> list[tuple[str, int, int]]:
    """(plane, row, bit) of each bit of code ``k``, low bit first, as the packing module says."""
    if bits == 4:
        return [("low", k // 8, 4 * (k % 8) + i) for i in range(4)]
    low = [("low", k // 16, 2 * (k % 16) + i) for i in range(2)]
    if bits == 2:
        return low
    c = k % 32
    return low + [("high", k // 32, 16 * (c // 16) + 2 * (c % 8) + (c % 16) // 8)]


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_documented_bit_positions(bits):
    """Every unsigned bit of every code lands exactly where the layout comment says."""
    k_size, n = 64, 3
    low_code = code_range(bits)[0]
    for k in range(k_size):
        for bit in range(bits):
            codes = torch.full((n, k_size), low_code, dtype=torch.int8)  # unsigned 0 everywhere
            codes[1, k] = low_code + (1 << bit)
            low, high = pack_kernel_planes(codes, bits)
            planes = {"low": low, "high": high}
            plane, row, position = documented_position(bits, k)[bit]
            expected = torch.zeros_like(planes[plane])
            value = 1 << position
            expected[row, 1] = value - (1 << 32) if position == 31 else value
            assert torch.equal(planes[plane], expected), (bits, k, bit)
            for other in {"low", "high"} - {plane}:
                assert planes[other] is None or not planes[other].any()


@pytest.mark.parametrize("bits, k", [(3, 48), (2, 24), (4, 12)])
def test_refuses_k_the_layout_cannot_hold(bits, k):
    with pytest.raises(PackingError, match="K %"):
        pack_kernel_planes(random_codes(2, k, bits, 0), bits)


def test_refuses_bad_codes_and_bits():
    with pytest.raises(PackingError, match="range"):
        pack_kernel_planes(torch.full((2, 32), 2, dtype=torch.int8), 2)
    with pytest.raises(PackingError, match="integer"):
        pack_kernel_planes(torch.zeros(2, 32), 2)
    with pytest.raises(PackingError, match="take"):
        pack_kernel_planes(torch.zeros(2, 32, dtype=torch.int8), 5)
    low, high = pack_kernel_planes(random_codes(2, 64, 3, 0), 3)
    with pytest.raises(PackingError, match="high plane"):
        unpack_kernel_planes(low, None, 3)
    with pytest.raises(PackingError, match="high_plane"):
        unpack_kernel_planes(low, high[:1], 3)
