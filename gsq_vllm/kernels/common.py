"""Small helpers the kernel launchers share (no Triton import here)."""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter (``TRITON_INTERPRET=1``)."""
    return os.environ.get("TRITON_INTERPRET", "0").lower() in ("1", "true", "yes", "on")


def m_bucket(m: int) -> int:
    """M rounded up to a power of two (capped at 4096): the autotuning key, so that serving,
    where M changes every step, tunes a handful of times rather than once per M."""
    return min(1 << max(m - 1, 0).bit_length(), 4096)


def autotune_arch(device: torch.device) -> str:
    """Which configuration list fits the GPU: "hopper" (sm_90 and later) or "ampere"."""
    major, _ = torch.cuda.get_device_capability(device)
    return "hopper" if major >= 9 else "ampere"
