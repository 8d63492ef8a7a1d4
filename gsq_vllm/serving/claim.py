"""Which checkpoints the plugin serves, decided from config.json alone (no vLLM import here).

The plugin takes over a compressed-tensors checkpoint when at least one config group is a
weight-only, symmetric, integer, group- or channel-wise scheme with 2 or 3 bits in the
``pack-quantized`` format: exactly what GSQ writes, and what stock vLLM cannot run on CPU or
ROCm. Everything else (4/8-bit, activation quantization, FP8/FP4, ...) is left to stock vLLM.
"""

from __future__ import annotations

import os
from typing import Any

from gsq_vllm.weight_format import PACK_QUANTIZED, is_claimed_weights

#: Environment variable that switches the plugin off (stock vLLM behaviour): ``GSQ_VLLM_DISABLE=1``.
DISABLE_ENV = "GSQ_VLLM_DISABLE"
#: Environment variable that forces one kernel by name, e.g. ``GSQ_VLLM_KERNEL=dequant``.
KERNEL_ENV = "GSQ_VLLM_KERNEL"
#: The name of the quantization method the plugin registers (``--quantization gsq``).
METHOD_NAME = "gsq"


def plugin_disabled() -> bool:
    """True when ``GSQ_VLLM_DISABLE`` is set to anything but an empty string, ``0`` or ``false``."""
    return os.environ.get(DISABLE_ENV, "").strip().lower() not in ("", "0", "false", "no")


def claims_checkpoint(hf_quant_cfg: dict[str, Any] | None) -> bool:
    """True when the plugin should serve this ``quantization_config`` without being asked."""
    if not hf_quant_cfg or hf_quant_cfg.get("quant_method") != "compressed-tensors":
        return False
    global_format = hf_quant_cfg.get("format")
    for group in (hf_quant_cfg.get("config_groups") or {}).values():
        if not isinstance(group, dict):
            continue
        fmt = group.get("format") or global_format
        if fmt == PACK_QUANTIZED and is_claimed_weights(group.get("weights"), group.get("input_activations")):
            return True
    return False


def override_method(hf_quant_cfg: dict[str, Any] | None, user_quant: str | None) -> str | None:
    """The answer to vLLM's ``override_quantization_method``: ``"gsq"`` or None (not ours).

    * ``--quantization gsq`` on a compressed-tensors checkpoint: ours (4/8-bit layers inside are
      still run by stock vLLM code).
    * no ``--quantization``: ours only for 2/3-bit weight-only groups (see :func:`claims_checkpoint`).
    * any other explicit ``--quantization`` (e.g. ``compressed-tensors``), or the plugin disabled:
      not ours.
    """
    if plugin_disabled() or not hf_quant_cfg:
        return None
    if hf_quant_cfg.get("quant_method") != "compressed-tensors":
        return None
    if user_quant == METHOD_NAME:
        return METHOD_NAME
    if user_quant is None and claims_checkpoint(hf_quant_cfg):
        return METHOD_NAME
    return None
