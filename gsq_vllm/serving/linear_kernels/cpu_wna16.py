"""int4 container on the CPU with vLLM's own CPU WNA16 kernel (the one stock GPTQ W4A16 uses).

Layout: checkpoint ``weight_packed`` -> int8 codes ``[N, K]`` (scheme) -> GPTQ ``qweight`` int32
``[K / 8, N]`` uint4b8 (:func:`gsq_vllm.packing.pack_gptq_int4`) + scales ``[N, K / group]`` ->
handed to vLLM's ``CPUWNA16LinearKernel``, which repacks into its 16-column blocked layout
(or the W4A8 AMX layout when ``VLLM_CPU_INT4_W4A8`` is set) and runs ``cpu_gemm_wna16``.

vLLM builds the ``cpu_gemm_wna16`` op only into its AVX-512 library: on an AVX2-only CPU this
kernel (like stock GPTQ W4A16) is unavailable, and the selector says so.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.model_executor.kernels.linear.mixed_precision.cpu import CPUWNA16LinearKernel
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from vllm.platforms import current_platform
from vllm.scalar_type import scalar_types

from gsq_vllm.packing import pack_gptq_int4
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel


#: activation dtypes vLLM's cpu_gemm_wna16 op is compiled for (vllm-cpu 0.32: "not implemented for 'Float'")
OP_ACTIVATION_DTYPES = (torch.bfloat16, torch.float16)


def _noop_loader(*args, **kwargs) -> None:  # parameters made after loading are never loaded
    raise RuntimeError("repacked GSQ parameters are not loadable")


def int4_config(c: MPLinearLayerConfig) -> MPLinearLayerConfig:
    """The same layer seen as a GPTQ uint4b8 layer (what a 4-bit kernel is asked about)."""
    return replace(c, weight_type=scalar_types.uint4b8)


def gptq_parameters(codes: torch.Tensor, scales: torch.Tensor) -> tuple[PackedvLLMParameter, GroupQuantScaleParameter]:
    """GPTQ-layout ``qweight [K/8, N]`` and scales ``[N, K/group]`` as vLLM parameters, as 4-bit
    kernels expect them after loading a compressed-tensors checkpoint."""
    qweight = PackedvLLMParameter(
        data=pack_gptq_int4(codes),
        input_dim=0,
        output_dim=1,
        packed_dim=0,
        packed_factor=8,
        weight_loader=_noop_loader,
    )
    scale = GroupQuantScaleParameter(data=scales.contiguous(), output_dim=0, input_dim=1, weight_loader=_noop_loader)
    return qweight, scale


def cpu_wna16_op_available() -> bool:
    try:
        return hasattr(torch.ops._C, "cpu_gemm_wna16")
    except (AttributeError, RuntimeError):
        return False


class GSQCPUWNA16LinearKernel(GSQLinearKernel):
    name = "cpu-wna16"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "cpu-wna16 runs on the CPU only"
        if not cpu_wna16_op_available():
            return False, "this vLLM build has no cpu_gemm_wna16 op (vLLM compiles it for AVX-512 CPUs only)"
        if c.act_type not in OP_ACTIVATION_DTYPES:
            return False, (f"cpu_gemm_wna16 has no {c.act_type} implementation "
                           f"(it runs {', '.join(map(str, OP_ACTIVATION_DTYPES))} activations)")
        return CPUWNA16LinearKernel.can_implement(int4_config(c))

    def __init__(self, c: MPLinearLayerConfig, layer_name: str = "<layer>") -> None:
        super().__init__(c, layer_name)
        self.inner = CPUWNA16LinearKernel(int4_config(c), "weight_packed", "weight_scale", "weight_zero_point")

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
