"""The weight format GSQ writes and the vLLM plugin serves: one owner for its facts.

A GSQ weight is symmetric, group-wise (or channel-wise) scalar int: ``weight[n, k] =
scales[n, k // group_size] * codes[n, k]``, codes on the signed grid of ``num_bits``
({-2..1}, {-4..3}, {-8..7}; ternary codes {-1, 0, 1} are stored as 2-bit), scales possibly
negative. On disk it is compressed-tensors ``pack-quantized`` (see :mod:`gsq_vllm.packing`).

Plain Python and torch: the algorithm, the checkpoint reader, the kernels and the vLLM plugin all
ask this module, so the widths they accept cannot drift apart.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch

#: widths GSQ quantizes to (ternary codes are stored as 2-bit)
GSQ_BITS = (2, 3, 4)
#: widths a pack-quantized checkpoint may hold for the checkpoint reader (GSQ's, and 8-bit layers beside them)
CHECKPOINT_BITS = (2, 3, 4, 8)
#: widths the vLLM plugin takes a checkpoint over for (stock vLLM has no 2/3-bit path on CPU/ROCm)
CLAIMED_BITS = (2, 3)
#: widths the plugin's kernels serve; 4-bit layers are served beside 2/3-bit ones (on the CPU, where
#: stock vLLM's 4-bit kernel exists only for AVX-512) or when forced with ``--quantization gsq``
SERVED_BITS = (2, 3, 4)
PACK_QUANTIZED = "pack-quantized"
STRATEGIES = ("group", "channel")


def code_range(num_bits: int) -> tuple[int, int]:
    """Smallest and largest signed code of a symmetric ``num_bits`` integer grid ({-4..3} at 3 bits)."""
    if not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
        raise ValueError(f"num_bits must be an integer in 1..8, got {num_bits!r}")
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def is_weight_only_int(weights: Mapping[str, Any] | None, input_activations: Any = None) -> bool:
    """A compressed-tensors ``weights`` entry (as in config.json) of this format, any width."""
    if not weights or input_activations:
        return False
    return (
        str(weights.get("type", "int")) == "int"
        and bool(weights.get("symmetric", True))
        and str(weights.get("strategy", "group")) in STRATEGIES
        and not weights.get("dynamic", False)
    )


def is_claimed_weights(weights: Mapping[str, Any] | None, input_activations: Any = None) -> bool:
    """A ``weights`` entry the vLLM plugin serves without being asked: weight-only int at a claimed width."""
    return is_weight_only_int(weights, input_activations) and weights.get("num_bits") in CLAIMED_BITS


def dequantize(codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """fp32 weight ``[N, K]`` from int codes ``[N, K]`` and scales ``[N, K / group_size]``
    (one column: channel-wise). The one dequantisation every part of the project uses."""
    import torch  # here, so the command line can read the widths above without importing torch

    groups = scales.shape[-1]
    if codes.shape[-1] % groups or scales.shape[0] != codes.shape[0]:
        raise ValueError(f"scales {tuple(scales.shape)} do not tile codes of shape {tuple(codes.shape)}")
    return codes.to(torch.float32) * scales.to(torch.float32).repeat_interleave(codes.shape[-1] // groups, dim=1)
