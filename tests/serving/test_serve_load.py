"""Under load: ``gsq-vllm serve`` on a checkpoint GSQModifier wrote, one burst of 64 requests at once
(completions and chat, streamed and not, clients that disconnect, nine invalid requests).

Every valid request answers in full, every invalid one gets a 4xx with a message, nothing is
lost, the server is healthy and idle afterwards, and greedy answers under load equal the same
requests sent alone, except where the alone-run's two best tokens are within ``TIE_MARGIN`` (fp32,
so only a near-tie can flip with the batch's shape). The figures against the bf16 model are
``benchmarks/serve_load.py``'s.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]
pytest.importorskip("vllm")

from serving_support import TIE_MARGIN, get_checkpoint  # noqa: E402

from gsq_vllm.data import resolve_text  # noqa: E402
from harness.load import build_requests, greedy_alone, run_burst, summarize  # noqa: E402
from harness.server import VLLMServer  # noqa: E402

CONCURRENCY = 64
FP32_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]


def test_a_burst_of_64_requests_on_a_gsq_checkpoint(tmp_path):
    model = get_checkpoint("gsq-made-w3", timeout=3600)
    words = resolve_text("wiki").read_text(encoding="utf-8").split()
    with VLLMServer(model, tmp_path / "serve.log", extra_args=FP32_ARGS, startup_timeout=900) as server:
        requests = build_requests(server.model, words, CONCURRENCY, 2048)
        burst = run_burst(server.url, requests)
        record = summarize(burst, greedy_alone(server.url, server.model, burst["outcomes"]))
        log = server.log_tail(2_000_000)
    assert "GSQ plugin serves this compressed-tensors checkpoint" in log
    assert record["concurrency"] >= 64 and record["valid"] >= 40
    assert record["failed_valid"] == 0, record["failures"]
    assert record["lost"] == 0
    assert record["invalid_rejected_4xx"] == record["invalid"] == 9, record["rejections"]
    assert record["disconnected_after_first_chunks"] == record["disconnected"]
    assert record["healthy_after"] and record["in_flight_after"] == 0
    assert record["greedy_compared"] >= 10
    for difference in record["greedy_differences"]:  # only near-ties may flip with the batch
        assert difference["margin"] is not None and difference["margin"] <= TIE_MARGIN, difference
