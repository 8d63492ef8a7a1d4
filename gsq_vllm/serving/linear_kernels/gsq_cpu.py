"""2/3-bit codes read directly on the CPU with GSQ's own C++ kernels (no int4 widening).

Layout: int8 codes ``[N, K]`` (scheme) -> :func:`gsq_vllm.kernels.cpu_lowbit.prepare` -> the C++
ops' blocked layout, kept as layer parameters: ``gsq_low_plane`` int32 ``[N/16, K/16, 16]``
(+ ``gsq_high_plane`` int32 ``[N/16, K/32, 16]`` at 3 bits) and ``gsq_scales_t`` fp32
``[N/16, K/group, 16]``, each block of 16 output rows contiguous: 2 or 3 bits per weight in
memory, against 4 for the int4 container.

Per call, by the number of rows (tokens) M:

* ``M < dense_from_rows``: ``gsq_cpu::lowbit_mm``, which decodes the planes in registers (decode,
  small batches: bytes dominate; with AMX and bf16 activations, 3 rows or more through the tile
  multiply);
* larger M (prefill, large batches): ``gsq_cpu::lowbit_dense_mm`` rebuilds the layer's weight in
  one pass into a scratch buffer shared by every layer, and PyTorch's dense GEMM (oneDNN)
  multiplies it: the rebuild is amortised over the rows, and no second copy stays resident.
  Never with AMX and bf16 activations: there the tiles stay ahead at every measured size.

The thresholds (``DENSE_FROM_ROWS``; ``DENSE_FROM_ROWS_AMX_BF16``: never) come from timing both
ops on the default model's layer shapes (:func:`dense_from_rows` picks one per CPU and dtype).
"""

from __future__ import annotations

import torch
from vllm.model_executor.kernels.linear import MPLinearLayerConfig
from vllm.platforms import current_platform

from gsq_vllm.kernels import cpu_lowbit
from gsq_vllm.serving.linear_kernels.base import GSQLinearKernel, register

#: rows from which a call rebuilds the weight and runs a dense GEMM instead of the low-bit kernel:
#: the crossover measured on the default model's layer shapes on a 2-core AVX-512 BF16 CPU
DENSE_FROM_ROWS = {torch.float32: 32, torch.bfloat16: 16, torch.float16: 32}
#: bf16 on a CPU with AMX tiles: never. The low-bit kernel (16 rows per tile multiply; beyond 16
#: rows each block's weight unpacked once, its scales applied in bf16 as the rebuild does, 32 rows
#: by two blocks per step, bf16 results written straight from the tiles) beats the rebuilt weight at
#: every size measured (3-bit, 2 cores, tiles vs rebuild: 1536 x 576 at 512 / 2048 rows 0.34 / 1.16
#: ms vs 0.44 / 1.33 ms; 576 x 1536 0.31 / 1.25 vs 0.49 / 1.45; 4096 x 4096 6.9 / 26.6 vs 9.3 / 33.3;
#: 11008 x 4096 19.0 / 85.7 vs 35.9 / 109.9)
DENSE_FROM_ROWS_AMX_BF16 = None


def dense_from_rows(act_type: torch.dtype) -> int | None:
    """Rows from which a call takes the rebuilt dense weight, for this CPU and activation dtype
    (None: never)."""
    isa = cpu_lowbit.isa()
    if act_type == torch.bfloat16 and isa == "amx":
        return DENSE_FROM_ROWS_AMX_BF16
    if act_type == torch.bfloat16 and isa != "avx512-bf16":  # no bf16 instructions: fp32 math throughout
        return DENSE_FROM_ROWS[torch.float32]
    return DENSE_FROM_ROWS[act_type]


class GSQCPULowbitLinearKernel(GSQLinearKernel):
    name = "cpu-lowbit"

    @classmethod
    def can_implement(cls, c: MPLinearLayerConfig) -> tuple[bool, str | None]:
        if not current_platform.is_cpu():
            return False, "cpu-lowbit runs on the CPU only"
        if c.act_type not in DENSE_FROM_ROWS:
            return False, f"activation dtype {c.act_type} not supported"
        k, n = c.partition_weight_shape
        problem = cpu_lowbit.shape_problem(n, k, c.weight_type.size_bits, c.group_size)
        if problem:
            return False, problem
        reason = cpu_lowbit.unavailable_reason()
        return (False, reason) if reason else (True, None)

    def process_weights_after_loading(self, layer: torch.nn.Module) -> None:
        codes, scales = self.take_codes_and_scales(layer)
        weight = cpu_lowbit.prepare(codes, scales, self.num_bits, self.group_size)
        register(layer, "gsq_low_plane", weight.low_plane)
        if weight.high_plane is not None:
            register(layer, "gsq_high_plane", weight.high_plane)
        register(layer, "gsq_scales_t", weight.scales)
        self.dense_from_rows = dense_from_rows(self.config.act_type)

    def uses_dense(self, rows: int) -> bool:
        """Whether a call with ``rows`` rows rebuilds the weight for a dense GEMM."""
        return self.dense_from_rows is not None and rows >= self.dense_from_rows

    def apply_weights(
        self, layer: torch.nn.Module, x: torch.Tensor, bias: torch.Tensor | None = None
    ) -> torch.Tensor:
        rows = x.reshape(-1, x.shape[-1]).contiguous()
        op = torch.ops.gsq_cpu.lowbit_dense_mm if self.uses_dense(rows.shape[0]) else torch.ops.gsq_cpu.lowbit_mm
        high = getattr(layer, "gsq_high_plane", None)
        out = op(rows, layer.gsq_low_plane, high, layer.gsq_scales_t, self.num_bits, self.group_size)
        if bias is not None:
            out = out + bias
        return out.reshape(*x.shape[:-1], out.shape[-1])
