"""Evaluation and checkpoint checks (tiny model; the real model in the slow tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gsq_vllm import data
from gsq_vllm.checkpoint import CheckpointError, inspect_checkpoint, load_causal_lm
from gsq_vllm.cli import main as cli
from gsq_vllm.evaluation import evaluate
from gsq_vllm.packing import pack_codes
from tests.conftest import HAS_LLMCOMPRESSOR


def windows(count=2, length=64, seed=0):
    return torch.randint(3, 250, (count, length), generator=torch.Generator().manual_seed(seed))


def test_model_against_itself_has_ear_one_and_kl_zero(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    result = evaluate(model, windows(), model, progress=False)
    assert result.ear == pytest.approx(1.0, abs=1e-6)
    assert result.kl == pytest.approx(0.0, abs=1e-6)
    assert result.reference_ce == pytest.approx(result.ce)


def test_cross_entropy_matches_transformers_loss(tiny_model_dir):
    model = load_causal_lm(tiny_model_dir)
    batch = windows(3, 80)
    with torch.no_grad():
        losses = [model(row[None], labels=row[None]).loss.item() for row in batch]
    result = evaluate(model, batch, progress=False)
    assert result.ce == pytest.approx(sum(losses) / len(losses), rel=1e-5)
    assert result.ppl == pytest.approx(math.exp(result.ce))
    assert result.tokens == 3 * 79


def test_different_models_have_ear_below_one(tiny_model_dir, tmp_path):
    from gsq_vllm.testing import save_tiny_llama

    other = load_causal_lm(save_tiny_llama(tmp_path / "other", seed=1))
    result = evaluate(load_causal_lm(tiny_model_dir), windows(), other, progress=False)
    assert 0.0 < result.ear < 0.99 and result.kl > 0


def test_text_too_short_or_empty(tmp_path, tiny_model_dir):
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(tiny_model_dir))
    short = tmp_path / "short.txt"
    short.write_text("just a few words")
    tokens = data.tokenize_file(short, tokenizer)
    with pytest.raises(ValueError, match=r"short.txt has \d+ tokens, too short for 10 windows of 2048 tokens"):
        data.take_windows(tokens, data.WindowSpec(10, 2048), source=str(short))
    empty = tmp_path / "empty.txt"
    empty.write_text("  \n")
    with pytest.raises(ValueError, match="empty.txt is empty"):
        data.tokenize_file(empty, tokenizer)


def test_cli_eval_errors_are_one_clear_line(tmp_path, capsys):
    assert cli(["eval", "--model", str(tmp_path / "nope")]) == 2
    assert f"model folder {tmp_path / 'nope'} does not exist" in capsys.readouterr().err


def test_cli_eval_writes_json(tiny_model_dir, tmp_path):
    text = tmp_path / "text.txt"
    text.write_text("The quick brown fox jumps over the lazy dog. " * 40)
    out = tmp_path / "result.json"
    assert cli(["eval", "--model", str(tiny_model_dir), "--reference", str(tiny_model_dir), "--text", str(text),
                "--windows", "2", "--seq-len", "128", "--json", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["ear"] == pytest.approx(1.0, abs=1e-6) and record["tokens"] == 2 * 127
    assert {p.name for p in tmp_path.iterdir()} == {"text.txt", "result.json"}  # no partial files


# -- checkpoint checks: small hand-made pack-quantized folders ------------------------------------


def fake_checkpoint(path, num_bits=3, in_features=64, width=None, with_scale=True, version="0.19.0"):
    from safetensors.torch import save_file

    path.mkdir()
    codes = torch.zeros(8, in_features, dtype=torch.int8)
    packed = pack_codes(codes, num_bits if num_bits in range(1, 9) else 2)
    if width is not None:
        packed = torch.zeros(8, width, dtype=torch.int32)
    tensors = {"layer.weight_packed": packed, "layer.weight_shape": torch.tensor([8, in_features])}
    if with_scale:
        tensors["layer.weight_scale"] = torch.ones(8, in_features // 32)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "version": version, "config_groups": {"group_0": {
                                          "targets": ["Linear"], "weights": {
                                              "num_bits": num_bits, "type": "int", "symmetric": True,
                                              "strategy": "group", "group_size": 32}}}}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_checkpoint_layouts_are_detected(tmp_path):
    assert {l.layout.value for l in inspect_checkpoint(fake_checkpoint(tmp_path / "a")).layers.values()} == {"dense"}
    old = fake_checkpoint(tmp_path / "b", width=7)  # ceil(64 / 10) words: compressed-tensors 0.17
    assert inspect_checkpoint(old).layers["layer"].layout.value == "word_aligned"


def test_unknown_num_bits(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: config_groups.group_0.weights.num_bits = 5 is not supported"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "c", num_bits=5))


def test_width_matching_no_layout_names_layer(tmp_path):
    with pytest.raises(CheckpointError, match=r"layer.weight_packed: packed width 9 matches no layout for 64 3-bit codes"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "d", width=9))


def test_missing_scale_and_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="layer layer has weight_packed but no weight_scale"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "e", with_scale=False))
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "missing")


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_old_3bit_layout_loads_to_the_same_model(tiny_model_dir, tmp_path):
    """A word-aligned (compressed-tensors 0.17) 3-bit checkpoint decodes to the same weights."""
    import yaml
    from safetensors.torch import load_file, save_file

    from gsq_vllm.packing import PackLayout, unpack_codes
    from gsq_vllm.quantize import quantize

    recipe = yaml.safe_load(open("recipes/rtn_w3a16_g64.yaml"))
    dense = quantize(tiny_model_dir, recipe, tmp_path / "dense").output_dir
    old = tmp_path / "old"
    old.mkdir()
    for item in dense.iterdir():
        if item.is_file():
            (old / item.name).write_bytes(item.read_bytes())
    state = load_file(str(old / "model.safetensors"))
    for name in [k for k in state if k.endswith(".weight_packed")]:
        cols = int(state[name.replace("packed", "shape")][1])
        codes = unpack_codes(state[name], 3, cols, PackLayout.DENSE)
        state[name] = pack_codes(codes, 3, PackLayout.WORD_ALIGNED)
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["version"] = "0.17.0"
    (old / "config.json").write_text(json.dumps(config))
    assert {l.layout for l in inspect_checkpoint(old).layers.values()} == {PackLayout.WORD_ALIGNED}
    batch = windows(1, 32)
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(old)(batch).logits, load_causal_lm(dense)(batch).logits)
