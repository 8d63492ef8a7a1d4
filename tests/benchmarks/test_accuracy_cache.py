"""The accuracy benchmark's cache cannot serve a stale record: editing any source file that can
change a result (quantize, checkpoint, evaluation, data) changes the key of every row that runs it,
and editing GSQ's own modules leaves the baselines' records (GPTQ, AutoRound: hours of CPU) valid."""

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


def _files(accuracy, patterns):
    return sorted({path.relative_to(ROOT) for pattern in patterns for path in ROOT.glob(pattern)})


def test_every_result_changing_module_is_in_the_key(accuracy):
    covered = {path.as_posix() for path in _files(accuracy, accuracy.sources_of("gsq3"))}
    for module in ("gsq_vllm/evaluation.py", "gsq_vllm/data.py", "gsq_vllm/compress/quantize.py", "gsq_vllm/checkpoint.py",
                   "gsq_vllm/packing.py", "gsq_vllm/compress/gsq_modifier.py", "gsq_vllm/compress/end_to_end_modifier.py",
                   "gsq_vllm/gsq/optimize.py", "gsq_vllm/weight_format.py"):
        assert module in covered, f"{module} can change a record but is not in the cache key"


def test_editing_a_source_changes_the_keys_of_the_rows_that_run_it(accuracy, tmp_path, monkeypatch):
    files = _files(accuracy, accuracy.SOURCES + accuracy.GSQ_SOURCES)
    for relative in files:
        (tmp_path / relative).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(ROOT / relative, tmp_path / relative)
    monkeypatch.setattr(accuracy, "ROOT", tmp_path)
    gsq_only = set(_files(accuracy, accuracy.GSQ_SOURCES))
    assert gsq_only and not gsq_only & set(_files(accuracy, accuracy.SOURCES))
    before = {name: accuracy.source_digest(accuracy.sources_of(name)) for name in ("gsq3", "gptq3", "autoround2")}
    for relative in files:
        path = tmp_path / relative
        original = path.read_bytes()
        path.write_bytes(original + b"\n# edited\n")
        after = {name: accuracy.source_digest(accuracy.sources_of(name)) for name in before}
        assert after["gsq3"] != before["gsq3"], f"editing {relative} leaves GSQ's cache key unchanged"
        for baseline in ("gptq3", "autoround2"):
            if relative in gsq_only:  # GSQ's own modules cannot change a baseline: its record stays valid
                assert after[baseline] == before[baseline], f"editing {relative} recomputes {baseline}"
            else:
                assert after[baseline] != before[baseline], f"editing {relative} leaves {baseline}'s key unchanged"
        path.write_bytes(original)
    assert {name: accuracy.source_digest(accuracy.sources_of(name)) for name in before} == before


def test_the_moe_rows_keep_the_router_and_key_on_the_moe_model(accuracy):
    """Every method leaves the MoE model's router in full precision (a quantized router would make
    GSQ's and GPTQ's rows differ by more than their experts), and rebuilding the MoE model
    differently recomputes its rows, never the dense ones."""
    args = type("Args", (), dict(group_size=64, calibration_samples=128, calibration_seq_len=512,
                                  calibration_from_start=False, wiki_windows=10, news_windows=4))()
    settings = accuracy.settings_of(args)
    assert accuracy.MOE_METHODS and all(spec.model == "moe" for spec in accuracy.MOE_METHODS.values())
    for name, spec in accuracy.MOE_METHODS.items():
        assert "gsq_vllm/moe_model.py" in accuracy.sources_of(name)
        recipe = accuracy.edited_recipe(name, settings)
        if recipe is None:
            continue
        for modifier, options in recipe["quant_stage"]["quant_modifiers"].items():
            if modifier in ("GPTQModifier", "GSQModifier"):
                assert "re:.*\\.gate$" in options["ignore"], f"{name}: {modifier} would quantize the router"
    assert "gsq_vllm/moe_model.py" not in accuracy.sources_of("gsq3")
