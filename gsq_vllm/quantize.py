"""The quantize job: a recipe, a model folder and calibration text in; a checkpoint out.

Shared by ``gsq-vllm quantize`` and ``benchmarks/accuracy.py``. The checkpoint is written by
llmcompressor (compressed-tensors ``pack-quantized``) into a temporary folder beside the target
and moved into place only when complete, so an existing folder is never left half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import tempfile
import threading
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gsq_vllm import data

logger = logging.getLogger(__name__)

def calibration_dataset(tokenizer, text: str, samples: int, seq_len: int, spread: bool = True):
    """``samples`` windows of ``seq_len`` tokens of a text, as a Dataset.

    Spread evenly over the whole text by default (more varied than consecutive windows from its
    start, which cover only its first few articles); ``spread=False`` takes them from the start.
    """
    from datasets import Dataset

    tokens = data.tokenize_file(data.resolve_text(text), tokenizer)
    windows = data.take_windows(tokens, data.WindowSpec(samples, seq_len, spread=spread),
                                source=f"calibration text {text}")
    return Dataset.from_dict({"input_ids": windows.tolist(), "attention_mask": torch.ones_like(windows).tolist()})


class PeakMemory:
    """Peak resident memory of this process while the block runs (polled every 50 ms)."""

    def __init__(self):
        self.peak_mb = 0.0
        self._stop = threading.Event()

    @staticmethod
    def _rss_mb() -> float:
        with open("/proc/self/statm") as handle:
            return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20

    def _poll(self):
        while not self._stop.wait(0.05):
            self.peak_mb = max(self.peak_mb, self._rss_mb())

    def __enter__(self):
        self.peak_mb = self._rss_mb()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.peak_mb = max(self.peak_mb, self._rss_mb())


@dataclass
class QuantizeResult:
    output_dir: Path
    seconds: float
    peak_mem_mb: float
    report: list[dict]
    model: torch.nn.Module  # the quantized model, in memory


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Refuse an existing output unless asked; return a fresh temporary folder beside it."""
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {output_dir} already exists; pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def commit_output(tmp_dir: Path, output_dir: Path) -> None:
    """Move a finished checkpoint into place; the old one (if any) is removed only afterwards."""
    backup = None
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(backup)
    tmp_dir.rename(output_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)


def quantize(
    model_dir: str | os.PathLike,
    recipe: dict,
    output_dir: str | os.PathLike,
    *,
    calibration_text: str = "calibration",
    calibration_samples: int = 128,
    calibration_seq_len: int = 512,
    calibration_spread: bool = True,
    overwrite: bool = False,
) -> QuantizeResult:
    """Run a recipe through llmcompressor's ``oneshot`` and save a compressed checkpoint."""
    import gsq_vllm.modifier  # noqa: F401  (registers GSQModifier and GSQEndToEndModifier with llmcompressor)
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from gsq_vllm.checkpoint import inspect_checkpoint

    inspect_checkpoint(model_dir)  # clear errors for a missing or broken folder
    output_dir = Path(output_dir)
    tmp_dir = prepare_output(output_dir, overwrite)
    try:
        tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
        dataset = calibration_dataset(tokenizer, calibration_text, calibration_samples, calibration_seq_len,
                                      calibration_spread)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        start = time.time()
        with PeakMemory() as memory:
            oneshot(
                model=model, dataset=dataset, recipe=yaml.safe_dump(recipe, sort_keys=False), processor=tokenizer,
                max_seq_length=calibration_seq_len, num_calibration_samples=calibration_samples,
                output_dir=str(tmp_dir), save_compressed=True,
            )
        seconds = time.time() - start
        report = _modifier_report()
        commit_output(tmp_dir, output_dir)
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        raise
    logger.info("wrote %s in %.0f s (peak memory %.0f MB)", output_dir, seconds, memory.peak_mb)
    return QuantizeResult(output_dir, seconds, memory.peak_mb, report, model)


def _modifier_report() -> list[dict]:
    """GSQ's per-layer objectives (and the end-to-end stage's, as one row) from the session that just ran."""
    from llmcompressor.core import active_session

    from gsq_vllm.end_to_end import GSQEndToEndModifier
    from gsq_vllm.modifier import GSQModifier

    try:
        modifiers = active_session().lifecycle.recipe.modifiers
    except AttributeError:
        return []
    report = []
    for modifier in modifiers:
        if isinstance(modifier, GSQModifier):
            report.extend(modifier.report)
        elif isinstance(modifier, GSQEndToEndModifier) and modifier.report:
            report.append({"name": "end_to_end", "objective": "kl", **modifier.report})
    return report
