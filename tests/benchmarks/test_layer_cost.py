"""benchmarks/layer_cost.py's code path on a tiny shape (hidden 64, one layer, 1-2 steps), so the
per-layer cost benchmark cannot rot: every method runs through oneshot, the fits and projections are
computed, the results file is written atomically and the README table renders from it."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_LLMCOMPRESSOR

ROOT = Path(__file__).resolve().parents[2]

pytestmark = pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="needs llmcompressor (the quantize environment)")


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def layer_cost():
    return _load("layer_cost_benchmark", ROOT / "benchmarks" / "layer_cost.py")


def test_fit_line_recovers_fixed_and_per_step(layer_cost):
    assert layer_cost.fit_line([(2, 14.0), (6, 30.0)]) == pytest.approx((6.0, 4.0))
    with pytest.raises(ValueError):
        layer_cost.fit_line([(2, 1.0), (2, 2.0)])


def test_shapes_and_memory_formula(layer_cost):
    assert layer_cost.layer_params(layer_cost.SHAPES["8b"]) == 218_103_808  # Llama-3.1-8B's seven Linears
    assert layer_cost.layer_params(layer_cost.SHAPES["70b"]) == 855_638_016
    small = layer_cost.estimate_memory_mb("gsq", layer_cost.SHAPES["8b"], 16384, "attention")["mb"]
    assert small < layer_cost.estimate_memory_mb("gsq", layer_cost.SHAPES["8b"], 16384, "layer")["mb"]


def test_tiny_shape_end_to_end(layer_cost, tmp_path):
    def in_process(kind, spec, log):
        measure = {"method": layer_cost.measure_method, "forward_backward": layer_cost.measure_forward_backward}[kind]
        return measure(spec)

    payload = layer_cost.run(["tiny"], ["gptq", "gsq", "autoround"], steps=[2], iters=[2], sequences=2,
                             memory_limit_gb=100, log=lambda _line: None, child=in_process,
                             fwd_bwd_spec={"vocab": 600, "sequences": 2, "seq_len": 64})
    methods = payload["shapes"]["tiny"]["methods"]
    for method in ("gptq", "gsq", "autoround"):
        record = methods[method]
        assert "skipped" not in record, record
        assert record["projection"]["seconds"] > 0
        assert all(run["peak_rss_mb"] > 0 and run["seconds"] > 0 for run in record["runs"])
    assert [r["budget"] for r in methods["gsq"]["runs"]] == [2]
    assert methods["gsq"]["runs"][0]["step_clock"]["steps_seen"] == 2
    assert methods["autoround"]["runs"][0]["step_clock"]["steps_seen"] == 2
    assert "optimize_seconds" in methods["gsq"]["runs"][0] and "gptq_start_seconds" in methods["gsq"]["runs"][0]
    assert payload["end_to_end"]["tiny"]["seconds_per_step"] > 0
    assert payload["random_weights"] and payload["cpu"]["flags"] is not None
    out = tmp_path / "layer_cost.json"
    layer_cost.write_json(payload, out)
    assert not out.with_name(out.name + ".part").exists()
    tables = _load("readme_tables_for_layer_cost", ROOT / "benchmarks" / "readme_tables.py")
    text = tables.layer_cost_table(json.loads(out.read_text()))
    assert "| tiny | gsq |" in text and "random weights" in text and "projection only" in text


def test_a_child_process_measures(layer_cost):
    result = layer_cost.run_child("forward_backward", {"shape": "tiny", "vocab": 0, "sequences": 1, "seq_len": 32},
                                  log=print)
    assert "error" not in result, result
    assert result["layer_forward_s_per_token"] > 0 and len(result["loadavg_before"]) == 3


def test_two_budgets_add_a_cross_check(layer_cost):
    runs = [{"budget": 2, "optimize_seconds": 14.0, "step_clock": {"steps_seen": 2, "per_step_seconds": 4.5,
                                                                    "fixed_seconds": 5.0}},
            {"budget": 6, "optimize_seconds": 30.0, "step_clock": {"steps_seen": 6, "per_step_seconds": 4.2,
                                                                    "fixed_seconds": 4.8}}]
    fixed, per_step, how, checks = layer_cost.fixed_and_per_step(runs, "optimize_seconds")
    assert (fixed, per_step) == (4.8, 4.2) and "6-step run" in how
    assert checks["two_run_fit"]["per_step_seconds"] == pytest.approx(4.0)
