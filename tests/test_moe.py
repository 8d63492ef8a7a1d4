"""Mixture of experts on the quantize side: the MoE model derived from a dense one, GSQ on its routed
experts (through llmcompressor's own expert linearisation), and a checkpoint that evaluates with
its quantized experts (not transformers' silently random ones)."""

from __future__ import annotations

import json

import pytest
import torch
import yaml

from tests.conftest import HAS_LLMCOMPRESSOR, gsq_recipe, tiny_calibration

EXPERTS, TOP_K = 4, 2


@pytest.fixture(scope="module")
def tiny_moe(tiny_model_dir, tmp_path_factory):
    from gsq_vllm.moe_model import build_moe_model

    return build_moe_model(tiny_model_dir, tmp_path_factory.mktemp("moe") / "tiny-moe", experts=EXPERTS, top_k=TOP_K)


def _logits(model_dir, ids):
    from gsq_vllm.checkpoint import load_causal_lm

    with torch.no_grad():
        return load_causal_lm(model_dir)(ids).logits


def test_the_moe_model_computes_the_dense_models_function(tiny_model_dir, tiny_moe):
    from transformers import AutoModelForCausalLM

    ids = torch.randint(3, 250, (2, 48), generator=torch.Generator().manual_seed(0))
    dense, moe = _logits(tiny_model_dir, ids), _logits(tiny_moe, ids)
    assert torch.allclose(moe, dense, atol=1e-4, rtol=1e-4), (moe - dense).abs().max()

    model = AutoModelForCausalLM.from_pretrained(str(tiny_moe))
    assert model.config.model_type == "mixtral"
    assert (model.config.num_local_experts, model.config.num_experts_per_tok) == (EXPERTS, TOP_K)
    block = model.model.layers[0].mlp
    # every expert is the dense MLP in its own channel order: the same values, other quantization groups
    down = block.experts.down_proj
    assert not torch.equal(down[0], down[1])
    assert torch.equal(down[0].sort(dim=1).values, down[1].sort(dim=1).values)
    # and the router really splits the tokens: every expert is chosen for some, none for all
    hidden = model.model.embed_tokens(ids).reshape(-1, model.config.hidden_size)
    chosen = (hidden @ block.gate.weight.T).topk(TOP_K, dim=-1).indices
    counts = torch.bincount(chosen.flatten(), minlength=EXPERTS)
    assert (counts > 0).all() and (counts < hidden.shape[0]).all(), counts


