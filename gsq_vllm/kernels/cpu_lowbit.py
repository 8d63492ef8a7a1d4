"""GSQ's native CPU kernels: 2/3-bit weight-only GEMM that reads the packed codes directly.

The int4 container (PyTorch's or vLLM's 4-bit CPU GEMM) widens every 2/3-bit code to 4 bits, so a
2-bit layer moves as many bytes as a 4-bit one. These kernels (C++, ``cpu_lowbit.cpp`` beside this
file; AMX, AVX-512 BF16, AVX-512F or AVX2+FMA chosen per call) keep 2 bits per weight at 2 bits
and 3 at 3 bits. :func:`prepare` builds what they take (:class:`CPUPackedWeight`) from signed codes
``[N, K]`` and scales ``[N, K / group_size]``: the ``cpu`` plane layout of
:mod:`gsq_vllm.kernels.planes` (:func:`~gsq_vllm.kernels.planes.pack_kernel_planes` with
``layout="cpu"``), cut into blocks of 16 output rows (:func:`~gsq_vllm.kernels.planes.block_rows`)
so that one thread reads its block's words front to back:

* ``low_plane``  int32 ``[N / 16, K / 16, 16]``: 2-bit, 16 codes a word; 3-bit, two of the three
  words that hold each 32 codes (3 bits side by side; planes.py's ``cpu3_fields``);
* ``high_plane`` int32 ``[N / 16, K / 32, 16]``, 3-bit only: the third word of each 32 codes;
* ``scales``     fp32  ``[N / 16, K / group_size, 16]``.

N must be a multiple of 16, ``group_size`` one of 32, 64, 128 dividing K (:func:`shape_problem`).
The ops, registered as ``torch.ops.gsq_cpu.*``:

* ``lowbit_mm(x [M, K], low, high, scales, bits, G) -> [M, N]`` in ``x.dtype`` (fp32, bf16 or
  fp16), fp32 accumulation, for decode-sized M. With bf16 x, 3 rows or more on AMX CPUs go through
  bf16 tile multiplies; otherwise AVX-512 reads each code as a float through its bits (one
  instruction per 16 weights; an fp32 rounding error about 2^8 (2-bit) or 2^9 (3-bit) times the
  plain path's, far below bf16's), and AVX2 widens x to fp32 and looks the levels up.
* ``lowbit_dense_mm(x, low, high, scales, bits, G) -> [M, N]``: for large M (prefill): the weight
  rebuilt in one pass into a scratch buffer the op keeps, then PyTorch's dense GEMM (bf16 x on a
  CPU with AVX-512 BF16: a bf16 GEMM; otherwise fp32, since PyTorch's bf16 GEMM without those
  instructions is far slower than its fp32 one).
* ``lowbit_dequantize_t(low, high, scales, bits, G, dtype) -> [K, N]``: the weight, transposed,
  fp32 or bf16 (tests, inspection).

All three have fake implementations, so a compiled vLLM graph keeps each as a single node. The
extension is compiled once per machine with PyTorch's C++ extension builder (``scripts/setup.sh``
does it; otherwise the first use does, in about a minute), cached under ``$TORCH_EXTENSIONS_DIR``.
:func:`unavailable_reason` says why it cannot be used (no compiler, neither AVX-512F nor AVX2)
instead of failing later.

The torch reference beside it is :func:`gsq_vllm.kernels.reference.reference_matmul`.
"""

from __future__ import annotations

import functools
import logging
import re
from dataclasses import dataclass
from pathlib import Path

import torch

from gsq_vllm.kernels.planes import block_rows, pack_kernel_planes

logger = logging.getLogger(__name__)

SOURCE = Path(__file__).with_name("cpu_lowbit.cpp")
#: widths and group sizes the C++ kernels take (a multiple of 16 output rows)
BITS = (2, 3)
GROUP_SIZES = (32, 64, 128)
ROW_BLOCK = 16


@functools.lru_cache(maxsize=None)
def _load() -> str | None:
    """Build (or reuse) and load the extension; ``None`` when it works, else the reason it does not."""
    try:
        from torch.utils import cpp_extension

        name = "gsq_cpu_lowbit_" + re.sub(r"[^0-9a-zA-Z]", "_", torch.__version__)
        cpp_extension.load(
            name=name, sources=[str(SOURCE)], extra_cflags=["-O3", "-fopenmp"],
            extra_ldflags=["-fopenmp"], is_python_module=False, verbose=False,
        )
    except Exception as error:  # no compiler, no headers, a build error: say which
        first_line = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        return f"the C++ kernels could not be built or loaded ({first_line})"
    _register_fakes()
    if torch.ops.gsq_cpu.isa() == "none":  # the op's own CPU check (GSQ_VLLM_CPU_ISA=none forces it)
        return "this CPU has neither AVX-512F nor AVX2+FMA"
    return None


