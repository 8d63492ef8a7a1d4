"""Running a block (a decoder layer, an MLP) on cached calibration inputs with substitute weights.

Plain torch, no llmcompressor: a :class:`BlockInputs` records each call of a block (its hidden
states and every other argument: position embeddings, attention mask, ...) from a pre-forward
hook, and replays any of them later, optionally with other hidden states (the full-precision
stream); :func:`linears_with_weights` makes the block's Linears use given weight tensors, through
which autograd flows to GSQ's relaxed weights; :func:`routed_tokens` counts the tokens a
mixture-of-experts block's router sends each expert.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
from collections.abc import Callable, Iterator
from typing import Any

import torch

__all__ = ["BlockInputs", "linears_with_weights", "routed_tokens"]


def _map_tensors(value: Any, fn) -> Any:
    if isinstance(value, torch.Tensor):
        return fn(value)
    if isinstance(value, tuple):
        return tuple(_map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [_map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {k: _map_tensors(v, fn) for k, v in value.items()}
    return value


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and a.shape == b.shape
                and a.dtype == b.dtype and torch.equal(a, b))
    if isinstance(a, (tuple, list)) and isinstance(b, (tuple, list)):
        return type(a) is type(b) and len(a) == len(b) and all(_same(x, y) for x, y in zip(a, b))
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_same(a[k], b[k]) for k in a)
    if isinstance(a, (int, float, str, bool, type(None))):
        return type(a) is type(b) and a == b
    return a is b


def _storable(value: Any) -> Any:
    """Tensors detached to the CPU; KV caches dropped (calibration runs without them)."""
    if type(value).__name__.endswith("Cache") and not isinstance(value, torch.Tensor):
        return None
    return _map_tensors(value, lambda t: t.detach().to("cpu"))


class BlockInputs:
    """Every call of one block during calibration, in call order (one item per call).

    Hidden states are kept in ``dtype`` (bf16 halves the memory); the other arguments are kept
    as given, and shared between calls where they are equal (the same position embeddings and
    mask for every sequence of one length). Calls beyond ``max_tokens`` cached tokens are
    not recorded.
    """

    def __init__(self, max_tokens: int = 1 << 20, dtype: torch.dtype = torch.bfloat16):
        self.max_tokens, self.dtype = max_tokens, dtype
        self.hidden: list[torch.Tensor] = []
        self._context: list[tuple[tuple, dict]] = []  # (other positional args, keyword args) per call
        self._input_dtype: torch.dtype | None = None
        self.tokens = 0

    def __len__(self) -> int:
        return len(self.hidden)

    def capture(self, _module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
        """A ``forward_pre`` hook (``with_kwargs=True``): record one call."""
        hidden = args[0] if args else kwargs.get("hidden_states")
        if hidden is None:
            raise ValueError("the block was called without hidden states (no positional input, no hidden_states=)")
        if self.tokens >= self.max_tokens:
            return
        rest = {k: _storable(v) for k, v in kwargs.items() if k != "hidden_states"}
        context = (_storable(tuple(args[1:])), rest)
        if self._context and _same(self._context[-1], context):
            context = self._context[-1]
        self._input_dtype = hidden.dtype
        self.hidden.append(self.cast(hidden))
        self._context.append(context)
        self.tokens += hidden.numel() // hidden.shape[-1]

    def cast(self, tensor: torch.Tensor) -> torch.Tensor:
        """How a tensor of this block's stream is stored (CPU, ``dtype``)."""
        return tensor.detach().to("cpu", self.dtype)

    def call(self, index: int, device: torch.device | str, hidden: torch.Tensor | None = None) -> tuple[tuple, dict]:
        """``(args, kwargs)`` that replay call ``index``, with ``hidden`` instead of its hidden states if given."""
        hidden = self.hidden[index] if hidden is None else hidden
        args, kwargs = self._context[index]
        move = functools.partial(torch.Tensor.to, device=device)
        return (hidden.to(device, self._input_dtype), *_map_tensors(args, move)), _map_tensors(kwargs, move)


@contextlib.contextmanager
def linears_with_weights(
    linears: dict[str, torch.nn.Module], weights: dict[str, torch.Tensor | Callable[[], torch.Tensor]]
) -> Iterator[None]:
    """Run each Linear with a given weight tensor instead of its parameter (or with the tensor a
    given function returns, computed at each call).

    Neither ``functional_call`` nor compressed-tensors' fake-quant forward fit here: both write
    into the parameter (offloading caches, ``weight.data`` patches), which breaks autograd through
    the soft weights. Replacing ``forward`` for the duration of one call does not.
    """
    saved = {name: module.__dict__.get("forward") for name, module in linears.items()}

    def linear(x: torch.Tensor, weight, bias: torch.Tensor | None) -> torch.Tensor:
        weight = weight() if callable(weight) else weight
        return torch.nn.functional.linear(x, weight.to(x.dtype), None if bias is None else bias.to(x.dtype))

    for name, module in linears.items():
        module.forward = functools.partial(linear, weight=weights[name], bias=module.bias)
    try:
        yield
    finally:
        for name, module in linears.items():
            if saved[name] is None:
                del module.forward
            else:
                module.forward = saved[name]


def _is_routed_experts(module: torch.nn.Module) -> bool:
    """transformers' interface of a block's routed experts: ``forward(hidden_states, top_k_index,
    top_k_weights)`` (its fused experts, and llmcompressor's per-expert Linears that replace them)."""
    try:
        return "top_k_index" in inspect.signature(module.forward).parameters
    except (TypeError, ValueError):
        return False


@contextlib.contextmanager
def routed_tokens(block: torch.nn.Module) -> Iterator[dict[str, torch.Tensor]]:
    """Count, while the block runs, the tokens sent to each routed expert: ``{experts module name
    (relative to the block): tokens per expert index}`` (empty for a block without experts)."""
    counts: dict[str, torch.Tensor] = {}
    handles = []
    for name, module in block.named_modules():
        if not _is_routed_experts(module):
            continue
        size = getattr(module, "num_experts", None) or len(module)
        counts[name] = torch.zeros(int(size), dtype=torch.long)

        def count(_module, args: tuple, kwargs: dict, name: str = name) -> None:
            chosen = args[1] if len(args) > 1 else kwargs["top_k_index"]
            counts[name] += torch.bincount(chosen.detach().reshape(-1).cpu(), minlength=len(counts[name]))

        handles.append(module.register_forward_pre_hook(count, with_kwargs=True))
    try:
        yield counts
    finally:
        for handle in handles:
            handle.remove()
