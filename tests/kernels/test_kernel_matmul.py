"""Kernels against the torch reference: every kernel, bit width, group size and dtype.

Most cases use exact data (power-of-two scales, activations on a 1/8 grid; see conftest), where
the kernel must equal the reference bit for bit, so a single misplaced code fails. A few cases
use realistic random data with a rounding tolerance.
"""

from __future__ import annotations

import itertools

import pytest
import torch

from gsq_vllm.kernels import (
    GSQPackedWeight,
    gsq_matmul,
    prepare_weight,
    reference_matmul,
    select_kernel,
)
from gsq_vllm.packing import code_range

DTYPES = [torch.float16, torch.bfloat16]
KERNELS = ["gemv_splitk", "gemm_splitk", "gemm"]
ROWS_FOR = {"gemv_splitk": [1, 2], "gemm_splitk": [3, 16], "gemm": [17, 40]}


def run_kernel(name: str, x: torch.Tensor, weight: GSQPackedWeight, config=None):
    if name == "gemv_splitk":
        from gsq_vllm.kernels.gemv_splitk import gemv_splitk

        return gemv_splitk(x, weight, config)
    from gsq_vllm.kernels.gemm import gemm

    return gemm(x, weight, split_k=name == "gemm_splitk", config=config)


def check_exact(make_exact_case, device, kernel, m, n, k, bits, group_size, dtype, config=None):
    codes, scales, x = make_exact_case(m, n, k, bits, group_size, dtype, seed=m * 7 + n + bits)
    weight = prepare_weight(codes.to(device), scales.to(device), bits, group_size)
    out = run_kernel(kernel, x.to(device), weight, config)
    expected = reference_matmul(x, codes, scales, group_size)
    assert out.dtype == dtype and out.shape == (m, n)
    assert torch.equal(out.cpu(), expected), (out.cpu() - expected).abs().max()


# One case per (kernel, bits, dtype); group size, M and N rotate so that each value shows up,
# N is never a multiple of the block, and K spans several groups.
DEFAULT_CASES = [
    (kernel, bits, dtype, group_size, ROWS_FOR[kernel][i % 2], n)
    for i, (kernel, bits, dtype) in enumerate(itertools.product(KERNELS, [2, 3, 4], DTYPES))
    for group_size, n in [([32, 64, 128][i % 3], [40, 72, 9][i % 3])]
]


@pytest.mark.parametrize("kernel, bits, dtype, group_size, m, n", DEFAULT_CASES)
def test_exact(make_exact_case, device, kernel, bits, dtype, group_size, m, n):
    k = max(256, 2 * group_size)
    check_exact(make_exact_case, device, kernel, m, n, k, bits, group_size, dtype)


# Explicit block shapes: splits that do not divide the steps, BLOCK_K not dividing K (masked
# rows), BLOCK_K above the group size (scales per row of the tile), blocks narrower than N.
CONFIG_CASES = [
    ("gemv_splitk", 3, 32, 96, dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3)),
    ("gemv_splitk", 3, 128, 384, dict(BLOCK_N=64, BLOCK_K=256, SPLIT_K=1)),
    ("gemv_splitk", 2, 32, 160, dict(BLOCK_N=16, BLOCK_K=128, SPLIT_K=2)),
    ("gemv_splitk", 4, 64, 192, dict(BLOCK_N=32, BLOCK_K=32, SPLIT_K=4)),
    ("gemm_splitk", 3, 32, 160, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=3, GROUP_M=1)),
    ("gemm_splitk", 2, 64, 192, dict(BLOCK_M=16, BLOCK_N=32, BLOCK_K=128, SPLIT_K=2, GROUP_M=1)),
    ("gemm", 3, 32, 96, dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=64, SPLIT_K=1, GROUP_M=2)),
    ("gemm", 4, 128, 384, dict(BLOCK_M=32, BLOCK_N=64, BLOCK_K=256, SPLIT_K=1, GROUP_M=8)),
]


@pytest.mark.parametrize("kernel, bits, group_size, k, config", CONFIG_CASES)
def test_exact_block_shapes(make_exact_case, device, kernel, bits, group_size, k, config):
    m = {"gemv_splitk": 2, "gemm_splitk": 5, "gemm": 37}[kernel]
    check_exact(
        make_exact_case, device, kernel, m, 33, k, bits, group_size, torch.float16, config
    )


