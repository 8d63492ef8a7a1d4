"""gsq_vllm.serving.config: the scheme chosen per layer (GSQ for 2/3-bit, stock vLLM's otherwise) and
the refusal of 2/3-bit fused-MoE experts off CUDA."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from serving_support import GROUP, gsq_config  # noqa: E402

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




def _routed_experts():
    from types import SimpleNamespace

    from vllm.model_executor.layers.fused_moe import RoutedExperts
    from vllm.model_executor.layers.fused_moe.activation import MoEActivation

    experts = RoutedExperts.__new__(RoutedExperts)  # only its class and its MoE config matter here
    torch.nn.Module.__init__(experts)
    experts.moe_config = SimpleNamespace(
        activation=MoEActivation.SILU, moe_parallel_config=SimpleNamespace(tp_rank=0, tp_size=1, ep_size=1, use_ep=False))
    return experts


def test_moe_experts_go_to_gsqs_own_cpu_method(vllm_tp1):
    from gsq_vllm.kernels import cpu_lowbit
    from gsq_vllm.serving.fused_moe import GSQLowbitMoEMethod

    if cpu_lowbit.unavailable_reason():
        pytest.skip(f"GSQ's native CPU kernels are not available: {cpu_lowbit.unavailable_reason()}")
    method = gsq_config(3).get_quant_method(_routed_experts(), "model.layers.2.mlp.experts")
    assert isinstance(method, GSQLowbitMoEMethod) and (method.num_bits, method.group_size) == (3, 64)


def test_moe_experts_refused_with_layer_name_where_no_method_serves_them(vllm_tp1, monkeypatch):
    from gsq_vllm.serving import config

    monkeypatch.setattr(config.current_platform, "is_cpu", lambda: False)
    monkeypatch.setattr(config.current_platform, "is_cuda", lambda: False)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts: 3-bit GSQ mixture-of-experts weights are not supported"):
        gsq_config(3).get_quant_method(_routed_experts(), "model.layers.2.mlp.experts")