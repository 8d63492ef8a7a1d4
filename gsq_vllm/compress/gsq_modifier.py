"""``GSQModifier``: GSQ as an llmcompressor recipe step (a thin adapter over :mod:`gsq_vllm.gsq`).

Built as llmcompressor's own modifiers are (``Modifier`` + ``QuantizationMixin``, hooks registered
with ``register_hook``, work done per sequential subgraph) and only on their public API. For each
decoder layer the sequential pipeline calibrates:

1. **start**: GPTQ on the GSQ grid (:func:`gsq_vllm.gsq.gptq_quantize`) from the Hessians our hooks
   accumulated, with full-range signed scales (``scale_init``), or round-to-nearest (``init: rtn``);
2. **targets**: what the layer should output on each calibration sequence. ``quantized``
   (default, as AutoRound does): the original weights applied to the same, already-quantized,
   inputs. ``full_precision``: the full-precision model's output there, computed from a
   full-precision copy of the hidden states that the modifier carries from layer to layer, so each
   layer also tries to correct the error the layers before it left (measured worse on the whole
   model: the README's ablation table);
3. **GSQ**: all quantized Linears of the block (by default the whole decoder layer: attention and
   MLP) trained jointly on the block's output from its real inputs (hidden states, position
   embeddings, attention mask, as captured by a pre-forward hook); Linears outside any block are
   trained one by one on their Hessian (the layer objective);
4. **write**: the fake-quantised weight and ``weight_scale``; compressed-tensors packs them on save.

Sample recipe::

    quant_stage:
      quant_modifiers:
        GSQModifier:
          ignore: [lm_head]
          steps: 100
          config_groups:
            group_0:
              targets: [Linear]
              weights: {num_bits: 2, type: int, symmetric: true, strategy: group, group_size: 64}
"""

from __future__ import annotations

import hashlib
import time
from collections.abc import Callable
from typing import Literal

import torch
from compressed_tensors.utils import getattr_chain, match_named_modules, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator
from torch.utils.hooks import RemovableHandle

from llmcompressor.core import Event, State
from llmcompressor.modifiers import Modifier
from llmcompressor.modifiers.quantization.quantization import QuantizationMixin
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.utils.pytorch.module import infer_sequential_targets

from gsq_vllm.compress.resume import LayerStore, tensor_digest
from gsq_vllm.gsq import (
    GSQConfig,
    Grid,
    accumulate_hessian,
    dequantize,
    get_grid,
    gptq_quantize,
    initial_scales,
    optimize_block,
    optimize_layer,
    quantize_to_grid,
)
from gsq_vllm.gsq import distributed
from gsq_vllm.gsq.blocks import BlockInputs, linears_with_weights, routed_tokens
from gsq_vllm.peak_memory import release_freed_memory
from gsq_vllm.weight_format import GSQ_BITS

__all__ = ["GSQModifier", "codes_digest"]

DECODER_LAYERS = "decoder_layers"


def codes_digest(codes: torch.Tensor) -> str:
    """A short fingerprint of a code matrix, to check a checkpoint holds exactly GSQ's choice."""
    return hashlib.sha1(codes.to(torch.int8).contiguous().numpy().tobytes()).hexdigest()[:16]


