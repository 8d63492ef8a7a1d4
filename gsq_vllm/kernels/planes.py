"""The bit planes the GSQ kernels (Triton and CPU) read, built once at load time from checkpoint codes."""

from __future__ import annotations

import torch

from gsq_vllm.packing import PackingError, code_range, to_int32
from gsq_vllm.weight_format import SERVED_BITS

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
#
# The CPU kernels (cpu_lowbit.cpp) read the same shapes with the bits in another order, the
# ``cpu`` layout (2/3-bit only), made for SIMD lanes that each hold one output row:
#
# * 2-bit: ``i = k % 16``; even ``i = 2j`` at bit ``2j``, odd ``i = 2j + 1`` at bit ``16 + 2j``:
#   one 16-bit shift puts a code pair (k, k+1) in the low bits of both halves (a bf16 pair for the
#   AMX tile multiply), one 32-bit shift any single code in the low bits.
# * 3-bit: each code's three bits side by side, so that one shift and one bitwise instruction make
#   a code a float (its bits in the mantissa of 1.0). A chunk of 32 codes ``c = k % 32`` fills
#   three words: low plane rows ``2t`` and ``2t + 1`` and high plane row ``t`` (``t = k // 32``).
#   Code ``c < 30`` sits in word ``c // 10`` at bit ``3 * (c % 10)`` (plus 2 in the high word);
#   codes 30 and 31 keep their two low bits at bits 30-31 of the two low words and their third
#   bits at bits 0 and 1 of the high word (:func:`cpu3_fields` lists every field).
#
# and stored in blocks of 16 output rows (:func:`block_rows`): ``[N // 16, words, 16]``, so that
# one CPU thread reads its rows' words front to back instead of one 64-byte piece per 4 KiB page.

PLANE_LAYOUTS = ("triton", "cpu")

KERNEL_BITS = SERVED_BITS  # the Triton kernels take every width the plugin serves
_KERNEL_ROW_CHUNK = 2048  # output rows repacked at once: bounds the int64 scratch memory


def kernel_plane_codes_per_word(num_bits: int) -> tuple[int, ...]:
    """Codes per int32 word of each kernel plane: (16,) 2-bit, (16, 32) 3-bit, (8,) 4-bit."""
    if num_bits not in KERNEL_BITS:
        raise PackingError(f"the GSQ kernels take {KERNEL_BITS}-bit codes, got {num_bits!r}")
    return {2: (16,), 3: (16, 32), 4: (8,)}[num_bits]


