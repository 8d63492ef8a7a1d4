"""Carry benchmarks/accuracy.py's cached rows over a source edit that leaves their arithmetic alone.

Every cached row is keyed by a hash of the sources it runs (accuracy.py's ``SOURCES``), so any edit
to them, a comment included, makes every row look uncomputed. Where an edit provably changes no
row's numbers (a new opt-in option, a check that a row never reaches, a torchrun-only path), this
moves each cached row from its key under the commit it was computed at to its key under today's
tree, and appends the reason to the row's ``provenance``. It recomputes nothing and refuses a row
whose recipe or settings differ between the two trees (then the numbers could differ: rerun it).

    .venv/bin/python benchmarks/rekey_cache.py --from-commit 1840225 \\
        --reason "keep_best_every, an end-to-end option off by default (tests: same steps without it)"
    .venv/bin/python benchmarks/accuracy.py --cached-only && .venv/bin/python benchmarks/accuracy.py --model moe --cached-only
"""

from __future__ import annotations

import argparse
import datetime
import importlib.util
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from types import ModuleType

REPO = Path(__file__).resolve().parents[1]


def load_accuracy(root: Path, alias: str) -> ModuleType:
    """``root``'s benchmarks/accuracy.py as a module (its ROOT, hence its source hashes, is ``root``)."""
    spec = importlib.util.spec_from_file_location(alias, root / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[alias] = module  # dataclasses look their module up while the file runs
    spec.loader.exec_module(module)
    return module


def default_settings(module: ModuleType) -> dict:
    """The settings of a plain ``accuracy.py`` run (its command line's defaults)."""
    return module.settings_of(argparse.Namespace(group_size=64, calibration_samples=128, calibration_seq_len=512,
                                                 calibration_from_start=False, wiki_windows=10, news_windows=4))


def rekey(old: ModuleType, new: ModuleType, cache: Path, provenance: str) -> list[str]:
    """Move every cached row of ``old``'s keys to ``new``'s; returns one line per row looked at."""
    report = []
    old_settings, new_settings = default_settings(old), default_settings(new)
    for name, method in new.ALL.items():
        if name not in old.ALL or method.match_time_of:  # a time-matched row's recipe needs other rows' times
            continue
        old_recipe, new_recipe = old.edited_recipe(name, old_settings), new.edited_recipe(name, new_settings)
        source = cache / f"{name}-{old.cache_key(name, old_settings, old_recipe)}.json"
        target = cache / f"{name}-{new.cache_key(name, new_settings, new_recipe)}.json"
        if not source.exists() or source == target:
            continue
        if (old_recipe, old_settings) != (new_recipe, new_settings):
            report.append(f"{name}: NOT carried over, its recipe or settings changed (rerun it)")
            continue
        if target.exists():
            report.append(f"{name}: {target.name} already cached; {source.name} left as it is")
            continue
        record = json.loads(source.read_text())
        record["provenance"] = "; ".join(filter(None, [record.get("provenance"), provenance]))
        target.write_text(json.dumps(record, indent=1) + "\n")
        source.unlink()
        report.append(f"{name}: {source.name} -> {target.name}")
    return report


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--from-commit", required=True, help="the commit whose sources the cached rows were keyed by")
    parser.add_argument("--reason", required=True, help="why the edit leaves every carried row's numbers alone")
    args = parser.parse_args()
    commit = subprocess.run(["git", "rev-parse", "--short", args.from_commit], cwd=REPO, check=True,
                            capture_output=True, text=True).stdout.strip()
    with tempfile.TemporaryDirectory() as folder:
        tree = Path(folder) / "tree"
        subprocess.run(["git", "worktree", "add", "--detach", "-q", str(tree), commit], cwd=REPO, check=True)
        try:
            old, new = load_accuracy(tree, "accuracy_old"), load_accuracy(REPO, "accuracy_new")
            provenance = (f"re-keyed on {datetime.date.today()} from the sources of {commit}: {args.reason}; "
                          "not recomputed")
            for line in rekey(old, new, new.CACHE, provenance):
                print(line)
        finally:
            subprocess.run(["git", "worktree", "remove", "--force", str(tree)], cwd=REPO, check=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
