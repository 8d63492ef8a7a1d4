"""The quantize job: a recipe, a model folder and calibration text in; a checkpoint out.

Shared by ``gsq-vllm quantize`` and ``benchmarks/accuracy.py``; the one place that knows
llmcompressor's ``oneshot`` and its session (to read GSQ's per-layer report). The checkpoint is written by
llmcompressor (compressed-tensors ``pack-quantized``) into a temporary folder beside the target
and moved into place only when complete, so an existing folder is never left half-written.
"""

from __future__ import annotations

import copy
import errno
import hashlib
import logging
import os
import shutil
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from gsq_vllm import data
from gsq_vllm.compress.resume import close_run, open_run, resume_dir_for, tensor_digest
from gsq_vllm.files import commit_output, prepare_output
from gsq_vllm.gsq import distributed
from gsq_vllm.peak_memory import PeakMemory
from gsq_vllm.recipes import set_modifier_options, uses_modifier

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
    resume: bool = True,
    fresh: bool = False,
) -> QuantizeResult:
    """Run a recipe through llmcompressor's ``oneshot`` and save a compressed checkpoint.

    Calibration is ``calibration_samples`` windows of ``calibration_seq_len`` tokens of
    ``calibration_text``, or ``dataset`` (a ready ``datasets.Dataset`` of ``input_ids``, used whole)
    if given. Under ``torchrun`` each rank calibrates on its own slice of those sequences.
    ``seed`` seeds torch's global generator, which llmcompressor shuffles the calibration samples
    with (GSQ's own noise has its recipe seed): the same inputs, recipe and seed on the same machine
    and thread count give a bit-identical checkpoint.

    With ``resume`` (default), GSQ keeps each finished decoder layer beside the output
    (:mod:`gsq_vllm.compress.resume`): the same call after a killed run continues after its last finished
    layer, and a call with another recipe, model, calibration or seed refuses to (``fresh``
    discards the saved layers instead).
    """
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    from gsq_vllm.checkpoint import inspect_checkpoint, load_tokenizer

    if inspect_checkpoint(model_dir).is_quantized:  # also: clear errors for a missing or broken folder
        raise ValueError(f"{model_dir} is already a quantized checkpoint (config.json has a quantization_config); "
                         "quantize the full-precision model it was made from")
    tokenizer = load_tokenizer(model_dir)
    output_dir = Path(output_dir)
    in_torchrun = join_torchrun()
    source = distributed.rank() == 0  # under torchrun, the rank that writes the checkpoint
    tmp_dir = prepare_output(output_dir, overwrite)  # each rank its own; only the source's is filled
    resume_dir = None
    try:
        if dataset is None:
            dataset = data.calibration_dataset(tokenizer, calibration_text, calibration_samples, calibration_seq_len,
                                               calibration_spread)
        if resume:
            if not source:
                distributed.barrier()  # the source writes (or checks) the run's manifest first
            resume_dir = _open_resume(recipe, model_dir, dataset, seed, output_dir, fresh and source)
            if source:
                distributed.barrier()
        if resume_dir is not None:
            recipe = copy.deepcopy(recipe)
            set_modifier_options(recipe, "GSQModifier", resume_dir=str(resume_dir))
        shard = rank_shard(dataset)
        # under torchrun llmcompressor loads the model itself, from its folder, on every rank
        model = str(model_dir) if in_torchrun else AutoModelForCausalLM.from_pretrained(str(model_dir),
                                                                                      dtype=torch.float32)
        torch.manual_seed(seed)
        start = time.time()
        with PeakMemory() as memory:
            try:
                model = oneshot(
                    model=model, precision="float32", dataset=shard, recipe=yaml.safe_dump(recipe, sort_keys=False),
                    processor=tokenizer, max_seq_length=calibration_seq_len, num_calibration_samples=len(shard),
                    output_dir=str(tmp_dir), save_compressed=True,
                )
            except Exception as error:
                if not _disk_full(error):
                    raise
                full = OSError(f"no space left on the device of {tmp_dir.parent} while writing the checkpoint; "
                               f"nothing was written to {output_dir}")
                full.errno = errno.ENOSPC
                raise full from error
        seconds = time.time() - start
        report = _modifier_report()
        if source:
            commit_output(tmp_dir, output_dir)
            if resume_dir is not None:
                close_run(resume_dir)
        else:
            shutil.rmtree(tmp_dir, ignore_errors=True)
        distributed.barrier()  # the checkpoint is in place before any rank goes on
    except BaseException:
        shutil.rmtree(tmp_dir, ignore_errors=True)
        if source and resume_dir is not None and not any(resume_dir.glob("*.pt")):
            close_run(resume_dir)  # nothing finished: nothing worth keeping
        raise
    logger.info("wrote %s in %.0f s (peak memory %.0f MB)", output_dir, seconds, memory.peak_mb)
    return QuantizeResult(output_dir, seconds, memory.peak_mb, report, model)


