"""Dequantise at load, then an ordinary dense matmul: runs everywhere, at the dense model's speed.

Layout: checkpoint ``weight_packed`` (pack-quantized, dense or word-aligned) -> int8 codes
``[N, K]`` (scheme) -> dense weight ``[N, K]`` in the activation dtype = ``scale * code``.
On the CPU the dense weight then goes through vLLM's own unquantized-GEMM dispatch (oneDNN or
the SGL kernel, prepacked), exactly what a bf16 model's layers get, so speed matches bf16.
It saves no memory at run time; it is the fallback when no low-bit kernel fits a layer.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel, register
from gsq_vllm.weight_format import dequantize


class GSQDequantLinearKernel(GSQLinearKernel):
    name = "dequant"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if c.act_type not in (torch.float32, torch.float16, torch.bfloat16):
            return False, f"activation dtype {c.act_type} is not a float type"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes, scales = self.take_codes_and_scales(layer)
        register(layer, "weight", dequantize(codes, scales).to(self.config.act_type))
        self.cpu_dispatch = current_platform.is_cpu()
        if self.cpu_dispatch:
            from vllm.model_executor.layers.utils import dispatch_cpu_unquantized_gemm

            dispatch_cpu_unquantized_gemm(layer, remove_weight=True)

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        if self.cpu_dispatch:
            return layer.cpu_linear(x, layer.weight, bias)
        return torch.nn.functional.linear(x, layer.weight, bias)
