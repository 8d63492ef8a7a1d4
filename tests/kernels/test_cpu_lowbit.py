"""GSQ's native CPU kernels (C++, 2/3-bit planes read directly) against the torch reference.

Every instruction set this CPU has is tested: AVX-512 where present, and the AVX2 path always
(``GSQ_VLLM_CPU_ISA=avx2`` forces it on an AVX-512 CPU). Skipped, with the reason, where the
extension cannot be built (no compiler) or the CPU has neither.
"""

from __future__ import annotations

import pytest
import torch

from gsq_vllm.kernels import cpu_lowbit
from gsq_vllm.kernels.reference import exact_problem, reference_matmul
from gsq_vllm.weight_format import dequantize

REASON = cpu_lowbit.unavailable_reason()
pytestmark = pytest.mark.skipif(REASON is not None, reason=f"native CPU kernels unavailable: {REASON}")


ISAS = ["amx", "avx512-bf16", "avx512", "avx2"]  # best first; each CPU runs its own and every lesser one


def _isas() -> list[str]:
    return ISAS[ISAS.index(cpu_lowbit.isa()):] if REASON is None else ["avx2"]


@pytest.fixture(params=_isas())
def isa(request, monkeypatch) -> str:
    if request.param != ISAS[0]:
        monkeypatch.setenv("GSQ_VLLM_CPU_ISA", request.param)
    assert cpu_lowbit.isa() == request.param
    return request.param


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("m", [1, 2, 3, 4, 9, 16, 17, 19, 35, 70])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_lowbit_mm_is_bit_identical_to_dequantise_then_matmul_in_fp32(isa, bits, group_size, m, dtype):
    """Exactly representable inputs (see exact_problem): any correct kernel equals the reference
    bit for bit, whatever its order of additions; bf16 x takes the AMX tiles from 3 rows where present."""
    codes, scales, x = exact_problem(m, 48, 256, bits, group_size, dtype, seed=bits * 100 + m, scale_dtype=torch.float32)
    weight = cpu_lowbit.prepare(codes, scales, bits, group_size)
    out = cpu_lowbit.lowbit_mm(x, weight)
    assert out.dtype == dtype and out.shape == (m, 48)
    assert torch.equal(out, reference_matmul(x, codes, scales, group_size))


@pytest.mark.parametrize("n", [16, 32, 64, 80, 144, 400])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_one_row_at_two_bits_is_bit_identical_for_any_number_of_row_blocks(isa, n, dtype):
    """One row of 2-bit codes on AVX-512 reads tables of pair sums, four blocks of 16 outputs per
    table: block counts that leave one, two or three blocks over, on each thread's share."""
    codes, scales, x = exact_problem(1, n, 512, 2, 128, dtype, seed=n, scale_dtype=torch.float32)
    out = cpu_lowbit.lowbit_mm(x, cpu_lowbit.prepare(codes, scales, 2, 128))
    assert torch.equal(out, reference_matmul(x, codes, scales, 128))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
def test_dense_mm_for_large_batches_is_bit_identical_too(isa, bits, dtype):
    codes, scales, x = exact_problem(70, 96, 384, bits, 64, dtype, seed=bits, scale_dtype=torch.float32)
    weight = cpu_lowbit.prepare(codes, scales, bits, 64)
    for rows in (70, 20):  # the second, smaller call reuses the op's scratch buffer
        out = cpu_lowbit.dense_mm(x[:rows], weight)
        assert out.dtype == dtype and torch.equal(out, reference_matmul(x[:rows], codes, scales, 64))


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_dequantize_t_is_exact(isa, bits, dtype):
    generator = torch.Generator().manual_seed(bits)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (96, 320), dtype=torch.int8, generator=generator)
    scales = torch.randn(96, 320 // 32, generator=generator)
    weight = cpu_lowbit.prepare(codes, scales, bits, 32)
    expected = dequantize(codes, scales).t().to(dtype)
    assert torch.equal(cpu_lowbit.dequantize_t(weight, dtype), expected)


@pytest.mark.parametrize("bits", [2, 3])
def test_lowbit_mm_on_real_valued_bf16_inputs_a_layer_sized_like_the_default_models(isa, bits):
    generator = torch.Generator().manual_seed(7)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (1536, 576), dtype=torch.int8, generator=generator)
    scales = (torch.rand(1536, 576 // 64, generator=generator) - 0.5) / 20
    x = torch.randn(5, 576, generator=generator).to(torch.bfloat16)
    out = cpu_lowbit.lowbit_mm(x, cpu_lowbit.prepare(codes, scales, bits, 64))
    expected = reference_matmul(x, codes, scales, 64)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), expected.float(), rtol=1.6e-2, atol=1e-3)


