"""GSQ's fused-MoE method for the CPU: 2/3-bit routed experts through GSQ's native low-bit kernels.

Stock vLLM has no 2/3-bit fused-MoE backend on the CPU (its CPU int path takes int4 with AMX
only). This method keeps each expert's codes at 2/3 bits in the kernels' blocked layout
(:mod:`gsq_vllm.kernels.cpu_lowbit`) and, for every expert that received tokens, runs gate and up
as one low-bit GEMM, SiLU-and-multiply, down as another, weights the rows by the router and sums
them. The loop over experts is Python: each expert's GEMMs dominate its cost on a CPU, and the
loop runs inside vLLM's opaque MoE op, so torch.compile does not trace it.

Loading: vLLM hands each expert's checkpoint tensors (``w1`` gate, ``w3`` up, ``w2`` down: packed
codes, group scales, shape) to :meth:`GSQLowbitMoEMethod._keep`, which keeps them whole, in either
3-bit layout; after loading each rank unpacks them, keeps its slice of the intermediate dimension
(gate/up rows, down columns, never cutting a quantization group) and builds the kernel planes.
"""

from __future__ import annotations

import torch
from vllm.model_executor.layers.fused_moe import FusedMoEMethodBase
from vllm.model_executor.layers.fused_moe.activation import MoEActivation
from vllm.model_executor.layers.fused_moe.config import FUSED_MOE_UNQUANTIZED_CONFIG
from vllm.logger import init_logger
from vllm.model_executor.utils import set_weight_attrs

from gsq_vllm.kernels import cpu_lowbit
from gsq_vllm.packing import PackLayout, detect_layout, unpack_codes
from gsq_vllm.serving.sharding import GSQShardError, plan_input_shard

logger = init_logger(f"vllm.{__name__}")  # under "vllm": shown by vLLM's log config

__all__ = ["GSQLowbitMoEMethod", "GSQMoELoadError"]

_SHARDS = ("w1", "w3", "w2")  # gate, up, down as vLLM names the checkpoint's expert projections
_KINDS = ("weight_packed", "weight_scale", "weight_shape")


class GSQMoELoadError(ValueError):
    """A mixture-of-experts checkpoint this method cannot serve (names the layer and the expert)."""


