"""Resuming a killed quantize run from its last finished decoder layer.

A GSQ run on a large model takes hours; one that dies at layer 70 of 80 (out of memory, a
preempted machine, SIGKILL) should not start again from layer 0. The quantize job keeps a resume
folder beside its output, ``.<output name>.gsq-resume/``:

* ``run.json``: what the run's result depends on (recipe, model weights, calibration tokens,
  seed). A second run with other inputs refuses to resume and names what changed;
* one file per finished block or layer, written atomically when it finishes: its codes, scales
  and report row, and a digest of everything it was computed from (its calibration inputs and
  original weights). A resumed run recomputes nothing whose digest matches, so, on the same
  machine and thread count, its checkpoint is bit-identical to an uninterrupted run's.

The folder is removed when the checkpoint is complete.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
from collections.abc import Iterable
from pathlib import Path

import torch

logger = logging.getLogger(__name__)

__all__ = ["ResumeMismatch", "LayerStore", "resume_dir_for", "tensor_digest", "open_run", "close_run"]

# what must match for a run to resume; anything else in run.json (library versions, threads) is
# recorded and only warned about when it differs, since it can change low-order bits but not the recipe
MUST_MATCH = ("recipe", "model", "calibration", "seed")


class ResumeMismatch(ValueError):
    """The saved state belongs to a run with other inputs."""


def resume_dir_for(output_dir: str | os.PathLike) -> Path:
    """Where a run that writes ``output_dir`` keeps its per-layer state."""
    output_dir = Path(output_dir)
    return output_dir.parent / f".{output_dir.name}.gsq-resume"


def tensor_digest(tensors: Iterable[torch.Tensor]) -> str:
    """SHA-1 over the shapes, dtypes and bytes of ``tensors`` (in order)."""
    digest = hashlib.sha1()
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        digest.update(f"{tuple(tensor.shape)}:{tensor.dtype};".encode())
        digest.update(tensor.view(torch.uint8).numpy().tobytes() if tensor.numel() else b"")
    return digest.hexdigest()


def _differences(saved: dict, current: dict) -> list[str]:
    reasons = []
    for key in MUST_MATCH:
        if saved.get(key) != current.get(key):
            if key == "recipe":
                reasons.append(f"the recipe differs ({_first_difference(saved.get(key), current.get(key))})")
            else:
                reasons.append(f"the {key} differs ({saved.get(key)!r} then, {current.get(key)!r} now)")
    return reasons


def _first_difference(old, new, path: str = "") -> str:
    if isinstance(old, dict) and isinstance(new, dict):
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                return _first_difference(old.get(key), new.get(key), f"{path}.{key}" if path else str(key))
    return f"{path or 'recipe'}: {old!r} then, {new!r} now"


def open_run(resume_dir: Path, fingerprint: dict, *, fresh: bool = False) -> int:
    """Start or continue the run whose state lives in ``resume_dir``; returns the finished layer count.

    ``fingerprint`` holds at least the ``MUST_MATCH`` keys. A folder from a run with other inputs
    raises :class:`ResumeMismatch` naming what differs (``fresh=True`` discards it instead).
    """
    manifest = resume_dir / "run.json"
    if resume_dir.exists() and fresh:
        _remove(resume_dir)
    if manifest.exists():
        saved = json.loads(manifest.read_text())
        reasons = _differences(saved, fingerprint)
        if reasons:
            raise ResumeMismatch(
                f"cannot resume from {resume_dir}: " + "; ".join(reasons)
                + ". Run again with the original arguments to resume, or pass --fresh to discard its finished layers")
        for key in sorted(set(saved) | set(fingerprint)):
            if key not in MUST_MATCH and saved.get(key) != fingerprint.get(key):
                logger.warning("resuming although %s changed (%r then, %r now): the result may differ in low-order "
                               "bits from an uninterrupted run", key, saved.get(key), fingerprint.get(key))
        finished = len(list(resume_dir.glob("*.pt")))
        if finished:
            logger.info("resuming from %s: %d finished blocks/layers are reused", resume_dir, finished)
        return finished
    resume_dir.mkdir(parents=True, exist_ok=True)
    tmp = manifest.with_name("run.json.part")
    tmp.write_text(json.dumps(fingerprint, indent=1, sort_keys=True, default=str))
    os.replace(tmp, manifest)
    return 0


def _remove(resume_dir: Path) -> None:
    for path in resume_dir.iterdir():
        path.unlink()
    resume_dir.rmdir()


def close_run(resume_dir: Path) -> None:
    """The checkpoint is complete: its per-layer state is no longer needed."""
    if resume_dir.exists():
        _remove(resume_dir)


class LayerStore:
    """Finished blocks/layers of one run, each stored under its name with the digest of its inputs."""

    def __init__(self, folder: str | os.PathLike):
        self.folder = Path(folder)

    def _path(self, name: str) -> Path:
        return self.folder / f"{name}.pt"

    def load(self, name: str, digest: str) -> dict | None:
        """The saved result of ``name`` if it was computed from the same inputs, else None."""
        path = self._path(name)
        if not path.exists():
            return None
        saved = torch.load(path, weights_only=True)
        if saved.get("digest") != digest:
            logger.warning("%s: saved result was computed from other inputs; computing it again", name)
            return None
        return saved

    def save(self, name: str, digest: str, result: dict) -> None:
        """Write atomically (a kill mid-write leaves the previous state)."""
        path = self._path(name)
        tmp = path.with_name(path.name + ".part")
        torch.save({**result, "digest": digest}, tmp)
        os.replace(tmp, path)
