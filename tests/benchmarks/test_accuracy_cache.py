"""The accuracy benchmark's cache cannot serve a stale record: editing any source file that can
change a result (quantize, checkpoint, evaluation, data) changes the key."""

from __future__ import annotations

import importlib.util
import shutil
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def accuracy():
    spec = importlib.util.spec_from_file_location("accuracy_benchmark", ROOT / "benchmarks" / "accuracy.py")
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up while being defined
    spec.loader.exec_module(module)
    return module


def test_every_result_changing_module_is_in_the_key(accuracy):
    covered = {path.relative_to(ROOT).as_posix() for pattern in accuracy.SOURCES for path in ROOT.glob(pattern)}
    for module in ("gsq_vllm/evaluation.py", "gsq_vllm/data.py", "gsq_vllm/quantize.py", "gsq_vllm/checkpoint.py",
                   "gsq_vllm/packing.py", "gsq_vllm/modifier.py", "gsq_vllm/end_to_end.py",
                   "gsq_vllm/gsq/optimize.py", "gsq_vllm/weight_format.py"):
        assert module in covered, f"{module} can change a record but is not in the cache key"


def test_editing_any_source_changes_the_key(accuracy, tmp_path, monkeypatch):
    files = sorted({path.relative_to(ROOT) for pattern in accuracy.SOURCES for path in ROOT.glob(pattern)})
    for relative in files:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    monkeypatch.setattr(accuracy, "ROOT", tmp_path)
    before = accuracy.source_digest()
    for relative in files:
        path = tmp_path / relative
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        assert accuracy.source_digest() != before, f"editing {relative} leaves the cache key unchanged"
        path.write_bytes(original)
    assert accuracy.source_digest() == before
