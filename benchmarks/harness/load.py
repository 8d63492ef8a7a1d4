"""A load test for an OpenAI-compatible server (``vllm serve``), shared by ``benchmarks/serve_load.py``
and the slow serving test.

One burst: every request is sent at once (completions and chat, streaming and not, prompts of
several lengths, greedy with EOS ignored so each answer's length is known), beside clients that
go away mid-stream and requests a server must refuse (prompts over the context, bad parameters,
an unknown model, a body that is not JSON). Then the server is asked whether it is still healthy
and idle, and the valid non-streaming completions are sent again one at a time: greedy tokens
under concurrency are compared with those of the same request alone, and where they differ, the
margin between the alone-run's two best tokens at the first difference says whether it was a
near-tie (batch-dependent rounding) or something worse.

Needs ``aiohttp`` (a vLLM dependency), imported when a burst runs.
"""

from __future__ import annotations

import asyncio
import json
import math
import random
import re
import time
import urllib.request
from dataclasses import dataclass
from typing import Any

__all__ = ["LoadRequest", "LoadOutcome", "build_requests", "run_burst", "summarize", "greedy_alone"]

#: tokens per answer of the valid requests (cycled), and prompt lengths in words (cycled)
ANSWER_TOKENS = (8, 16, 32, 64)
PROMPT_WORDS = (6, 60, 250, 700)
DISCONNECT_AFTER_CHUNKS = 2


@dataclass
class LoadRequest:
    name: str
    path: str  # /v1/completions or /v1/chat/completions
    body: dict[str, Any] | bytes  # bytes: sent as is (a malformed body)
    expect: str  # "ok" | "reject" | "disconnect"
    stream: bool = False

    @property
    def max_tokens(self) -> int | None:
        return self.body.get("max_tokens") if isinstance(self.body, dict) else None


@dataclass
class LoadOutcome:
    request: LoadRequest
    status: int | None = None  # None: no HTTP answer at all (lost)
    seconds: float = 0.0
    completion_tokens: int = 0
    token_ids: list[int] | None = None
    text: str = ""
    finished: bool = False  # a whole answer: a parsed body, or a stream that reached [DONE]
    error: str = ""

    @property
    def valid_ok(self) -> bool:
        """A valid request answered in full with exactly the tokens it asked for."""
        return (self.status == 200 and self.finished and not self.error
                and self.completion_tokens == self.request.max_tokens)