def _disk_full(error: BaseException | None) -> bool:
    """Whether an error (or one it was raised from) is a full disk: safetensors reports it in its own
    exception type, with the OS's message."""
    while error is not None:
        if (isinstance(error, OSError) and error.errno == errno.ENOSPC) or "No space left on device" in str(error):
            return True
        error = error.__cause__ or error.__context__
    return False


def join_torchrun() -> bool:
    """Under ``torchrun`` (``WORLD_SIZE`` > 1), join its process group if nobody has: gloo on CPUs,
    NCCL on GPUs (compressed-tensors' own initialiser assumes an accelerator). Returns whether the
    job is distributed; llmcompressor then gives each rank its share of the calibration data."""
    import torch.distributed as dist

    if int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return False
    if not dist.is_initialized():
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
            dist.init_process_group("nccl")
        else:
            dist.init_process_group("gloo")
    return True


def leave_torchrun() -> None:
    """Leave the process group once every rank is done (no-op in one process): what runs after
    the job (loading the checkpoint to evaluate it) must not wait on ranks that have exited;
    compressed-tensors' decompression broadcasts whenever a group exists."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def rank_shard(dataset):
    """This rank's share of the calibration sequences under torchrun: a contiguous slice, the
    split of llmcompressor's ``get_rank_partition`` (the whole dataset in one process).

    Why not let llmcompressor split a dataset every rank holds: 0.14 partitions it only to size its
    sampler, whose indices then run over the whole dataset with the same seed on every rank, so
    every rank calibrated on the same half of the sequences (the 2-rank test in
    ``tests/test_distributed.py`` compares the union of the shards with one process). Its own
    examples give each rank its slice; so does this.
    """
    size, index = distributed.world_size(), distributed.rank()
    if size == 1:
        return dataset
    if len(dataset) < size:
        raise ValueError(f"{len(dataset)} calibration sequences cannot be shared among {size} ranks; "
                         "use at least one per rank")
    start, end = len(dataset) * index // size, len(dataset) * (index + 1) // size
    return dataset.select(range(start, end))


def _open_resume(recipe: dict, model_dir, dataset, seed: int, output_dir: Path, fresh: bool) -> Path | None:
    """The resume folder of a recipe that runs GSQ (None for other methods: nothing to resume)."""
    if not uses_modifier(recipe, "GSQModifier"):
        return None
    fingerprint = {
        "recipe": recipe, "seed": seed, "model": model_fingerprint(model_dir),
        "calibration": tensor_digest(torch.as_tensor(row) for row in dataset["input_ids"]),
        "torch": torch.__version__, "threads": torch.get_num_threads(),
    }
    resume_dir = resume_dir_for(output_dir)
    open_run(resume_dir, fingerprint, fresh=fresh)
    return resume_dir


def model_fingerprint(model_dir: str | os.PathLike) -> str:
    """Identity of a model folder: its config and, per weight file, its size and first and last MiB."""
    digest = hashlib.sha1()
    for path in sorted(Path(model_dir).glob("*.safetensors")) + [Path(model_dir) / "config.json"]:
        if not path.exists():
            continue
        size = path.stat().st_size
        with open(path, "rb") as handle:
            head = handle.read(1 << 20)
            handle.seek(max(0, size - (1 << 20)))
            digest.update(f"{path.name}:{size}".encode() + head + handle.read())
    return digest.hexdigest()[:16]


def _modifier_report() -> list[dict]:
    """GSQ's per-layer objectives (and the end-to-end stage's, as one row) from the session that just ran."""
    from llmcompressor.core import active_session

    from gsq_vllm.compress import GSQEndToEndModifier, GSQModifier

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
