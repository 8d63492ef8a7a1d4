"""The plugin against vLLM 0.33's API (the CUDA build users run), on a machine without a GPU.

Runs in the optional environment ``.venv-vllm033`` (``bash scripts/setup.sh --vllm-033`` creates
it: vllm 0.33.0 with its torch 2.14.0; ``scripts/test.sh`` runs these tests there when it exists).
Without a GPU vLLM's engine cannot start, so this checks what can be checked: every module of
the plugin imports against 0.33, registration, the checkpoint claim, the scheme and kernel
classes, and the CUDA decision (stock Humming unless ``--quantization gsq``).
"""

from __future__ import annotations

import importlib

import pytest

pytestmark = pytest.mark.vllm033
vllm = pytest.importorskip("vllm")
if not vllm.__version__.startswith("0.33"):
    pytest.skip(f"needs vLLM 0.33 (found {vllm.__version__}); see .venv-vllm033", allow_module_level=True)

PLUGIN_MODULES = [
    "gsq_vllm.serving",
    "gsq_vllm.serving.config",
    "gsq_vllm.serving.scheme",
    "gsq_vllm.serving.serve_command",
    "gsq_vllm.serving.linear_kernels",
    "gsq_vllm.serving.linear_kernels.int4_container",
    "gsq_vllm.serving.linear_kernels.cpu_wna16",
    "gsq_vllm.serving.linear_kernels.marlin",
    "gsq_vllm.serving.linear_kernels.triton",
    "gsq_vllm.serving.linear_kernels.torch_int4_cpu",
    "gsq_vllm.serving.linear_kernels.dequant",
]


def quant_config(bits: int) -> dict:
    return {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.17.0",
        "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64}}},
        "ignore": ["lm_head"],
    }


@pytest.mark.parametrize("module", PLUGIN_MODULES)
def test_every_plugin_module_imports_against_vllm_033(module):
    importlib.import_module(module)


def test_registration_under_033():
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS, get_quantization_config

    import gsq_vllm.serving as serving
    from gsq_vllm.serving import vllm_compat
    from gsq_vllm.serving.config import GSQQuantizationConfig

    vllm_compat.check_supported_version(vllm_compat.vllm_version())
    serving.register()
    serving.register()
    assert QUANTIZATION_METHODS.count("gsq") == 1
    assert get_quantization_config("gsq") is GSQQuantizationConfig


def test_scheme_and_kernel_classes_under_033():
    from compressed_tensors.quantization import QuantizationArgs
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.model_executor.layers.quantization.compressed_tensors.schemes import CompressedTensorsScheme

    import torch
    from gsq_vllm.serving.config import GSQQuantizationConfig
    from gsq_vllm.serving.linear_kernels import ALL_KERNELS
    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES, CompressedTensorsGSQ

    config = GSQQuantizationConfig.from_config(quant_config(3))
    args = QuantizationArgs(num_bits=3, type="int", symmetric=True, strategy="group", group_size=64)
    scheme = config._get_scheme_from_parts(args, None, layer_name="model.layers.0.mlp.down_proj")
    assert isinstance(scheme, CompressedTensorsGSQ) and isinstance(scheme, CompressedTensorsScheme)
    layer = MPLinearLayerConfig((576, 192), (576, 192), GSQ_SCALAR_TYPES[3], torch.bfloat16, 64, False)
    for kernel in ALL_KERNELS:  # every kernel answers (with a reason) on vLLM 0.33's config class
        ok, reason = kernel.can_implement(layer)
        assert ok or reason, kernel.name


def test_on_cuda_033_leaves_2_3_bit_to_stock_humming_unless_asked(monkeypatch):
    from vllm.platforms import current_platform

    from gsq_vllm.serving import config as config_module

    monkeypatch.setattr(type(current_platform), "is_cuda", lambda self: True)
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert config_module.stock_serves_low_bit()
    cls = config_module.GSQQuantizationConfig
    assert cls.override_quantization_method(quant_config(2), None) is None
    assert cls.override_quantization_method(quant_config(2), "gsq") == "gsq"


def test_claim_rules_read_the_config_only():
    from gsq_vllm.serving.claim import claims_checkpoint

    assert claims_checkpoint(quant_config(2)) and claims_checkpoint(quant_config(3)) and not claims_checkpoint(quant_config(4))
