"""Load test: ``gsq-vllm serve`` on a GSQ-made checkpoint (the plugin) against the bf16 model, one run.

Run it with the serving environment's Python::

    .venv-serve/bin/python benchmarks/serve_load.py                  # bursts of 64 and 128, both models
    .venv-serve/bin/python benchmarks/serve_load.py --concurrency 256 --only gsq

Each model gets a fresh ``vllm serve`` on loopback (bf16, max-model-len 2048, the README's CPU
settings) and one burst per concurrency (64 and 128 by default) from :mod:`harness.load`:
all requests at once (completions and chat, streaming and not, 6 to 700-word prompts, 8 to 64
greedy tokens with EOS ignored), clients that disconnect after two chunks, and nine requests that
must be refused (prompts over the context, bad parameters, an unknown model, a body that is not
JSON). Recorded per model and burst:
``failed_valid``, ``lost``, ``invalid_rejected_4xx``, ``healthy_after`` (health and a drained
queue afterwards), ``p50_s`` / ``p99_s`` latency of valid requests, ``tok_s`` (answer tokens over
the burst's wall time) and whether greedy answers under load equal the same requests sent alone.
Results: ``benchmarks/results/serve_load_<device>.json``. On a CUDA machine the same script runs as
is (the server picks the GPU kernels); CPU figures come from the machine in the ``cpu`` field.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

from gsq_vllm.files import write_json_atomic
from gsq_vllm.machine import cpu_description
from harness.load import build_requests, greedy_alone, run_burst, summarize
from harness.server import CPU_SERVE_ARGS, VLLMServer

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MAKE_CHECKPOINTS = REPO / "scripts" / "make_checkpoints.py"
QUANTIZE_PYTHON = REPO / ".venv" / "bin" / "python"
MAX_MODEL_LEN = 2048


def model_folder(kind: str) -> Path:
    """The bf16 default model, or a cached checkpoint made by ``scripts/make_checkpoints.py``."""
    from gsq_vllm.data import cache_dir, default_model_dir

    if kind == "bf16":
        return default_model_dir()
    path = cache_dir() / "checkpoints" / kind
    if not (path / "config.json").is_file():
        print(f"making checkpoint {kind} with {QUANTIZE_PYTHON} ...", flush=True)
        subprocess.run([str(QUANTIZE_PYTHON), str(MAKE_CHECKPOINTS), kind, str(path)], cwd=REPO, check=True)
    return path


def evaluation_words() -> list[str]:
    from gsq_vllm.data import resolve_text

    return resolve_text("wiki").read_text(encoding="utf-8").split()


def load_test(model: Path, log_file: Path, concurrencies: list[int], seed: int = 0) -> list[dict]:
    """One server, one burst per concurrency (each followed by its greedy comparison); a record each."""
    records = []
    with VLLMServer(model, log_file, startup_timeout=900) as server:
        server.complete("Warm up", 4, timeout=300)
        for concurrency in concurrencies:
            requests = build_requests(server.model, evaluation_words(), concurrency, MAX_MODEL_LEN, seed)
            burst = run_burst(server.url, requests)
            records.append(summarize(burst, greedy_alone(server.url, server.model, burst["outcomes"])))
        log = server.log_tail(2_000_000)
        startup_s = server.startup_s
    kernels = sorted({line.split("GSQ: using kernel ", 1)[1].split(" for")[0] for line in log.splitlines()
                      if "GSQ: using kernel " in line})
    return [{"startup_s": round(startup_s, 1), "kernel": ", ".join(kernels) or "stock dense", **r} for r in records]


def format_table(records: list[dict]) -> str:
    columns = ["name", "kernel", "concurrency", "failed_valid", "lost", "invalid_rejected_4xx", "healthy_after",
               "p50_s", "p99_s", "tok_s", "greedy_equal"]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for r in records:
        cells = [r.get(c) for c in columns]
        cells[-1] = f"{r['greedy_equal']}/{r['greedy_compared']}"
        lines.append("| " + " | ".join(str(c) for c in cells) + " |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--concurrency", type=int, nargs="+", default=[64, 128],
                        help="requests per burst, all at once (>= 32); one burst each, on the same server")
    parser.add_argument("--gsq-checkpoint", default="gsq-made-w3", help="make_checkpoints kind served by the plugin")
    parser.add_argument("--only", nargs="*", choices=["gsq", "bf16"], default=["gsq", "bf16"])
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    args = parser.parse_args(argv)

    from gsq_vllm.data import cache_dir

    log_dir = cache_dir() / "serve-load-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    records = []
    began = time.perf_counter()
    for name in args.only:
        kind = args.gsq_checkpoint if name == "gsq" else "bf16"
        model = model_folder(kind)
        print(f"== {name}: {model}", flush=True)
        shown = str(model.relative_to(cache_dir()) if model.is_relative_to(cache_dir()) else model)
        for result in load_test(model, log_dir / f"{name}.log", args.concurrency):
            record = {"name": name, "model": shown, **result}
            print("   " + json.dumps({k: v for k, v in record.items() if k not in ("rejections",)}), flush=True)
            records.append(record)
    device = "cuda" if _cuda() else "cpu"
    payload = {
        "device": device,
        "cpu": cpu_description(),
        "settings": {"server_args": CPU_SERVE_ARGS, "max_model_len": MAX_MODEL_LEN, "concurrencies": args.concurrency,
                     "greedy": True, "ignore_eos": True},
        "note": args.note,
        "wall_s": round(time.perf_counter() - began, 1),
        "results": records,
    }
    out = args.out / f"serve_load_{device}.json"
    write_json_atomic(out, payload)
    print(format_table(records))
    print(f"written {out}")
    return 0


def _cuda() -> bool:
    import torch

    return torch.cuda.is_available()


if __name__ == "__main__":
    sys.exit(main())