@pytest.mark.parametrize("bits", [2, 3])
@pytest.mark.parametrize("dtype", DTYPES)
def test_realistic_data_within_rounding(device, bits, dtype):
    """Gaussian activations and bf16 scales: within the rounding of the activation dtype."""
    gen = torch.Generator().manual_seed(bits)
    n, k, group_size = 48, 256, 64
    low, high = code_range(bits)
    codes = torch.randint(low, high + 1, (n, k), generator=gen, dtype=torch.int8)
    scales = (torch.randn(n, k // group_size, generator=gen) * 0.02).to(torch.bfloat16)
    weight = prepare_weight(codes.to(device), scales.to(device), bits, group_size)
    weight_fp32 = codes.float() * scales.float().repeat_interleave(group_size, 1)
    eps = torch.finfo(dtype).eps
    for m in (1, 8, 24):  # one per kernel
        x = torch.randn(m, k, generator=gen).to(dtype)
        out = gsq_matmul(x.to(device), weight).cpu().float()
        expected = reference_matmul(x, codes, scales, group_size).float()
        # the dequantized weight and the output are each rounded once to the activation dtype
        bound = eps * (x.float().abs() @ weight_fp32.abs().t()) + eps * expected.abs() + 1e-6
        error = (out - expected).abs()
        assert (error <= bound).all(), (select_kernel(m), error.max())


def test_public_api_batches_and_bias(make_exact_case, device):
    """gsq_matmul flattens leading dimensions, adds the bias and picks a kernel by M."""
    codes, scales, x = make_exact_case(6, 24, 128, 3, 32, torch.bfloat16)
    weight = prepare_weight(codes.to(device), scales.to(device), 3, 32)
    bias = (torch.arange(24) / 4).to(torch.bfloat16)
    out = gsq_matmul(x.view(2, 3, 128).to(device), weight, bias.to(device))
    expected = reference_matmul(x, codes, scales, 32, bias).view(2, 3, 24)
    assert torch.equal(out.cpu(), expected)
    assert [select_kernel(m) for m in (1, 2, 3, 16, 17, 4096)] == [
        "gemv_splitk", "gemv_splitk", "gemm_splitk", "gemm_splitk", "gemm", "gemm"
    ]


def test_gemv_scratch_left_zeroed(make_exact_case, device):
    """The GEMV's split-K scratch is zero after every call, so calls do not leak into each
    other; more rows than the scratch holds get a fresh one."""
    from gsq_vllm.kernels.gemv_splitk import gemv_splitk

    codes, scales, x = make_exact_case(3, 40, 256, 2, 64, torch.float16)
    weight = prepare_weight(codes.to(device), scales.to(device), 2, 64)
    config = dict(BLOCK_N=16, BLOCK_K=64, SPLIT_K=3)
    for rows in (x[:1], x[:2], x[:1], x):
        out = gemv_splitk(rows.to(device), weight, config)
        assert torch.equal(out.cpu(), reference_matmul(rows, codes, scales, 64))
        assert all(not t.any() for t in weight.split_k_scratch)


def test_weight_rebuilt_from_planes(make_exact_case, device):
    """A GSQPackedWeight rebuilt from its stored planes (as the vLLM plugin does per call),
    without the scratch, still gives exact results."""
    import dataclasses

    codes, scales, x = make_exact_case(2, 24, 128, 3, 32, torch.float16)
    packed = prepare_weight(codes.to(device), scales.to(device), 3, 32)
    fields = {f.name: getattr(packed, f.name) for f in dataclasses.fields(packed)}
    rebuilt = GSQPackedWeight(**{**fields, "split_k_scratch": None})
    for rows in (x[:1], x):
        expected = reference_matmul(rows, codes, scales, 32)
        assert torch.equal(gsq_matmul(rows.to(device), rebuilt).cpu(), expected)


def test_decode_call_allocates_no_scratch(make_exact_case, device, monkeypatch):
    """A decode-sized call with a prepared weight uses the weight's own scratch (what the vLLM
    plugin keeps as layer buffers): nothing is allocated or zero-filled around the kernel."""
    import gsq_vllm.kernels as kernels
    from gsq_vllm.kernels import gemv_splitk

    codes, scales, x = make_exact_case(2, 32, 128, 3, 32, torch.float16)
    weight = prepare_weight(codes.to(device), scales.to(device), 3, 32)
    sums, counters = weight.split_k_scratch
    made = []
    real_zeros = torch.zeros

    def counting_zeros(*args, **kwargs):
        made.append(args)
        return real_zeros(*args, **kwargs)

    monkeypatch.setattr(kernels.torch, "zeros", counting_zeros)  # the module-level name both files use
    assert gemv_splitk.torch is kernels.torch
    out = gsq_matmul(x[:1].to(device), weight)
    assert made == [] and weight.split_k_scratch[0] is sums and weight.split_k_scratch[1] is counters
    assert torch.equal(out.cpu(), reference_matmul(x[:1], codes, scales, 32))
    assert not sums.any() and not counters.any()


def test_weight_round_trip(make_exact_case, device):
    codes, scales, _ = make_exact_case(1, 17, 96, 3, 32, torch.float16)
    weight = prepare_weight(codes.to(device), scales.to(device), 3, 32)
    assert torch.equal(weight.codes().cpu(), codes)
    assert weight.scales.shape == (3, 17) and weight.scales.is_contiguous()


@pytest.mark.large_sweep
@pytest.mark.parametrize("bits", [2, 3, 4])
@pytest.mark.parametrize("group_size", [32, 64, 128])
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("kernel", KERNELS)
def test_exact_large_sweep(make_exact_case, device, kernel, bits, group_size, dtype):
    rows = {"gemv_splitk": [1, 2], "gemm_splitk": [3, 7, 16], "gemm": [17, 33, 64, 100]}[kernel]
    for m, n, k_groups in itertools.product(rows, [1, 31, 64, 130], [1, 3, 8]):
        k = group_size * k_groups
        check_exact(make_exact_case, device, kernel, m, n, k, bits, group_size, dtype)
