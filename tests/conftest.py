"""Shared fixtures: a tiny random Llama on disk and a GSQ checkpoint of it (built once per run)."""

from __future__ import annotations

import importlib.util
import os
import sys
from pathlib import Path

import pytest
import torch

# Triton reads TRITON_INTERPRET when a @triton.jit function is defined; any test module may
# import the kernels (the serving plugin does), so set it before the first test is collected.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# the serving harness (a real `vllm serve` process, load bursts) lives with the benchmarks, outside the package
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

HAS_LLMCOMPRESSOR = importlib.util.find_spec("llmcompressor") is not None


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory) -> Path:
    if importlib.util.find_spec("transformers") is None:
        pytest.skip("transformers is not installed in this environment")
    from tests.tiny_llama import save_tiny_llama

    return save_tiny_llama(tmp_path_factory.mktemp("tiny-llama"))


def tiny_calibration(num_samples: int = 16, seq_len: int = 128, seed: int = 0):
    from datasets import Dataset

    ids = torch.randint(3, 250, (num_samples, seq_len), generator=torch.Generator().manual_seed(seed))
    return Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})


def gsq_recipe(bits: int | str = 2, group_size: int = 32, steps: int = 40, extra: str = "") -> str:
    num_bits = 2 if bits == "ternary" else bits
    grid = "      grid: ternary\n" if bits == "ternary" else ""
    return f"""
quant_stage:
  quant_modifiers:
    GSQModifier:
      ignore: [lm_head]
      steps: {steps}
      tokens_per_step: 512
{grid}{extra}      config_groups:
        group_0:
          targets: [Linear]
          weights: {{num_bits: {num_bits}, type: int, symmetric: true, strategy: group, group_size: {group_size}}}
"""
