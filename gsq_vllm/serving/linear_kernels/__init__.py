"""GSQ kernels, one class per file, and the one selector that picks a kernel for each layer.

=============  ===========================================  ======================================
name           class (file)                                 runs on
=============  ===========================================  ======================================
cpu-lowbit     GSQCPULowbitLinearKernel (gsq_cpu)           CPU: 2/3-bit planes, GSQ's C++ kernels
torch-int4     GSQTorchInt4CPULinearKernel (torch_int4_cpu)  CPU: int4 container, PyTorch's GEMM
cpu-wna16      GSQCPUWNA16LinearKernel (cpu_wna16)          CPU: int4 container, vLLM's WNA16 op
marlin         GSQMarlinLinearKernel (marlin)               CUDA: int4 container, vLLM's Marlin
triton         GSQTritonLinearKernel (triton)               CUDA/ROCm: 2/3-bit Triton kernels
dequant        GSQDequantLinearKernel (dequant)             anywhere: dense weight at load time
=============  ===========================================  ======================================

Per platform the first kernel that can run a layer wins (``PLATFORM_KERNELS``);
``GSQ_VLLM_KERNEL=<name>`` forces one kernel for every layer (and fails loudly where it cannot).
"""

from __future__ import annotations

import os

from vllm.logger import init_logger
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.claim import KERNEL_ENV
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel
from gsq_vllm.serving.linear_kernels.gsq_cpu import GSQCPULowbitLinearKernel
from gsq_vllm.serving.linear_kernels.cpu_wna16 import GSQCPUWNA16LinearKernel
from gsq_vllm.serving.linear_kernels.dequant import GSQDequantLinearKernel
from gsq_vllm.serving.linear_kernels.marlin import GSQMarlinLinearKernel
from gsq_vllm.serving.linear_kernels.torch_int4_cpu import GSQTorchInt4CPULinearKernel
from gsq_vllm.serving.linear_kernels.triton import GSQTritonLinearKernel

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown by vLLM's log config

ALL_KERNELS: list[type[GSQLinearKernel]] = [
    GSQCPULowbitLinearKernel,
    GSQTorchInt4CPULinearKernel,
    GSQCPUWNA16LinearKernel,
    GSQMarlinLinearKernel,
    GSQTritonLinearKernel,
    GSQDequantLinearKernel,
]
KERNELS_BY_NAME = {kernel.name: kernel for kernel in ALL_KERNELS}

# In order of preference. On the CPU GSQ's own C++ kernels come first (2/3 bits a weight in memory,
# AVX-512 or AVX2; refused where they cannot be built), then PyTorch's int4 GEMM, which exists in
# every build, while vLLM's cpu_gemm_wna16 is compiled for AVX-512 only.
PLATFORM_KERNELS: dict[str, list[type[GSQLinearKernel]]] = {
    "cpu": [GSQCPULowbitLinearKernel, GSQTorchInt4CPULinearKernel, GSQCPUWNA16LinearKernel, GSQDequantLinearKernel],
    "cuda": [GSQMarlinLinearKernel, GSQTritonLinearKernel, GSQDequantLinearKernel],
    "rocm": [GSQTritonLinearKernel, GSQDequantLinearKernel],
    "other": [GSQDequantLinearKernel],
}

_announced: set[tuple[str, int]] = set()


def platform_key() -> str:
    if current_platform.is_cpu():
        return "cpu"
    if current_platform.is_rocm():
        return "rocm"
    if current_platform.is_cuda():
        return "cuda"
    return "other"


class GSQKernelSelectionError(ValueError):
    """No GSQ kernel can run a layer (the message lists every kernel's reason)."""


def choose_gsq_kernel(config: MPLinearLayerConfig, layer_name: str = "<layer>") -> type[GSQLinearKernel]:
    """The kernel for one layer: ``GSQ_VLLM_KERNEL`` if set, else the platform's first that fits."""
    forced = os.environ.get(KERNEL_ENV, "").strip()
    bits = config.weight_type.size_bits
    if forced:
        if forced not in KERNELS_BY_NAME:
            raise GSQKernelSelectionError(
                f"{KERNEL_ENV}={forced!r} is not a GSQ kernel; choose one of {', '.join(KERNELS_BY_NAME)}"
            )
        candidates = [KERNELS_BY_NAME[forced]]
    else:
        candidates = PLATFORM_KERNELS[platform_key()]
    reasons = []
    for kernel in candidates:
        ok, reason = kernel.can_implement(config)
        if ok:
            if (kernel.name, bits) not in _announced:  # once per kernel and width
                _announced.add((kernel.name, bits))
                logger.info("GSQ: using kernel %s for %d-bit layers (first: %s)", kernel.name, bits, layer_name)
            logger.debug("GSQ: %s -> %s", layer_name, kernel.name)
            return kernel
        reasons.append(f"{kernel.name}: {reason}")
    where = f"{KERNEL_ENV}={forced}" if forced else f"platform {platform_key()}"
    raise GSQKernelSelectionError(
        f"{layer_name}: no GSQ kernel can run this {bits}-bit layer "
        f"(K={config.partition_weight_shape[0]}, N={config.partition_weight_shape[1]}, "
        f"group {config.group_size}, {config.act_type}) on {where}: " + "; ".join(reasons)
    )


__all__ = [
    "ALL_KERNELS",
    "KERNELS_BY_NAME",
    "PLATFORM_KERNELS",
    "GSQKernelSelectionError",
    "GSQLinearKernel",
    "choose_gsq_kernel",
]
