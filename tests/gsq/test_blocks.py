"""The decoder-layer objective: a recorded call of a real Llama decoder layer, replayed with other
Linear weights, gives what the layer's equations give by hand with those weights."""

from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("transformers")

from gsq_vllm.gsq.blocks import BlockInputs, linears_with_weights  # noqa: E402
from tests.tiny_llama import build_tiny_llama  # noqa: E402

PROJECTIONS = ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
               "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj")


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    return weight * (x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + eps))


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    rotated = torch.cat([-x[..., half:], x[..., :half]], dim=-1)
    return x * cos + rotated * sin


def decoder_layer_by_hand(hidden, weights, layer, config, cos, sin):
    """Llama's decoder layer written out: pre-norm causal GQA attention with RoPE, then a SwiGLU MLP."""
    batch, length, _ = hidden.shape
    heads, kv_heads = config.num_attention_heads, config.num_key_value_heads
    head_dim = config.hidden_size // heads
    x = rms_norm(hidden, layer.input_layernorm.weight, config.rms_norm_eps)
    q = (x @ weights["self_attn.q_proj"].T).view(batch, length, heads, head_dim).transpose(1, 2)
    k = (x @ weights["self_attn.k_proj"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    v = (x @ weights["self_attn.v_proj"].T).view(batch, length, kv_heads, head_dim).transpose(1, 2)
    q, k = rotate(q, cos[:, None], sin[:, None]), rotate(k, cos[:, None], sin[:, None])
    k = k.repeat_interleave(heads // kv_heads, dim=1)
    v = v.repeat_interleave(heads // kv_heads, dim=1)
    scores = q @ k.transpose(-1, -2) / math.sqrt(head_dim)
    causal = torch.ones(length, length, dtype=torch.bool).triu(1)
    attention = scores.masked_fill(causal, float("-inf")).softmax(-1) @ v
    hidden = hidden + attention.transpose(1, 2).reshape(batch, length, -1) @ weights["self_attn.o_proj"].T
    x = rms_norm(hidden, layer.post_attention_layernorm.weight, config.rms_norm_eps)
    gate, up = x @ weights["mlp.gate_proj"].T, x @ weights["mlp.up_proj"].T
    return hidden + (torch.nn.functional.silu(gate) * up) @ weights["mlp.down_proj"].T


@torch.no_grad()
def test_replayed_decoder_layer_matches_the_hand_computed_layer():
    model = build_tiny_llama(seed=3, num_layers=2)
    layer = model.model.layers[1]
    inputs = BlockInputs(dtype=torch.float32)
    handle = layer.register_forward_pre_hook(inputs.capture, with_kwargs=True)
    ids = torch.randint(3, 500, (2, 3, 24), generator=torch.Generator().manual_seed(0))
    for batch in ids:  # two calls, as the sequential pipeline makes one per calibration batch
        model(batch, use_cache=False)
    handle.remove()
    assert len(inputs) == 2

    members = dict((name, layer.get_submodule(name)) for name in PROJECTIONS)
    generator = torch.Generator().manual_seed(1)
    other = {name: module.weight + 0.05 * torch.randn(module.weight.shape, generator=generator)
             for name, module in members.items()}
    rotary = model.model.rotary_emb
    for index in range(len(inputs)):
        args, kwargs = inputs.call(index, "cpu")
        with linears_with_weights(members, other):
            replayed = layer(*args, **kwargs)
        replayed = replayed[0] if isinstance(replayed, (tuple, list)) else replayed
        hidden = inputs.hidden[index]
        cos, sin = rotary(hidden, torch.arange(hidden.shape[1])[None])
        expected = decoder_layer_by_hand(hidden, other, layer, model.config, cos, sin)
        torch.testing.assert_close(replayed, expected, rtol=1e-4, atol=1e-4)
        # and other hidden states (the full-precision stream) replace the recorded ones
        fresh = torch.randn(hidden.shape, generator=generator)
        args, kwargs = inputs.call(index, "cpu", fresh)
        with linears_with_weights(members, other):
            replayed = layer(*args, **kwargs)
        replayed = replayed[0] if isinstance(replayed, (tuple, list)) else replayed
        torch.testing.assert_close(replayed, decoder_layer_by_hand(fresh, other, layer, model.config, cos, sin),
                                   rtol=1e-4, atol=1e-4)
    assert all(module.__dict__.get("forward") is None for module in members.values())  # restored
