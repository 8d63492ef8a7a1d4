"""The quantize job: a recipe, a model folder and calibration text in; a checkpoint out.

Shared by ``gsq-vllm quantize`` and ``benchmarks/accuracy.py``; the one place that knows
llmcompressor's ``oneshot`` and its session (to read GSQ's per-layer report). The checkpoint is written by
llmcompressor (compressed-tensors ``pack-quantized``) into a temporary folder beside the target
and moved into place only when complete, so an existing folder is never left half-written.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gsq_vllm import data
from gsq_vllm.files import commit_output, prepare_output
from gsq_vllm.peak_memory import PeakMemory

logger = logging.getLogger(__name__)


@dataclass
class QuantizeResult:
    output_dir: Path
    seconds: float
    peak_mem_mb: float
    report: list[dict]
    model: torch.nn.Module  # the quantized model, in memory


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
    dataset=None,
    seed: int = 0,
) -> QuantizeResult:
    """Run a recipe through llmcompressor's ``oneshot`` and save a compressed checkpoint.

    Calibration is ``calibration_samples`` windows of ``calibration_seq_len`` tokens of
    ``calibration_text``, or ``dataset`` (a ready ``datasets.Dataset`` of ``input_ids``) if given.
    ``seed`` seeds torch's global generator, which llmcompressor shuffles the calibration samples
    with (GSQ's own noise has its recipe seed): the same inputs, recipe and seed on the same machine
    and thread count give a bit-identical checkpoint.
    """
    import gsq_vllm.modifier  # noqa: F401  (registers GSQModifier and GSQEndToEndModifier with llmcompressor)
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from gsq_vllm.checkpoint import inspect_checkpoint, load_tokenizer

    inspect_checkpoint(model_dir)  # clear errors for a missing or broken folder
    tokenizer = load_tokenizer(model_dir)
    output_dir = Path(output_dir)
    tmp_dir = prepare_output(output_dir, overwrite)
    try:
        if dataset is None:
            dataset = data.calibration_dataset(tokenizer, calibration_text, calibration_samples, calibration_seq_len,
                                               calibration_spread)
        model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
        torch.manual_seed(seed)
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
