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




def test_moe_experts_refused_with_layer_name(vllm_tp1):
    from vllm.model_executor.layers.fused_moe import RoutedExperts

    experts = RoutedExperts.__new__(RoutedExperts)  # only its class matters to the scheme lookup
    torch.nn.Module.__init__(experts)
    with pytest.raises(ValueError, match=r"model.layers.2.mlp.experts: 3-bit GSQ mixture-of-experts weights are not supported"):
        gsq_config(3).get_quant_method(experts, "model.layers.2.mlp.experts")
