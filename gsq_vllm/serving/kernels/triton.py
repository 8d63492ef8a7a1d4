"""The project's own Triton 2/3-bit kernels (``gsq_vllm.kernels``) for CUDA and ROCm GPUs.

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) ->
:func:`gsq_vllm.kernels.prepare_weight` -> bit planes (``low_plane`` int32 ``[K / 16, N]``,
3-bit ``high_plane`` int32 ``[K / 32, N]``) and scales ``[K / group, N]``; the GEMV/GEMM kernels
read 2 or 3 bits a weight from memory (no 4-bit container).

The call is registered as the custom op ``torch.ops.vllm.gsq_triton_matmul`` so that vLLM's
torch.compile graph treats it as one opaque node. On the CPU it runs only under the Triton
interpreter (``TRITON_INTERPRET=1``, for tests), and is never picked unless forced.
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.serving.kernels.base import GSQLinearKernel, register

_OP_REGISTERED = False


def _gsq_triton_matmul(
    x: torch.Tensor,
    low_plane: torch.Tensor,
    high_plane: torch.Tensor | None,
    scales: torch.Tensor,
    bias: torch.Tensor | None,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    from gsq_vllm.kernels import GSQPackedWeight, gsq_matmul

    weight = GSQPackedWeight(
        low_plane=low_plane,
        high_plane=high_plane,
        scales=scales,
        bits=bits,
        group_size=group_size,
        in_features=x.shape[-1],
        out_features=low_plane.shape[1],
    )
    return gsq_matmul(x, weight, bias)


def _gsq_triton_matmul_fake(x, low_plane, high_plane, scales, bias, bits, group_size) -> torch.Tensor:
    return x.new_empty(*x.shape[:-1], low_plane.shape[1])


def _register_op() -> None:
    global _OP_REGISTERED
    if _OP_REGISTERED or hasattr(torch.ops.vllm, "gsq_triton_matmul"):
        _OP_REGISTERED = True
        return
    from vllm.utils.torch_utils import direct_register_custom_op

    direct_register_custom_op("gsq_triton_matmul", _gsq_triton_matmul, fake_impl=_gsq_triton_matmul_fake)
    _OP_REGISTERED = True


def _device() -> str:
    if current_platform.is_cuda_alike():
        return "cuda"
    return "cpu"


class GSQTritonLinearKernel(GSQLinearKernel):
    name = "triton"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        try:
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
        _register_op()

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        return torch.ops.vllm.gsq_triton_matmul(
            x, layer.gsq_low_plane, layer.gsq_high_plane, layer.gsq_scales, bias, self.num_bits, self.group_size
        )
