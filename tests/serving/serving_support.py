"""Helpers shared by the serving tests and scripts (imported as ``serving_support``: pytest puts
this folder on sys.path). Checkpoints are made by ``scripts/make_checkpoints.py`` run with
``.venv/bin/python`` (llmcompressor lives there, not in the serving env) and cached under
``.cache/gsq-vllm/checkpoints/<kind>``.
"""
from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from gsq_vllm.packing import code_range

REPO = Path(__file__).resolve().parents[2]
QUANTIZE_PYTHON = REPO / ".venv" / "bin" / "python"
MAKE_CHECKPOINTS = REPO / "scripts" / "make_checkpoints.py"


def checkpoint_dir(kind: str) -> Path:
    from gsq_vllm.data import cache_dir

    return cache_dir() / "checkpoints" / kind


def get_checkpoint(kind: str, timeout: float = 1200) -> Path:
    """The cached checkpoint ``kind`` (see make_checkpoints.KINDS), made on first use."""
    path = checkpoint_dir(kind)
    if (path / "config.json").is_file():
        return path
    if not QUANTIZE_PYTHON.exists():
        pytest.skip(f"{QUANTIZE_PYTHON} (the quantize environment) is missing: cannot make {kind}")
    from gsq_vllm.data import default_model_dir

    if not (default_model_dir() / "config.json").is_file():
        pytest.skip(f"the default model is not prepared at {default_model_dir()} (run scripts/setup.sh)")
    path.parent.mkdir(parents=True, exist_ok=True)
    result = subprocess.run(
        [str(QUANTIZE_PYTHON), str(MAKE_CHECKPOINTS), kind, str(path)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if result.returncode != 0:
        raise RuntimeError(f"making checkpoint {kind} failed:\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    return path


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def run_python(script: str, env: dict | None = None, timeout: float = 600) -> subprocess.CompletedProcess:
    """Run a Python snippet with this interpreter (fresh vLLM process state)."""
    full_env = dict(os.environ)
    full_env.update(env or {})
    return subprocess.run(
        [sys.executable, "-c", script], cwd=REPO, capture_output=True, text=True, timeout=timeout, env=full_env
    )


def quant_config(bits: int, **weights) -> dict:
    return {
        "quant_method": "compressed-tensors",
        "format": "pack-quantized",
        "config_groups": {
            "group_0": {
                "targets": ["Linear"],
                "weights": {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": 64, **weights},
            }
        },
        "ignore": ["lm_head"],
        "version": "0.19.0",
    }



GROUP = 64


def random_codes(rows: int, cols: int, bits: int, seed: int = 0) -> torch.Tensor:
    low, high = code_range(bits)
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(low, high + 1, (rows, cols), generator=generator, dtype=torch.int8)


def random_scales(rows: int, groups: int, seed: int = 0) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed + 1)
    signs = torch.where(torch.rand(rows, groups, generator=generator) < 0.2, -1.0, 1.0)  # GSQ scales may be negative
    return (signs * (0.01 + 0.02 * torch.rand(rows, groups, generator=generator))).to(torch.bfloat16)


def reference(x: torch.Tensor, codes: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    weight = codes.float() * scales.float().repeat_interleave(GROUP, dim=1)
    return x.float() @ weight.t()


def assert_close(y: torch.Tensor, ref: torch.Tensor, what: str) -> None:
    err = (y.float() - ref).abs().max().item()
    bound = 0.02 * ref.abs().max().item() + 1e-3  # bf16 output rounding, well below any layout error
    assert err <= bound, f"{what}: max error {err:.4g} > {bound:.4g}"




PROMPTS = [
    "The capital of France is",
    "In 1905, Albert Einstein published",
    "def fibonacci(n):\n    ",
    "The three primary colors are",
]
NEW_TOKENS = 16
# A divergence is accepted only where the fp32 reference itself is nearly tied between its token
# and vLLM's (fp32 summation order alone moves logits far less than this).
TIE_MARGIN = 0.02


def prompt_ids(model_dir: Path) -> list[list[int]]:
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    return [tokenizer(p).input_ids for p in PROMPTS]


def transformers_greedy(model_dir: Path, prompts: list[list[int]], new_tokens: int = NEW_TOKENS):
    """The checkpoint's own greedy continuation under transformers (decompressed, fp32), with the
    logits of every step (to judge near-ties)."""
    from gsq_vllm.checkpoint import load_causal_lm

    model = load_causal_lm(model_dir, dtype=torch.float32)
    results = []
    with torch.no_grad():
        for ids in prompts:
            sequence = torch.tensor([ids])
            tokens, step_logits = [], []
            for _ in range(new_tokens):
                logits = model(sequence).logits[0, -1]
                token = int(logits.argmax())
                tokens.append(token)
                step_logits.append(logits)
                sequence = torch.cat([sequence, torch.tensor([[token]])], dim=1)
            results.append((tokens, step_logits))
    return results


def compare_greedy(served: list[list[int]], reference) -> list[str]:
    """Problems (empty = match): a divergence counts only where the reference was not nearly tied."""
    problems = []
    for index, (got, (expected, step_logits)) in enumerate(zip(served, reference)):
        for step, (a, b) in enumerate(zip(got, expected)):
            if a != b:
                logits = step_logits[step]
                margin = float(logits[b] - logits[a])
                if margin > TIE_MARGIN:
                    problems.append(
                        f"prompt {index} ({PROMPTS[index]!r}): token {step} is {a}, transformers gives {b} "
                        f"(logit margin {margin:.3f} > {TIE_MARGIN}); served {got}, expected {expected}"
                    )
                break
        if len(got) != len(expected):
            problems.append(f"prompt {index}: {len(got)} tokens, expected {len(expected)}")
    return problems


def gsq_config(bits: int, version: str = "0.19.0", **weights):
    from gsq_vllm.serving.config import GSQQuantizationConfig

    return GSQQuantizationConfig.from_config({**quant_config(bits, **weights), "version": version})


def layer_config(k: int, n: int, bits: int, group: int = GROUP, act=torch.bfloat16):
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig

    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES

    return MPLinearLayerConfig((k, n), (k, n), GSQ_SCALAR_TYPES[bits], act, group, False)
