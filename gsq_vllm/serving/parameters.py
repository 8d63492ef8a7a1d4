"""The ``weight_packed`` parameter of a GSQ layer: loads whole packed rows, in either 3-bit layout.

vLLM's ``PackedvLLMParameter`` sizes the packed width from the dense layout and cuts the packed
dimension for row-parallel layers; neither is right for a word-aligned (compressed-tensors 0.17)
3-bit checkpoint, and cutting packed words is wrong for most shards (see ``sharding.py``). This
parameter instead

* takes its width from the first tensor the checkpoint gives it, after checking that width with
  :func:`gsq_vllm.packing.detect_layout` (a width that fits no layout fails here, naming the
  layer and both expected widths),
* cuts output rows like any column-parallel weight (plain, merged gate/up and q/k/v shards),
* never cuts input columns: row-parallel ranks keep full packed rows and the scheme cuts the
  unpacked codes after loading.
"""

from __future__ import annotations

from typing import Callable

import torch
from vllm.model_executor.parameter import BasevLLMParameter

from gsq_vllm.packing import PackingError, PackLayout, detect_layout, packed_width


class GSQPackedWeightParameter(BasevLLMParameter):
    """int32 ``[output_size_per_partition, packed width of the full input]``."""

    def __new__(cls, data: torch.Tensor, **kwargs):
        return super().__new__(cls, data=data, **kwargs)

    def __init__(
        self,
        data: torch.Tensor,
        weight_loader: Callable,
        *,
        layer_name: str,
        num_bits: int,
        input_size: int,
        layout_hint: PackLayout | None = None,
    ):
        super().__init__(data=data, weight_loader=weight_loader)
        self.layer_name = layer_name
        self.num_bits = num_bits
        self.input_size = input_size
        self.layout_hint = layout_hint
        self.pack_layout: PackLayout | None = None

    # vLLM's merged/QKV loaders look these up on weight parameters
    @property
    def output_dim(self) -> int:
        return 0

    def _accept(self, loaded_weight: torch.Tensor) -> torch.Tensor:
        """Check a checkpoint tensor's dtype and width; size this parameter to that width."""
        name = f"{self.layer_name}.weight_packed"
        if loaded_weight.dtype != torch.int32 or loaded_weight.ndim != 2:
            raise ValueError(
                f"{name}: expected a 2-D int32 tensor, found {loaded_weight.dtype} "
                f"of shape {list(loaded_weight.shape)}"
            )
        width = loaded_weight.shape[1]
        try:
            layout = detect_layout(width, self.input_size, self.num_bits, hint=self.layout_hint, name=name)
        except PackingError as err:
            raise ValueError(str(err)) from err
        if self.pack_layout is None:
            self.pack_layout = layout
            if self.data.shape[1] != width:
                self.data = torch.empty(self.data.shape[0], width, dtype=torch.int32, device=self.data.device)
        elif layout is not self.pack_layout:
            raise ValueError(
                f"{name}: shards in two layouts ({self.pack_layout.value} and {layout.value}) in one layer"
            )
        return loaded_weight

    def _copy_rows(self, loaded_weight: torch.Tensor, dst_offset: int, src_offset: int, rows: int) -> None:
        loaded_weight = self._accept(loaded_weight)
        if src_offset + rows > loaded_weight.shape[0] or dst_offset + rows > self.data.shape[0]:
            raise ValueError(
                f"{self.layer_name}.weight_packed: expected rows [{src_offset}, {src_offset + rows}) "
                f"of a checkpoint tensor, found shape {list(loaded_weight.shape)}"
            )
        self.data.narrow(0, dst_offset, rows).copy_(loaded_weight.narrow(0, src_offset, rows))

    def load_column_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        rows = self.data.shape[0]
        self._copy_rows(loaded_weight, 0, self.tp_rank * rows, rows)

    def load_row_parallel_weight(self, loaded_weight: torch.Tensor) -> None:
        # input columns are cut after unpacking (see module docstring): keep the full rows
        self._copy_rows(loaded_weight, 0, 0, self.data.shape[0])

    def load_merged_column_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        if "shard_offset" not in kwargs:  # fused on disk, not split by vLLM: plain copy
            self._copy_rows(loaded_weight, 0, 0, self.data.shape[0])
            return
        size = kwargs["shard_size"]
        self._copy_rows(loaded_weight, kwargs["shard_offset"], self.tp_rank * size, size)

    def load_qkv_weight(self, loaded_weight: torch.Tensor, **kwargs) -> None:
        if "shard_offset" not in kwargs:
            self._copy_rows(loaded_weight, 0, 0, self.data.shape[0])
            return
        size = kwargs["shard_size"]
        shard_index = self.tp_rank if kwargs["shard_id"] == "q" else self.tp_rank // kwargs["num_heads"]
        self._copy_rows(loaded_weight, kwargs["shard_offset"], shard_index * size, size)


def initial_packed_width(input_size: int, num_bits: int) -> int:
    """Width allocated before the checkpoint is seen (the dense layout's; resized on load)."""
    return packed_width(input_size, num_bits, PackLayout.DENSE)
