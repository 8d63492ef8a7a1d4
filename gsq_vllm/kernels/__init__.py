"""GSQ's weight-only GEMM kernels; this module is the Triton kernels' API.

The files of ``gsq_vllm/kernels/``, one job each:

* ``__init__.py`` (here): the Triton kernels' entry points (:func:`prepare_weight`,
  :func:`gsq_matmul`, the custom op ``torch.ops.gsq_vllm.matmul``) and the choice of kernel by M.
* ``gemv_splitk.py``: Triton split-K GEMV on CUDA cores, for M <= 2 rows (decode).
* ``gemm.py``: Triton tensor-core GEMM (``tl.dot``), tiled for prefill, split-K for 3..16 rows.
* ``common.py``: small helpers the Triton launchers share (interpreter check, autotuning keys).
* ``planes.py``: the bit-plane layouts the kernels read (``triton``; ``cpu`` for the C++ kernels,
  in blocks of 16 output rows), built from checkpoint codes at load time and inverted for tests.
* ``reference.py``: the pure-torch reference (dequantize, then matmul) the kernels are tested
  against.
* ``cpu_lowbit.cpp``: the C++ CPU kernels for 2/3-bit weights (AMX, AVX-512, AVX2), registered as
  ``torch.ops.gsq_cpu.lowbit_mm``, ``lowbit_dense_mm`` and ``lowbit_dequantize_t``.
* ``cpu_lowbit.py``: builds and loads that extension and packs weights into its layout
  (:func:`gsq_vllm.kernels.cpu_lowbit.prepare`); import it by name, this module does not.

The Triton kernels take 2-, 3- and 4-bit symmetric group-wise weights:
``weight[n, k] = scale[n, k // group_size] * code[n, k]`` with signed integer codes; the kernels
compute ``y = x @ weight.T (+ bias)`` without ever writing the dequantized weight to memory.

From checkpoint to kernel (once, at load time)::

    weight_packed  int32 [N, packed]       compressed-tensors pack-quantized (either layout)
      -> gsq_vllm.packing.unpack_codes(weight_packed, bits, K)
    codes          int8  [N, K]            signed, in code_range(bits)
    weight_scale   fp16/bf16/fp32 [N, K // group_size]   (may be negative)
      -> prepare_weight(codes, weight_scale, bits, group_size)
    GSQPackedWeight
        low_plane  int32 [K // 16, N]   (4-bit: [K // 8, N])   N contiguous
        high_plane int32 [K // 32, N]   3-bit only, else None
        scales     [K // group_size, N], the checkpoint's dtype, N contiguous
        split_k_scratch  the GEMV's zeroed fp32/int32 scratch (8.5 bytes per output feature)

The plane layout is defined (and inverted, for tests) in ``gsq_vllm/kernels/planes.py``: see
``pack_kernel_planes`` and ``unpack_kernel_planes``. Then, at every forward::

    gsq_matmul(x, weight, bias=None) -> y
        x     fp16 or bf16 [..., K] on the weight's device (any strides: copied if needed)
        bias  [N] or None
        y     x.dtype [..., N]

``gsq_matmul`` checks its inputs and calls the custom op ``torch.ops.gsq_vllm.matmul`` (one
opaque node in a compiled graph; the vLLM plugin calls the same op with the planes, scales and
scratch it keeps as layer buffers, so the benchmark times exactly the serving path). The op
picks a kernel by M = rows of x (:func:`select_kernel`): M <= 2 the CUDA-core
split-K GEMV (gemv_splitk.py), M <= 16 the tensor-core kernel with split-K, larger M the tiled
tensor-core GEMM (gemm.py). Each kernel autotunes per GPU architecture (Ampere or Hopper list)
and per (M rounded up to a power of two, N, K, bits, group size, dtypes), at the first call
with each such key: run every batch size once before capturing CUDA graphs (vLLM's warm-up
does). A weight's GEMV scratch makes concurrent calls on two CUDA streams with the same weight
unsafe; one stream per model, as vLLM runs, is fine.

Constraints: bits in (2, 3, 4); group_size in (32, 64, 128) and dividing K; CUDA sm_80 or later,
or the CPU with ``TRITON_INTERPRET=1`` (tests). This package imports without Triton; only the
calls need it (:func:`triton_available` says why they would fail). Inputs a kernel cannot take
raise :class:`GSQKernelError` naming the problem.
"""

from __future__ import annotations

import dataclasses
import importlib.util

import torch

from gsq_vllm.kernels.common import interpreting
from gsq_vllm.kernels.reference import dequantize, reference_matmul
from gsq_vllm.kernels.planes import KERNEL_BITS, pack_kernel_planes, unpack_kernel_planes
from gsq_vllm.packing import PackingError

