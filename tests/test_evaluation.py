"""Evaluation and checkpoint checks (tiny model; the real model in the slow tests)."""

from __future__ import annotations

import json
import math

import pytest
import torch

from gsq_vllm import data
from gsq_vllm.checkpoint import load_causal_lm
from gsq_vllm.cli import main as cli
from gsq_vllm.evaluation import evaluate


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
    from tests.tiny_llama import save_tiny_llama

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
