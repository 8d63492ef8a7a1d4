"""``GSQEndToEndModifier``: a recipe step after GSQ that tunes the quantized model end to end.

Codes stay frozen; the per-group scales of every quantized Linear (and, with ``tune_norms``, the
norm weights) are tuned with :func:`gsq_vllm.gsq.tune_end_to_end` so that the model's next-token
distribution matches the full-precision model's on calibration sequences. The checkpoint keeps
exactly its format: the same codes, other scales. It works after any modifier that leaves
symmetric int weights (GSQ, GPTQ, AutoRound, RTN).

* ``on_initialize`` (before anything is quantized): runs the full-precision model on the first
  ``sequences`` calibration sequences and keeps what its output head sees (the final hidden
  states), so the teacher's logits can be recomputed, a slice of positions at a time, at any
  step (a copy of the head is kept only when a recipe quantizes the head itself);
* ``on_finalize`` (after every layer is quantized, outside the calibration context so the model
  runs normally): the tuning, then the new scales are written.

Sample recipe (after a ``GSQModifier`` in the same stage)::

        GSQEndToEndModifier:
          steps: 60
          tune_norms: true
"""

from __future__ import annotations

import contextlib
import time
from typing import Literal

import torch
from compressed_tensors.utils import getattr_chain, update_offload_parameter
from loguru import logger
from pydantic import Field, PrivateAttr

from llmcompressor.core import State
from llmcompressor.modifiers import Modifier
from llmcompressor.utils.helpers import DisableQuantization

from gsq_vllm.gsq import EndToEndConfig, dequantize, tune_end_to_end
from gsq_vllm.gsq.blocks import linears_with_weights
from gsq_vllm.peak_memory import release_freed_memory
from gsq_vllm.weight_format import code_range

__all__ = ["GSQEndToEndModifier"]


@contextlib.contextmanager
def _only_trainable(model: torch.nn.Module, parameters: list[torch.nn.Parameter]):
    """Only ``parameters`` of the model take gradients meanwhile: backward computes no gradient for
    the embeddings and head (at 8B shape: 3.9 GB of gradients, and the head's backward 1.6x slower)."""
    before = [p for p in model.parameters() if p.requires_grad]
    model.requires_grad_(False)
    for parameter in parameters:
        parameter.requires_grad_(True)
    try:
        yield
    finally:
        for parameter in parameters:
            parameter.requires_grad_(False)
            parameter.grad = None
        for parameter in before:
            parameter.requires_grad_(True)