def _register_fakes() -> None:
    @torch.library.register_fake("gsq_cpu::lowbit_mm")
    def _(x, low_plane, high_plane, scales, bits, group_size):
        return x.new_empty(x.shape[0], low_plane.shape[0] * 16)

    @torch.library.register_fake("gsq_cpu::lowbit_dense_mm")
    def _(x, low_plane, high_plane, scales, bits, group_size):
        return x.new_empty(x.shape[0], low_plane.shape[0] * 16)

    @torch.library.register_fake("gsq_cpu::lowbit_dequantize_t")
    def _(low_plane, high_plane, scales, bits, group_size, dtype):
        return low_plane.new_empty(low_plane.shape[1] * 16, low_plane.shape[0] * 16, dtype=dtype)


def unavailable_reason() -> str | None:
    """Why the native kernels cannot run here (``None``: they can). Builds them on first call."""
    return _load()


def isa() -> str:
    """The best instruction set the kernels use now: ``amx``, ``avx512-bf16``, ``avx512`` or ``avx2``
    (``GSQ_VLLM_CPU_ISA=avx512-bf16`` / ``avx512`` / ``avx2`` forces a lesser path, for tests)."""
    _require()
    return torch.ops.gsq_cpu.isa()


def _require() -> None:
    reason = _load()
    if reason:
        raise RuntimeError(f"GSQ CPU kernels unavailable: {reason}")


def shape_problem(n: int, k: int, bits: int, group_size: int) -> str | None:
    """Why a layer of ``n`` outputs and ``k`` inputs cannot use these kernels (``None``: it can)."""
    if bits not in BITS:
        return f"{bits}-bit codes (the native CPU kernels take {BITS})"
    if group_size not in GROUP_SIZES:
        return f"group size {group_size} not in {GROUP_SIZES}"
    if k % group_size:
        return f"input size {k} is not a multiple of the group size {group_size}"
    if n % ROW_BLOCK:
        return f"output size {n} is not a multiple of {ROW_BLOCK}"
    return None


@dataclass
class CPUPackedWeight:
    """A layer's weight as the native CPU kernels read it (built once at load time)."""

    low_plane: torch.Tensor  # int32 [N / 16, K / 16, 16]
    high_plane: torch.Tensor | None  # int32 [N / 16, K / 32, 16], 3-bit only
    scales: torch.Tensor  # fp32 [N / 16, K / group_size, 16]
    bits: int
    group_size: int


def prepare(codes: torch.Tensor, scales: torch.Tensor, bits: int, group_size: int) -> CPUPackedWeight:
    """Signed codes ``[N, K]`` and scales ``[N, K / group_size]`` -> the kernels' blocked layout."""
    n, k = codes.shape
    problem = shape_problem(n, k, bits, group_size)
    if problem:
        raise ValueError(f"the native CPU kernels cannot take this weight: {problem}")
    low, high = pack_kernel_planes(codes, bits, layout="cpu")
    return CPUPackedWeight(block_rows(low), None if high is None else block_rows(high),
                           block_rows(scales.to(torch.float32).t()), bits, group_size)


def lowbit_mm(x: torch.Tensor, weight: CPUPackedWeight) -> torch.Tensor:
    """``x [M, K] @ weight.T`` with fp32 accumulation, returned in ``x.dtype``."""
    _require()
    return torch.ops.gsq_cpu.lowbit_mm(x, weight.low_plane, weight.high_plane, weight.scales, weight.bits, weight.group_size)


def dense_mm(x: torch.Tensor, weight: CPUPackedWeight) -> torch.Tensor:
    """``x [M, K] @ weight.T`` through the rebuilt weight and a dense GEMM, in ``x.dtype``."""
    _require()
    return torch.ops.gsq_cpu.lowbit_dense_mm(x, weight.low_plane, weight.high_plane, weight.scales, weight.bits,
                                             weight.group_size)


def dequantize_t(weight: CPUPackedWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The weight transposed, ``[K, N]``, in ``dtype`` (fp32 or bf16), in one pass over the planes."""
    _require()
    return torch.ops.gsq_cpu.lowbit_dequantize_t(weight.low_plane, weight.high_plane, weight.scales, weight.bits,
                                                 weight.group_size, dtype)


def build_main() -> int:
    """``python -m gsq_vllm.kernels.cpu_lowbit``: build the extension now (the set-up runs this)."""
    logging.basicConfig(level=logging.INFO, format="%(message)s")
    reason = unavailable_reason()
    if reason:
        logger.warning("GSQ native CPU kernels not built: %s (serving falls back to the int4 container)", reason)
        return 0
    logger.info("GSQ native CPU kernels ready (%s)", isa())
    return 0


if __name__ == "__main__":
    raise SystemExit(build_main())
