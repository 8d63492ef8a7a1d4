"""Slow end-to-end checks on the real default model (run by CI with -m slow)."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest
import torch

from gsq_vllm import data

pytestmark = [
    pytest.mark.slow,
    pytest.mark.skipif(not data.default_model_dir().exists(), reason="run scripts/setup.sh to prepare the default model"),
]


def test_perplexity_matches_transformers_and_ear_is_one():
    from transformers import AutoTokenizer

    from gsq_vllm.checkpoint import load_causal_lm
    from gsq_vllm.evaluation import evaluate

    model = load_causal_lm(data.default_model_dir())
    tokenizer = AutoTokenizer.from_pretrained(str(data.default_model_dir()))
    windows = data.take_windows(data.tokenize_file(data.text_path("wiki"), tokenizer), data.WindowSpec(2, 2048, True))
    with torch.no_grad():
        reference = sum(model(w[None], labels=w[None]).loss.item() for w in windows) / len(windows)
    ours = evaluate(model, windows, model, progress=False)
    assert ours.ppl == pytest.approx(torch.tensor(reference).exp().item(), rel=0.01)
    assert ours.ear == pytest.approx(1.0, abs=1e-5)  # sum_v p(v) over 49k fp32 probabilities
    assert 10 < ours.ppl < 40  # SmolLM2-135M on clean Wikipedia


def test_text_split_is_disjoint():
    split = json.loads((data.cache_dir() / "text" / "split.json").read_text())
    assert not set(split["calibration_articles"]) & set(split["evaluation_articles"])
    assert len(split["evaluation_articles"]) >= 5


def test_main_job_on_a_small_budget(tmp_path):
    out = tmp_path / "ckpt"
    result = subprocess.run(
        [sys.executable, "-m", "gsq_vllm.cli", "quantize", "--bits", "2", "--steps", "3", "--calibration-samples", "8",
         "--windows", "1", "--seq-len", "512", "--output", str(out), "--json", str(tmp_path / "r.json")],
        capture_output=True, text=True, timeout=1800,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    record = json.loads((tmp_path / "r.json").read_text())
    assert record["method"] == "gsq" and record["bits"] == 2 and 0 < record["ear"] < 1
    assert (out / "config.json").exists()
    again = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "quantize", "--output", str(out), "--no-eval"],
                           capture_output=True, text=True, timeout=600)
    assert again.returncode == 2 and "already exists" in again.stderr