def test_a_source_that_is_not_a_dense_llama_is_refused(tiny_moe, tmp_path):
    from gsq_vllm.moe_model import build_moe_model

    with pytest.raises(ValueError, match="expected a Llama model"):
        build_moe_model(tiny_moe, tmp_path / "again")
    assert not (tmp_path / "again").exists()


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_gsq_quantizes_every_routed_expert_and_the_checkpoint_evaluates_with_them(tiny_moe, tmp_path):
    from safetensors.torch import load_file

    from gsq_vllm.checkpoint import dequantize_packed, inspect_checkpoint, load_causal_lm
    from gsq_vllm.compress.quantize import quantize

    out = tmp_path / "gsq-moe"
    result = quantize(tiny_moe, yaml.safe_load(gsq_recipe(3, steps=5)), out, calibration_samples=16,
                      calibration_seq_len=128, dataset=tiny_calibration(16, 128))
    # one block per decoder layer: its attention and every expert's projections trained together
    first = next(row for row in result.report if row["name"] == "model.layers.0")
    experts = {name.split(".experts.")[1].split(".")[0] for name in first["codes_sha1"] if ".experts." in name}
    assert experts == {str(e) for e in range(EXPERTS)}
    assert len(set(first["codes_sha1"].values())) == len(first["codes_sha1"])  # no two experts share codes
    config = json.loads((out / "config.json").read_text())
    assert "lm_head" in config["quantization_config"]["ignore"]

    info = inspect_checkpoint(out)
    name = "model.layers.0.block_sparse_moe.experts.1.down_proj"
    assert name in info.layers and info.layers[name].quant.num_bits == 3
    state = load_file(str(out / "model.safetensors"))
    expected = dequantize_packed(state[name + ".weight_packed"], state[name + ".weight_scale"], info.layers[name])

    model = load_causal_lm(out)  # transformers alone would leave the fused experts random
    assert torch.equal(model.model.layers[0].mlp.experts.down_proj[1], expected)
    ids = torch.randint(3, 250, (1, 64), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        quantized = model(ids).logits
    full = _logits(tiny_moe, ids)
    quantized_ce = torch.nn.functional.cross_entropy(quantized[0, :-1], ids[0, 1:])
    full_ce = torch.nn.functional.cross_entropy(full[0, :-1], ids[0, 1:])
    assert abs(float(quantized_ce - full_ce)) < 0.2, (quantized_ce, full_ce)


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_the_moe_recipe_makes_experts_2_bit_attention_4_bit_and_keeps_the_router(tiny_moe, tmp_path):
    from gsq_vllm.checkpoint import inspect_checkpoint
    from gsq_vllm.compress.quantize import quantize
    from gsq_vllm.recipes import load_recipe, set_modifier_options

    recipe = load_recipe("gsq_moe_w2a16_g64")
    set_modifier_options(recipe, "GSQModifier", steps=3, tokens_per_step=512)
    set_modifier_options(recipe, "GSQEndToEndModifier", steps=2, sequences=16)
    result = quantize(tiny_moe, recipe, tmp_path / "moe-w2", calibration_samples=16, calibration_seq_len=128,
                      dataset=tiny_calibration(16, 128))
    widths = {name: layer.quant.num_bits for name, layer in inspect_checkpoint(result.output_dir).layers.items()}
    assert {bits for name, bits in widths.items() if ".experts." in name} == {2}
    assert {bits for name, bits in widths.items() if ".self_attn." in name} == {4}
    assert len([name for name in widths if ".experts." in name]) == 2 * EXPERTS * 3  # 2 layers, 3 projections
    assert not any(name.endswith(".gate") for name in widths)  # the router stays in full precision
    end_to_end = next(row for row in result.report if row["name"] == "end_to_end")
    assert end_to_end["layers"] == len(widths)  # the experts' scales are tuned too


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_experts_routed_too_few_tokens_keep_their_gptq_codes_and_the_log_says_so(tiny_moe, tmp_path):
    from loguru import logger
    from safetensors.torch import load_file

    from gsq_vllm.compress.quantize import quantize

    def run(name: str, steps: int, extra: str = "") -> tuple[dict, dict]:
        result = quantize(tiny_moe, yaml.safe_load(gsq_recipe(3, steps=steps, extra=extra)), tmp_path / name,
                          calibration_samples=16, calibration_seq_len=128, dataset=tiny_calibration(16, 128))
        packed = {key: value for key, value in load_file(str(result.output_dir / "model.safetensors")).items()
                  if key.endswith(".weight_packed")}
        return {row["name"]: row for row in result.report}, packed

    _, gptq = run("gptq", 0)  # GSQ without steps: every Linear keeps its GPTQ start
    lines: list[str] = []
    sink = logger.add(lines.append, format="{message}")
    try:
        # 16 x 128 calibration tokens, top-2 of 4 experts: fewer routed to each expert than asked
        report, fallback = run("fallback", 5, extra="      min_expert_tokens: 100000\n")
        default_report, default = run("trained", 5)
    finally:
        logger.remove(sink)
    experts = [key for key in gptq if ".experts." in key]
    attention = [key for key in gptq if ".self_attn." in key]
    assert len(experts) == 2 * EXPERTS * 3
    # the first layer's experts are GPTQ's exactly (later layers see the trained attention's outputs)
    assert all(torch.equal(fallback[key], gptq[key]) for key in experts if key.startswith("model.layers.0."))
    assert any(not torch.equal(fallback[key], gptq[key]) for key in attention)  # attention still trained
    assert len(report["model.layers.0"]["kept_start"]) == EXPERTS * 3
    kept = [line for line in lines if "calibration tokens (< 100000): kept its GPTQ codes" in line]
    assert len(kept) == 2 * EXPERTS, lines  # every expert of both layers, each named once
    assert kept[0].startswith("GSQ model.layers.0: expert 0 of ") and "experts was routed" in kept[0]
    # by default (an expert needs as many routed tokens as its widest input) they train with the block
    assert "kept_start" not in default_report["model.layers.0"]
    assert any(not torch.equal(default[key], gptq[key]) for key in experts)
