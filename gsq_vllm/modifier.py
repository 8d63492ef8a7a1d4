"""``GSQModifier``: GSQ as an llmcompressor recipe step (a thin adapter over :mod:`gsq_vllm.gsq`).

It is a :class:`GPTQModifier` that goes further: Hessians are accumulated by GPTQ's own hooks,
llmcompressor's GPTQ gives the initial codes and scales, and GSQ then trains them

* jointly for the Linears under a *block* module (default: every ``...mlp``), on the block's
  cached calibration inputs (the ``block`` objective),
* one by one for the other Linears (attention projections), on their Hessian (the ``layer``
  objective).

Sample recipe::

    quant_stage:
      quant_modifiers:
        GSQModifier:
          targets: [Linear]
          ignore: [lm_head]
          steps: 100
          config_groups:
            group_0:
              targets: [Linear]
              weights: {num_bits: 2, type: int, symmetric: true, strategy: group, group_size: 64}

Lifecycle (as GPTQ's): on_initialize applies the scheme and checks every targeted layer;
on_calibration_start adds the Hessian hooks and the block-input hooks; on_sequential_epoch_end
quantizes the subgraph just calibrated (usually one decoder layer), so later layers calibrate on
the outputs of already-quantized ones; on_finalize clears the state.
"""

from __future__ import annotations

import contextlib
import hashlib
import functools
import re
import time
from typing import Literal

import torch
from compressed_tensors.quantization.utils import is_module_quantized
from compressed_tensors.utils import getattr_chain, match_named_modules, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr, field_validator

from llmcompressor.core import Event, State
from llmcompressor.modifiers.gptq import GPTQModifier
from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight
from llmcompressor.modifiers.quantization.calibration import observe, update_qparams
from llmcompressor.modifiers.quantization.group_size_validation import get_layers_indivisible_by_group_size
from llmcompressor.modifiers.utils.hooks import HooksMixin
from llmcompressor.observers import ACTIVATION_OBS

from gsq_vllm.gsq import GSQConfig, Grid, dequantize, get_grid, optimize_block, optimize_layer, rtn_quantize

__all__ = ["GSQModifier", "codes_digest"]


def codes_digest(codes: torch.Tensor) -> str:
    """A short fingerprint of a code matrix, to check a checkpoint holds exactly GSQ's choice."""
    return hashlib.sha1(codes.to(torch.int8).contiguous().numpy().tobytes()).hexdigest()[:16]


@contextlib.contextmanager
def _linears_with_weights(linears: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor]):
    """Run each Linear with a given weight tensor instead of its parameter.

    Neither ``functional_call`` nor compressed-tensors' fake-quant forward fit here: both write
    into the parameter (offloading caches, ``weight.data`` patches), which breaks autograd
    through the soft weights. Replacing ``forward`` for the duration of one call does not.
    """
    saved = {name: module.__dict__.get("forward") for name, module in linears.items()}
    for name, module in linears.items():
        module.forward = functools.partial(torch.nn.functional.linear, weight=weights[name], bias=module.bias)
    try:
        yield
    finally:
        for name, module in linears.items():
            if saved[name] is None:
                del module.forward
            else:
                module.forward = saved[name]