def build_requests(model: str, words: list[str], concurrency: int, max_model_len: int, seed: int = 0) -> list[LoadRequest]:
    """``concurrency`` requests (at least 32): nine refused on purpose, a tenth clients that
    disconnect, the rest valid (four kinds: completion or chat, streamed or not)."""
    if concurrency < 32:
        raise ValueError(f"a burst needs at least 32 requests for its mix, got {concurrency}")
    rng = random.Random(seed)

    def prompt(count: int) -> str:
        start = rng.randrange(0, max(1, len(words) - count))
        return " ".join(words[start : start + count])

    over_context = " ".join(words[: max_model_len * 2]) if len(words) >= max_model_len * 2 else "word " * (max_model_len * 2)
    completion = lambda **extra: {"model": model, "temperature": 0.0, "ignore_eos": True, **extra}  # noqa: E731
    chat = lambda text, **extra: completion(messages=[{"role": "user", "content": text}], **extra)  # noqa: E731
    invalid = [
        LoadRequest("over-context-completion", "/v1/completions", completion(prompt=over_context, max_tokens=8), "reject"),
        LoadRequest("over-context-chat", "/v1/chat/completions", chat(over_context, max_tokens=8), "reject"),
        LoadRequest("negative-max-tokens", "/v1/completions", completion(prompt="Hello", max_tokens=-5), "reject"),
        LoadRequest("negative-temperature", "/v1/chat/completions", {**chat("Hello", max_tokens=8), "temperature": -1.0},
                    "reject"),
        LoadRequest("top-p-above-one", "/v1/completions", completion(prompt="Hello", max_tokens=8, top_p=7.0), "reject"),
        LoadRequest("unknown-model", "/v1/completions", {**completion(prompt="Hello", max_tokens=8), "model": "no-such-model"},
                    "reject"),
        LoadRequest("not-json", "/v1/completions", b'{"model": "x", "prompt": ', "reject"),
        LoadRequest("no-prompt", "/v1/completions", completion(max_tokens=8), "reject"),
        LoadRequest("messages-not-a-list", "/v1/chat/completions", completion(messages="Hello", max_tokens=8), "reject"),
    ]
    disconnects = []
    for i in range(max(2, concurrency // 10)):
        if i % 2 == 0:
            path, body = "/v1/completions", completion(prompt=prompt(60), max_tokens=64, stream=True)
        else:
            path, body = "/v1/chat/completions", chat(prompt(60), max_tokens=64, stream=True)
        disconnects.append(LoadRequest(f"disconnect-{i}", path, body, "disconnect", stream=True))
    valid = []
    for i in range(max(1, concurrency - len(invalid) - len(disconnects))):
        tokens, words_in = ANSWER_TOKENS[i % len(ANSWER_TOKENS)], PROMPT_WORDS[(i // 4) % len(PROMPT_WORDS)]
        kind, stream = ("completion", "chat")[i % 2], (i // 2) % 2 == 1
        extra = {"max_tokens": tokens}
        if stream:
            extra.update(stream=True, stream_options={"include_usage": True})
        if kind == "completion":
            valid.append(LoadRequest(f"completion{'-stream' if stream else ''}-{i}", "/v1/completions",
                                     completion(prompt=prompt(words_in), return_token_ids=not stream, **extra), "ok", stream))
        else:
            valid.append(LoadRequest(f"chat{'-stream' if stream else ''}-{i}", "/v1/chat/completions",
                                     chat(prompt(words_in), **extra), "ok", stream))
    requests = valid + disconnects + invalid
    rng.shuffle(requests)
    return requests


async def _one(session, url: str, request: LoadRequest, timeout_s: float) -> LoadOutcome:
    import aiohttp

    outcome = LoadOutcome(request)
    data = request.body if isinstance(request.body, bytes) else json.dumps(request.body).encode()
    start = time.perf_counter()
    try:
        async with session.post(url + request.path, data=data, headers={"Content-Type": "application/json"},
                                timeout=aiohttp.ClientTimeout(total=timeout_s)) as response:
            outcome.status = response.status
            if response.status != 200 or not request.stream:
                raw = await response.read()
                outcome.seconds = time.perf_counter() - start
                _read_body(outcome, raw)
                return outcome
            chunks = 0
            async for line in response.content:
                line = line.strip()
                if not line.startswith(b"data:"):
                    continue
                payload = line[len(b"data:"):].strip()
                if payload == b"[DONE]":
                    outcome.finished = True
                    break
                event = json.loads(payload)
                chunks += 1
                _read_chunk(outcome, event)
                if request.expect == "disconnect" and chunks >= DISCONNECT_AFTER_CHUNKS:
                    response.close()  # the client goes away mid-answer
                    break
    except (aiohttp.ClientError, asyncio.TimeoutError, json.JSONDecodeError) as error:
        outcome.error = f"{type(error).__name__}: {error}"
    outcome.seconds = time.perf_counter() - start
    return outcome


def _read_body(outcome: LoadOutcome, raw: bytes) -> None:
    try:
        body = json.loads(raw)
    except json.JSONDecodeError:
        outcome.error = f"reply is not JSON: {raw[:200]!r}"
        return
    if outcome.status != 200:
        error = body.get("error", body) if isinstance(body, dict) else body
        outcome.error = str(error.get("message", error) if isinstance(error, dict) else error)
        return
    choice = body["choices"][0]
    outcome.text = choice.get("text") or (choice.get("message") or {}).get("content") or ""
    outcome.token_ids = choice.get("token_ids")
    outcome.completion_tokens = int(body.get("usage", {}).get("completion_tokens", 0))
    outcome.finished = choice.get("finish_reason") is not None


def _read_chunk(outcome: LoadOutcome, event: dict) -> None:
    if event.get("usage"):
        outcome.completion_tokens = int(event["usage"].get("completion_tokens", 0))
    for choice in event.get("choices", []):
        outcome.text += choice.get("text") or (choice.get("delta") or {}).get("content") or ""


async def _burst(url: str, requests: list[LoadRequest], timeout_s: float) -> tuple[list[LoadOutcome], float]:
    import aiohttp

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        start = time.perf_counter()
        outcomes = await asyncio.gather(*(_one(session, url, r, timeout_s) for r in requests))
        return list(outcomes), time.perf_counter() - start


def _get(url: str, timeout: float = 10) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=timeout) as response:
            return response.status, response.read().decode(errors="replace")
    except Exception as error:  # noqa: BLE001 - any failure means "not healthy"
        return 0, str(error)


def _requests_in_flight(metrics: str) -> float | None:
    """Running plus waiting requests from vLLM's Prometheus metrics (None if not exposed)."""
    values = [float(m.group(2)) for m in re.finditer(r"^vllm:num_requests_(running|waiting)\{[^}]*\} ([0-9.e+-]+)$",
                                                          metrics, re.MULTILINE)]
    return sum(values) if values else None


def run_burst(url: str, requests: list[LoadRequest], timeout_s: float = 900, settle_s: float = 30) -> dict:
    """Send ``requests`` at once; then check health and that the server went back to idle."""
    outcomes, wall = asyncio.run(_burst(url, requests, timeout_s))
    deadline, in_flight = time.time() + settle_s, None
    while time.time() < deadline:  # aborted streams must be released, not left running
        status, metrics = _get(url + "/metrics")
        in_flight = _requests_in_flight(metrics) if status == 200 else None
        if in_flight == 0:
            break
        time.sleep(1)
    health, _ = _get(url + "/health")
    return {"outcomes": outcomes, "wall_s": wall, "healthy_after": health == 200, "in_flight_after": in_flight}


def greedy_alone(url: str, model: str, outcomes: list[LoadOutcome], timeout_s: float = 600) -> list[dict]:
    """Each valid non-streamed completion sent again alone (with its two best logprobs per token):
    equal tokens, or the first difference and the alone-run's top-2 margin there (nats)."""
    comparisons = []
    for outcome in outcomes:
        request = outcome.request
        if request.expect != "ok" or request.stream or request.path != "/v1/completions" or not outcome.valid_ok:
            continue
        body = {**request.body, "model": model, "logprobs": 2}
        http = urllib.request.Request(url + request.path, data=json.dumps(body).encode(),
                                      headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(http, timeout=timeout_s) as response:
            alone = json.loads(response.read())["choices"][0]
        tokens = alone["token_ids"]
        record = {"name": request.name, "tokens": len(tokens), "equal": tokens == outcome.token_ids}
        if not record["equal"]:
            first = next((i for i, (a, b) in enumerate(zip(tokens, outcome.token_ids)) if a != b),
                         min(len(tokens), len(outcome.token_ids)))
            top = sorted(alone["logprobs"]["top_logprobs"][first].values(), reverse=True) if first < len(tokens) else []
            record.update(first_difference=first, margin=(top[0] - top[1]) if len(top) > 1 else None)
        comparisons.append(record)
    return comparisons


def _percentile(values: list[float], q: float) -> float | None:
    if not values:
        return None
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def summarize(burst: dict, comparisons: list[dict] | None = None) -> dict:
    """The record the benchmark commits (see issue: concurrency, lost, failed_valid, p50/p99, tok/s)."""
    outcomes: list[LoadOutcome] = burst["outcomes"]
    valid = [o for o in outcomes if o.request.expect == "ok"]
    rejected = [o for o in outcomes if o.request.expect == "reject"]
    disconnects = [o for o in outcomes if o.request.expect == "disconnect"]
    latencies = [o.seconds for o in valid if o.valid_ok]
    tokens = sum(o.completion_tokens for o in valid if o.valid_ok)
    record = {
        "concurrency": len(outcomes),
        "requests": len(outcomes),
        "valid": len(valid),
        "failed_valid": sum(not o.valid_ok for o in valid),
        "lost": sum(o.status is None for o in outcomes if o.request.expect != "disconnect"),
        "invalid": len(rejected),
        "invalid_rejected_4xx": sum(o.status is not None and 400 <= o.status < 500 and bool(o.error) for o in rejected),
        "disconnected": len(disconnects),
        "disconnected_after_first_chunks": sum(o.status == 200 and bool(o.text) for o in disconnects),
        "healthy_after": burst["healthy_after"],
        "in_flight_after": burst["in_flight_after"],
        "wall_s": round(burst["wall_s"], 2),
        "p50_s": _round(_percentile(latencies, 0.50)),
        "p99_s": _round(_percentile(latencies, 0.99)),
        "tok_s": round(tokens / burst["wall_s"], 1) if burst["wall_s"] else None,
        "requests_s": round(len(latencies) / burst["wall_s"], 2) if burst["wall_s"] else None,
        "failures": [f"{o.request.name}: status {o.status}, {o.completion_tokens}/{o.request.max_tokens} tokens, "
                     f"{o.error or ('unfinished' if not o.finished else '')}" for o in valid if not o.valid_ok],
        "rejections": {o.request.name: f"{o.status}: {o.error[:160]}" for o in rejected},
    }
    if comparisons is not None:
        differing = [c for c in comparisons if not c["equal"]]
        record.update(
            greedy_compared=len(comparisons),
            greedy_equal=len(comparisons) - len(differing),
            greedy_differences=differing,
        )
    return record


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 3)