def pack_kernel_planes(
    codes: torch.Tensor, num_bits: int, layout: str = "triton"
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Signed codes ``[N, K]`` -> ``(low_plane, high_plane)`` in the kernel layout above
    (``layout="cpu"``: the CPU kernels' slot order, 2/3-bit only).

    ``low_plane`` is int32 ``[K // 16, N]`` (``[K // 8, N]`` for 4-bit); ``high_plane`` is int32
    ``[K // 32, N]`` for 3-bit and None otherwise.
    """
    per_word = kernel_plane_codes_per_word(num_bits)
    _check_layout(layout, num_bits)
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
        if layout == "cpu" and num_bits == 3:
            words = _pack_cpu3(unsigned)
            low_plane[:, start : start + _KERNEL_ROW_CHUNK] = to_int32(words[:, :2].reshape(-1, words.shape[2]))
            high_plane[:, start : start + _KERNEL_ROW_CHUNK] = to_int32(words[:, 2])
            continue
        low_plane[:, start : start + _KERNEL_ROW_CHUNK] = _pack_plane(
            unsigned & ((1 << low_bits) - 1), _plane_shifts(low_bits, unsigned.device, layout)
        )
        if high_plane is not None:
            high_plane[:, start : start + _KERNEL_ROW_CHUNK] = _pack_plane(
                unsigned >> 2, _plane_shifts(1, unsigned.device, layout)
            )
    return low_plane, high_plane


def unpack_kernel_planes(
    low_plane: torch.Tensor, high_plane: torch.Tensor | None, num_bits: int, layout: str = "triton"
) -> torch.Tensor:
    """Exact inverse of :func:`pack_kernel_planes`: the planes -> signed int8 codes ``[N, K]``."""
    per_word = kernel_plane_codes_per_word(num_bits)
    _check_layout(layout, num_bits)
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
    if layout == "cpu" and num_bits == 3:
        words = torch.stack([low_plane[0::2], low_plane[1::2], high_plane], dim=1)
        return (_unpack_cpu3(words) + code_range(num_bits)[0]).t().contiguous().to(torch.int8)
    low_bits = 2 if num_bits in (2, 3) else 4
    unsigned = _unpack_plane(low_plane, low_bits, _plane_shifts(low_bits, low_plane.device, layout))
    if high_plane is not None:
        high = _unpack_plane(high_plane, 1, _plane_shifts(1, high_plane.device, layout))
        unsigned = unsigned | (high << 2)
    return (unsigned + code_range(num_bits)[0]).t().contiguous().to(torch.int8)


def block_rows(words: torch.Tensor, block: int = 16) -> torch.Tensor:
    """``[R, N]`` (N contiguous) -> ``[N // block, R, block]``: each block of ``block`` columns
    (output rows) made contiguous. The CPU kernels' planes and scales are stored so."""
    rows, cols = words.shape
    if cols % block:
        raise PackingError(f"{cols} output rows do not split into blocks of {block}")
    return words.reshape(rows, cols // block, block).permute(1, 0, 2).contiguous()


def _check_layout(layout: str, num_bits: int) -> None:
    if layout not in PLANE_LAYOUTS:
        raise PackingError(f"unknown plane layout {layout!r}; expected one of {PLANE_LAYOUTS}")
    if layout == "cpu" and num_bits not in (2, 3):
        raise PackingError(f"the cpu plane layout holds 2/3-bit codes, got {num_bits}-bit")


def cpu3_fields() -> list[tuple[int, int, int, int, int]]:
    """The 3-bit ``cpu`` layout, one entry per bit field: ``(code, word, bit, code_bit, width)``:
    bits ``code_bit .. code_bit + width - 1`` of unsigned code ``code`` (0-31 in its chunk) sit at
    bit ``bit`` of chunk word ``word`` (0, 1: the low plane's two rows; 2: the high plane's row)."""
    whole = [(c, c // 10, 3 * (c % 10) + (2 if c >= 20 else 0), 0, 3) for c in range(30)]
    return whole + [(30, 0, 30, 0, 2), (30, 2, 0, 2, 1), (31, 1, 30, 0, 2), (31, 2, 1, 2, 1)]


def _pack_cpu3(unsigned: torch.Tensor) -> torch.Tensor:
    """Unsigned 3-bit codes ``[K, n]`` -> int64 words ``[K // 32, 3, n]`` (:func:`cpu3_fields`)."""
    chunks = unsigned.reshape(-1, 32, unsigned.shape[1])
    words = torch.zeros(chunks.shape[0], 3, chunks.shape[2], dtype=torch.int64, device=unsigned.device)
    for code, word, bit, code_bit, width in cpu3_fields():
        words[:, word] |= ((chunks[:, code] >> code_bit) & ((1 << width) - 1)) << bit
    return words


def _unpack_cpu3(words: torch.Tensor) -> torch.Tensor:
    """int32 words ``[K // 32, 3, n]`` -> unsigned int64 codes ``[K, n]`` (inverse of _pack_cpu3)."""
    words = words.to(torch.int64) & 0xFFFFFFFF
    codes = torch.zeros(words.shape[0], 32, words.shape[2], dtype=torch.int64, device=words.device)
    for code, word, bit, code_bit, width in cpu3_fields():
        codes[:, code] |= ((words[:, word] >> bit) & ((1 << width) - 1)) << code_bit
    return codes.reshape(-1, words.shape[2])


def _plane_shifts(plane_bits: int, device: torch.device, layout: str = "triton") -> torch.Tensor:
    """Bit offset of each code slot within its word (the 1-bit plane's order is permuted)."""
    slot = torch.arange(32 // plane_bits, dtype=torch.int64, device=device)
    if layout == "cpu":  # 2-bit (the 3-bit cpu layout is cpu3_fields)
        return 16 * (slot % 2) + 2 * (slot // 2)
    if plane_bits == 1:
        return 16 * (slot // 16) + 2 * (slot % 8) + (slot % 16) // 8
    return slot * plane_bits


def _pack_plane(unsigned: torch.Tensor, shifts: torch.Tensor) -> torch.Tensor:
    """Unsigned ``[K, n]`` codes -> int32 ``[K // slots, n]`` with slot ``i`` at ``shifts[i]``."""
    cols, rows = unsigned.shape
    slots = shifts.numel()
    grouped = unsigned.reshape(cols // slots, slots, rows) << shifts.view(1, slots, 1)
    return to_int32(grouped.sum(dim=1))


def _unpack_plane(words: torch.Tensor, plane_bits: int, shifts: torch.Tensor) -> torch.Tensor:
    """int32 ``[K // slots, n]`` -> unsigned int64 ``[K, n]``."""
    slots = shifts.numel()
    shifted = words.to(torch.int64).unsqueeze(1) >> shifts.view(1, slots, 1)
    unsigned = shifted & ((1 << plane_bits) - 1)
    return unsigned.reshape(-1, words.shape[1])
