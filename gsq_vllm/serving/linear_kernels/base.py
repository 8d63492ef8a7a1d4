"""The shape every GSQ kernel has (vLLM's mixed-precision kernel interface) and its common input.

The scheme unpacks the checkpoint before any kernel sees it, so every kernel starts from the same
two tensors, left on the layer as ``layer.gsq_codes`` and ``layer.gsq_scales``:

* codes  int8 ``[N, K]`` (this rank's output rows and input columns), signed, in [-4, 3] or [-2, 1]
* scales ``[N, K // group_size]`` in the model dtype (may be negative)

``weight[n, k] = scales[n, k // group_size] * codes[n, k]``. ``MPLinearLayerConfig`` describes
the layer: ``partition_weight_shape = (K, N)``, ``weight_type`` uint2b2 / uint3b4 (the bits),
``group_size`` (K for channel-wise scales), ``act_type`` the activation dtype.
"""

from __future__ import annotations

from abc import abstractmethod
from typing import ClassVar

import torch
from vllm.model_executor.kernels.linear import MPLinearKernel, MPLinearLayerConfig


class GSQLinearKernel(MPLinearKernel):
    """Base class: ``can_implement`` / ``process_weights_after_loading`` / ``apply_weights``."""

    #: the name ``GSQ_VLLM_KERNEL`` selects this kernel by
    name: ClassVar[str]

    def __init__(self, c: MPLinearLayerConfig, layer_name: str = "<layer>") -> None:
        ok, reason = self.can_implement(c)
        if not ok:
            raise ValueError(f"{layer_name}: {type(self).__name__} cannot run this layer: {reason}")
        super().__init__(c, w_q_param_name="weight_packed", w_s_param_name="weight_scale")
        self.layer_name = layer_name

    @classmethod
    def get_min_capability(cls) -> int:
        return -1

    @property
    def num_bits(self) -> int:
        return self.config.weight_type.size_bits

    @property
    def group_size(self) -> int:
        return self.config.group_size

    @staticmethod
    def take_codes_and_scales(layer: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor]:
        """Remove and return the scheme's unpacked codes and scales from the layer."""
        codes, scales = layer.gsq_codes, layer.gsq_scales
        del layer.gsq_codes, layer.gsq_scales
        return codes, scales

    @abstractmethod
    def process_weights_after_loading(self, layer: torch.nn.Module) -> None: ...

    @abstractmethod
    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor: ...


def register(layer: torch.nn.Module, name: str, tensor: torch.Tensor) -> None:
    """Attach a kernel tensor as a frozen parameter (moved with the module, seen by Dynamo)."""
    layer.register_parameter(name, torch.nn.Parameter(tensor, requires_grad=False))
