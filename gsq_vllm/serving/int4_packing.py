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



#: PyTorch's CPU int4 pack (``aten._convert_weight_to_int4pack_for_cpu``) groups output rows by 64
TORCH_CPU_ROW_BLOCK = 64


def unpack_torch_cpu_int4(packed: torch.Tensor, out_features: int, in_features: int) -> torch.Tensor:
    """Unsigned 4-bit values ``[out, in]`` (uint8) back from PyTorch's CPU int4 pack.

    The pack is ``[out / 64, in, 32]`` bytes: byte ``[b, k, j]`` holds row ``64 b + j`` in its low
    nibble and row ``64 b + 32 + j`` in its high one (read off the op's output; the kernel that uses
    this checks it against the codes at load time, so another PyTorch's layout is caught, not used).
    Lets a layer dequantise its weight on the fly for large batches without a second copy.
    """
    if out_features % TORCH_CPU_ROW_BLOCK or packed.numel() * 2 != out_features * in_features:
        raise PackingError(
            f"PyTorch CPU int4 pack of {out_features} x {in_features}: needs out_features % {TORCH_CPU_ROW_BLOCK} == 0 "
            f"and {out_features * in_features // 2} bytes, found {packed.numel()}"
        )
    blocks = packed.reshape(out_features // TORCH_CPU_ROW_BLOCK, in_features, TORCH_CPU_ROW_BLOCK // 2)
    halves = torch.stack([blocks & 0xF, blocks >> 4], dim=1)  # [blocks, 2, in, 32]
    return halves.permute(0, 1, 3, 2).reshape(out_features, in_features)