class GSQLowbitMoEMethod(FusedMoEMethodBase):
    """Routed experts with 2/3-bit symmetric group-quantized weights, on the CPU."""

    def __init__(self, moe, num_bits: int, group_size: int | None, layer_name: str,
                 layout_hint: PackLayout | None = None):
        super().__init__(moe)
        self.num_bits, self.layer_name, self.layout_hint = num_bits, layer_name, layout_hint
        self.group_size = group_size if group_size not in (None, -1) else None  # None: channel-wise
        parallel = moe.moe_parallel_config
        if getattr(parallel, "use_ep", False) or getattr(parallel, "ep_size", 1) > 1:
            raise GSQMoELoadError(f"{layer_name}: GSQ's CPU MoE method does not support expert parallelism")
        if moe.activation != MoEActivation.SILU:
            raise GSQMoELoadError(f"{layer_name}: GSQ's CPU MoE method runs SiLU experts, found {moe.activation}")
        reason = cpu_lowbit.unavailable_reason()
        if reason:
            raise GSQMoELoadError(f"{layer_name}: {num_bits}-bit experts need GSQ's native CPU kernels: {reason}")

    # -- weights ----------------------------------------------------------------------------------

    def create_weights(self, layer, num_experts: int, hidden_size: int, intermediate_size_per_partition: int,
                       params_dtype: torch.dtype, **extra_weight_attrs) -> None:
        self.num_experts, self.hidden_size = num_experts, hidden_size
        self.intermediate_per_rank = intermediate_size_per_partition
        layer.gsq_expert_tensors = {}  # (expert, shard, kind) -> tensor, until process_weights_after_loading
        for stem in ("w13", "w2"):
            for kind in _KINDS:  # placeholders with the names vLLM's expert mapping loads into
                param = torch.nn.Parameter(torch.empty(0), requires_grad=False)
                layer.register_parameter(f"{stem}_{kind}", param)
                set_weight_attrs(param, {"weight_loader": self._keep(layer, kind)})

    @staticmethod
    def _keep(layer, kind: str):
        def load(param, loaded_weight: torch.Tensor, weight_name: str, shard_id: str, expert_id: int,
                 return_success: bool = False):
            layer.gsq_expert_tensors[(int(expert_id), shard_id, kind)] = loaded_weight.detach().to("cpu").clone()
            return True if return_success else None

        return load

    def get_fused_moe_quant_config(self, layer):
        return FUSED_MOE_UNQUANTIZED_CONFIG  # activations stay as they are; the weights are this method's

    def process_weights_after_loading(self, layer) -> None:
        tensors = layer.gsq_expert_tensors
        parallel = self.moe.moe_parallel_config
        planes: dict[str, list[torch.Tensor]] = {}
        for expert in range(self.num_experts):
            codes, scales = {}, {}
            for shard in _SHARDS:
                codes[shard], scales[shard] = self._expert_codes(tensors, expert, shard)
            self._check_intermediate(expert, codes, self.intermediate_per_rank * parallel.tp_size)
            rows = slice(parallel.tp_rank * self.intermediate_per_rank, (parallel.tp_rank + 1) * self.intermediate_per_rank)
            down_codes, down_scales = self._down_shard(expert, codes["w2"], scales["w2"], parallel)
            gate_up = cpu_lowbit.prepare(torch.cat([codes["w1"][rows], codes["w3"][rows]]),
                                         torch.cat([scales["w1"][rows], scales["w3"][rows]]), self.num_bits,
                                         self._group(codes["w1"].shape[1]))
            down = cpu_lowbit.prepare(down_codes, down_scales, self.num_bits, self._group(down_codes.shape[1]))
            for name, weight in (("w13", gate_up), ("w2", down)):
                planes.setdefault(f"gsq_{name}_low", []).append(weight.low_plane)
                planes.setdefault(f"gsq_{name}_scales", []).append(weight.scales)
                if weight.high_plane is not None:
                    planes.setdefault(f"gsq_{name}_high", []).append(weight.high_plane)
        for stem in ("w13", "w2"):
            for kind in _KINDS:
                delattr(layer, f"{stem}_{kind}")
        del layer.gsq_expert_tensors
        for name, per_expert in planes.items():
            layer.register_parameter(name, torch.nn.Parameter(torch.stack(per_expert), requires_grad=False))
        logger.info("GSQ: %s: %d %d-bit experts on GSQ's native CPU kernels", self.layer_name, self.num_experts,
                    self.num_bits)

    def _group(self, columns: int) -> int:
        return self.group_size or columns

    def _expert_codes(self, tensors: dict, expert: int, shard: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Full-size signed codes ``[out, in]`` and scales ``[out, in / group]`` of one expert projection."""
        name = f"{self.layer_name}.{expert}.{shard}"
        missing = [kind for kind in _KINDS if (expert, shard, kind) not in tensors]
        if missing:
            raise GSQMoELoadError(f"{name}: the checkpoint has no {', '.join(missing)} for expert {expert} "
                                  f"({shard}); every expert needs weight_packed, weight_scale and weight_shape")
        packed, scales, shape = (tensors[(expert, shard, kind)] for kind in _KINDS)
        out_features, in_features = (int(v) for v in shape.tolist())
        expected = (self.hidden_size, None) if shard == "w2" else (None, self.hidden_size)
        if (shard == "w2" and out_features != self.hidden_size) or (shard != "w2" and in_features != self.hidden_size):
            raise GSQMoELoadError(f"{name}: weight_shape {[out_features, in_features]} does not fit the model's "
                                  f"hidden size {self.hidden_size} (expected {expected})")
        layout = detect_layout(packed.shape[1], in_features, self.num_bits, hint=self.layout_hint,
                               name=f"{name}.weight_packed")
        codes = unpack_codes(packed, self.num_bits, in_features, layout, name=f"{name}.weight_packed")
        group = self._group(in_features)
        if codes.shape[0] != out_features or scales.shape != (out_features, in_features // group):
            raise GSQMoELoadError(f"{name}: codes {tuple(codes.shape)} and scales {tuple(scales.shape)} do not fit "
                                  f"weight_shape {[out_features, in_features]} with group size {group}")
        return codes, scales.float()

    def _check_intermediate(self, expert: int, codes: dict[str, torch.Tensor], intermediate: int) -> None:
        """Gate and up rows and down columns are the model's intermediate size (an expert of
        another width would be cut at the wrong place or fail to stack with the others)."""
        found = {"w1": codes["w1"].shape[0], "w3": codes["w3"].shape[0], "w2": codes["w2"].shape[1]}
        odd = {shard: width for shard, width in found.items() if width != intermediate}
        if odd:
            raise GSQMoELoadError(f"{self.layer_name}: expert {expert}: intermediate width "
                                  f"{', '.join(f'{shard} {width}' for shard, width in odd.items())}, expected "
                                  f"{intermediate} (the model's moe intermediate size; every expert the same)")

    def _down_shard(self, expert: int, codes: torch.Tensor, scales: torch.Tensor, parallel):
        """This rank's input columns of the down projection (whole groups only)."""
        name = f"{self.layer_name}.{expert}.w2"
        try:
            shard = plan_input_shard(name, codes.shape[1], self.intermediate_per_rank, parallel.tp_rank,
                                     self.group_size)
        except GSQShardError as error:
            raise GSQMoELoadError(str(error)) from error
        if not shard.row_parallel:
            return codes, scales
        first = shard.start // shard.group_size if shard.group_size < shard.input_size else 0
        return (codes[:, shard.start:shard.start + shard.size].contiguous(),
                scales[:, first:first + shard.scale_columns].contiguous())

    # -- forward ----------------------------------------------------------------------------------

    def apply(self, layer, x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
              shared_experts=None, shared_experts_input=None) -> torch.Tensor:
        """``sum_k topk_weights[t, k] * expert_{topk_ids[t, k]}(x[t])`` for every token ``t``."""
        if getattr(layer, "apply_router_weight_on_input", False):
            raise GSQMoELoadError(f"{self.layer_name}: router weights applied to the input are not supported")
        rows = x.reshape(-1, x.shape[-1])
        out = torch.zeros(rows.shape[0], self.hidden_size, dtype=torch.float32, device=rows.device)
        ids = topk_ids.reshape(rows.shape[0], -1)
        weights = topk_weights.reshape(rows.shape[0], -1)
        high13, high2 = getattr(layer, "gsq_w13_high", None), getattr(layer, "gsq_w2_high", None)
        for expert in torch.unique(ids).tolist():
            token, slot = (ids == expert).nonzero(as_tuple=True)
            hidden = torch.ops.gsq_cpu.lowbit_mm(
                rows[token].contiguous(), layer.gsq_w13_low[expert], None if high13 is None else high13[expert],
                layer.gsq_w13_scales[expert], self.num_bits, self._group(self.hidden_size))
            gate, up = hidden.split(self.intermediate_per_rank, dim=-1)
            activated = (torch.nn.functional.silu(gate.float()) * up.float()).to(rows.dtype)
            down = torch.ops.gsq_cpu.lowbit_mm(
                activated.contiguous(), layer.gsq_w2_low[expert], None if high2 is None else high2[expert],
                layer.gsq_w2_scales[expert], self.num_bits, self._group(self.intermediate_per_rank))
            out.index_add_(0, token, down.float() * weights[token, slot, None].float())
        return out.to(x.dtype).reshape(*x.shape[:-1], self.hidden_size)
