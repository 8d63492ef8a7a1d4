"""The int4 container (gsq_vllm.serving.int4_packing): exact round trip of GPTQ's qweight layout."""

import pytest
import torch

from gsq_vllm.packing import PackingError, code_range
from gsq_vllm.serving.int4_packing import pack_gptq_int4, unpack_gptq_int4, unpack_torch_cpu_int4, widen_to_uint4

pytestmark = pytest.mark.packing


def random_codes(rows: int, cols: int, bits: int, seed: int) -> torch.Tensor:
    low, high = code_range(bits)
    gen = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (rows, cols), generator=gen, dtype=torch.int8)


@pytest.mark.parametrize("bits", [2, 3, 4])
def test_gptq_int4_container_round_trip(bits):
    codes = random_codes(24, 64, bits, 1)
    qweight = pack_gptq_int4(codes)
    assert qweight.shape == (8, 24) and qweight.dtype == torch.int32
    assert torch.equal(unpack_gptq_int4(qweight), codes)


def test_int4_container_refuses_what_it_cannot_hold():
    with pytest.raises(PackingError, match="int4 range"):
        widen_to_uint4(torch.tensor([[8]], dtype=torch.int8))
    with pytest.raises(PackingError, match="in_features % 8"):
        pack_gptq_int4(torch.zeros(2, 12, dtype=torch.int8))


@pytest.mark.parametrize("shape", [(64, 32), (128, 576), (192, 64)])
def test_torch_cpu_int4_pack_reads_back(shape):
    """PyTorch's CPU int4 pack, read back without the op: the values that went in."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip(f"PyTorch {torch.__version__} has no CPU int4 pack")
    values = torch.randint(0, 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    assert torch.equal(unpack_torch_cpu_int4(packed, *shape).to(torch.int32), values)
    with pytest.raises(PackingError, match="out_features % 64"):
        unpack_torch_cpu_int4(packed[:16], 48, shape[1])