__all__ = [
    "GROUP_SIZES",
    "GEMV_MAX_M",
    "SPLITK_MAX_M",
    "GSQKernelError",
    "GSQPackedWeight",
    "prepare_weight",
    "gsq_matmul",
    "select_kernel",
    "matmul_op",
    "reference_matmul",
    "dequantize",
    "triton_available",
]

GROUP_SIZES = (32, 64, 128)
GEMV_MAX_M = 2  # up to here one CUDA-core pass per row beats dequantizing for the tensor cores
SPLITK_MAX_M = 16  # up to here one 16-row tensor-core tile, split along K
_ACTIVATION_DTYPES = (torch.float16, torch.bfloat16)
_SCALE_DTYPES = (torch.float16, torch.bfloat16, torch.float32)


class GSQKernelError(ValueError):
    """An input the GSQ kernels cannot take (shape, dtype, device, bit width, group size)."""


@dataclasses.dataclass(frozen=True)
class GSQPackedWeight:
    """A GSQ linear weight in the kernel layout (build it with :func:`prepare_weight`)."""

    low_plane: torch.Tensor  # int32 [K // 16, N] (4-bit: [K // 8, N])
    high_plane: torch.Tensor | None  # int32 [K // 32, N] for 3-bit, else None
    scales: torch.Tensor  # [K // group_size, N], fp16/bf16/fp32
    bits: int
    group_size: int
    in_features: int  # K
    out_features: int  # N
    # The GEMV's split-K scratch: fp32 [GEMV_MAX_M, N] partial sums and int32
    # [GEMV_MAX_M * ceil(N / 16)] arrival counters (8.5 bytes per output feature). Each call
    # leaves them zeroed, so one weight must not run on two CUDA streams at once. None (a weight
    # built field by field): gsq_matmul allocates a zeroed one for each call.
    split_k_scratch: tuple[torch.Tensor, torch.Tensor] | None = dataclasses.field(
        default=None, repr=False
    )

    @property
    def low_bits(self) -> int:
        """Bits per code in the low plane: 2 for 2- and 3-bit weights, 4 for 4-bit."""
        return 4 if self.bits == 4 else 2

    @property
    def device(self) -> torch.device:
        return self.low_plane.device

    def codes(self) -> torch.Tensor:
        """The signed int8 codes ``[N, K]`` back (exact inverse of the repack)."""
        return unpack_kernel_planes(self.low_plane, self.high_plane, self.bits)


