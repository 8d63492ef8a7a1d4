"""The checkpoint's bit layouts: compressed-tensors ``pack-quantized``, both versions, and their detection.

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

The layouts that kernels read are their own: the Triton kernels' bit planes in
``gsq_vllm.kernels.planes``, the int4 container of vLLM's 4-bit kernels in
``gsq_vllm.serving.int4_packing``.
"""

from __future__ import annotations

import enum
import math

import torch

from gsq_vllm.weight_format import code_range  # re-exported: packing's callers read the range here too

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
    "to_int32",
]

_ROW_CHUNK = 4096  # rows processed at once: bounds the int64 scratch memory on large matrices


class PackingError(ValueError):
    """A packed tensor that does not match the shape, bit width or layout it claims."""


class PackLayout(str, enum.Enum):
    DENSE = "dense"
    WORD_ALIGNED = "word_aligned"


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
        out[start : start + _ROW_CHUNK] = to_int32(words)
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
# internals
# --------------------------------------------------------------------------------------------


def _check_bits(num_bits: int) -> None:
    if not isinstance(num_bits, int) or not 1 <= num_bits <= 8:
        raise PackingError(f"num_bits must be an integer in [1, 8], got {num_bits!r}")


def to_int32(words: torch.Tensor) -> torch.Tensor:
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
