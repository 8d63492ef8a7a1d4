"""vLLM plugin: serve GSQ (2/3-bit compressed-tensors ``pack-quantized``) checkpoints.

``register()`` is the ``vllm.general_plugins`` entry point (see pyproject.toml). vLLM calls it in
every process it starts, possibly more than once; it registers the quantization method ``gsq``
(:class:`gsq_vllm.serving.config.GSQQuantizationConfig`), which then claims 2/3-bit checkpoints by itself.

* ``GSQ_VLLM_DISABLE=1``: register nothing (stock vLLM behaviour).
* ``GSQ_VLLM_KERNEL=<name>``: force one kernel (see :mod:`gsq_vllm.serving.linear_kernels`).

The entry point is loaded by every ``vllm serve`` on the machine, whatever the model, so it
fails soft: if registration raises (a vLLM outside the supported versions, an API that moved, a
missing dependency), vLLM starts as if the plugin were absent, after one warning naming the cause.

Importing this package does not import vLLM (the quantize environment has none); only
``register()`` and the submodules other than ``claim``, ``sharding`` and ``vllm_compat`` need it.
"""

from __future__ import annotations

import logging

from gsq_vllm.serving import vllm_compat
from gsq_vllm.serving.claim import DISABLE_ENV, KERNEL_ENV, METHOD_NAME, claims_checkpoint, plugin_disabled
from gsq_vllm.serving.vllm_compat import SUPPORTED_VLLM, vllm_version

logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["register", "is_registered", "claims_checkpoint", "vllm_version", "DISABLE_ENV", "KERNEL_ENV", "METHOD_NAME",
           "SUPPORTED_VLLM"]

_failure_reported = False  # one warning per process, however often vLLM calls register()

def is_registered() -> bool:
    """Whether vLLM knows the ``gsq`` quantization method in this process."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return METHOD_NAME in QUANTIZATION_METHODS  # public: register_quantization_config appends to it


def _register_method() -> None:
    from vllm.model_executor.layers.quantization import register_quantization_config

    from gsq_vllm.serving.config import GSQQuantizationConfig

    if is_registered():
        return
    register_quantization_config(METHOD_NAME)(GSQQuantizationConfig)
    logger.debug("registered the %s quantization method", METHOD_NAME)


def register() -> None:
    """Register the ``gsq`` quantization method with vLLM (idempotent; no-op when disabled).

    Never raises: a failure leaves vLLM as if the plugin were absent, with one warning.
    """
    if plugin_disabled():
        logger.info("%s is set: the GSQ vLLM plugin stays off", DISABLE_ENV)
        return
    try:
        vllm_compat.check_supported_version(vllm_compat.vllm_version())
        _register_method()
    except Exception as error:  # noqa: BLE001 - whatever breaks, vLLM must still start
        global _failure_reported
        if _failure_reported:
            return
        _failure_reported = True
        logger.warning(
            "GSQ vLLM plugin not loaded (%s: %s); vLLM runs without it, so 2/3-bit GSQ checkpoints will not "
            "load on CPU/ROCm. Supported vLLM versions: %s. Set %s=1 to silence this.",
            type(error).__name__, error, ",".join(SUPPORTED_VLLM), DISABLE_ENV,
        )
