"""Tensor-parallel shard arithmetic for packed GSQ weights (pure functions, no vLLM import).

Column-parallel layers (q/k/v, gate/up) split the *output* rows: every packed row is whole, in
either 3-bit layout, so rows are cut exactly as for a dense weight.

Row-parallel layers (o_proj, down_proj) split the *input* columns, which are the packed
dimension. In the dense 3-bit layout a column range starts on a word boundary only when its
first column is a multiple of 32 (``32 * 3 / 3``), in the word-aligned layout a multiple of 10,
and the checkpoint's layout is only known once the tensor's width is seen. So the plugin never
cuts packed words: each rank loads the full packed rows (3 bits a weight, so the transient cost
is small), unpacks them after loading and keeps its own columns. The scales, which are not
packed, are cut at load time by vLLM's own group-scale parameter; that is exact only when the
shard holds whole quantization groups, which :func:`plan_input_shard` checks up front.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


class GSQShardError(ValueError):
    """A tensor-parallel split that the checkpoint's quantization groups do not allow."""


@dataclass(frozen=True)
class InputShard:
    """The input columns ``[start, start + size)`` of the full ``input_size`` that one rank keeps."""

    input_size: int
    start: int
    size: int
    group_size: int  # the effective group: input_size for channel-wise scales

    @property
    def row_parallel(self) -> bool:
        return self.size != self.input_size

    @property
    def scale_columns(self) -> int:
        """Scale columns on this rank (channel-wise scales are replicated: 1)."""
        return max(self.size // self.group_size, 1) if self.group_size < self.input_size else 1


def plan_input_shard(
    layer_name: str,
    input_size: int,
    input_size_per_partition: int,
    tp_rank: int,
    group_size: int | None,
) -> InputShard:
    """Check and describe one rank's input columns; ``group_size`` None or -1 means channel-wise."""
    group = input_size if group_size in (None, -1) else int(group_size)
    if group <= 0:
        raise GSQShardError(f"{layer_name}: group_size must be positive, got {group_size}")
    if input_size % group:
        raise GSQShardError(
            f"{layer_name}: group_size {group} does not divide in_features {input_size} "
            f"(expected in_features % group_size == 0)"
        )
    row_parallel = input_size_per_partition != input_size
    if row_parallel and group < input_size and input_size_per_partition % group:
        raise GSQShardError(
            f"{layer_name}: a tensor-parallel shard of {input_size_per_partition} input columns "
            f"(in_features {input_size}) would split a quantization group of {group} columns; "
            f"use a tensor-parallel size that makes in_features / tp a multiple of {group}"
        )
    return InputShard(
        input_size=input_size,
        start=tp_rank * input_size_per_partition if row_parallel else 0,
        size=input_size_per_partition,
        group_size=group,
    )


def take_input_shard(codes: torch.Tensor, shard: InputShard) -> torch.Tensor:
    """The rank's columns of full-width unpacked codes ``[rows, input_size]``."""
    if codes.shape[1] != shard.input_size:
        raise GSQShardError(f"codes have {codes.shape[1]} columns, expected {shard.input_size}")
    if not shard.row_parallel:
        return codes
    return codes[:, shard.start : shard.start + shard.size].contiguous()
