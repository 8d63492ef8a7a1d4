"""Inputs the kernels cannot take fail with an error naming the problem; odd-but-valid inputs
(non-contiguous views, fp32 or negative scales, empty batches) give the right result."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from gsq_vllm.kernels import (
    GSQKernelError,
    gsq_matmul,
    prepare_weight,
    reference_matmul,
    triton_available,
)


@pytest.fixture
def case(make_exact_case, device):
    codes, scales, x = make_exact_case(3, 24, 128, 3, 32, torch.float16)
    weight = prepare_weight(codes.to(device), scales.to(device), 3, 32)
    return codes, scales, x.to(device), weight


def test_group_size_must_divide_k():
    codes = torch.zeros(4, 96, dtype=torch.int8)
    with pytest.raises(GSQKernelError, match="does not divide"):
        prepare_weight(codes, torch.ones(4, 1), 3, 64)


@pytest.mark.parametrize(
    "bits, group_size, message", [(5, 32, "bits"), (1, 32, "bits"), (3, 16, "group_size")]
)
def test_unsupported_bits_and_group_sizes(bits, group_size, message):
    with pytest.raises(GSQKernelError, match=message):
        prepare_weight(torch.zeros(4, 128, dtype=torch.int8), torch.ones(4, 4), bits, group_size)


def test_bad_codes_and_scales():
    with pytest.raises(GSQKernelError, match="integer"):
        prepare_weight(torch.zeros(4, 64), torch.ones(4, 2), 2, 32)
    with pytest.raises(GSQKernelError, match=r"\[N, K // group_size\]"):
        prepare_weight(torch.zeros(4, 64, dtype=torch.int8), torch.ones(2, 4), 2, 32)
    with pytest.raises(GSQKernelError, match="fp16, bf16 or fp32"):
        prepare_weight(
            torch.zeros(4, 64, dtype=torch.int8), torch.ones(4, 2, dtype=torch.int32), 2, 32
        )
    with pytest.raises(GSQKernelError, match="range"):
        prepare_weight(torch.full((4, 64), 3, dtype=torch.int8), torch.ones(4, 2), 2, 32)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.int8])
def test_wrong_activation_dtype(case, dtype):
    _, _, x, weight = case
    with pytest.raises(GSQKernelError, match="fp16 or bf16"):
        gsq_matmul(x.to(dtype), weight)


def test_wrong_input_size_and_bias(case):
    _, _, x, weight = case
    with pytest.raises(GSQKernelError, match="K = 128"):
        gsq_matmul(x[:, :96], weight)
    with pytest.raises(GSQKernelError, match="bias"):
        gsq_matmul(x, weight, torch.zeros(23, dtype=x.dtype, device=x.device))
    with pytest.raises(GSQKernelError, match="GSQPackedWeight"):
        gsq_matmul(x, torch.zeros(24, 128, dtype=x.dtype))


def test_non_contiguous_activations(case, device):
    codes, scales, x, weight = case
    expected = reference_matmul(x.cpu(), codes, scales, 32)
    wide = torch.zeros(3, 256, dtype=x.dtype, device=device)
    wide[:, ::2] = x  # every other column: inner stride 2
    assert torch.equal(gsq_matmul(wide[:, ::2], weight).cpu(), expected)
    transposed = x.t().contiguous().t()  # column-major
    assert torch.equal(gsq_matmul(transposed, weight).cpu(), expected)
    padded = torch.zeros(3, 160, dtype=x.dtype, device=device)
    padded[:, :128] = x  # row stride 160, inner stride 1: taken as is
    assert torch.equal(gsq_matmul(padded[:, :128], weight).cpu(), expected)


def test_non_contiguous_codes_and_fp32_scales(make_exact_case, device):
    codes, scales, x = make_exact_case(20, 16, 64, 2, 32, torch.bfloat16)
    weight = prepare_weight(
        codes.t().contiguous().t().to(device), scales.float().t().contiguous().t().to(device), 2, 32
    )
    expected = reference_matmul(x, codes, scales, 32)
    assert torch.equal(gsq_matmul(x.to(device), weight).cpu(), expected)


def test_empty_batch(case):
    _, _, x, weight = case
    out = gsq_matmul(x[:0], weight)
    assert out.shape == (0, 24) and out.dtype == x.dtype


def test_availability_reports_a_reason(monkeypatch):
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    usable, reason = triton_available("cpu")
    assert usable and "interpreter" in reason
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    usable, reason = triton_available("cpu")
    assert not usable and "TRITON_INTERPRET" in reason


def test_imports_without_triton():
    """The serving environment may lack Triton: the package must import and say why."""
    script = (
        "import sys; sys.modules['triton'] = None\n"
        "import gsq_vllm.kernels as kernels\n"
        "usable, reason = kernels.triton_available('cpu')\n"
        "assert not usable and 'not installed' in reason, reason\n"
    )
    subprocess.run([sys.executable, "-c", script], check=True)
