"""Writing outputs so that nothing already on disk is lost: a file or a folder is written under a
temporary name beside its target and moved into place only when complete."""

from __future__ import annotations

import json
import logging
import os
import shutil
import tempfile
from pathlib import Path

logger = logging.getLogger(__name__)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    """Write ``text`` to ``path`` through ``path.part`` (a crash leaves the old file intact)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(text, encoding="utf-8")
    tmp.replace(path)


def write_json_atomic(path: str | os.PathLike, payload: dict) -> None:
    write_text_atomic(path, json.dumps(payload, indent=1) + "\n")


def _temporary_prefix(output_dir: Path) -> str:
    return f".{output_dir.name}.tmp-"


def _process_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # someone else's process
        return True
    return True


def remove_stale_temporaries(output_dir: Path) -> list[Path]:
    """Remove the temporary folders that killed runs (SIGKILL, out of memory, power loss) left
    beside ``output_dir``; those of runs still alive are kept. Returns what was removed."""
    removed = []
    for candidate in output_dir.parent.glob(_temporary_prefix(output_dir) + "*"):
        pid_text = candidate.name[len(_temporary_prefix(output_dir)):].split("-", 1)[0]
        if candidate.is_dir() and pid_text.isdigit() and not _process_alive(int(pid_text)):
            shutil.rmtree(candidate, ignore_errors=True)
            logger.info("removed %s, left by an interrupted run (process %s)", candidate, pid_text)
            removed.append(candidate)
    return removed


def prepare_output(output_dir: Path, overwrite: bool) -> Path:
    """Refuse an existing output folder unless asked; return a fresh temporary folder beside it.

    The temporary folder is named ``.<name>.tmp-<pid>-<random>``, so that a later run can tell
    (and removes) the leftovers of a run that was killed before it could clean up.
    """
    if output_dir.exists() and not overwrite:
        raise FileExistsError(f"output folder {output_dir} already exists; pass --overwrite to replace it")
    output_dir.parent.mkdir(parents=True, exist_ok=True)
    remove_stale_temporaries(output_dir)
    return Path(tempfile.mkdtemp(prefix=f"{_temporary_prefix(output_dir)}{os.getpid()}-", dir=output_dir.parent))


def commit_output(tmp_dir: Path, output_dir: Path) -> None:
    """Move a finished folder into place; the old one (if any) is removed only afterwards."""
    backup = None
    if output_dir.exists():
        backup = output_dir.with_name(f".{output_dir.name}.old-{os.getpid()}")
        output_dir.rename(backup)
    tmp_dir.rename(output_dir)
    if backup is not None:
        shutil.rmtree(backup, ignore_errors=True)
