"""The int4 container: 2/3/4-bit GSQ codes handed to one of vLLM's own 4-bit kernels.

A GSQ code is a valid int4 code, so any GPTQ-style 4-bit kernel can serve a 2/3-bit layer: the
codes are repacked once into the GPTQ layout (``qweight`` int32 ``[K / 8, N]`` uint4b8, scales
``[N, K / group]``, :func:`gsq_vllm.serving.int4_packing.pack_gptq_int4`) as the parameters a stock vLLM
kernel expects after loading a compressed-tensors checkpoint, and that kernel takes over: its
own repack at load, its own GEMM at every forward. 4-bit memory and speed, no new kernel code.

Subclasses name the stock kernel (:meth:`stock_kernel`) and how the layer looks to it
(:meth:`stock_config`); ``cpu_wna16.py`` and ``marlin.py`` are the two.
"""

from __future__ import annotations

from dataclasses import replace

import torch
from vllm.model_executor.kernels.linear import MPLinearKernel, MPLinearLayerConfig
from vllm.model_executor.parameter import GroupQuantScaleParameter, PackedvLLMParameter
from vllm.scalar_type import scalar_types

from gsq_vllm.serving.int4_packing import pack_gptq_int4
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel


def _noop_loader(*args, **kwargs) -> None:  # parameters made after loading are never loaded
    raise RuntimeError("repacked GSQ parameters are not loadable")


def int4_config(c: MPLinearLayerConfig) -> MPLinearLayerConfig:
    """The same layer seen as a GPTQ uint4b8 layer (what a 4-bit kernel is asked about)."""
    return replace(c, weight_type=scalar_types.uint4b8)


def gptq_parameters(codes: torch.Tensor, scales: torch.Tensor) -> tuple[PackedvLLMParameter, GroupQuantScaleParameter]:
    """GPTQ-layout ``qweight [K/8, N]`` and scales ``[N, K/group]`` as vLLM parameters, as 4-bit
    kernels expect them after loading a compressed-tensors checkpoint."""
    qweight = PackedvLLMParameter(
        data=pack_gptq_int4(codes), input_dim=0, output_dim=1, packed_dim=0, packed_factor=8,
        weight_loader=_noop_loader,
    )
    scale = GroupQuantScaleParameter(data=scales.contiguous(), output_dim=0, input_dim=1, weight_loader=_noop_loader)
    return qweight, scale


class GSQInt4ContainerKernel(GSQLinearKernel):
    """Repack into the GPTQ int4 layout at load, then delegate to a stock vLLM 4-bit kernel."""

    #: the zero-point parameter name the stock kernel is told (symmetric: never loaded)
    zero_point_param: str | None = "weight_zero_point"

    @classmethod
    def stock_kernel(cls) -> type[MPLinearKernel]:
        raise NotImplementedError

    @classmethod
    def stock_config(cls, c: MPLinearLayerConfig) -> MPLinearLayerConfig:
        return int4_config(c)

    def __init__(self, c: MPLinearLayerConfig, layer_name: str = "<layer>") -> None:
        super().__init__(c, layer_name)
        self.inner = self.stock_kernel()(self.stock_config(c), "weight_packed", "weight_scale", self.zero_point_param)

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
