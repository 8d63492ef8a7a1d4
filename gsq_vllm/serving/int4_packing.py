"""The int4 container: any 2/3-bit code is also a valid int4 code, so vLLM's 4-bit kernels can run it.

The layout those kernels read (GPTQ's ``qweight``) is built here, beside the serving kernels that
use it (``serving/linear_kernels/int4_container.py``, ``torch_int4_cpu.py``). Plain torch: no vLLM
import, so the quantize environment can test it too.
"""

from __future__ import annotations

import torch

from gsq_vllm.packing import PackingError, code_range, to_int32

def widen_to_uint4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes in [-8, 7] -> unsigned 4-bit values with bias 8 (vLLM's ``uint4b8``)."""
    low, high = code_range(4)
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise PackingError(f"codes out of the int4 range [{low}, {high}]")
    return (codes.to(torch.int32) + 8).to(torch.uint8)


def pack_gptq_int4(codes: torch.Tensor) -> torch.Tensor:
    """Signed codes ``[out, in]`` -> GPTQ ``qweight`` int32 ``[in // 8, out]`` (uint4b8, K-packed).

    This is the layout GPTQ checkpoints use and that Marlin's ``gptq_marlin_repack`` and vLLM's
    CPU WNA16 path read.
    """
    out_features, in_features = codes.shape
    if in_features % 8:
        raise PackingError(f"GPTQ int4 packing needs in_features % 8 == 0, got {in_features}")
    unsigned = widen_to_uint4(codes).to(torch.int64).t().contiguous()  # [in, out]
    unsigned = unsigned.view(in_features // 8, 8, out_features)
    shifts = (torch.arange(8, dtype=torch.int64, device=codes.device) * 4).view(1, 8, 1)
    return to_int32((unsigned << shifts).sum(dim=1))


def unpack_gptq_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_gptq_int4`: int32 ``[in // 8, out]`` -> signed int8 ``[out, in]``."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(8, dtype=torch.int64, device=qweight.device) * 4).view(1, 8, 1)
    unsigned = (words.unsqueeze(1) >> shifts) & 0xF  # [in//8, 8, out]
    return (unsigned.reshape(-1, qweight.shape[1]) - 8).t().contiguous().to(torch.int8)



#: PyTorch's CPU int4 pack (``aten._convert_weight_to_int4pack_for_cpu``) depends on the CPU kernel
#: ATen dispatches to: (rows per block, how a byte pairs rows). In a whole block of ``B`` rows the
#: bytes are ``[K, B / 2]``; "split" puts row ``j`` in the low nibble and row ``j + B / 2`` in the
#: high one (AVX-512: B = 64, AVX2: B = 32), "pairs" rows ``2j`` and ``2j + 1`` (no vector ISA).
#: A last, partial block is always "pairs".
TORCH_CPU_INT4_LAYOUTS = {"avx512": (64, "split"), "avx2": (32, "split"), "scalar": (32, "pairs")}


def _nibbles(blocks: torch.Tensor, form: str) -> torch.Tensor:
    """Bytes ``[blocks, K, B / 2]`` -> values ``[blocks * B, K]`` (uint8)."""
    count, in_features, half = blocks.shape
    low, high = blocks & 0xF, blocks >> 4
    if form == "split":  # [blocks, 2, B/2, K]
        rows = torch.stack([low, high], dim=1).permute(0, 1, 3, 2)
    else:  # [blocks, B/2, 2, K]
        rows = torch.stack([low, high], dim=2).permute(0, 3, 2, 1)
    return rows.reshape(count * 2 * half, in_features)


def unpack_torch_cpu_int4(packed: torch.Tensor, out_features: int, in_features: int, layout: str) -> torch.Tensor:
    """Unsigned 4-bit values ``[out, in]`` (uint8) back from PyTorch's CPU int4 pack in ``layout``
    (a key of ``TORCH_CPU_INT4_LAYOUTS``; :func:`torch_cpu_int4_layout` finds the one in use).

    Lets a layer dequantise its weight on the fly for large batches without a second copy.
    """
    block, form = TORCH_CPU_INT4_LAYOUTS[layout]
    if out_features % 2 or packed.numel() * 2 != out_features * in_features:
        raise PackingError(f"PyTorch CPU int4 pack of {out_features} x {in_features}: expected "
                           f"{out_features * in_features // 2} bytes and an even row count, found {packed.numel()} bytes")
    flat = packed.reshape(-1)
    whole = out_features - out_features % block
    parts = []
    if whole:
        parts.append(_nibbles(flat[: whole * in_features // 2].view(whole // block, in_features, block // 2), form))
    if whole < out_features:
        tail = out_features - whole
        parts.append(_nibbles(flat[whole * in_features // 2 :].view(1, in_features, tail // 2), "pairs"))
    return parts[0] if len(parts) == 1 else torch.cat(parts)


def torch_cpu_int4_layout(packed: torch.Tensor, values: torch.Tensor) -> str | None:
    """Which of ``TORCH_CPU_INT4_LAYOUTS`` reads ``packed`` back as ``values`` ``[out, in]`` (None: none
    does, e.g. a PyTorch whose pack changed)."""
    for layout in TORCH_CPU_INT4_LAYOUTS:
        try:
            if torch.equal(unpack_torch_cpu_int4(packed, *values.shape, layout).to(values.dtype), values):
                return layout
        except PackingError:
            return None
    return None
