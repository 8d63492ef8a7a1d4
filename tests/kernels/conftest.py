"""GSQ kernel tests: real kernels on a CUDA GPU, else Triton's CPU interpreter.

``TRITON_INTERPRET`` must be set before the kernel modules are imported (``triton.jit`` reads it
when it decorates), so it is set here, at collection, and only where there is no GPU. The kernel
modules are imported lazily, by these tests, so no other test sees interpreted kernels.
"""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

if importlib.util.find_spec("triton") is None:  # e.g. the serving environment: layout tests only
    collect_ignore = ["test_kernel_matmul.py", "test_kernel_inputs.py"]


@pytest.fixture(scope="session")
def device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


@pytest.fixture(scope="session")
def make_exact_case():
    """Factory of (codes, scales, x) that a correct kernel matches bit for bit
    (see :func:`gsq_vllm.kernels.reference.exact_problem`)."""
    from gsq_vllm.kernels.reference import exact_problem

    def make(m, n, k, bits, group_size, dtype, seed=0, scale_dtype=torch.float16):
        return exact_problem(m, n, k, bits, group_size, dtype, seed, scale_dtype)

    return make
