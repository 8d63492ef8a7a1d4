"""The int4 container (gsq_vllm.serving.int4_packing): exact round trip of GPTQ's qweight layout."""

import pytest
import torch

from gsq_vllm.packing import PackingError, code_range
from gsq_vllm.serving.int4_packing import (
    pack_gptq_int4,
    torch_cpu_int4_layout,
    unpack_gptq_int4,
    unpack_torch_cpu_int4,
    widen_to_uint4,
)

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


@pytest.mark.parametrize("shape", [(64, 32), (128, 576), (192, 64), (48, 64), (80, 128)])
def test_torch_cpu_int4_pack_reads_back(shape):
    """PyTorch's CPU int4 pack, read back without the op, whichever CPU kernel packed it (AVX-512,
    AVX2 or scalar: ATEN_CPU_CAPABILITY picks one in a subprocess); partial last blocks included."""
    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip(f"PyTorch {torch.__version__} has no CPU int4 pack")
    values = torch.randint(0, 16, shape, dtype=torch.int32, generator=torch.Generator().manual_seed(0))
    packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(values, 1)
    layout = torch_cpu_int4_layout(packed, values)
    assert layout is not None
    assert torch.equal(unpack_torch_cpu_int4(packed, *shape, layout).to(torch.int32), values)
    with pytest.raises(PackingError, match="expected"):
        unpack_torch_cpu_int4(packed[:16], 48, shape[1], layout)


@pytest.mark.parametrize("capability", ["avx2", "default"])
def test_torch_cpu_int4_layout_of_other_cpus(capability):
    """The layouts of CPUs other than this one, forced through ATen's dispatch."""
    import subprocess
    import sys

    if not hasattr(torch.ops.aten, "_convert_weight_to_int4pack_for_cpu"):
        pytest.skip(f"PyTorch {torch.__version__} has no CPU int4 pack")
    probe = (
        "import torch\n"
        "from gsq_vllm.serving.int4_packing import torch_cpu_int4_layout\n"
        "for n in (48, 64, 96, 1536):\n"
        "    v = torch.randint(0, 16, (n, 64), dtype=torch.int32)\n"
        "    p = torch.ops.aten._convert_weight_to_int4pack_for_cpu(v, 1)\n"
        "    print(torch_cpu_int4_layout(p, v))\n"
    )
    import os

    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120,
                            env={**os.environ, "ATEN_CPU_CAPABILITY": capability})
    assert result.returncode == 0, result.stderr[-2000:]
    assert "None" not in result.stdout.split(), result.stdout
