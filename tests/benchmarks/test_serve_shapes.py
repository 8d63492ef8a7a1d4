"""The arithmetic of benchmarks/serve_shapes.py that its rows stand on: what a decode step reads,
its bandwidth bound, and the cores each tensor-parallel rank gets (the engines themselves run in
tests/serving/test_tensor_parallel.py and in the benchmark)."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def serve_shapes():
    import serve_shapes  # benchmarks/ is on sys.path (tests/conftest.py)

    return serve_shapes


def test_a_decode_step_reads_every_weight_but_an_untied_input_embedding(serve_shapes):
    one, eight = serve_shapes.random_llama.MODEL_SHAPES["1b"], serve_shapes.random_llama.MODEL_SHAPES["8b"]
    assert serve_shapes.vllm_read_bytes("1b", 10**9) == 10**9  # tied: the embedding is the head, read whole
    assert serve_shapes.vllm_read_bytes("8b", 10**10) == 10**10 - eight["vocab"] * eight["hidden"] * 2
    assert one["tied_embeddings"] and not eight["tied_embeddings"]


def test_the_bound_is_bandwidth_over_bytes_and_an_error_row_stays_an_error(serve_shapes):
    row = serve_shapes.add_bounds({"decode_tok_s_bs1": 6.0, "read_bytes": 2 * 10**9}, bandwidth=20e9)
    assert row["bound_tok_s"] == 10.0 and row["of_bound_bs1"] == 0.6
    assert serve_shapes.add_bounds({"error": "x"}, 20e9) == {"error": "x"}


def test_two_ranks_get_half_the_cores_each(serve_shapes):
    assert serve_shapes.two_ranks_binding(2) == "0|1"
    assert serve_shapes.two_ranks_binding(16) == "0-7|8-15"
    assert serve_shapes.two_ranks_binding(3) == "0|1-2"