@pytest.mark.parametrize("k", [576, 8192])
def test_lowbit_mm_error_on_real_valued_inputs_stays_within_its_stated_bound(isa, k):
    """Real-valued x with outlier channels against a float64 product. The AVX-512 path for 2-3
    rows (codes read as floats, x prescaled by up to 2^8 at 2 bits, 2^9 at 3) rounds sums that much
    larger than the products: its error must stay below 2^-14 of sum |x w| (measured: about 1e-6
    to 5e-6 of it at 2 bits, 1e-6 to 7e-6 at 3); the AVX2 path's, and the one-row 2-bit tables'
    (plain fp32 sums), below 2^-20."""
    generator = torch.Generator().manual_seed(k)
    for bits in (2, 3):
        low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
        codes = torch.randint(low, high + 1, (64, k), dtype=torch.int8, generator=generator)
        scales = (torch.rand(64, k // 64, generator=generator) - 0.5) / 20
        x = torch.randn(2, k, generator=generator)
        x[:, :8] *= 30
        weight = dequantize(codes, scales).double()
        packed = cpu_lowbit.prepare(codes, scales, bits, 64)
        for rows in (1, 2):
            exact = x[:rows].double() @ weight.t()
            out = cpu_lowbit.lowbit_mm(x[:rows].float(), packed).double()
            plain_sums = isa == "avx2" or (bits == 2 and rows == 1)
            bound = 2.0**-20 if plain_sums else 2.0**-14
            error = ((out - exact).abs() / (x[:rows].double().abs() @ weight.abs().t())).max()
            assert error < bound, (bits, rows, isa, error)


@pytest.mark.parametrize(
    ("n", "k", "bits", "group_size", "message"),
    [
        (40, 256, 2, 64, "output size 40 is not a multiple of 16"),
        (48, 200, 3, 64, "input size 200 is not a multiple of the group size 64"),
        (48, 512, 2, 256, "group size 256 not in (32, 64, 128)"),
        (48, 256, 4, 64, "4-bit codes"),
    ],
)
def test_shapes_the_kernels_cannot_take_are_refused_with_the_reason(n, k, bits, group_size, message):
    assert message in cpu_lowbit.shape_problem(n, k, bits, group_size)
    codes = torch.zeros(n, k, dtype=torch.int8)
    with pytest.raises(ValueError, match="native CPU kernels cannot take this weight"):
        cpu_lowbit.prepare(codes, torch.ones(n, max(1, k // group_size)), bits, group_size)


def test_the_op_checks_its_tensors():
    codes, scales, x = exact_problem(2, 32, 128, 3, 64, torch.float32, scale_dtype=torch.float32)
    weight = cpu_lowbit.prepare(codes, scales, 3, 64)
    with pytest.raises(RuntimeError, match=r"3-bit weights need a contiguous int32 high_plane \[N/16, K/32, 16\]"):
        torch.ops.gsq_cpu.lowbit_mm(x, weight.low_plane, None, weight.scales, 3, 64)
    with pytest.raises(RuntimeError, match="scales must be contiguous fp32"):
        torch.ops.gsq_cpu.lowbit_mm(x, weight.low_plane, weight.high_plane, weight.scales.half(), 3, 64)
    with pytest.raises(RuntimeError, match="does not hold K = 64"):
        torch.ops.gsq_cpu.lowbit_mm(x[:, :64], weight.low_plane, weight.high_plane, weight.scales, 3, 64)


def test_the_ops_trace_as_single_nodes():
    """vLLM compiles the model: the ops need fake implementations and must not break the graph."""
    codes, scales, x = exact_problem(3, 32, 128, 2, 64, torch.float32, scale_dtype=torch.float32)
    weight = cpu_lowbit.prepare(codes, scales, 2, 64)

    def layer(x):
        return torch.ops.gsq_cpu.lowbit_mm(x, weight.low_plane, None, weight.scales, 2, 64) + 1

    compiled = torch.compile(layer, fullgraph=True, backend="eager")
    assert torch.equal(compiled(x), layer(x))


def test_a_cpu_without_avx512_or_avx2_gets_the_reason_not_a_crash():
    """GSQ_VLLM_CPU_ISA=none makes the op see such a CPU: the kernels say why they cannot run."""
    import os
    import subprocess
    import sys

    code = "from gsq_vllm.kernels import cpu_lowbit; print(cpu_lowbit.unavailable_reason())"
    env = {**os.environ, "GSQ_VLLM_CPU_ISA": "none"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert out.stdout.strip() == "this CPU has neither AVX-512F nor AVX2+FMA", out.stderr[-2000:]
