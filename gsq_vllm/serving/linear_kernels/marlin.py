"""int4 container on CUDA with vLLM's Marlin kernel.

Layout: int8 codes ``[N, K]`` (scheme) -> GPTQ int4 parameters (:mod:`.int4_container`) ->
vLLM's ``MarlinLinearKernel``, which runs ``gptq_marlin_repack`` (Marlin's tiled, permuted
layout) and ``marlin_permute_scales`` on the GPU, then serves it with the Marlin GEMM.

4-bit memory traffic and Marlin speed for 2/3-bit weights, with no new CUDA code. Only the GPTQ
repack runs (and is tested) on the CPU here; Marlin itself needs a CUDA GPU.
"""

from __future__ import annotations

from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.linear_kernels.int4_container import GSQInt4ContainerKernel, int4_config


class GSQMarlinLinearKernel(GSQInt4ContainerKernel):
    name = "marlin"
    zero_point_param = None

    @classmethod
    def stock_kernel(cls):
        from vllm.model_executor.kernels.linear import MarlinLinearKernel

        return MarlinLinearKernel

    @classmethod
    def stock_config(cls, c: MPLinearLayerConfig) -> MPLinearLayerConfig:
        """uint4b8, with Marlin's -1 for one group spanning the whole input (channel-wise scales)."""
        c4 = int4_config(c)
        if c4.group_size >= c4.full_weight_shape[0]:
            c4.group_size = -1
        return c4

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cuda():
            return False, "Marlin runs on CUDA GPUs only"
        marlin = cls.stock_kernel()
        capability = current_platform.get_device_capability()
        if capability is not None and capability.to_int() < marlin.get_min_capability():
            return False, f"Marlin needs compute capability {marlin.get_min_capability()}"
        return marlin.can_implement(cls.stock_config(c))
