"""vLLM plugin: serve GSQ (2/3-bit compressed-tensors ``pack-quantized``) checkpoints.

``register()`` is the ``vllm.general_plugins`` entry point (see pyproject.toml). vLLM calls it in
every process it starts, possibly more than once; it registers the quantization method ``gsq``
(:class:`gsq_vllm.serving.config.GSQConfig`), which then claims 2/3-bit checkpoints by itself.

* ``GSQ_VLLM_DISABLE=1``: register nothing (stock vLLM behaviour).
* ``GSQ_VLLM_KERNEL=<name>``: force one kernel (see :mod:`gsq_vllm.serving.kernels`).

Importing this package does not import vLLM (the quantize environment has none); only
``register()`` and the submodules other than ``claim`` and ``sharding`` need it.
"""

from __future__ import annotations

import logging

from gsq_vllm.serving.claim import DISABLE_ENV, KERNEL_ENV, METHOD_NAME, claims_checkpoint, plugin_disabled

logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["register", "is_registered", "claims_checkpoint", "DISABLE_ENV", "KERNEL_ENV", "METHOD_NAME"]


def is_registered() -> bool:
    """Whether vLLM knows the ``gsq`` quantization method in this process."""
    from vllm.model_executor.layers import quantization

    return METHOD_NAME in quantization._CUSTOMIZED_METHOD_TO_QUANT_CONFIG


def register() -> None:
    """Register the ``gsq`` quantization method with vLLM (idempotent; no-op when disabled)."""
    if plugin_disabled():
        logger.info("%s is set: the GSQ vLLM plugin stays off", DISABLE_ENV)
        return
    from vllm.model_executor.layers.quantization import register_quantization_config

    from gsq_vllm.serving.config import GSQConfig

    if is_registered():
        return
    register_quantization_config(METHOD_NAME)(GSQConfig)
    logger.debug("registered the %s quantization method", METHOD_NAME)
