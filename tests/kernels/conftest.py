"""GSQ kernel tests: real kernels on a CUDA GPU, else Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``triton.jit`` reads it
when it decorates), so it is set here, at collection, and only where there is no GPU. The kernel
modules are imported lazily, by these tests, so no other test sees interpreted kernels.
"""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

pytest.importorskip("triton")

from gsq_vllm.packing import code_range  # noqa: E402


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def exact_weight(n: int, k: int, bits: int, group_size: int, seed: int, scale_dtype=torch.float16):
    """Random codes and power-of-two scales of both signs: every product and partial sum of a
    small matmul is exact in fp32, so a kernel must match the reference bit for bit."""
    gen = torch.Generator().manual_seed(seed)
    low, high = code_range(bits)
    codes = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
    exponents = torch.randint(-5, -1, (n, k // group_size), generator=gen).to(torch.float32)
    signs = torch.randint(0, 2, (n, k // group_size), generator=gen).to(torch.float32) * 2 - 1
    return codes, (signs * torch.exp2(exponents)).to(scale_dtype)


def exact_activations(m: int, k: int, dtype: torch.dtype, seed: int) -> torch.Tensor:
    """Multiples of 1/8 in [-4, 4]: exact in fp16 and bf16."""
    gen = torch.Generator().manual_seed(seed + 1)
    return (torch.randint(-32, 33, (m, k), generator=gen).to(torch.float32) / 8).to(dtype)


@pytest.fixture(scope="session")
def make_exact_case():
    """Factory: (codes, scales, x) for an exact comparison (see :func:`exact_weight`)."""

    def make(m, n, k, bits, group_size, dtype, seed=0, scale_dtype=torch.float16):
        codes, scales = exact_weight(n, k, bits, group_size, seed, scale_dtype)
        return codes, scales, exact_activations(m, k, dtype, seed)

    return make