def prepare_weight(
    codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int
) -> GSQPackedWeight:
    """Repack signed codes ``[N, K]`` and scales ``[N, K // group_size]`` for the kernels.

    Runs once at load time on the tensors' device; the result lives on that device.
    """
    if bits not in KERNEL_BITS:
        raise GSQKernelError(f"bits must be one of {KERNEL_BITS}, got {bits!r}")
    if group_size not in GROUP_SIZES:
        raise GSQKernelError(f"group_size must be one of {GROUP_SIZES}, got {group_size!r}")
    if codes.ndim != 2 or codes.is_floating_point() or codes.is_complex():
        raise GSQKernelError(
            f"codes must be a 2-D integer tensor [N, K], got {codes.dtype} {tuple(codes.shape)}"
        )
    out_features, in_features = codes.shape
    if in_features % group_size:
        raise GSQKernelError(
            f"group_size {group_size} does not divide the input size K = {in_features}"
        )
    expected = (out_features, in_features // group_size)
    if tuple(scales.shape) != expected:
        raise GSQKernelError(
            f"scales must have shape [N, K // group_size] = {list(expected)}, "
            f"got {list(scales.shape)}"
        )
    if scales.dtype not in _SCALE_DTYPES:
        raise GSQKernelError(f"scales must be fp16, bf16 or fp32, got {scales.dtype}")
    if scales.device != codes.device:
        raise GSQKernelError(f"codes on {codes.device} but scales on {scales.device}")
    try:
        low_plane, high_plane = pack_kernel_planes(codes, bits)
    except PackingError as error:
        raise GSQKernelError(str(error)) from error
    return GSQPackedWeight(
        low_plane=low_plane,
        high_plane=high_plane,
        scales=scales.t().contiguous(),
        bits=bits,
        group_size=group_size,
        in_features=in_features,
        out_features=out_features,
        split_k_scratch=new_scratch(out_features, codes.device),
    )


def select_kernel(m: int) -> str:
    """Which kernel serves ``m`` rows: "gemv_splitk", "gemm_splitk" or "gemm"."""
    if m <= GEMV_MAX_M:
        return "gemv_splitk"
    if m <= SPLITK_MAX_M:
        return "gemm_splitk"
    return "gemm"


def gsq_matmul(
    x: torch.Tensor, weight: GSQPackedWeight, bias: torch.Tensor | None = None
) -> torch.Tensor:
    """``x @ dequantize(weight).T (+ bias)`` with the GSQ Triton kernels; ``x`` is ``[..., K]``."""
    if not isinstance(weight, GSQPackedWeight):
        raise GSQKernelError(
            f"weight must be a GSQPackedWeight (see prepare_weight), got {type(weight)}"
        )
    if x.dtype not in _ACTIVATION_DTYPES:
        raise GSQKernelError(f"x must be fp16 or bf16, got {x.dtype}")
    if x.ndim == 0 or x.shape[-1] != weight.in_features:
        raise GSQKernelError(
            f"x has {tuple(x.shape)[-1:] or 'no'} input features, the weight takes "
            f"K = {weight.in_features}"
        )
    if x.device != weight.device:
        raise GSQKernelError(f"x is on {x.device} but the weight on {weight.device}")
    if bias is not None and tuple(bias.shape) != (weight.out_features,):
        raise GSQKernelError(
            f"bias must have shape [{weight.out_features}], got {list(bias.shape)}"
        )
    usable, reason = triton_available(x.device)
    if not usable:
        raise RuntimeError(f"GSQ kernels unavailable: {reason}")

    rows = x.reshape(-1, weight.in_features)
    if rows.stride(-1) != 1:  # the kernels take any row stride but need contiguous rows
        rows = rows.contiguous()
    scratch = weight.split_k_scratch or new_scratch(weight.out_features, weight.device)
    out = torch.ops.gsq_vllm.matmul(rows, weight.low_plane, weight.high_plane, weight.scales, *scratch,
                                    weight.bits, weight.group_size)
    if bias is not None:
        out = out + bias.to(out.dtype)
    return out.reshape(*x.shape[:-1], weight.out_features)


@torch.library.custom_op("gsq_vllm::matmul", mutates_args=("scratch_sums", "scratch_counters"))
def matmul_op(
    x: torch.Tensor,
    low_plane: torch.Tensor,
    high_plane: torch.Tensor | None,
    scales: torch.Tensor,
    scratch_sums: torch.Tensor,
    scratch_counters: torch.Tensor,
    bits: int,
    group_size: int,
) -> torch.Tensor:
    """``x [M, K] @ weight.T -> [M, N]`` on a weight's kernel-layout tensors (no bias, no checks:
    :func:`gsq_matmul` and the plugin's ``can_implement`` check at the boundary). The GEMV's
    scratch is read and left zeroed, never allocated here."""
    weight = GSQPackedWeight(
        low_plane=low_plane, high_plane=high_plane, scales=scales, bits=bits, group_size=group_size,
        in_features=x.shape[-1], out_features=low_plane.shape[1], split_k_scratch=(scratch_sums, scratch_counters),
    )
    if x.shape[0] == 0:
        return x.new_empty(0, weight.out_features)
    return _run_kernel(select_kernel(x.shape[0]), x, weight)


@matmul_op.register_fake
def _matmul_op_shape(x, low_plane, high_plane, scales, scratch_sums, scratch_counters, bits, group_size):
    return x.new_empty(x.shape[0], low_plane.shape[1])


def new_scratch(out_features: int, device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor]:
    """A zeroed GEMV split-K scratch for a weight with ``out_features`` outputs."""
    return (torch.zeros(GEMV_MAX_M, out_features, dtype=torch.float32, device=device),
            torch.zeros(GEMV_MAX_M * -(-out_features // 16), dtype=torch.int32, device=device))


def _run_kernel(name: str, rows: torch.Tensor, weight: GSQPackedWeight) -> torch.Tensor:
    # Triton is imported here, not at the top: the serving environment may lack it.
    if name == "gemv_splitk":
        from gsq_vllm.kernels.gemv_splitk import gemv_splitk

        return gemv_splitk(rows, weight)
    from gsq_vllm.kernels.gemm import gemm

    return gemm(rows, weight, split_k=name == "gemm_splitk")


def triton_available(device: torch.device | str) -> tuple[bool, str]:
    """Whether the kernels can run on ``device``, and why (not)."""
    if importlib.util.find_spec("triton") is None:
        return False, "triton is not installed (pip install 'gsq-vllm[kernels]')"
    device = torch.device(device)
    if device.type == "cuda":
        if not torch.cuda.is_available():
            return False, "CUDA is not available"
        major, minor = torch.cuda.get_device_capability(device)
        if major < 8:
            return False, f"needs an sm_80 (Ampere) or later GPU, found sm_{major}{minor}"
        return True, f"CUDA sm_{major}{minor}"
    if device.type == "cpu":
        if interpreting():
            return True, "Triton interpreter (TRITON_INTERPRET=1): correct, slow"
        return False, "on the CPU the kernels run only in Triton's interpreter (TRITON_INTERPRET=1)"
    return False, f"unsupported device type {device.type!r}"