class GSQEndToEndModifier(Modifier):
    """End-to-end tuning of group scales (codes frozen) against the full-precision model's KL.

    :param steps: Adam steps (0 = off).
    :param lr: Adam learning rate on the log of each scale (a relative change), cosine decay.
    :param sequences: calibration sequences used (the teacher's hidden states are kept for them).
    :param sequences_per_step: sequences per step.
    :param holdout: fraction of those sequences never trained on, which decide whether the
        result beats the start.
    :param tune_norms: also tune the weights of the normalisation layers.
    :param cache_dtype: dtype of the kept teacher hidden states.
    :param checkpoint_layers: recompute decoder layers in backward (gradient checkpointing): memory
        of one layer's activations and weights instead of the whole model's, for one more forward.
    :param positions_per_chunk: positions whose full-vocabulary logits exist at once (the KL is
        computed chunk by chunk; the result is the same up to rounding order).
    :param keep_best_every: check the held-out KL every this many steps and end with the best
        scales seen (0: only the end is checked, against the start).
    """

    requires_calibration_data: bool = True

    steps: int = Field(default=60, ge=0)
    lr: float = Field(default=3e-3, gt=0)
    sequences: int = Field(default=128, ge=1)
    sequences_per_step: int = Field(default=4, ge=1)
    holdout: float = Field(default=0.1, ge=0, lt=1)
    tune_norms: bool = True
    seed: int = 0
    cache_dtype: Literal["float32", "bfloat16"] = "bfloat16"
    checkpoint_layers: bool = True
    positions_per_chunk: int = Field(default=128, ge=1)
    keep_best_every: int = Field(default=0, ge=0)

    _input_ids: list[torch.Tensor] = PrivateAttr(default_factory=list)
    _teacher_hidden: list[torch.Tensor] = PrivateAttr(default_factory=list)
    _teacher_head: tuple[torch.Tensor, torch.Tensor | None] | None = PrivateAttr(default=None)
    _report: dict = PrivateAttr(default_factory=dict)

    @property
    def report(self) -> dict:
        """Held-out KL before and after, seconds, what was tuned."""
        return dict(self._report)

    def on_initialize(self, state: State, **kwargs) -> bool:
        model = state.model
        loader = kwargs.get("calib_data") or getattr(state.data, "calib", None)
        if loader is None:
            raise ValueError("GSQEndToEndModifier needs calibration data (oneshot's `dataset`)")
        head = model.get_output_embeddings()
        if head is None:
            raise ValueError(f"{type(model).__name__} has no output embeddings (lm_head); GSQEndToEndModifier needs one")
        if self.steps == 0:
            return True
        for batch in loader:
            for row, mask in zip(batch["input_ids"], batch.get("attention_mask", batch["input_ids"])):
                row = torch.as_tensor(row)
                keep = torch.as_tensor(mask).bool() if "attention_mask" in batch else torch.ones_like(row, dtype=torch.bool)
                self._input_ids.append(row[keep].to(torch.long).cpu())  # unpadded sequence
                if len(self._input_ids) == self.sequences:
                    break
            if len(self._input_ids) == self.sequences:
                break
        dtype = getattr(torch, self.cache_dtype)
        hook = head.register_forward_pre_hook(
            lambda _m, args: self._teacher_hidden.append(args[0][0].detach().to("cpu", dtype)))
        device = next(model.parameters()).device
        try:
            with torch.no_grad(), DisableQuantization(model):
                for ids in self._input_ids:
                    model(input_ids=ids[None].to(device), use_cache=False)
        finally:
            hook.remove()
        if getattr(head, "quantization_scheme", None) is not None:  # the student's head will differ
            self._teacher_head = (head.weight.detach().to("cpu").clone(),
                                  None if head.bias is None else head.bias.detach().to("cpu").clone())
        return True

    def on_finalize(self, state: State, **kwargs) -> bool:
        if not self.ended_:
            self.on_end(state, None)
        if self.steps == 0:
            return True
        model = state.model
        release_freed_memory()  # what the layer-wise stage freed
        linears, codes, initial, group_sizes = self._quantized_linears(model)
        gains = {name: torch.nn.Parameter(torch.zeros_like(initial[name])) for name in linears}
        norms = [p for name, module in model.named_modules() if type(module).__name__.endswith("Norm")
                 for p in module.parameters(recurse=False)] if self.tune_norms else []
        device = next(model.parameters()).device
        head = model.get_output_embeddings()
        trunk = model.base_model  # everything before the head: its output is the final hidden states
        teacher_head = head
        if self._teacher_head is not None:
            head_weight, head_bias = (t.to(device) if t is not None else None for t in self._teacher_head)
            teacher_head = lambda hidden: torch.nn.functional.linear(hidden, head_weight, head_bias)  # noqa: E731

        def weight_of(name: str):
            """Codes times the current scales, computed at each call of the Linear (and again when
            a checkpointed layer is recomputed): one layer's weights alive at a time, not the model's."""
            return lambda: codes[name].to(initial[name].dtype) * (
                initial[name] * torch.exp(gains[name])).repeat_interleave(group_sizes[name], 1)

        def student(items: list[int]) -> torch.Tensor:
            return torch.cat([trunk(input_ids=self._input_ids[i][None].to(device), use_cache=False).last_hidden_state[0]
                              for i in items])

        def teacher(items: list[int]) -> torch.Tensor:
            return torch.cat([self._teacher_hidden[i] for i in items]).to(device, head.weight.dtype)

        begin = time.time()
        config = EndToEndConfig(steps=self.steps, lr=self.lr, items_per_step=self.sequences_per_step,
                                holdout=self.holdout, seed=self.seed, positions_per_chunk=self.positions_per_chunk,
                                keep_best_every=self.keep_best_every)
        # the whole tuning (its backward passes included) runs inside these contexts, so a layer
        # recomputed by gradient checkpointing sees the same weights as its forward did
        with torch.enable_grad(), DisableQuantization(model), \
                linears_with_weights(linears, {name: weight_of(name) for name in linears}), \
                self._layer_checkpointing(model), _only_trainable(model, norms):
            result = tune_end_to_end(student, teacher, list(gains.values()) + norms, len(self._input_ids), config,
                                     head=head, teacher_head=teacher_head)
        with torch.no_grad():
            for name, module in linears.items():
                scales = (initial[name] * torch.exp(gains[name])).to(module.weight.dtype)
                update_offload_parameter(module, "weight_scale", scales.reshape(module.weight_scale.shape))
                update_offload_parameter(module, "weight", dequantize(codes[name], scales.float()).to(module.weight.dtype))
        seconds = time.time() - begin
        self._report = dict(initial_kl=result.initial_kl, final_kl=result.final_kl, kept_initial=result.kept_initial,
                            seconds=seconds, layers=len(linears), norms=len(norms), steps=self.steps,
                            best_step=result.best_step, held_out=result.held_out)
        logger.info(f"GSQ end to end: held-out KL {result.initial_kl:.4g} -> {result.final_kl:.4g}"
                    f"{' (kept the start)' if result.kept_initial else ''} over {len(linears)} layers"
                    f"{f' and {len(norms)} norms' if norms else ''} in {seconds:.0f}s")
        self._input_ids, self._teacher_hidden, self._teacher_head = [], [], None
        release_freed_memory()  # before the checkpoint is written
        return True

    @contextlib.contextmanager
    def _layer_checkpointing(self, model: torch.nn.Module):
        """Recompute each decoder layer's activations in backward (transformers' own gradient
        checkpointing): the activations of one layer alive instead of all, for about one more forward."""
        if not self.checkpoint_layers or not getattr(model, "supports_gradient_checkpointing", False):
            yield
            return
        was_on, was_training = model.is_gradient_checkpointing, model.training
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.train()  # transformers checkpoints only in training mode (no dropout in these models' layers)
        try:
            yield
        finally:
            model.train(was_training)
            if not was_on:
                model.gradient_checkpointing_disable()

    @staticmethod
    def _quantized_linears(model: torch.nn.Module):
        """Every Linear holding symmetric int weights: its codes and scales as the model holds them."""
        linears, codes, scales, group_sizes = {}, {}, {}, {}
        for name, module in model.named_modules():
            args = getattr_chain(module, "quantization_scheme.weights", None)
            if not isinstance(module, torch.nn.Linear) or args is None or not hasattr(module, "weight_scale"):
                continue
            if args.type != "int" or not args.symmetric:
                raise ValueError(f"layer {name}: GSQEndToEndModifier tunes symmetric int weights, found "
                                 f"type={args.type} symmetric={args.symmetric}")
            weight = module.weight.detach().float()
            scale = module.weight_scale.detach().float().reshape(weight.shape[0], -1)
            group_size = weight.shape[1] // scale.shape[1]
            low, high = code_range(args.num_bits)
            codes[name] = torch.clamp(torch.round(weight / scale.repeat_interleave(group_size, 1)), low, high
                                      ).to(torch.int8)  # a quarter of fp32's memory, exact
            linears[name], scales[name], group_sizes[name] = module, scale, group_size
        if not linears:
            raise ValueError("GSQEndToEndModifier found no quantized Linear; put it after a quantization modifier")
        return linears, codes, scales, group_sizes
