"""The accuracy benchmark's cache cannot serve a stale record: editing any source file that can
change a result (quantize, checkpoint, evaluation, data) changes the key of every row that runs it,
and editing GSQ's own modules leaves the baselines' records (GPTQ, AutoRound: hours of CPU) valid."""

from __future__ import annotations

import importlib.util
import math
import re
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


def test_seed_zero_keeps_the_key_rows_had_before_seeds_and_other_seeds_get_their_own(accuracy):
    settings = {"group_size": 64, "calibration": {"samples": 128}}
    zero = accuracy.edited_recipe("gsq3", settings)
    assert accuracy.edited_recipe("gsq3", settings, 0) == zero
    one = accuracy.edited_recipe("gsq3", settings, 1)
    seeds = {name: options.get("seed") for stage in one.values() for group in stage.values()
             for name, options in group.items() if isinstance(options, dict)}
    assert seeds.get("GSQModifier") == 1 and seeds.get("GSQEndToEndModifier") == 1, seeds
    assert accuracy.cache_file("gsq3", settings, zero).name == f"gsq3-{accuracy.cache_key('gsq3', settings, zero)}.json"
    assert "-seed1-" in accuracy.cache_file("gsq3", settings, one, 1).name
    assert accuracy.seeds_of("gsq3", [0, 1]) == [0, 1] and accuracy.seeds_of("autoround3", [0, 1]) == [0, 1]
    assert accuracy.seeds_of("gptq3", [0, 1]) == [0]


def test_a_row_over_two_seeds_is_their_mean_with_each_seed_and_the_spread(accuracy):
    runs = [{"name": "gsq3", "ce": 3.2, "ce_news": 3.6, "ear": 0.7, "ear_news": 0.6, "kl": 0.3, "kl_news": 0.4,
             "ppl": math.exp(3.2), "ppl_news": math.exp(3.6), "quant_seconds": 100.0, "peak_mem_mb": 2000.0},
            {"name": "gsq3", "seed": 1, "ce": 3.3, "ce_news": 3.5, "ear": 0.8, "ear_news": 0.5, "kl": 0.5,
             "kl_news": 0.2, "ppl": math.exp(3.3), "ppl_news": math.exp(3.5), "quant_seconds": 120.0,
             "peak_mem_mb": 2100.0}]
    row = accuracy.combine_seeds(runs)
    assert row["ce"] == pytest.approx(3.25) and row["ppl"] == pytest.approx(math.exp(3.25))
    assert row["quant_seconds"] == 110.0 and row["peak_mem_mb"] == 2100.0
    assert row["spread"] == pytest.approx({"ce": 0.1, "ce_news": 0.1})
    assert set(row["seeds"]) == {"0", "1"} and row["seeds"]["1"]["ce"] == 3.3
    assert accuracy.combine_seeds(runs[:1]) is runs[0]  # one seed: the row as it was


def test_a_run_of_a_few_rows_keeps_every_other_cached_row_in_the_results(accuracy, tmp_path, monkeypatch):
    """``--methods gsq3`` once rewrote the results file with gsq3 alone, dropping every other row from
    the README's tables; now the file holds every row cached for the model."""
    import json

    real_cache = accuracy.CACHE
    monkeypatch.setattr(accuracy, "CACHE", tmp_path / "cache")
    monkeypatch.setattr(accuracy, "RESULTS", tmp_path)
    (tmp_path / "cache").mkdir()
    settings = accuracy.settings_of(accuracy.argparse.Namespace(
        group_size=64, calibration_samples=128, calibration_seq_len=512, calibration_from_start=False,
        wiki_windows=10, news_windows=4))
    for name in ("fp", "gptq3", "gsq3"):  # a real record of each row, under today's key
        record = next(path for path in real_cache.glob(f"{name}-*.json") if re.fullmatch(rf"{name}-[0-9a-f]{{16}}\.json", path.name))
        shutil.copy(record, accuracy.cache_file(name, settings, accuracy.edited_recipe(name, settings)))

    monkeypatch.setattr(sys, "argv", ["accuracy.py", "--methods", "gsq3", "--cached-only"])
    assert accuracy.main() == 0
    rows = json.loads((tmp_path / "accuracy_smollm2.json").read_text())["results"]
    assert sorted(row["name"] for row in rows) == ["fp", "gptq3", "gsq3"]