class GSQModifier(GPTQModifier):
    """Gumbel-Softmax Quantization initialised from GPTQ (see the module docstring for a recipe).

    :param grid: ``auto`` takes the grid from ``num_bits`` (2, 3 or 4); ``ternary`` stores
        {-1, 0, 1} codes in a 2-bit scheme.
    :param init: ``gptq`` (default) or ``rtn`` (ablation).
    :param steps: optimisation steps per layer or block (0 = keep the initialisation).
    :param block_modules: modules whose quantized Linears are trained jointly on the module's
        output (``re:`` prefix for a regex on the module name).
    :param layer_objective: for Linears outside any block: ``hessian`` (GSQ on the layer
        objective) or ``none`` (keep the initialisation).
    :param prior_strength: how strongly the initial logits favour the initial codes (see
        :class:`gsq_vllm.gsq.RelaxedWeight`).
    :param max_block_tokens: cap on the cached calibration tokens per block (memory).
    :param fused: ``torch.compile`` the relaxation and optimiser loops (several times faster on a
        CPU; falls back to eager PyTorch when compiling fails).
    """

    grid: Literal["auto", "ternary"] = "auto"
    init: Literal["gptq", "rtn"] = "gptq"
    steps: int = Field(default=100, ge=0)
    lr_logits: float = 2e-3
    lr_scales: float = 1e-4
    weight_decay: float = 1.0
    tau: tuple[float, float] = (2.0, 0.2)
    kappa: tuple[float, float] = (100.0, 500.0)
    prior_strength: float = Field(default=12.0, gt=0)
    tokens_per_step: int = Field(default=2048, ge=1)
    logits_dtype: Literal["float32", "bfloat16"] = "float32"
    seed: int = 0
    block_modules: list[str] = Field(default_factory=lambda: ["re:.*mlp$"])
    layer_objective: Literal["hessian", "none"] = "hessian"
    max_block_tokens: int = Field(default=65536, ge=1)
    fused: bool = True

    _grids: dict[torch.nn.Module, Grid] = PrivateAttr(default_factory=dict)
    _blocks: dict[str, torch.nn.Module] = PrivateAttr(default_factory=dict)
    _block_members: dict[str, dict[str, torch.nn.Module]] = PrivateAttr(default_factory=dict)
    _block_inputs: dict[str, list[torch.Tensor]] = PrivateAttr(default_factory=dict)
    _initial: dict[torch.nn.Module, tuple[torch.Tensor, torch.Tensor]] = PrivateAttr(default_factory=dict)
    _layer_hessians: dict[torch.nn.Module, torch.Tensor] = PrivateAttr(default_factory=dict)
    _num_tokens: dict[torch.nn.Module, int] = PrivateAttr(default_factory=dict)
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
            tokens_per_step=self.tokens_per_step,
            logits_dtype=self.logits_dtype, seed=self.seed, dampening=self.dampening_frac or 0.01,
            fused=self.fused,
        )

    @property
    def report(self) -> list[dict]:
        """Per layer / block: objective at the initialisation and after GSQ, seconds."""
        return list(self._report)

    def on_initialize(self, state: State, **kwargs) -> bool:
        super().on_initialize(state, **kwargs)  # llmcompressor checks group sizes here too
        model = state.model
        # GSQ cannot honour bypass_divisibility_checks: every group must be whole
        indivisible = get_layers_indivisible_by_group_size(model, self.resolved_targets, self.ignore)
        if indivisible:
            lines = "\n".join(f"  - {name}: in_features {cols} is not a multiple of group_size {gs}"
                              for name, cols, gs in indivisible)
            raise ValueError(
                "GSQ needs every quantized layer's input size to be a multiple of the group size:\n"
                f"{lines}\nAdd these layers to the modifier's `ignore` list (e.g. ignore: "
                f"['{indivisible[0][0]}']) or choose a group size that divides them."
            )
        for module, name in self._module_names.items():
            weights = getattr_chain(module, "quantization_scheme.weights", None)
            if weights is None or isinstance(module, torch.nn.Embedding):
                continue
            self._grids[module] = self._grid_for(name, weights)
            if not torch.isfinite(module.weight).all():
                raise ValueError(f"layer {name}: weight has NaN or Inf values; GSQ cannot quantize it")
        targeted = {name for module, name in self._module_names.items() if module in self._grids}
        for name, module in model.named_modules():
            if self._is_block(name):
                members = {n: m for n, m in module.named_modules() if n and f"{name}.{n}" in targeted}
                if members:
                    self._blocks[name] = module
                    self._block_members[name] = members
        return True

    def _grid_for(self, name: str, weights) -> Grid:
        if weights.type != "int" or not weights.symmetric or weights.dynamic:
            raise ValueError(
                f"layer {name}: GSQ needs static symmetric int weights, found type={weights.type} "
                f"symmetric={weights.symmetric} dynamic={weights.dynamic}"
            )
        if str(weights.strategy.value if hasattr(weights.strategy, "value") else weights.strategy) not in ("group", "channel"):
            raise ValueError(f"layer {name}: GSQ supports group or channel strategies, found {weights.strategy}")
        if self.grid == "ternary":
            if weights.num_bits != 2:
                raise ValueError(f"layer {name}: the ternary grid is stored as 2-bit, found num_bits={weights.num_bits}")
            return get_grid("ternary")
        if weights.num_bits not in (2, 3, 4):
            raise ValueError(f"layer {name}: GSQ supports num_bits 2, 3 or 4 (or grid: ternary), found {weights.num_bits}")
        return get_grid(weights.num_bits)

    def _in_block(self, module: torch.nn.Module) -> bool:
        return any(module in members.values() for members in self._block_members.values())

    def _is_block(self, name: str) -> bool:
        for pattern in self.block_modules:
            if pattern.startswith("re:") and re.match(pattern[3:], name):
                return True
            if not pattern.startswith("re:") and (name == pattern or name.endswith("." + pattern)):
                return True
        return False

    # -- calibration --------------------------------------------------------------------------

    def on_calibration_start(self, state: State, event: Event, **kwargs):
        super().on_calibration_start(state, event, **kwargs)
        for name, block in self._blocks.items():
            self.register_hook(block, self._make_input_cache(name), "forward")

    def calibrate_module(self, module: torch.nn.Module, args: tuple[torch.Tensor, ...], output: torch.Tensor):
        """GPTQ's Hessian hook, plus a token count (GPTQ counts sequences)."""
        super().calibrate_module(module, args, output)
        self._num_tokens[module] = self._num_tokens.get(module, 0) + args[0].numel() // args[0].shape[-1]

    def _make_input_cache(self, name: str):
        def cache_input(_module, args, _output):
            inputs = args[0].detach().reshape(-1, args[0].shape[-1]).to("cpu", torch.float32)
            cached = self._block_inputs.setdefault(name, [])
            if sum(x.shape[0] for x in cached) < self.max_block_tokens:
                cached.append(inputs)
        return cache_input

    def on_sequential_epoch_end(self, state: State, event: Event, modules: list[torch.nn.Module], **kwargs):
        modules = [module for module in modules if is_module_quantized(module)]
        observe(modules, base_name="weight")
        self.sync_obs_act_stats(modules)
        update_qparams(modules, ACTIVATION_OBS)
        with torch.no_grad():
            for module in list(self._num_samples):
                self._initialise(module)
        with torch.enable_grad(), HooksMixin.disable_hooks():
            for module, (codes, scales) in list(self._initial.items()):
                if not self._in_block(module):
                    self._train_layer(module, codes, scales)
            for name in [n for n in self._blocks if all(m in self._initial for m in self._block_members[n].values())]:
                self._train_block(name)

    # -- the work -----------------------------------------------------------------------------

    def _initialise(self, module: torch.nn.Module) -> None:
        """GPTQ (llmcompressor's own) or RTN codes and scales for one Linear."""
        name = self._module_names[module]
        grid = self._grids[module]
        num_samples = float(self._num_samples.pop(module))
        hessian = self._hessians.pop(module) / max(num_samples, 1.0)
        num_tokens = self._num_tokens.pop(module, 0)
        in_features = module.weight.shape[1]
        if num_tokens < in_features:
            raise ValueError(
                f"layer {name}: only {num_tokens} calibration tokens for {in_features} input features; "
                "GSQ/GPTQ need at least as many tokens as input features (use more or longer calibration samples)"
            )
        weight = module.weight.detach().to(torch.float32)
        quant_args = module.quantization_scheme.weights
        group_size = quant_args.group_size or in_features
        if self.init == "gptq":
            observer_scale = module.weight_observer.get_qparams()["scale"].to(torch.float32)
            # int grids: the observer's scale; ternary: absmax instead of int2's absmax / 1.5
            scales = observer_scale * 1.5 if grid.name == "ternary" else observer_scale
            scales = scales.reshape(weight.shape[0], -1).clamp_min(torch.finfo(torch.float16).tiny)
            quantized, _, _ = quantize_weight(
                weights=weight.clone()[None], hessians=hessian.clone()[None], scale=scales[None],
                zero_point=torch.zeros_like(scales, dtype=torch.int8)[None], global_scale=None,
                quant_args=quant_args, blocksize=self.block_size, percdamp=self.dampening_frac or 0.01,
            )
            expanded = scales.repeat_interleave(weight.shape[1] // scales.shape[1], dim=1)
            codes = torch.clamp(torch.round(quantized[0] / expanded), grid.qmin, grid.qmax).to(torch.int8)
        else:
            codes, scales = rtn_quantize(weight, grid, group_size)
        self._initial[module] = (codes, scales)
        if not self._in_block(module):
            self._layer_hessians[module] = hessian

    def _train_layer(self, module: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        name = self._module_names[module]
        hessian = self._layer_hessians.pop(module)
        if self.layer_objective == "none" or self.steps == 0:
            self._write(module, codes, scales)
            self._initial.pop(module)
            return
        start = time.time()
        result = optimize_layer(module.weight.detach().float(), hessian, codes, scales, self._grids[module],
                                self.gsq_config(), name=name)
        self._log(name, "layer", result, time.time() - start, {name: result.codes[name]})
        self._write(module, result.codes[name], result.scales[name])
        self._initial.pop(module)

    def _train_block(self, block_name: str) -> None:
        block = self._blocks[block_name]
        members = self._block_members[block_name]
        init = {rel: self._initial.pop(m) for rel, m in members.items()}
        inputs = torch.cat(self._block_inputs.pop(block_name, []) or [torch.empty(0)])
        if inputs.numel() == 0:
            raise ValueError(f"block {block_name}: no calibration inputs were seen")
        if self.steps == 0:
            for rel, m in members.items():
                self._write(m, *init[rel])
            return
        grids = {self._grids[m] for m in members.values()}
        if len(grids) != 1:
            raise ValueError(f"block {block_name}: its layers use different grids {sorted(g.name for g in grids)}")
        device = next(block.parameters()).device

        def forward(weights: dict[str, torch.Tensor], x: torch.Tensor) -> torch.Tensor:
            with _linears_with_weights(members, weights):
                return block(x.to(device))

        start = time.time()
        result = optimize_block(
            forward, {rel: m.weight.detach().float() for rel, m in members.items()}, inputs,
            {rel: init[rel][0] for rel in members}, {rel: init[rel][1] for rel in members},
            grids.pop(), self.gsq_config(), name=block_name,
        )
        self._log(block_name, "block", result, time.time() - start,
                  {f"{block_name}.{rel}": result.codes[rel] for rel in members})
        for rel, m in members.items():
            self._write(m, result.codes[rel], result.scales[rel])

    def _log(self, name: str, objective: str, result, seconds: float, codes: dict[str, torch.Tensor]) -> None:
        change = 100 * (1 - result.final_loss / result.initial_loss) if result.initial_loss else 0.0
        logger.info(
            f"GSQ {name} ({objective}): objective {result.initial_loss:.4g} ({self.init}) -> {result.final_loss:.4g} "
            f"({change:+.1f}% better){' kept init' if result.kept_initial else ''} in {seconds:.1f}s"
        )
        self._report.append(dict(name=name, objective=objective, initial=result.initial_loss,
                                 final=result.final_loss, kept_initial=result.kept_initial, seconds=seconds,
                                 codes_sha1={layer: codes_digest(c) for layer, c in codes.items()}))

    def _write(self, module: torch.nn.Module, codes: torch.Tensor, scales: torch.Tensor) -> None:
        """Fake-quantised weight and its scale; compressed-tensors packs them into codes on save."""
        dtype = module.weight.dtype
        stored_scales = scales.to(dtype)
        update_offload_parameter(module, "weight", dequantize(codes, stored_scales.float()).to(dtype))
        update_offload_parameter(module, "weight_scale", stored_scales.reshape(module.weight_scale.shape))
        if hasattr(module, "weight_zero_point"):
            update_offload_parameter(module, "weight_zero_point", torch.zeros_like(module.weight_zero_point))
        self._num_compressed_modules += 1

    def on_finalize(self, state: State, **kwargs) -> bool:
        if self._initial or self._block_inputs:
            leftover = [self._module_names[m] for m in self._initial] + list(self._block_inputs)
            raise ValueError(f"GSQ did not finish these layers: {leftover}")
        result = super().on_finalize(state, **kwargs)
        self._grids, self._blocks, self._block_members = {}, {}, {}
        return result
