"""The project's own Triton 2/3-bit kernels (``gsq_vllm.kernels``) for CUDA and ROCm GPUs.

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) ->
:func:`gsq_vllm.kernels.prepare_weight` -> bit planes (``low_plane`` int32 ``[K / 16, N]``,
3-bit ``high_plane`` int32 ``[K / 32, N]``) and scales ``[K / group, N]``; the GEMV/GEMM kernels
read 2 or 3 bits a weight from memory (no 4-bit container).

Planes, scales and the GEMV's split-K scratch are built once at load and kept as layer buffers;
every forward is one call of the custom op ``torch.ops.gsq_vllm.matmul`` (registered beside the
kernels, one opaque node in vLLM's compiled graph), the same op ``benchmarks/kernels.py`` times.
Triton's availability is checked once, in ``can_implement``. On the CPU the kernels run only
under the Triton interpreter (``TRITON_INTERPRET=1``, for tests), and are never picked unless forced.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel, register


def _device() -> str:
    if current_platform.is_cuda_alike():
        return "cuda"
    return "cpu"


class GSQTritonLinearKernel(GSQLinearKernel):
    name = "triton"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        try:  # importing registers torch.ops.gsq_vllm.matmul
            from gsq_vllm.kernels import GROUP_SIZES, triton_available
        except ImportError as err:
            return False, f"gsq_vllm.kernels is not importable ({err})"
        if not (current_platform.is_cuda_alike() or current_platform.is_cpu()):
            return False, "the Triton kernels run on CUDA/ROCm GPUs (or the CPU interpreter)"
        usable, reason = triton_available(_device())
        if not usable:
            return False, reason
        if c.act_type not in (torch.float16, torch.bfloat16):
            return False, f"activation dtype {c.act_type} not supported (fp16 or bf16)"
        if c.group_size not in GROUP_SIZES:
            return False, f"group size {c.group_size} not in {GROUP_SIZES}"
        if c.partition_weight_shape[0] % c.group_size:
            return False, f"input size {c.partition_weight_shape[0]} not a multiple of the group size"
        return True, None

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        from gsq_vllm.kernels import prepare_weight

        codes, scales = self.take_codes_and_scales(layer)
        packed = prepare_weight(codes, scales.to(self.config.act_type), self.num_bits, self.group_size)
        register(layer, "gsq_low_plane", packed.low_plane)
        if packed.high_plane is not None:
            register(layer, "gsq_high_plane", packed.high_plane)
        else:
            layer.gsq_high_plane = None
        register(layer, "gsq_scales", packed.scales)
        sums, counters = packed.split_k_scratch
        layer.register_buffer("gsq_scratch_sums", sums, persistent=False)
        layer.register_buffer("gsq_scratch_counters", counters, persistent=False)

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1])
        out = torch.ops.gsq_vllm.matmul(
            rows.contiguous(), layer.gsq_low_plane, layer.gsq_high_plane, layer.gsq_scales,
            layer.gsq_scratch_sums, layer.gsq_scratch_counters, self.num_bits, self.group_size,
        )
        if bias is not None:
            out = out + bias.to(out.dtype)
        return out.reshape(*x.shape[:-1], out.shape[-1])
