"""int4 container on the CPU with PyTorch's own int4 weight-only GEMM (``_weight_int4pack_mm_for_cpu``).

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) -> unsigned 4-bit values
``code + 8`` (:func:`gsq_vllm.serving.int4_packing.widen_to_uint4`; a 2/3-bit code is a valid int4 code) ->
``torch.ops.aten._convert_weight_to_int4pack_for_cpu`` -> uint8 ``[N, K / 2]`` (PyTorch's blocked
layout), plus ``scales_and_zeros`` ``[K / group, N, 2]`` = (scale, 0) in the activation dtype, since
PyTorch computes ``(q - 8) * scale + zero``.

Weights take 4 bits in memory. Unlike vLLM's CPU WNA16 op (built only for AVX-512 CPUs), this
kernel is part of every x86/Arm PyTorch build, and it is a single traceable aten op.

The op's cost grows with every row it multiplies (it is a GEMV per row, not a blocked GEMM): on a
2-core AVX-512 machine a 1536 x 576 layer takes 1.5 s for 1024 fp32 rows against 80 ms dequantised +
dense, and in bf16 19 ms against 1.7 ms; at that rate one fp32 step of a 64-request burst (prefills
of up to 905 tokens) outlasts vLLM's 5-minute step timeout, which kills the engine. So from
``DENSE_FROM_ROWS`` rows on (prefill, large batches) the layer's weight is dequantised on the fly
from the same int4 pack (whose layout depends on the CPU; the one in use is found at load time by
reading the codes back), for this call only, and multiplied with PyTorch's dense GEMM (oneDNN): no
second resident copy.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.int4_packing import torch_cpu_int4_layout, unpack_torch_cpu_int4, widen_to_uint4
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel, register

GROUP_SIZES = (32, 64, 128, 256)
#: rows (tokens) from which a call dequantises the weight and runs a dense GEMM (measured crossover:
#: fp32 from 2-4 rows, bf16 between 64 and 256 rows, on 1536 x 576 and 4096 x 4096 layers)
DENSE_FROM_ROWS = {torch.float32: 2, torch.bfloat16: 128, torch.float16: 128}


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
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(unsigned, 1)
        register(layer, "gsq_int4_weight", packed)
        scales_t = scales.t().to(self.config.act_type)
        register(layer, "gsq_scales_zeros", torch.stack([scales_t, torch.zeros_like(scales_t)], dim=-1).contiguous())
        # the pack's layout depends on the CPU (AVX-512, AVX2, scalar); one that reads back is needed
        self.pack_layout = torch_cpu_int4_layout(packed, unsigned)
        self.dense_from_rows = DENSE_FROM_ROWS.get(self.config.act_type) if self.pack_layout else None

    def uses_dense(self, rows: int) -> bool:
        """Whether a call with ``rows`` rows goes through the dequantised dense GEMM."""
        return self.dense_from_rows is not None and rows >= self.dense_from_rows

    def dequantized_weight(self, layer: torch.nn.Module) -> torch.Tensor:
        """This layer's weight ``[N, K]`` in the activation dtype, rebuilt from the int4 pack."""
        scales = layer.gsq_scales_zeros[..., 0].t()  # [N, K / group]
        n, groups = scales.shape
        unsigned = unpack_torch_cpu_int4(layer.gsq_int4_weight, n, groups * self.group_size, self.pack_layout)
        centred = unsigned.to(scales.dtype) - 8
        return (centred.view(n, groups, self.group_size) * scales.unsqueeze(-1)).view(n, groups * self.group_size)

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()  # the op refuses strided activations
        if self.uses_dense(rows.shape[0]):
            out = torch.nn.functional.linear(rows, self.dequantized_weight(layer))
        else:
            out = torch.ops.aten._weight_int4pack_mm_for_cpu(
                rows, layer.gsq_int4_weight, self.group_size, layer.gsq_scales_zeros
            )
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
