"""The random-weight checkpoints of the 1B-8B serving benchmark, at a tiny shape: each kind is the
format its name says (read back by the same inspection that `gsq-vllm eval` and the plugin use),
loads and runs in transformers, and its codes cover the grid."""

from __future__ import annotations

import json

import pytest
import torch

TINY = dict(hidden=256, intermediate=512, layers=2, heads=4, kv_heads=2, vocab=1024, tied_embeddings=False)


@pytest.fixture(scope="module")
def random_llama():
    import random_llama  # benchmarks/ is on sys.path (tests/conftest.py)

    return random_llama


def test_the_real_shapes_are_llamas(random_llama):
    eight = random_llama.MODEL_SHAPES["8b"]
    counts = random_llama.parameter_count(eight)
    assert 6.9e9 < counts["linear"] < 7.0e9  # Llama-3.1-8B: 8.03e9 with its two 128256 x 4096 matrices
    assert 8.0e9 < counts["linear"] + counts["embedding_and_head"] < 8.1e9
    one = random_llama.MODEL_SHAPES["1b"]
    assert 1.2e9 < sum(random_llama.parameter_count(one).values()) < 1.3e9  # Llama-3.2-1B: 1.24e9, tied


@pytest.mark.parametrize("kind", ["gptq-w4", "gsq-w3", "gsq-w2", "gsq-w2-h4"])
def test_a_quantized_kind_is_the_format_it_names(random_llama, kind, tmp_path):
    from gsq_vllm.checkpoint import inspect_checkpoint, load_causal_lm
    from gsq_vllm.packing import unpack_codes
    from safetensors import safe_open

    out = random_llama.write_random_llama(TINY, kind, tmp_path / kind)
    assert not (tmp_path / f"{kind}.tmp").exists()
    info = inspect_checkpoint(out)
    bits, head_bits = random_llama.KINDS[kind]
    assert len(info.layers) == 7 * TINY["layers"] + (head_bits is not None)
    for name, layer in info.layers.items():
        expected = head_bits if name == "lm_head" else bits
        assert (layer.quant.num_bits, layer.quant.group_size, layer.quant.symmetric) == (expected, 128, True), name
    index = json.loads((out / "model.safetensors.index.json").read_text())
    name = "model.layers.1.mlp.down_proj.weight_packed"
    with safe_open(str(out / index["weight_map"][name]), "pt") as tensors:
        codes = unpack_codes(tensors.get_tensor(name), bits, TINY["intermediate"])
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    assert int(codes.min()) == low and int(codes.max()) == high
    model = load_causal_lm(out)
    logits = model(torch.tensor([[1, 2, 3]])).logits
    assert logits.shape == (1, 3, TINY["vocab"]) and torch.isfinite(logits).all()


def test_the_bf16_kind_loads_in_transformers_and_a_second_write_keeps_the_first(random_llama, tmp_path):
    from transformers import AutoModelForCausalLM

    out = random_llama.write_random_llama(TINY, "bf16", tmp_path / "bf16")
    stamp = (out / "config.json").stat().st_mtime_ns
    assert random_llama.write_random_llama(TINY, "bf16", out) == out
    assert (out / "config.json").stat().st_mtime_ns == stamp
    model = AutoModelForCausalLM.from_pretrained(str(out))
    assert model.model.layers[0].mlp.down_proj.weight.dtype == torch.bfloat16
    with pytest.raises(ValueError, match="unknown kind 'w5'"):
        random_llama.write_random_llama(TINY, "w5", tmp_path / "w5")


def test_a_4_bit_head_unties_a_tied_shape_and_reaches_transformers_as_written(random_llama, tmp_path):
    """The -h4 kinds: the head its own 4-bit layer (second config group), the input embedding bf16;
    transformers' logits are the hidden state times the dequantised head, nothing else."""
    from safetensors import safe_open

    from gsq_vllm.checkpoint import inspect_checkpoint, load_causal_lm
    from gsq_vllm.packing import unpack_codes
    from gsq_vllm.weight_format import dequantize

    tied = {**TINY, "tied_embeddings": True}
    assert json.loads((random_llama.write_random_llama(tied, "gsq-w3", tmp_path / "w3") / "config.json").read_text())[
        "tie_word_embeddings"]
    out = random_llama.write_random_llama(tied, "gsq-w3-h4", tmp_path / "w3h4")
    config = json.loads((out / "config.json").read_text())
    assert not config["tie_word_embeddings"] and config["quantization_config"]["ignore"] == []
    assert inspect_checkpoint(out).layers["lm_head"].quant.num_bits == 4
    with safe_open(str(out / "model-00001.safetensors"), "pt") as tensors:
        assert tensors.get_tensor("model.embed_tokens.weight").dtype == torch.bfloat16
        head = dequantize(unpack_codes(tensors.get_tensor("lm_head.weight_packed"), 4, TINY["hidden"]),
                          tensors.get_tensor("lm_head.weight_scale"))
    model = load_causal_lm(out)
    hidden = model.model(torch.tensor([[5, 6, 7]])).last_hidden_state
    torch.testing.assert_close(model(torch.tensor([[5, 6, 7]])).logits, hidden @ head.float().t(), rtol=1e-4, atol=1e-4)
    config["tie_word_embeddings"] = True  # contradicts the file: refused, not silently re-tied
    (out / "config.json").write_text(json.dumps(config))
    from gsq_vllm.checkpoint import CheckpointError

    with pytest.raises(CheckpointError, match=r"lm_head is quantized but config.json ties it to the input embedding"):
        load_causal_lm(out)
