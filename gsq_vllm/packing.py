"""Every bit layout of the project, in one place.

Checkpoint layouts (compressed-tensors ``pack-quantized``, packed along the input dimension):

* ``PackLayout.DENSE`` (compressed-tensors 0.18 and later): signed codes are made unsigned by adding
  ``2**(bits-1)`` and written as one little-endian bit stream per row; element ``i`` starts at bit
  ``i * bits`` and may straddle two int32 words. Width: ``ceil(cols * bits / 32)``.
* ``PackLayout.WORD_ALIGNED`` (compressed-tensors 0.17 and earlier): ``32 // bits`` codes per
  int32 word, never straddling (3-bit keeps 10 codes and 2 padding bits a word).
  Width: ``ceil(cols / (32 // bits))``.

For 1, 2, 4 and 8 bits the two layouts are the same bytes. Only the packed width tells 3-bit (and
5/6/7-bit) checkpoints apart, so :func:`detect_layout` works from shapes and refuses a width that
fits neither.

Serving layouts (the int4 "container" that 4-bit kernels read) live here too, so that no other
module shifts bits on its own.
"""

from __future__ import annotations

import enum
import math

import torch

__all__ = [
    "PackLayout",
    "PackingError",
    "packed_width",
    "pack_codes",
    "unpack_codes",
    "detect_layout",
    "layout_for_compressed_tensors_version",
    "code_range",
    "layouts_identical",
    "widen_to_uint4",
    "pack_gptq_int4",
    "unpack_gptq_int4",
    "KERNEL_BITS",
    "kernel_plane_codes_per_word",
    "pack_kernel_planes",
    "unpack_kernel_planes",
]

_ROW_CHUNK = 4096  # rows processed at once: bounds the int64 scratch memory on large matrices


class PackingError(ValueError):
    """A packed tensor that does not match the shape, bit width or layout it claims."""


class PackLayout(str, enum.Enum):
    DENSE = "dense"
    WORD_ALIGNED = "word_aligned"


def code_range(num_bits: int) -> tuple[int, int]:
    """Smallest and largest signed code of a symmetric ``num_bits`` integer grid."""
    _check_bits(num_bits)
    return -(1 << (num_bits - 1)), (1 << (num_bits - 1)) - 1


