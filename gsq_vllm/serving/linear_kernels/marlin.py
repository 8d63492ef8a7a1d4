"""int4 container on CUDA with vLLM's Marlin kernel.

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) -> GPTQ ``qweight`` int32
``[K / 8, N]`` uint4b8 (:func:`gsq_vllm.packing.pack_gptq_int4`) + scales ``[N, K / group]`` ->
handed to vLLM's ``MarlinLinearKernel``, which runs ``gptq_marlin_repack`` (Marlin's tiled,
permuted layout) and ``marlin_permute_scales`` on the GPU, then serves it with the Marlin GEMM.

4-bit memory traffic and Marlin speed for 2/3-bit weights, with no new CUDA code. Only the GPTQ
repack runs (and is tested) on the CPU here; Marlin itself needs a CUDA GPU.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel
from gsq_vllm.serving.linear_kernels.cpu_wna16 import gptq_parameters, int4_config


def marlin_config(c: MPLinearLayerConfig) -> MPLinearLayerConfig:
    """uint4b8, with Marlin's -1 for one group spanning the whole input (channel-wise scales)."""
    c4 = int4_config(c)
    if c4.group_size >= c4.full_weight_shape[0]:
        c4.group_size = -1
    return c4


class GSQMarlinLinearKernel(GSQLinearKernel):
    name = "marlin"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cuda():
            return False, "Marlin runs on CUDA GPUs only"
        from vllm.model_executor.kernels.linear import MarlinLinearKernel

        capability = current_platform.get_device_capability()
        if capability is not None and capability.to_int() < MarlinLinearKernel.get_min_capability():
            return False, f"Marlin needs compute capability {MarlinLinearKernel.get_min_capability()}"
        return MarlinLinearKernel.can_implement(marlin_config(c))

    def __init__(self, c: MPLinearLayerConfig, layer_name: str = "<layer>") -> None:
        super().__init__(c, layer_name)
        from vllm.model_executor.kernels.linear import MarlinLinearKernel

        self.inner = MarlinLinearKernel(marlin_config(c), "weight_packed", "weight_scale", None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes, scales = self.take_codes_and_scales(layer)
        qweight, scale = gptq_parameters(codes, scales.to(self.config.act_type))
        layer.register_parameter("weight_packed", qweight)
        layer.register_parameter("weight_scale", scale)
        self.inner.process_weights_after_loading(layer)

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return self.inner.apply_weights(layer, x, bias)
