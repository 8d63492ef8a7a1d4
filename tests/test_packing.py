"""Packing round trips, against compressed-tensors' own pack/unpack in the installed version."""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from gsq_vllm.packing import (
    PackingError,
    PackLayout,
    code_range,
    detect_layout,
    pack_codes,
    packed_width,
    unpack_codes,
)

pytestmark = pytest.mark.packing

BITS = st.sampled_from([2, 3, 4, 8])


def random_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    low, high = code_range(bits)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (rows, cols), generator=gen, dtype=torch.int8)


def installed_layout() -> PackLayout:
    from gsq_vllm.checkpoint import installed_compressed_tensors_layout

    return installed_compressed_tensors_layout()


@settings(max_examples=60, deadline=None)
@given(bits=BITS, rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_round_trip_both_layouts(bits, rows, cols, seed):
    codes = random_codes(rows, cols, bits, seed)
    for layout in PackLayout:
        packed = pack_codes(codes, bits, layout)
        assert packed.dtype == torch.int32
        assert packed.shape == (rows, packed_width(cols, bits, layout))
        assert torch.equal(unpack_codes(packed, bits, cols, layout), codes)


@settings(max_examples=60, deadline=None)
@given(bits=BITS, rows=st.integers(1, 9), cols=st.integers(1, 300), seed=st.integers(0, 2**16))
def test_matches_installed_compressed_tensors(bits, rows, cols, seed):
    from compressed_tensors.compressors.pack_quantized.helpers import pack_to_int32, unpack_from_int32

    codes = random_codes(rows, cols, bits, seed)
    layout = installed_layout()
    theirs = pack_to_int32(codes, bits)
    ours = pack_codes(codes, bits, layout)
    assert torch.equal(ours, theirs)
    assert torch.equal(unpack_codes(theirs, bits, cols, layout), unpack_from_int32(ours, bits, torch.Size([rows, cols])))


@pytest.mark.parametrize("cols", [32, 64, 576, 1536])
def test_detect_3bit_layouts(cols):
    codes = random_codes(4, cols, 3, 0)
    for layout in PackLayout:
        packed = pack_codes(codes, 3, layout)
        assert detect_layout(packed.shape[1], cols, 3) is layout
        assert torch.equal(unpack_codes(packed, 3, cols), codes)  # layout detected


def test_width_matching_no_layout_is_refused():
    with pytest.raises(PackingError, match=r"width 7 matches no layout .* expected 6 .* or 7|width 5 matches no layout"):
        detect_layout(5, 64, 3, name="model.layers.0.mlp.down_proj.weight_packed")
    with pytest.raises(PackingError, match="down_proj.weight_packed: packed width 5 matches no layout for 64 3-bit codes: expected 6"):
        detect_layout(5, 64, 3, name="down_proj.weight_packed")


def test_ambiguous_width_needs_hint():
    # 11 three-bit codes take 2 words in both layouts, with different bits
    with pytest.raises(PackingError, match="fits both"):
        detect_layout(2, 11, 3)
    assert detect_layout(2, 11, 3, hint="word_aligned") is PackLayout.WORD_ALIGNED


def test_out_of_range_codes_and_bad_bits():
    with pytest.raises(PackingError, match=r"out of the 2-bit range \[-2, 1\]"):
        pack_codes(torch.tensor([[2]], dtype=torch.int8), 2)
    with pytest.raises(PackingError, match="num_bits"):
        pack_codes(torch.zeros(1, 4, dtype=torch.int8), 9)
    with pytest.raises(PackingError, match="integer tensor"):
        pack_codes(torch.zeros(1, 4), 2)