class GSQModifier(Modifier, QuantizationMixin):
    """Gumbel-Softmax Quantization initialised from GPTQ (see the module docstring for a recipe).

    :param grid: ``auto`` takes the grid from ``num_bits`` (2, 3 or 4); ``ternary`` stores
        {-1, 0, 1} codes in a 2-bit scheme.
    :param init: ``gptq`` (default) or ``rtn`` (ablation).
    :param scale_init: ``full_range`` (default: signed scales, the largest weight of each group
        exactly on the grid's wide end) or ``symmetric`` (compressed-tensors' absmax rule, which
        clips the asymmetric 2/3-bit grids).
    :param dampening_frac: GPTQ's Hessian dampening, a fraction of the mean diagonal (0 is honoured).
    :param block_size: GPTQ's column block size.
    :param actorder: ``static`` (default: columns by decreasing Hessian diagonal, groups stay
        contiguous) or ``None``.
    :param steps: optimisation steps per block or layer (0 = keep the start: GPTQ on the full range).
    :param blocks: ``decoder_layers`` (default: the pipeline's sequential targets, every Linear of
        a layer trained jointly on the layer's output) or module targets (class names, names or
        ``re:`` patterns, e.g. ``["re:.*mlp$"]``) whose Linears are trained jointly.
    :param targets_from: ``quantized`` (default) or ``full_precision`` (needs
        ``blocks: decoder_layers``); see the module docstring.
    :param layer_objective: for Linears outside any block: ``hessian`` or ``none`` (keep the start).
    :param tokens_per_step: calibration tokens per block step (whole sequences).
    :param holdout: fraction of the calibration sequences never trained on, which decide whether
        a block's result beats its start.
    :param prior_strength: how strongly the initial logits favour the start codes.
    :param max_block_tokens: cap on the calibration tokens cached per block.
    :param cache_dtype: dtype of the cached block inputs and targets (bf16 halves their memory).
    :param fused: ``torch.compile`` the relaxation and optimiser loops (eager when compiling fails).
    :param min_expert_tokens: routed tokens a mixture-of-experts expert needs to be trained with its
        block; one routed fewer keeps its GPTQ start (and the log says so). Default: its widest input.
    :param resume_dir: keep each finished block's codes and scales there, and reuse those computed from
        the same inputs (set by the quantize job, :mod:`gsq_vllm.compress.resume`).
    """

    requires_calibration_data: bool = True

    grid: Literal["auto", "ternary"] = "auto"
    init: Literal["gptq", "rtn"] = "gptq"
    scale_init: Literal["full_range", "symmetric"] = "full_range"
    dampening_frac: float = Field(default=0.01, ge=0)
    block_size: int = Field(default=128, ge=1)
    actorder: Literal["static"] | None = "static"
    steps: int = Field(default=100, ge=0)
    lr_logits: float = Field(default=1e-3, gt=0)
    lr_scales: float = Field(default=2e-3, ge=0)
    weight_decay: float = Field(default=1.0, ge=0)
    tau: tuple[float, float] = (2.0, 0.2)
    kappa: tuple[float, float] = (100.0, 500.0)
    prior_strength: float = Field(default=12.0, gt=0)
    tokens_per_step: int = Field(default=1024, ge=1)
    holdout: float = Field(default=0.1, ge=0, lt=1)
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    blocks: Literal["decoder_layers"] | list[str] = DECODER_LAYERS
    targets_from: Literal["full_precision", "quantized"] = "quantized"
    layer_objective: Literal["hessian", "none"] = "hessian"
    max_block_tokens: int = Field(default=1 << 20, ge=1)
    cache_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    fused: bool = True
    min_expert_tokens: int | None = Field(default=None, ge=1)
    resume_dir: str | None = None

    _names: dict[torch.nn.Module, str] = PrivateAttr(default_factory=dict)
    _grids: dict[torch.nn.Module, Grid] = PrivateAttr(default_factory=dict)
    _hessians: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _tokens: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
    _blocks: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _members: dict[str, dict[str, torch.nn.Module]] = PrivateAttr(default_factory=dict)
    _inputs: dict[str, BlockInputs] = PrivateAttr(default_factory=dict)
    _capture_hooks: dict[str, RemovableHandle] = PrivateAttr(default_factory=dict)
    _fp_stream: list[torch.Tensor] | None = PrivateAttr(default=None)
    _report: list[dict] = PrivateAttr(default_factory=list)

    @field_validator("tau", "kappa")
    @classmethod
    def _positive_pair(cls, value):
        if min(value) <= 0:
            raise ValueError(f"schedule endpoints must be positive, got {value}")
        return value

    # -- configuration ----------------------------------------------------------------------

    def gsq_config(self) -> GSQConfig:
        return GSQConfig(
            steps=self.steps, lr_logits=self.lr_logits, lr_scales=self.lr_scales, weight_decay=self.weight_decay,
            tau=tuple(self.tau), kappa=tuple(self.kappa), prior_strength=self.prior_strength,
            tokens_per_step=self.tokens_per_step, holdout=self.holdout, logits_dtype=self.logits_dtype,
            seed=self.seed, dampening=self.dampening_frac, fused=self.fused,
        )

    @property
    def report(self) -> list[dict]:
        """Per block / layer: objective at the start and after GSQ, seconds, code fingerprints."""
        return list(self._report)

    def on_initialize(self, state: State, **kwargs) -> bool:
        if QuantizationMixin.has_config(self):
            QuantizationMixin.initialize_quantization(self, state.model)
        model = state.model
        for name, module in match_named_modules(model, self.resolved_targets, self.ignore):
            weights = getattr_chain(module, "quantization_scheme.weights", None)
            if weights is None or not isinstance(module, torch.nn.Linear):
                continue
            self._grids[module] = self._grid_for(name, module, weights)
            self._names[module] = name
        if not self._grids:
            raise ValueError("GSQModifier found no Linear layer to quantize; check `targets`, `ignore` and `config_groups`")
        block_targets = self._block_targets(model, kwargs.get("sequential_targets"))
        for name, block in match_named_modules(model, block_targets):
            members = {rel: m for rel, m in block.named_modules() if m in self._grids}
            if not members:
                continue
            if any(name.startswith(existing + ".") for existing in self._blocks):
                continue  # nested in a block already: trained with it
            self._blocks[name], self._members[name] = block, members
        if self.targets_from == "full_precision" and self.blocks != DECODER_LAYERS and self.steps > 0:
            raise ValueError("targets_from: full_precision needs blocks: decoder_layers (the full-precision "
                             "hidden states are carried from one decoder layer to the next); use targets_from: quantized")
        return True

    def _block_targets(self, model: torch.nn.Module, sequential_targets) -> list[str]:
        if self.blocks == DECODER_LAYERS:
            return list(infer_sequential_targets(model, sequential_targets))
        return list(self.blocks)

    def _grid_for(self, name: str, module: torch.nn.Module, weights) -> Grid:
        strategy = getattr(weights.strategy, "value", weights.strategy)
        if weights.type != "int" or not weights.symmetric or weights.dynamic:
            raise ValueError(f"layer {name}: GSQ needs static symmetric int weights, found type={weights.type} "
                             f"symmetric={weights.symmetric} dynamic={weights.dynamic}")
        if strategy not in ("group", "channel"):
            raise ValueError(f"layer {name}: GSQ supports group or channel strategies, found {strategy}")
        actorder = getattr(weights.actorder, "value", weights.actorder)
        if actorder not in (None, "static"):
            raise ValueError(f"layer {name}: GSQ supports actorder static or none (contiguous groups, no g_idx), "
                             f"found actorder: {actorder} in its config group")
        in_features = module.weight.shape[1]
        if strategy == "group" and in_features % weights.group_size:
            raise ValueError(f"GSQ needs every quantized layer's input size to be a multiple of the group size:\n"
                             f"  - {name}: in_features {in_features} is not a multiple of group_size {weights.group_size}\n"
                             f"Add such layers to the modifier's `ignore` list (e.g. ignore: ['{name}']) or choose a "
                             "group size that divides them.")
        if not torch.isfinite(module.weight).all():
            raise ValueError(f"layer {name}: weight has NaN or Inf values; GSQ cannot quantize it")
        if self.grid == "ternary":
            if weights.num_bits != 2:
                raise ValueError(f"layer {name}: the ternary grid is stored as 2-bit, found num_bits={weights.num_bits}")
            return get_grid("ternary")
        if weights.num_bits not in GSQ_BITS:
            raise ValueError(f"layer {name}: GSQ supports num_bits {', '.join(map(str, GSQ_BITS))} (or grid: ternary), "
                             f"found {weights.num_bits}")
        return get_grid(weights.num_bits)

    def _block_of(self, module: torch.nn.Module) -> str | None:
        return next((name for name, members in self._members.items() if module in members.values()), None)

    # -- calibration --------------------------------------------------------------------------

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        QuantizationMixin.start_calibration(self, state.model)
        for module in self._grids:
            self.register_hook(module, self._accumulate, "forward")
        for name, block in self._blocks.items():
            self._inputs[name] = BlockInputs(self.max_block_tokens, getattr(torch, self.cache_dtype))
            self._capture_hooks[name] = self.register_hook(block, self._inputs[name].capture, "forward_pre",
                                                           with_kwargs=True)

    def _accumulate(self, module: torch.nn.Module, args: tuple, _output) -> None:
        """Hessian of each quantized Linear's input, and its token count."""
        self._hessians[module] = accumulate_hessian(self._hessians.get(module), args[0])
        self._tokens[module] = self._tokens.get(module, 0) + args[0].numel() // args[0].shape[-1]

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        calibrated = [m for m in modules if m in self._hessians]
        ready = [name for name in self._blocks
                 if name in self._inputs and all(m in self._hessians for m in self._members[name].values())]
        for module in calibrated:  # under torchrun: every rank's calibration shard counts
            distributed.all_reduce_sum(self._hessians[module])
            self._tokens[module] = int(distributed.all_reduce_sum(torch.tensor(self._tokens[module])))
        release_freed_memory()  # what the calibration pass freed, before this layer's work allocates its own
        with torch.enable_grad(), HooksMixin.disable_hooks():
            for module in calibrated:
                if self._block_of(module) is None:
                    self._quantize_layer(module)
            for name in ready:
                self._quantize_block(name)
        release_freed_memory()

    def on_calibration_end(self, state: State, event: Event, **kwargs):
        QuantizationMixin.end_calibration(self, state.model)
        self.remove_hooks()

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        leftover = [self._names[m] for m in self._hessians] + list(self._inputs)
        if leftover:
            raise ValueError(f"GSQ did not finish these layers / blocks: {leftover}")
        self._grids, self._names, self._blocks, self._members, self._fp_stream = {}, {}, {}, {}, None
        return True

    # -- the work -----------------------------------------------------------------------------

    def _start(self, module: torch.nn.Module) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(codes, scales, Hessian) of one Linear: GPTQ or RTN on the GSQ grid."""
        name, grid = self._names[module], self._grids[module]
        hessian = self._hessians.pop(module)
        tokens = self._tokens.pop(module)
        weight = module.weight.detach().to(torch.float32)
        if tokens < weight.shape[1]:
            raise ValueError(f"layer {name}: only {tokens} calibration tokens for {weight.shape[1]} input features; "
                             "GSQ/GPTQ need at least as many tokens as input features (use more or longer calibration samples)")
        hessian = hessian / tokens
        group_size = module.quantization_scheme.weights.group_size or weight.shape[1]
        scales = initial_scales(weight, grid, group_size, self.scale_init)
        if self.init == "gptq":
            codes = gptq_quantize(weight, hessian.to(weight.device), scales, grid, dampening=self.dampening_frac,
                                  block_size=self.block_size, act_order=self.actorder == "static")
        else:
            codes = quantize_to_grid(weight, scales, grid)
        return codes, scales, hessian

    def _quantize_layer(self, module: torch.nn.Module) -> None:
        name = self._names[module]
        digest = self._digest([module.weight, self._hessians[module]])
        if self._resumed(name, digest, {name: module}):
            return
        codes, scales, hessian = self._start(module)
        if self.layer_objective == "none" or self.steps == 0:
            self._finish(name, digest, {name: module}, {name: codes}, {name: scales}, None)
            return
        begin = time.time()
        result = optimize_layer(module.weight.detach().float(), hessian, codes, scales, self._grids[module],
                                self.gsq_config(), name=name)
        row = self._log(name, "layer", result, time.time() - begin, {name: result.codes[name]})
        self._finish(name, digest, {name: module}, result.codes, result.scales, row)

    def _quantize_block(self, block_name: str) -> None:
        block, members, inputs = self._blocks[block_name], self._members[block_name], self._inputs.pop(block_name)
        # the hook holds the recorded inputs: removed, they go with this call (one layer's at a time)
        self.remove_hooks({self._capture_hooks.pop(block_name)})
        if len(inputs) == 0:
            raise ValueError(f"block {block_name}: no calibration inputs were seen")
        originals = {rel: module.weight.detach().float() for rel, module in members.items()}
        run = self._runner(block, members, inputs)
        fp_inputs = None
        if self.targets_from == "full_precision" and self.steps > 0:
            fp_inputs = self._fp_stream if self._fp_stream is not None else inputs.hidden
            with torch.no_grad():  # carried to the next layer even when this one is resumed
                self._fp_stream = [inputs.cast(run(originals, i, fp_inputs[i])) for i in range(len(inputs))]
        digest = self._digest([*inputs.hidden, *(fp_inputs or []), *(originals[rel] for rel in sorted(members))])
        if self._resumed(block_name, digest, members):
            return
        starts = {rel: self._start(module) for rel, module in members.items()}
        if self.steps == 0:
            self._finish(block_name, digest, members, {rel: s[0] for rel, s in starts.items()},
                         {rel: s[1] for rel, s in starts.items()}, None)
            return
        with torch.no_grad(), routed_tokens(block) as routed:  # routing of the training inputs
            if fp_inputs is not None:
                targets = self._fp_stream
                for i in range(len(inputs) if routed else 0):
                    run(originals, i)
            else:
                targets = [inputs.cast(run(originals, i)) for i in range(len(inputs))]
        kept = self._experts_with_few_tokens(block_name, members, routed)
        trained = [rel for rel in members if rel not in kept]
        if not trained:
            self._finish(block_name, digest, members, {rel: s[0] for rel, s in starts.items()},
                         {rel: s[1] for rel, s in starts.items()}, None)
            return
        fixed = {rel: dequantize(starts[rel][0], starts[rel][1]) for rel in kept}
        begin = time.time()
        result = optimize_block(
            lambda weights, i: run({**fixed, **weights}, i), {rel: originals[rel] for rel in trained}, targets,
            {rel: starts[rel][0] for rel in trained}, {rel: starts[rel][1] for rel in trained},
            {rel: self._grids[members[rel]] for rel in trained}, self.gsq_config(), name=block_name,
        )
        codes = {**{rel: starts[rel][0] for rel in kept}, **result.codes}
        scales = {**{rel: starts[rel][1] for rel in kept}, **result.scales}
        row = self._log(block_name, "block", result, time.time() - begin,
                        {f"{block_name}.{rel}": codes[rel] for rel in members})
        if kept:
            row["kept_start"] = sorted(f"{block_name}.{rel}" for rel in kept)
        self._finish(block_name, digest, members, codes, scales, row)

    def _experts_with_few_tokens(self, block_name: str, members: dict[str, torch.nn.Module],
                                 routed: dict[str, torch.Tensor]) -> set[str]:
        """Members of routed experts that the router sent too few training tokens to fit them on:
        they keep their start (GPTQ's codes, fitted on every calibration token through
        llmcompressor's all-experts calibration) instead of GSQ's block objective, and the log
        names them. Too few: below ``min_expert_tokens``, by default the expert's widest input
        (GPTQ's own rule: at least as many tokens as input features)."""
        kept: set[str] = set()
        for experts, counts in routed.items():
            counts = distributed.all_reduce_sum(counts.clone())  # under torchrun: every rank's shard
            for index, tokens in enumerate(counts.tolist()):
                prefix = f"{experts}.{index}." if experts else f"{index}."
                own = [rel for rel in members if rel.startswith(prefix)]
                if not own:
                    continue
                needed = self.min_expert_tokens or max(members[rel].weight.shape[1] for rel in own)
                if tokens < needed:
                    kept.update(own)
                    logger.info(f"GSQ {block_name}: expert {index} of {experts} was routed {tokens} calibration "
                                f"tokens (< {needed}): kept its {self.init.upper()} codes instead of GSQ's")
        return kept

    # -- resuming a killed run (gsq_vllm.compress.resume) ------------------------------------------------

    def _digest(self, tensors: list[torch.Tensor]) -> str | None:
        """What a block's or layer's result is computed from, every rank's shard included (None
        when not resuming: nothing to hash)."""
        return distributed.agreed_digest(tensor_digest(tensors)) if self.resume_dir else None

    def _resumed(self, name: str, digest: str | None, members: dict[str, torch.nn.Module]) -> bool:
        """Write a finished block's saved result (same inputs) instead of computing it again."""
        saved = LayerStore(self.resume_dir).load(name, digest) if self.resume_dir else None
        if saved is None:
            return False
        for rel, module in members.items():
            self._hessians.pop(module)
            self._tokens.pop(module)
            self._write(module, saved["codes"][rel], saved["scales"][rel])
        if saved["report"] is not None:
            self._report.append(saved["report"])
        logger.info(f"GSQ {name}: resumed (finished by an earlier run with the same inputs)")
        return True

    def _finish(self, name: str, digest: str | None, members: dict[str, torch.nn.Module],
                codes: dict[str, torch.Tensor], scales: dict[str, torch.Tensor], row: dict | None) -> None:
        for rel, module in members.items():
            self._write(module, codes[rel], scales[rel])
        if self.resume_dir and distributed.rank() == 0:
            LayerStore(self.resume_dir).save(name, digest, dict(
                codes={rel: c.to(torch.int8) for rel, c in codes.items()},
                scales={rel: s.detach().float() for rel, s in scales.items()}, report=row))

    @staticmethod
    def _runner(block: torch.nn.Module, members: dict[str, torch.nn.Module], inputs: BlockInputs
                ) -> Callable[..., torch.Tensor]:
        """``run(weights, i, hidden=None)``: the block's output on item ``i`` with the given Linear weights."""
        device = next(block.parameters()).device

        def run(weights: dict[str, torch.Tensor], index: int, hidden: torch.Tensor | None = None) -> torch.Tensor:
            args, kwargs = inputs.call(index, device, hidden)
            with linears_with_weights(members, weights):
                output = block(*args, **kwargs)
            return output[0] if isinstance(output, (tuple, list)) else output

        return run

    def _log(self, name: str, objective: str, result, seconds: float, codes: dict[str, torch.Tensor]) -> dict:
        change = 100 * (1 - result.final_loss / result.initial_loss) if result.initial_loss else 0.0
        logger.info(
            f"GSQ {name} ({objective}): objective {result.initial_loss:.4g} ({self.init}) -> {result.final_loss:.4g} "
            f"({change:+.1f}% better){' kept start' if result.kept_initial else ''} in {seconds:.1f}s"
        )
        row = dict(name=name, objective=objective, initial=result.initial_loss, final=result.final_loss,
                   kept_initial=result.kept_initial, seconds=seconds,
                   codes_sha1={layer: codes_digest(c) for layer, c in codes.items()})
        self._report.append(row)
        return row

    def _write(self, module: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Fake-quantised weight and its scale; compressed-tensors packs them into codes on save."""
        dtype = module.weight.dtype
        stored_scales = scales.to(dtype)
        update_offload_parameter(module, "weight", dequantize(codes, stored_scales.float()).to(dtype))
        update_offload_parameter(module, "weight_scale", stored_scales.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            update_offload_parameter(module, "weight_zero_point", torch.zeros_like(module.weight_zero_point))
