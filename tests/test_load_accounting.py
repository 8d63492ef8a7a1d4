"""The load test's request mix and its bookkeeping (no server: the burst itself is the slow serving test)."""

from __future__ import annotations

from collections import Counter

import pytest

from harness.load import LoadOutcome, build_requests, summarize

WORDS = [f"w{i}" for i in range(5000)]


def test_a_burst_mixes_every_kind_of_request():
    requests = build_requests("model", WORDS, 64, max_model_len=2048)
    kinds = Counter(r.expect for r in requests)
    assert len(requests) == 64 and kinds == {"ok": 49, "reject": 9, "disconnect": 6}
    valid = Counter((r.path, r.stream) for r in requests if r.expect == "ok")
    assert len(valid) == 4 and min(valid.values()) >= 12  # completion/chat x streamed/not
    assert all(r.body["temperature"] == 0.0 and r.body["ignore_eos"] for r in requests if r.expect == "ok")
    over = next(r for r in requests if r.name == "over-context-completion")
    assert len(over.body["prompt"].split()) >= 2 * 2048
    with pytest.raises(ValueError, match="at least 32 requests"):
        build_requests("model", WORDS, 16, max_model_len=2048)


def test_summary_counts_failures_losses_and_refusals():
    requests = build_requests("model", WORDS, 32, max_model_len=2048)
    outcomes = []
    for r in requests:
        if r.expect == "ok":
            outcomes.append(LoadOutcome(r, 200, 1.0, r.max_tokens, finished=True))
        elif r.expect == "reject":
            outcomes.append(LoadOutcome(r, 400, 0.1, error="bad request"))
        else:
            outcomes.append(LoadOutcome(r, 200, 0.5, text="partial"))
    valid = [o for o in outcomes if o.request.expect == "ok"]
    valid[0].completion_tokens -= 1  # a short answer is a failure
    valid[1].status = None  # no answer at all is lost (and a failure)
    rejected = next(o for o in outcomes if o.request.expect == "reject")
    rejected.status, rejected.error = 200, ""  # an invalid request that was served is not a refusal
    record = summarize({"outcomes": outcomes, "wall_s": 10.0, "healthy_after": True, "in_flight_after": 0.0},
                       [{"name": "x", "equal": True}, {"name": "y", "equal": False, "margin": 0.0}])
    assert record["failed_valid"] == 2 and record["lost"] == 1
    assert record["invalid_rejected_4xx"] == record["invalid"] - 1
    assert record["disconnected_after_first_chunks"] == record["disconnected"]
    assert record["p50_s"] == 1.0 and record["greedy_equal"] == 1 and record["greedy_compared"] == 2
