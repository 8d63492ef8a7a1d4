"""The arithmetic of benchmarks/serve_shapes.py that its rows stand on: what a decode step reads,
its bandwidth bound, the cores each tensor-parallel rank gets and llama.cpp's second try (the
engines themselves run in tests/serving/test_tensor_parallel.py and in the benchmark)."""

from __future__ import annotations

import json
import subprocess

import pytest


@pytest.fixture(scope="module")
def serve_shapes():
    import serve_shapes  # benchmarks/ is on sys.path (tests/conftest.py)

    return serve_shapes


def test_a_decode_step_reads_every_weight_but_an_untied_input_embedding(serve_shapes):
    one, eight = serve_shapes.random_llama.MODEL_SHAPES["1b"], serve_shapes.random_llama.MODEL_SHAPES["8b"]
    assert serve_shapes.vllm_read_bytes("1b", "gsq-w2", 10**9) == 10**9  # tied: the embedding is the head, read whole
    assert serve_shapes.vllm_read_bytes("8b", "gsq-w2", 10**10) == 10**10 - eight["vocab"] * eight["hidden"] * 2
    assert one["tied_embeddings"] and not eight["tied_embeddings"]
    # a 4-bit head unties the 1B model: its bf16 input embedding is held but only a row of it read
    assert serve_shapes.vllm_read_bytes("1b", "gsq-w2-h4", 10**9) == 10**9 - one["vocab"] * one["hidden"] * 2


def test_the_bound_is_bandwidth_over_bytes_and_an_error_row_stays_an_error(serve_shapes):
    row = serve_shapes.add_bounds({"decode_tok_s_bs1": 6.0, "read_bytes": 2 * 10**9}, bandwidth=20e9)
    assert row["bound_tok_s"] == 10.0 and row["of_bound_bs1"] == 0.6
    assert serve_shapes.add_bounds({"error": "x"}, 20e9) == {"error": "x"}


def test_every_row_computes_on_every_core_split_evenly_between_ranks(serve_shapes):
    assert serve_shapes.threads_binding(1, 2) == "0-1"  # not vLLM's default, which keeps a core back
    assert serve_shapes.threads_binding(2, 2) == "0|1"
    assert serve_shapes.threads_binding(2, 16) == "0-7|8-15"
    assert serve_shapes.threads_binding(2, 3) == "0-1|2"
    assert serve_shapes.threads_binding(1, 1) == "0"


def test_a_run_of_one_shape_keeps_the_other_shapes_rows_and_their_run(serve_shapes):
    first = serve_shapes.merge_runs({}, ["1b"], [{"shape": "1b", "format": "bf16"}], {"note": "first"})
    second = serve_shapes.merge_runs(first, ["8b"], [{"shape": "8b", "format": "gsq-w2"}], {"note": "second"})
    assert [r["shape"] for r in second["results"]] == ["1b", "8b"]
    assert second["runs"]["1b"]["note"] == "first" and second["runs"]["8b"]["budget"] == serve_shapes.BUDGET["8b"]
    again = serve_shapes.merge_runs(second, ["1b"], [{"shape": "1b", "format": "gsq-w3"}], {"note": "third"})
    assert [(r["shape"], r["format"]) for r in again["results"]] == [("8b", "gsq-w2"), ("1b", "gsq-w3")]
    assert set(again["shapes"]) == {"1b", "8b"} and again["runs"]["1b"]["note"] == "third"


@pytest.mark.parametrize(("death", "name"), [(-4, "SIGILL"), (-11, "SIGSEGV")])
def test_llama_cpp_killed_in_its_extra_layouts_is_run_again_without_them(serve_shapes, monkeypatch, tmp_path,
                                                                          death, name):
    """llama.cpp's AMX repacking has died with SIGILL on one machine and SIGSEGV on another: either
    way the row is measured again without the extra layouts, and says so; other failures are not retried."""
    calls = []

    def fake_run(command, **kwargs):
        extra = json.loads(command[-1])["extra_buffers"]
        calls.append(extra)
        if extra:
            return subprocess.CompletedProcess(command, death, stdout="")
        return subprocess.CompletedProcess(command, 0, stdout='RESULT {"decode_tok_s_bs1": 1.5}\n')

    monkeypatch.setattr(serve_shapes, "gguf_file", lambda *args: tmp_path / "model.gguf")
    monkeypatch.setattr(serve_shapes, "_text_ids", lambda count, length: [[1] * length] * count)
    monkeypatch.setattr(serve_shapes.subprocess, "run", fake_run)
    row = serve_shapes.run_llama("1b", "q4_0", tmp_path / "convert.py", tmp_path)
    assert calls == [True, False]
    assert row["decode_tok_s_bs1"] == 1.5 and row["extra_buffers"] is False and name in row["note"]

    calls.clear()
    monkeypatch.setattr(serve_shapes.subprocess, "run",
                        lambda command, **kwargs: calls.append(1) or subprocess.CompletedProcess(command, 1, stdout=""))
    row = serve_shapes.run_llama("1b", "q4_0", tmp_path / "convert.py", tmp_path)
    assert calls == [1] and row["error"].startswith("exit 1")
