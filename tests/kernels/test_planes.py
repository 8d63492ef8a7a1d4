"""The kernel layout in gsq_vllm.kernels.planes: exact round trip and the documented bit positions."""

from __future__ import annotations

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq_vllm.kernels.planes import cpu3_fields, pack_kernel_planes, unpack_kernel_planes
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
    for layout in ("triton", "cpu") if bits != 4 else ("triton",):
        low, high = pack_kernel_planes(codes, bits, layout)
        assert low.dtype == torch.int32
        assert low.shape == (32 * k_units // (8 if bits == 4 else 16), n)
        assert (high is None) == (bits != 3)
        if high is not None:
            assert high.shape == (k_units, n)
        assert torch.equal(unpack_kernel_planes(low, high, bits, layout), codes)


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


def test_cpu3_fields_tile_three_words_exactly():
    """The 3-bit cpu layout: 32 codes x 3 bits fill three 32-bit words, every bit used once."""
    seen_word_bits, seen_code_bits = set(), set()
    for code, word, bit, code_bit, width in cpu3_fields():
        for i in range(width):
            seen_word_bits.add((word, bit + i))
            seen_code_bits.add((code, code_bit + i))
    assert seen_word_bits == {(w, b) for w in range(3) for b in range(32)}
    assert seen_code_bits == {(c, b) for c in range(32) for b in range(3)}


def test_cpu3_documented_bit_positions():
    """Every bit of every code of the 3-bit cpu layout lands where cpu3_fields says: words 0 and 1
    of chunk t are low plane rows 2t and 2t + 1, word 2 is high plane row t."""
    k_size, n = 64, 3
    for k in range(k_size):
        chunk, code = divmod(k, 32)
        for code_bit in range(3):
            codes = torch.full((n, k_size), -4, dtype=torch.int8)  # unsigned 0 everywhere
            codes[1, k] = -4 + (1 << code_bit)
            low, high = pack_kernel_planes(codes, 3, "cpu")
            (word, position), = [
                (w, b + code_bit - first)
                for c, w, b, first, width in cpu3_fields()
                if c == code and first <= code_bit < first + width
            ]
            plane, row = (high, chunk) if word == 2 else (low, 2 * chunk + word)
            expected = torch.zeros_like(plane)
            expected[row, 1] = (1 << position) - (1 << 32) if position == 31 else 1 << position
            assert torch.equal(plane, expected), (k, code_bit)
            other = low if word == 2 else high
            assert not other.any()


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
