"""Writing outputs so that nothing already on disk is lost: a file or a folder is written under a
temporary name beside its target and moved into place only when complete."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from pathlib import Path


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.part`` (a crash leaves the old file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless asked; return a fresh temporary folder beside it."""
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {output_dir} already exists; pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    return Path(tempfile.mkdtemp(prefix=f".{output_dir.name}.tmp-", dir=output_dir.parent))


def commit_output(tmp_dir: Path, output_dir: Path) -> None:
    """Move a finished folder into place; the old one (if any) is removed only afterwards."""
    backup = None
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(backup)
    tmp_dir.rename(output_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
