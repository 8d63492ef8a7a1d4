"""int4 container on the CPU with PyTorch's own int4 weight-only GEMM (``_weight_int4pack_mm_for_cpu``).

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) -> unsigned 4-bit values
``code + 8`` (:func:`gsq_vllm.serving.int4_packing.widen_to_uint4`; a 2/3-bit code is a valid int4 code) ->
``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` -> uint8 ``[N, K / 2]`` (PyTorch's blocked
layout), plus ``scales_and_zeros`` ``[K / group, N, 2]`` = (scale, 0) in the activation dtype, since
PyTorch computes ``(q - 8) * scale + zero``.

Weights take 4 bits in memory. Unlike vLLM's CPU WNA16 op (built only for AVX-512 CPUs), this
kernel is part of every x86/Arm PyTorch build, and it is a single traceable aten op.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.int4_packing import widen_to_uint4
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel, register

GROUP_SIZES = (32, 64, 128, 256)


class GSQTorchInt4CPULinearKernel(GSQLinearKernel):
    name = "torch-int4"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "torch-int4 runs on the CPU only"
        if not hasattr(torch.ops.aten, "_weight_int4pack_mm_for_cpu"):
            return False, f"PyTorch {torch.__version__} has no _weight_int4pack_mm_for_cpu"
        if c.act_type not in (torch.bfloat16, torch.float16, torch.float32):
            return False, f"activation dtype {c.act_type} not supported"
        k, n = c.partition_weight_shape
        if c.group_size not in GROUP_SIZES:
            return False, f"group size {c.group_size} not in {GROUP_SIZES}"
        if k % c.group_size:
            return False, f"input size {k} is not a multiple of the group size {c.group_size}"
        if n % 16:
            return False, f"output size {n} is not a multiple of 16"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes, scales = self.take_codes_and_scales(layer)
        unsigned = widen_to_uint4(codes).to(torch.int32)
        register(layer, "gsq_int4_weight", torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1))
        scales_t = scales.t().to(self.config.act_type)
        register(layer, "gsq_scales_zeros", torch.stack([scales_t, torch.zeros_like(scales_t)], dim=-1).contiguous())

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # the op refuses strided activations
        out = torch.ops.aten._weight_int4pack_mm_for_cpu(
            rows, layer.gsq_int4_weight, self.group_size, layer.gsq_scales_zeros
        )
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
