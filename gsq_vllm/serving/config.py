"""``GSQQuantizationConfig``: vLLM's compressed-tensors config, with 2/3-bit weight-only layers served by GSQ.

Everything stock vLLM already does for compressed-tensors (4/8-bit WNA16, FP8, ignored layers,
KV-cache schemes, transforms) is inherited unchanged; only the scheme chosen for a 2/3-bit
symmetric weight-only ``pack-quantized`` layer is replaced by :class:`CompressedTensorsGSQ`.
"""

from __future__ import annotations

import os
from typing import Any

import torch
from vllm.logger import init_logger
from vllm.platforms import current_platform

from gsq_vllm.packing import layout_for_compressed_tensors_version
from gsq_vllm.serving.claim import METHOD_NAME, override_method
from gsq_vllm.serving.scheme import CompressedTensorsGSQ
from gsq_vllm.serving.vllm_compat import compressed_tensors_config_base, vllm_release
from gsq_vllm.weight_format import CLAIMED_BITS, PACK_QUANTIZED, SERVED_BITS, is_claimed_weights, is_weight_only_int

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown by vLLM's log config


def _weight_only_int(weight_quant: Any, input_quant: Any) -> bool:
    """:func:`gsq_vllm.weight_format.is_weight_only_int` for vLLM's parsed ``QuantizationArgs``."""
    return weight_quant is not None and is_weight_only_int(weight_quant.model_dump(mode="json"), input_quant)


def is_gsq_layer(weight_quant: Any, input_quant: Any, fmt: str | None) -> bool:
    """A 2/3-bit symmetric int, weight-only, pack-quantized layer (the plugin's own kind)."""
    return (fmt == PACK_QUANTIZED and weight_quant is not None
            and is_claimed_weights(weight_quant.model_dump(mode="json"), input_quant))


def stock_serves_low_bit() -> bool:
    """Whether stock vLLM runs 2/3-bit weight-only layers here: vLLM 0.33+ on CUDA (its Humming
    kernels). Then the plugin does not claim checkpoints unasked; on the CPU, ROCm and older vLLM
    there is no stock 2/3-bit path and it does."""
    return current_platform.is_cuda() and vllm_release() >= (0, 33)


def serves_layer(num_bits: int) -> bool:
    """Whether a weight-only pack-quantized layer of a checkpoint the plugin serves gets a GSQ kernel.

    2/3-bit always; 4-bit on the CPU too (stock vLLM's CPU 4-bit kernel is built for AVX-512 only,
    ours run everywhere); 4-bit on GPUs and 8-bit stay with stock vLLM (Marlin and friends).
    """
    return num_bits in CLAIMED_BITS or (num_bits in SERVED_BITS and current_platform.is_cpu()) or num_bits not in (4, 8)


class GSQQuantizationConfig(compressed_tensors_config_base()):  # vLLM's CompressedTensorsConfig
    """Registered as ``gsq``; claims 2/3-bit compressed-tensors checkpoints (see ``claim.py``)."""

    def get_name(self) -> str:
        return METHOD_NAME

    @classmethod
    def override_quantization_method(cls, hf_quant_cfg, user_quant, hf_config=None) -> str | None:
        method = override_method(hf_quant_cfg, user_quant)
        if method is not None and user_quant is None and stock_serves_low_bit():
            logger.info("GSQ plugin: this vLLM serves 2/3-bit compressed-tensors layers itself on CUDA (Humming); "
                        "leaving the checkpoint to it (--quantization gsq runs the plugin's Marlin/Triton kernels)")
            return None
        if method is not None:
            logger.info("GSQ plugin serves this compressed-tensors checkpoint (--quantization %s)", method)
        return method

    @classmethod
    def from_config(cls, config: dict[str, Any]) -> "GSQQuantizationConfig":
        self = super().from_config(config)
        # only breaks ties where both 3-bit layouts give the same width (tiny inputs)
        self.gsq_layout_hint = layout_for_compressed_tensors_version(config.get("version"))
        return self

    def maybe_update_config(self, model_name: str, *args, **kwargs) -> None:
        """vLLM's hook after the config is built, before any weight loads: a local checkpoint is
        checked whole here (:func:`gsq_vllm.checkpoint.inspect_checkpoint`), so a truncated weight file
        or a layer we cannot serve stops start-up with one message naming the file and the layer."""
        super().maybe_update_config(model_name, *args, **kwargs)
        if os.path.isdir(model_name):
            from gsq_vllm.checkpoint import inspect_checkpoint

            inspect_checkpoint(model_name)

    def scheme_for_layer(self, weight_quant, input_quant, output_quant, fmt: str | None, layer_name: str | None):
        """GSQ's scheme for a weight-only pack-quantized layer it serves; None leaves the layer to stock vLLM."""
        if output_quant is None and fmt == PACK_QUANTIZED and _weight_only_int(weight_quant, input_quant):
            if serves_layer(weight_quant.num_bits):  # 5-7 bits come here too, to be refused with the layer name
                return CompressedTensorsGSQ(
                    num_bits=weight_quant.num_bits,
                    strategy=str(getattr(weight_quant.strategy, "value", weight_quant.strategy)),
                    group_size=weight_quant.group_size,
                    layer_name=layer_name,
                    layout_hint=getattr(self, "gsq_layout_hint", None),
                )
        return None

    def get_quant_method(self, layer: torch.nn.Module, prefix: str):
        from vllm.model_executor.layers.fused_moe import RoutedExperts

        if isinstance(layer, RoutedExperts):
            method = self._experts_method(layer, prefix)
            if method is not None:
                return method
        return super().get_quant_method(layer, prefix)

    def _experts_method(self, layer: torch.nn.Module, prefix: str):
        """Fused MoE experts with GSQ weights: stock vLLM's MoE path on CUDA, GSQ's own CPU method on
        the CPU, a clear refusal elsewhere; None for experts that are not ours."""
        self.add_fused_moe_schemes()
        proj = getattr(layer, "ckpt_down_proj_name", "down_proj")
        scheme = self.get_scheme_dict(layer, f"{prefix}.0.{proj}") or self.get_scheme_dict(layer, prefix)
        if not scheme:
            return None
        weights, inputs = scheme.get("weights"), scheme.get("input_activations")
        if not is_gsq_layer(weights, inputs, scheme.get("format") or self.quant_format):
            return None
        if current_platform.is_cuda():
            logger.info("GSQ: %s: %d-bit experts go to stock vLLM's compressed-tensors MoE path", prefix, weights.num_bits)
            return None
        if current_platform.is_cpu():
            from gsq_vllm.serving.fused_moe import GSQLowbitMoEMethod

            return GSQLowbitMoEMethod(layer.moe_config, weights.num_bits, weights.group_size, prefix,
                                      layout_hint=getattr(self, "gsq_layout_hint", None))
        raise ValueError(
            f"{prefix}: {weights.num_bits}-bit GSQ mixture-of-experts weights are not supported on this "
            f"platform ({current_platform.device_name}): the gsq plugin serves them on CUDA (stock vLLM) and "
            "on the CPU (its own kernels). Quantize the experts with 4 bits "
            "(or leave them in the checkpoint's ignore list) to serve this model."
        )
