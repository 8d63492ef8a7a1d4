"""Llama-architecture checkpoints with random weights at real model shapes, for speed only.

No model larger than the default one can be had offline, and the serving speed of a checkpoint does
not depend on its weight values (no kernel here branches on them), so the 1B-70B serving figures
come from these: every dense weight drawn from N(0, 0.02), every quantized layer random codes of its
grid with random group scales, written in exactly the format a quantizer writes (compressed-tensors
``pack-quantized``, symmetric int, group 128). Perplexity means nothing here.

Kinds: ``bf16``; ``gptq-w4`` (4-bit codes: the format GPTQ W4A16 writes); ``gsq-w3`` and ``gsq-w2``
(GSQ's 3/2-bit format), all with ``lm_head`` in bf16 (tied to the input embedding where the real
model ties them); and the same three with ``-h4``: the output head a 4-bit group-128 layer of its
own (a second config group), the input embedding a separate bf16 tensor, as llama.cpp's K-quants
quantize the output head (Q6_K there). The default model's tokenizer goes in, padded with unused
tokens to the model's vocabulary, so every tool can load the folder and name every id it emits.

    .venv-serve/bin/python benchmarks/random_llama.py 1b gsq-w2 OUT_DIR
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path
from typing import NamedTuple

import torch

#: the real models' shapes (Llama-3.2-1B, Llama-3.1-8B, Llama-3.1-70B)
MODEL_SHAPES: dict[str, dict] = {
    "1b": dict(hidden=2048, intermediate=8192, layers=16, heads=32, kv_heads=8, vocab=128256, tied_embeddings=True),
    "8b": dict(hidden=4096, intermediate=14336, layers=32, heads=32, kv_heads=8, vocab=128256, tied_embeddings=False),
    "70b": dict(hidden=8192, intermediate=28672, layers=80, heads=64, kv_heads=8, vocab=128256, tied_embeddings=False),
}


class Kind(NamedTuple):
    """Code bits of the decoder layers' Linears and of the output head (None: dense bf16)."""

    bits: int | None
    head_bits: int | None = None


KINDS: dict[str, Kind] = {"bf16": Kind(None), "gptq-w4": Kind(4), "gsq-w3": Kind(3), "gsq-w2": Kind(2),
                          "gptq-w4-h4": Kind(4, 4), "gsq-w3-h4": Kind(3, 4), "gsq-w2-h4": Kind(2, 4)}
GROUP_SIZE = 128
SHARD_BYTES = 2 << 30


def ties_embeddings(shape: dict, kind: str) -> bool:
    """Whether the checkpoint's head is its input embedding (only a bf16 head can be)."""
    return shape["tied_embeddings"] and KINDS[kind].head_bits is None


def linear_shapes(shape: dict) -> dict[str, tuple[int, int]]:
    """(out_features, in_features) of each Linear of one decoder layer, by its name in the layer."""
    hidden, inter = shape["hidden"], shape["intermediate"]
    kv = shape["kv_heads"] * hidden // shape["heads"]
    return {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv, hidden), "self_attn.v_proj": (kv, hidden),
            "self_attn.o_proj": (hidden, hidden), "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden),
            "mlp.down_proj": (hidden, inter)}


def parameter_count(shape: dict) -> dict[str, int]:
    """Weights of the decoder layers' Linears, and of the embedding and head (one matrix when tied)."""
    linear = shape["layers"] * sum(o * i for o, i in linear_shapes(shape).values())
    embedding = shape["vocab"] * shape["hidden"] * (1 if shape["tied_embeddings"] else 2)
    return {"linear": linear, "embedding_and_head": embedding}


def _weight_args(bits: int) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": GROUP_SIZE,
            "dynamic": False, "actorder": None, "observer": "minmax", "observer_kwargs": {}}


def llama_config(shape: dict, kind: str) -> dict:
    bits, head_bits = KINDS[kind]
    config = {
        "architectures": ["LlamaForCausalLM"], "model_type": "llama", "hidden_act": "silu",
        "hidden_size": shape["hidden"], "intermediate_size": shape["intermediate"],
        "num_hidden_layers": shape["layers"], "num_attention_heads": shape["heads"],
        "num_key_value_heads": shape["kv_heads"], "head_dim": shape["hidden"] // shape["heads"],
        "vocab_size": shape["vocab"], "max_position_embeddings": 8192, "rms_norm_eps": 1e-5,
        "rope_theta": 500000.0, "tie_word_embeddings": ties_embeddings(shape, kind), "attention_bias": False,
        "mlp_bias": False, "torch_dtype": "bfloat16", "bos_token_id": 1, "eos_token_id": 2,
    }
    if bits is not None:
        groups = {"group_0": {"targets": ["Linear"], "format": "pack-quantized", "weights": _weight_args(bits),
                              "input_activations": None, "output_activations": None}}
        if head_bits is not None:  # an exact name wins over the class name in compressed-tensors' matching
            groups["group_1"] = {**groups["group_0"], "targets": ["lm_head"], "weights": _weight_args(head_bits)}
        config["quantization_config"] = {
            "quant_method": "compressed-tensors", "format": "pack-quantized", "quantization_status": "compressed",
            "version": "0.19.0", "ignore": [] if head_bits else ["lm_head"], "kv_cache_scheme": None,
            "sparsity_config": {}, "config_groups": groups,
        }
    return config