def packed_width(num_columns: int, num_bits: int, layout: PackLayout | str) -> int:
    """Number of int32 words per row that ``num_columns`` codes occupy in ``layout``."""
    _check_bits(num_bits)
    layout = PackLayout(layout)
    if layout is PackLayout.DENSE:
        return math.ceil(num_columns * num_bits / 32)
    return math.ceil(num_columns / (32 // num_bits))


def layouts_identical(num_columns: int, num_bits: int) -> bool:
    """True where both layouts put every code at the same bit (so the choice does not matter)."""
    return 32 % num_bits == 0 or num_columns <= 32 // num_bits


def layout_for_compressed_tensors_version(version: str | None) -> PackLayout | None:
    """The layout a given compressed-tensors version writes (None when the version is unknown)."""
    if not version:
        return None
    try:
        major, minor = (int(part) for part in str(version).split(".")[:2])
    except ValueError:
        return None
    return PackLayout.DENSE if (major, minor) >= (0, 18) else PackLayout.WORD_ALIGNED


def detect_layout(
    width: int,
    num_columns: int,
    num_bits: int,
    *,
    hint: PackLayout | str | None = None,
    name: str = "weight_packed",
) -> PackLayout:
    """Tell the layout of a packed tensor from its width.

    ``hint`` (e.g. from the checkpoint's compressed-tensors ``version``) only breaks ties where
    both layouts give the same width but different bits; it never overrides the shape.
    """
    _check_bits(num_bits)
    dense = packed_width(num_columns, num_bits, PackLayout.DENSE)
    aligned = packed_width(num_columns, num_bits, PackLayout.WORD_ALIGNED)
    if width == dense and width == aligned:
        if layouts_identical(num_columns, num_bits):
            return PackLayout.DENSE
        if hint is None:
            raise PackingError(
                f"{name}: width {width} for {num_columns} {num_bits}-bit codes fits both the dense "
                "(compressed-tensors >= 0.18) and the word-aligned (<= 0.17) layout; pass the "
                "checkpoint's compressed-tensors version to tell them apart"
            )
        return PackLayout(hint)
    if width == dense:
        return PackLayout.DENSE
    if width == aligned:
        return PackLayout.WORD_ALIGNED
    raise PackingError(
        f"{name}: packed width {width} matches no layout for {num_columns} {num_bits}-bit codes: "
        f"expected {dense} (dense, compressed-tensors >= 0.18) or {aligned} "
        f"(word-aligned, compressed-tensors <= 0.17)"
    )


def pack_codes(
    codes: torch.Tensor, num_bits: int, layout: PackLayout | str = PackLayout.DENSE
) -> torch.Tensor:
    """Pack signed integer codes ``[rows, cols]`` into int32 ``[rows, packed_width]``."""
    _check_bits(num_bits)
    layout = PackLayout(layout)
    if codes.ndim != 2:
        raise PackingError(f"codes must be 2-D [rows, cols], got shape {tuple(codes.shape)}")
    if codes.is_floating_point() or codes.is_complex():
        raise PackingError(f"codes must be an integer tensor, got {codes.dtype}")
    low, high = code_range(num_bits)
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise PackingError(
            f"codes out of the {num_bits}-bit range [{low}, {high}]: "
            f"found [{int(codes.min())}, {int(codes.max())}]"
        )
    rows, cols = codes.shape
    width = packed_width(cols, num_bits, layout)
    out = torch.empty(rows, width, dtype=torch.int32, device=codes.device)
    for start in range(0, rows, _ROW_CHUNK):
        chunk = codes[start : start + _ROW_CHUNK].to(torch.int64) - low  # unsigned
        if layout is PackLayout.DENSE:
            words = _pack_dense(chunk, num_bits, width)
        else:
            words = _pack_aligned(chunk, num_bits, width)
        out[start : start + _ROW_CHUNK] = _to_int32(words)
    return out


def unpack_codes(
    packed: torch.Tensor,
    num_bits: int,
    num_columns: int,
    layout: PackLayout | str | None = None,
    *,
    name: str = "weight_packed",
) -> torch.Tensor:
    """Unpack int32 ``[rows, width]`` into signed int8 codes ``[rows, num_columns]``.

    With ``layout=None`` the layout is detected from the width (and refused if it fits none).
    """
    _check_bits(num_bits)
    if packed.dtype != torch.int32 or packed.ndim != 2:
        raise PackingError(
            f"{name}: expected a 2-D int32 tensor, got {packed.dtype} of shape {tuple(packed.shape)}"
        )
    if layout is None:
        layout = detect_layout(packed.shape[1], num_columns, num_bits, name=name)
    layout = PackLayout(layout)
    expected = packed_width(num_columns, num_bits, layout)
    if packed.shape[1] != expected:
        raise PackingError(
            f"{name}: width {packed.shape[1]} does not fit {num_columns} {num_bits}-bit codes in "
            f"the {layout.value} layout (expected {expected})"
        )
    low, _ = code_range(num_bits)
    rows = packed.shape[0]
    out = torch.empty(rows, num_columns, dtype=torch.int8, device=packed.device)
    for start in range(0, rows, _ROW_CHUNK):
        words = packed[start : start + _ROW_CHUNK].to(torch.int64) & 0xFFFFFFFF
        if layout is PackLayout.DENSE:
            unsigned = _unpack_dense(words, num_bits, num_columns)
        else:
            unsigned = _unpack_aligned(words, num_bits, num_columns)
        out[start : start + _ROW_CHUNK] = (unsigned + low).to(torch.int8)
    return out


# --------------------------------------------------------------------------------------------
# int4 container: any 2/3-bit code is also a valid int4 code, so 4-bit kernels can run it.
# --------------------------------------------------------------------------------------------


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
    return _to_int32((unsigned << shifts).sum(dim=1))


def unpack_gptq_int4(qweight: torch.Tensor) -> torch.Tensor:
    """Inverse of :func:`pack_gptq_int4`: int32 ``[in // 8, out]`` -> signed int8 ``[out, in]``."""
    words = qweight.to(torch.int64) & 0xFFFFFFFF
    shifts = (torch.arange(8, dtype=torch.int64, device=qweight.device) * 4).view(1, 8, 1)
    unsigned = (words.unsqueeze(1) >> shifts) & 0xF  # [in//8, 8, out]
    return (unsigned.reshape(-1, qweight.shape[1]) - 8).t().contiguous().to(torch.int8)


# --------------------------------------------------------------------------------------------
# internals
# --------------------------------------------------------------------------------------------


def _check_bits(num_bits: int) -> None:
    if not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
        raise PackingError(f"num_bits must be an integer in [1, 8], got {num_bits!r}")


def _to_int32(words: torch.Tensor) -> torch.Tensor:
    """int64 holding an unsigned 32-bit pattern -> int32 with the same bits."""
    words = words & 0xFFFFFFFF
    return torch.where(words >= 1 << 31, words - (1 << 32), words).to(torch.int32)


def _pack_dense(unsigned: torch.Tensor, num_bits: int, width: int) -> torch.Tensor:
    rows, cols = unsigned.shape
    starts = torch.arange(cols, device=unsigned.device, dtype=torch.int64) * num_bits
    word, offset = starts // 32, starts % 32
    shifted = unsigned << offset  # up to 39 bits: the part above bit 31 spills into word + 1
    words = torch.zeros(rows, width + 1, dtype=torch.int64, device=unsigned.device)
    words.scatter_add_(1, word.expand(rows, cols), shifted & 0xFFFFFFFF)
    words.scatter_add_(1, (word + 1).expand(rows, cols), shifted >> 32)
    return words[:, :width]


def _unpack_dense(words: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    rows = words.shape[0]
    padded = torch.nn.functional.pad(words, (0, 1))
    starts = torch.arange(cols, device=words.device, dtype=torch.int64) * num_bits
    word, offset = starts // 32, starts % 32
    pair = padded[:, word] | (padded[:, word + 1] << 32)
    return (pair >> offset) & ((1 << num_bits) - 1)


def _pack_aligned(unsigned: torch.Tensor, num_bits: int, width: int) -> torch.Tensor:
    rows, cols = unsigned.shape
    per_word = 32 // num_bits
    unsigned = torch.nn.functional.pad(unsigned, (0, width * per_word - cols))
    shifts = torch.arange(per_word, device=unsigned.device, dtype=torch.int64) * num_bits
    return (unsigned.view(rows, width, per_word) << shifts).sum(dim=2)


def _unpack_aligned(words: torch.Tensor, num_bits: int, cols: int) -> torch.Tensor:
    rows, width = words.shape
    per_word = 32 // num_bits
    shifts = torch.arange(per_word, device=words.device, dtype=torch.int64) * num_bits
    unsigned = (words.unsqueeze(2) >> shifts) & ((1 << num_bits) - 1)
    return unsigned.reshape(rows, width * per_word)[:, :cols]


# --------------------------------------------------------------------------------------------
# Kernel layout: what the GSQ Triton kernels (gsq_vllm.kernels) read. Built once at load time.
# --------------------------------------------------------------------------------------------
#
# Checkpoint codes are signed int8 ``[N=out, K=in]``. The kernels want every load to be an
# aligned int32 word whose codes never straddle words, with N contiguous so a warp reads whole
# cache lines. So each weight becomes one or two "planes" of unsigned codes
# ``u = code + 2**(bits-1)``, packed along K, transposed to ``[K // codes_per_word, N]``:
#
# * 2-bit: one plane, 16 codes per word; code ``k`` sits at bits ``2 * (k % 16)`` of row ``k // 16``.
# * 4-bit: one plane, 8 codes per word; code ``k`` sits at bits ``4 * (k % 8)`` of row ``k // 8``.
# * 3-bit: the low plane holds ``u & 3`` exactly like 2-bit; the high plane holds ``u >> 2``,
#   32 one-bit codes per word, row ``k // 32``, at bit ``16*(c // 16) + 2*(c % 8) + (c % 16) // 8``
#   with ``c = k % 32``. That order puts the high bit of each code two places above its low bits
#   after one shift of the word, so the kernels join both planes with two and/or operations
#   (see gsq_vllm/kernels/gemv_splitk.py). 3 bits a code, no padding.
#
# K must be a multiple of 32 (3-bit), 16 (2-bit) or 8 (4-bit); every group size the kernels take
# (32, 64, 128) makes it so.

KERNEL_BITS = (2, 3, 4)
_KERNEL_ROW_CHUNK = 2048  # output rows repacked at once: bounds the int64 scratch memory


def kernel_plane_codes_per_word(num_bits: int) -> tuple[int, ...]:
    """Codes per int32 word of each kernel plane: (16,) 2-bit, (16, 32) 3-bit, (8,) 4-bit."""
    if num_bits not in KERNEL_BITS:
        raise PackingError(f"the GSQ kernels take {KERNEL_BITS}-bit codes, got {num_bits!r}")
    return {2: (16,), 3: (16, 32), 4: (8,)}[num_bits]


def pack_kernel_planes(
    codes: torch.Tensor, num_bits: int
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed codes ``[N, K]`` -> ``(low_plane, high_plane)`` in the kernel layout above.

    ``low_plane`` is int32 ``[K // 16, N]`` (``[K // 8, N]`` for 4-bit); ``high_plane`` is int32
    ``[K // 32, N]`` for 3-bit and None otherwise.
    """
    per_word = kernel_plane_codes_per_word(num_bits)
    if codes.ndim != 2 or codes.is_floating_point() or codes.is_complex():
        raise PackingError(
            f"codes must be a 2-D integer tensor [N, K], got {codes.dtype} {tuple(codes.shape)}"
        )
    rows, cols = codes.shape
    if cols % max(per_word):
        raise PackingError(
            f"the {num_bits}-bit kernel layout needs K % {max(per_word)} == 0, got K = {cols}"
        )
    low, high = code_range(num_bits)
    if codes.numel() and (int(codes.min()) < low or int(codes.max()) > high):
        raise PackingError(
            f"codes out of the {num_bits}-bit range [{low}, {high}]: "
            f"found [{int(codes.min())}, {int(codes.max())}]"
        )
    low_plane = torch.empty(cols // per_word[0], rows, dtype=torch.int32, device=codes.device)
    high_plane = (
        torch.empty(cols // 32, rows, dtype=torch.int32, device=codes.device)
        if num_bits == 3
        else None
    )
    low_bits = 2 if num_bits in (2, 3) else 4
    for start in range(0, rows, _KERNEL_ROW_CHUNK):
        unsigned = codes[start : start + _KERNEL_ROW_CHUNK].to(torch.int64).t() - low  # [K, n]
        low_plane[:, start : start + _KERNEL_ROW_CHUNK] = _pack_plane(
            unsigned & ((1 << low_bits) - 1), _plane_shifts(low_bits, unsigned.device)
        )
        if high_plane is not None:
            high_plane[:, start : start + _KERNEL_ROW_CHUNK] = _pack_plane(
                unsigned >> 2, _plane_shifts(1, unsigned.device)
            )
    return low_plane, high_plane


def unpack_kernel_planes(
    low_plane: torch.Tensor, high_plane: torch.Tensor | None, num_bits: int
) -> torch.Tensor:
    """Exact inverse of :func:`pack_kernel_planes`: the planes -> signed int8 codes ``[N, K]``."""
    per_word = kernel_plane_codes_per_word(num_bits)
    if low_plane.dtype != torch.int32 or low_plane.ndim != 2:
        raise PackingError(
            f"low_plane must be 2-D int32, got {low_plane.dtype} {tuple(low_plane.shape)}"
        )
    if (high_plane is not None) != (num_bits == 3):
        raise PackingError("a high plane comes with 3-bit weights and only with them")
    cols = low_plane.shape[0] * per_word[0]
    expected_high = (cols // 32, low_plane.shape[1])
    if high_plane is not None and (
        high_plane.dtype != torch.int32 or tuple(high_plane.shape) != expected_high
    ):
        raise PackingError(
            f"high_plane must be int32 {expected_high}, got "
            f"{high_plane.dtype} {tuple(high_plane.shape)}"
        )
    low_bits = 2 if num_bits in (2, 3) else 4
    unsigned = _unpack_plane(low_plane, low_bits, _plane_shifts(low_bits, low_plane.device))
    if high_plane is not None:
        high = _unpack_plane(high_plane, 1, _plane_shifts(1, high_plane.device))
        unsigned = unsigned | (high << 2)
    return (unsigned + code_range(num_bits)[0]).t().contiguous().to(torch.int8)


def _plane_shifts(plane_bits: int, device: torch.device) -> torch.Tensor:
    """Bit offset of each code slot within its word (the 1-bit plane's order is permuted)."""
    slot = torch.arange(32 // plane_bits, dtype=torch.int64, device=device)
    if plane_bits == 1:
        return 16 * (slot // 16) + 2 * (slot % 8) + (slot % 16) // 8
    return slot * plane_bits


def _pack_plane(unsigned: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Unsigned ``[K, n]`` codes -> int32 ``[K // slots, n]`` with slot ``i`` at ``shifts[i]``."""
    cols, rows = unsigned.shape
    slots = shifts.numel()
    grouped = unsigned.reshape(cols // slots, slots, rows) << shifts.view(1, slots, 1)
    return _to_int32(grouped.sum(dim=1))


def _unpack_plane(words: torch.Tensor, plane_bits: int, shifts: torch.Tensor) -> torch.Tensor:
    """int32 ``[K // slots, n]`` -> unsigned int64 ``[K, n]``."""
    slots = shifts.numel()
    shifted = words.to(torch.int64).unsqueeze(1) >> shifts.view(1, slots, 1)
    unsigned = shifted & ((1 << plane_bits) - 1)
    return unsigned.reshape(-1, words.shape[1])