def _tensors(shape: dict, kind: str, generator: torch.Generator):
    """(name, tensor) of every weight, one at a time (an 8B model never sits in memory whole)."""
    from gsq_vllm.packing import PackLayout, pack_codes
    from gsq_vllm.weight_format import code_range

    def dense(rows: int, cols: int) -> torch.Tensor:
        return (torch.randn(rows, cols, generator=generator) * 0.02).to(torch.bfloat16)

    def linear(name: str, rows: int, cols: int, bits: int | None):
        if bits is None:
            yield f"{name}.weight", dense(rows, cols)
            return
        low, high = code_range(bits)
        codes = torch.randint(low, high + 1, (rows, cols), generator=generator, dtype=torch.int8)
        yield f"{name}.weight_packed", pack_codes(codes, bits, PackLayout.DENSE)
        yield f"{name}.weight_scale", torch.empty(rows, cols // GROUP_SIZE).uniform_(0.002, 0.01, generator=generator)
        yield f"{name}.weight_shape", torch.tensor([rows, cols], dtype=torch.int64)

    bits, head_bits = KINDS[kind]
    yield "model.embed_tokens.weight", dense(shape["vocab"], shape["hidden"])
    for layer in range(shape["layers"]):
        prefix = f"model.layers.{layer}."
        for norm in ("input_layernorm", "post_attention_layernorm"):
            yield f"{prefix}{norm}.weight", torch.ones(shape["hidden"], dtype=torch.bfloat16)
        for name, (rows, cols) in linear_shapes(shape).items():
            yield from linear(prefix + name, rows, cols, bits)
    yield "model.norm.weight", torch.ones(shape["hidden"], dtype=torch.bfloat16)
    if not ties_embeddings(shape, kind):
        yield from linear("lm_head", shape["vocab"], shape["hidden"], head_bits)


def write_tokenizer(tokenizer_dir: str | Path, out_dir: Path, vocab: int) -> None:
    """The default model's tokenizer, padded with unused special tokens to the model's vocabulary, so
    that every id the model can emit has a token (llama.cpp's converter and loader insist on it)."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tokenizer_dir))
    if vocab > len(tokenizer):
        tokenizer.add_tokens([f"<|unused_{i}|>" for i in range(len(tokenizer), vocab)], special_tokens=True)
    tokenizer.save_pretrained(str(out_dir))


def write_random_llama(shape_name: str | dict, kind: str, out_dir: str | Path,
                       tokenizer_dir: str | Path | None = None, seed: int = 0) -> Path:
    """Write the checkpoint (sharded safetensors + index) into ``out_dir``, moved into place when complete;
    an existing complete folder is kept. ``shape_name``: a key of MODEL_SHAPES, or such a dict (tests)."""
    from safetensors.torch import save_file

    if isinstance(shape_name, str) and shape_name not in MODEL_SHAPES:
        raise ValueError(f"unknown shape {shape_name!r}; expected one of {sorted(MODEL_SHAPES)}")
    if kind not in KINDS:
        raise ValueError(f"unknown kind {kind!r}; expected one of {sorted(KINDS)}")
    out_dir = Path(out_dir)
    if (out_dir / "config.json").is_file():
        return out_dir
    shape = MODEL_SHAPES[shape_name] if isinstance(shape_name, str) else shape_name
    tmp = out_dir.with_name(out_dir.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    generator = torch.Generator().manual_seed(seed)
    shard: dict[str, torch.Tensor] = {}
    weight_map: dict[str, str] = {}
    shard_bytes, shards = 0, 0

    def flush() -> None:
        nonlocal shard, shard_bytes, shards
        shards += 1
        file = f"model-{shards:05d}.safetensors"
        save_file(shard, str(tmp / file), metadata={"format": "pt"})
        weight_map.update({name: file for name in shard})
        shard, shard_bytes = {}, 0

    for name, tensor in _tensors(shape, kind, generator):
        if shard and shard_bytes + tensor.nbytes > SHARD_BYTES:
            flush()
        shard[name], shard_bytes = tensor.contiguous(), shard_bytes + tensor.nbytes
    flush()
    total = sum(f.stat().st_size for f in tmp.glob("*.safetensors"))
    (tmp / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (tmp / "config.json").write_text(json.dumps(llama_config(shape, kind), indent=2))
    if tokenizer_dir is not None:
        write_tokenizer(tokenizer_dir, tmp, shape["vocab"])
    tmp.rename(out_dir)
    return out_dir


def main(argv: list[str] | None = None) -> int:
    from gsq_vllm.data import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("shape", choices=sorted(MODEL_SHAPES))
    parser.add_argument("kind", choices=sorted(KINDS))
    parser.add_argument("output_dir", type=Path)
    args = parser.parse_args(argv)
    print(write_random_llama(args.shape, args.kind, args.output_dir, default_model_dir()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
