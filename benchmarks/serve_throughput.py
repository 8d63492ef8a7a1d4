"""Serving benchmark: bf16 vs stock GPTQ W4A16 vs GSQ W3/W2 (each GSQ kernel), same engine settings.

Run it with the serving environment's Python::

    .venv-serve/bin/python benchmarks/serve_throughput.py            # everything (about 15 min on 2 cores)
    .venv-serve/bin/python benchmarks/serve_throughput.py --only gsq-w2:torch-int4 bf16
    .venv-serve/bin/python benchmarks/serve_throughput.py --only bf16-moe gsq-moe-w3 --label moe

Every configuration runs in a fresh child process (one vLLM engine each) with ``vllm.LLM``:

* ``startup_s``       time to construct the engine (load, repack, profile, KV cache)
* ``prefill_tok_s``   2 prompts x 256 tokens, 1 new token each: prompt tokens / second
* ``decode_tok_s_bs1`` / ``decode_tok_s_bs8``: (tokens of a 128-token greedy run minus those of a
  1-token run) / (time difference), batch 1 and 8; prefix caching off, EOS ignored
  (every timing is the best of ``REPEATS`` runs: the least disturbed one on a shared machine)
* ``weight_bytes``    bytes of the model's parameters and buffers in the worker (dense weights that
  vLLM's CPU GEMM dispatch moved into prepacked oneDNN/SGL handles counted at their dense size)

Checkpoints come from ``scripts/make_checkpoints.py`` (run in ``.venv``, cached under
``.cache/gsq-vllm/checkpoints``). Results: ``benchmarks/results/serve_<device>.json`` and a table.
On CUDA the same script runs GSQ through Marlin (int4 container), the Triton kernels and the
dequantised fallback, and stock vLLM (Humming) with the plugin disabled.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import subprocess
import sys
import time
from pathlib import Path

from gsq_vllm.files import write_json_atomic
from gsq_vllm.machine import cpu_description

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
MAKE_CHECKPOINTS = REPO / "scripts" / "make_checkpoints.py"
QUANTIZE_PYTHON = REPO / ".venv" / "bin" / "python"
NEW_TOKENS = 128
PREFILL_PROMPTS, PREFILL_LEN = 2, 256
CHILD_TIMEOUT_S = 900
REPEATS = 3


# ----------------------------------------------------------------------------------------------
# child: one engine, one configuration
# ----------------------------------------------------------------------------------------------


def _weight_bytes(worker) -> int:
    """Runs inside the vLLM worker (collective_rpc): bytes held by the model's weights."""
    model = worker.get_model() if hasattr(worker, "get_model") else worker.model_runner.model
    seen, total = set(), 0
    for tensor in list(model.parameters()) + list(model.buffers()):
        key = (tensor.data_ptr(), tensor.numel())
        if key not in seen:
            seen.add(key)
            total += tensor.numel() * tensor.element_size()
    for module in model.modules():  # dense weights prepacked into a oneDNN/SGL handle by vLLM
        weight = getattr(module, "weight", None)
        if hasattr(module, "cpu_linear") and weight is not None and weight.numel() == 0:
            # a replicated layer (the MoE router) has no per-partition sizes: its whole shape is the rank's
            rows = getattr(module, "output_size_per_partition", None) or module.output_size
            columns = getattr(module, "input_size_per_partition", None) or module.input_size
            total += rows * columns * weight.element_size()
    return total


def _text_ids(tokenizer, count: int, length: int) -> list[list[int]]:
    from gsq_vllm.data import text_path

    ids = tokenizer(text_path("wiki").read_text()[:200_000]).input_ids
    return [ids[i * length : (i + 1) * length] for i in range(count)]


def run_child(spec: dict) -> dict:
    import torch
    from vllm import LLM, SamplingParams, TokensPrompt

    on_cpu = not torch.cuda.is_available()
    start = time.perf_counter()
    llm = LLM(
        model=spec["path"],
        dtype="bfloat16",
        max_model_len=2048,
        enforce_eager=on_cpu and not spec.get("compile", False),  # CPU rows of this file: eager unless asked
        tensor_parallel_size=spec.get("tensor_parallel_size", 1),
        enable_prefix_caching=False,
        seed=0,
    )
    startup = time.perf_counter() - start
    tokenizer = llm.get_tokenizer()
    new_tokens, repeats = spec.get("new_tokens", NEW_TOKENS), spec.get("repeats", REPEATS)  # larger models: fewer

    def timed(prompts: list[list[int]], max_tokens: int) -> list[float]:
        params = SamplingParams(temperature=0.0, max_tokens=max_tokens, ignore_eos=True)
        times = []
        for _ in range(repeats):
            begin = time.perf_counter()
            outputs = llm.generate([TokensPrompt(prompt_token_ids=p) for p in prompts], params, use_tqdm=False)
            times.append(time.perf_counter() - begin)
            assert all(len(o.outputs[0].token_ids) == max_tokens for o in outputs)
        return times

    def spread(times: list[float]) -> float:
        """(slowest - fastest) / fastest over the repeats: how much the machine disturbed them."""
        return round((max(times) - min(times)) / min(times), 3)

    short = _text_ids(tokenizer, 8, 16)
    timed(short[:1], 8)  # warm-up
    decode, decode_spread = {}, {}
    for batch in (1, 8):
        one, full = timed(short[:batch], 1), timed(short[:batch], new_tokens)
        decode[batch] = batch * (new_tokens - 1) / (min(full) - min(one))
        decode_spread[batch] = spread(full)
    long = _text_ids(tokenizer, PREFILL_PROMPTS, PREFILL_LEN)
    prefill_times = timed(long, 1)
    return {
        "decode_tok_s_bs1": round(decode[1], 2),
        "decode_tok_s_bs8": round(decode[8], 2),
        "prefill_tok_s": round(PREFILL_PROMPTS * PREFILL_LEN / min(prefill_times), 1),
        "spread": {"decode_bs1": decode_spread[1], "decode_bs8": decode_spread[8], "prefill": spread(prefill_times)},
        "weight_bytes": int(sum(llm.collective_rpc(_weight_bytes))),  # every rank's share
        "startup_s": round(startup, 1),
    }


def probe_kernels() -> dict:
    """Which GSQ kernels can run a typical layer of the default model here (and why not)."""
    import torch
    from vllm.model_executor.kernels.linear import MPLinearLayerConfig
    from vllm.platforms import current_platform

    current_platform.import_kernels()
    from gsq_vllm.serving.linear_kernels import ALL_KERNELS, PLATFORM_KERNELS, platform_key
    from gsq_vllm.serving.scheme import GSQ_SCALAR_TYPES

    found = {}
    for bits in (2, 3):
        config = MPLinearLayerConfig((576, 1536), (576, 1536), GSQ_SCALAR_TYPES[bits], torch.bfloat16, 64, False)
        for kernel in ALL_KERNELS:
            ok, reason = kernel.can_implement(config)
            found.setdefault(kernel.name, (ok, reason))
    device = "cpu"
    if torch.cuda.is_available():
        device = re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name(0).lower()).strip("-")
    return {
        "device": device,
        "platform": platform_key(),
        "order": [k.name for k in PLATFORM_KERNELS[platform_key()]],
        "kernels": {name: {"ok": ok, "reason": reason} for name, (ok, reason) in found.items()},
    }


# ----------------------------------------------------------------------------------------------
# parent: configurations, child processes, results
# ----------------------------------------------------------------------------------------------


def checkpoint(kind: str) -> Path:
    from gsq_vllm.data import cache_dir, default_model_dir

    if kind == "bf16":
        return default_model_dir()
    if kind == "bf16-moe":
        from gsq_vllm.data import moe_model_dir

        return moe_model_dir()
    path = cache_dir() / "checkpoints" / kind
    if not (path / "config.json").is_file():
        print(f"making checkpoint {kind} in {QUANTIZE_PYTHON} ...", flush=True)
        subprocess.run([str(QUANTIZE_PYTHON), str(MAKE_CHECKPOINTS), kind, str(path)], cwd=REPO, check=True)
    return path


def configurations(probe: dict) -> list[dict]:
    """(model, kernel, env) triples for this platform."""
    usable = [name for name in probe["order"] if probe["kernels"][name]["ok"]]
    configs = [
        {"model": "bf16", "kernel": "stock (dense bf16)", "env": {}, "default": True},
        {"model": "gptq-w4", "kernel": "stock (vLLM W4A16)", "env": {}, "default": True},
    ]
    for model in ("gsq-w3", "gsq-w2"):
        for name in usable:  # the first usable kernel is the one the plugin picks without any flag
            configs.append({"model": model, "kernel": name, "default": name == usable[0],
                            "env": {} if name == usable[0] else {"GSQ_VLLM_KERNEL": name}})
        if probe["platform"] == "cuda":
            configs.append({"model": model, "kernel": "stock (Humming, plugin off)", "env": {"GSQ_VLLM_DISABLE": "1"}})
    # the mixture-of-experts model derived from the default one (4 experts, top-2), against its own bf16
    configs.append({"model": "bf16-moe", "kernel": "stock (dense bf16 experts)", "env": {}, "default": True})
    moe_kernel = "plugin fused-MoE (cpu-lowbit per expert)" if probe["platform"] != "cuda" else "stock fused-MoE"
    configs.append({"model": "gsq-moe-w3", "kernel": moe_kernel, "env": {}, "default": True, "reference": "bf16-moe"})
    return configs


def run_config(config: dict, log_dir: Path) -> dict:
    """One configuration in a fresh child process; ``config`` may name its checkpoint folder (``path``)
    and a tensor-parallel size, else the checkpoint is made from its model name."""
    log = log_dir / f"{config['model']}-{re.sub(r'[^a-z0-9]+', '-', config['kernel'].lower()).strip('-')}.log"
    result_file = log.with_suffix(".json")
    result_file.unlink(missing_ok=True)
    spec = {"path": str(config.get("path") or checkpoint(config["model"])), "result_file": str(result_file),
            **{key: config[key] for key in ("tensor_parallel_size", "new_tokens", "repeats", "compile") if key in config}}
    env = {
        **os.environ,
        "VLLM_CPU_KVCACHE_SPACE": "2",
        "VLLM_ALLOW_INSECURE_SERIALIZATION": "1",  # lets collective_rpc ship _weight_bytes to the worker
        **config["env"],
    }
    record = {"model": config["model"], "kernel": config["kernel"], "default": config.get("default", False)}
    if "reference" in config:
        record["reference"] = config["reference"]
    try:
        with open(log, "w") as handle:  # vLLM logs to stdout, tracebacks to stderr: both kept
            result = subprocess.run(
                [sys.executable, __file__, "--child", json.dumps(spec)],
                cwd=REPO, env=env, stdout=handle, stderr=subprocess.STDOUT, timeout=CHILD_TIMEOUT_S,
            )
    except subprocess.TimeoutExpired:
        return {**record, "error": f"timed out after {CHILD_TIMEOUT_S} s (log {log})"}
    if result.returncode != 0 or not result_file.is_file():
        return {**record, "error": f"exit {result.returncode}: {_root_cause(log)} (log {log})"}
    return {**record, **json.loads(result_file.read_text())}


def _root_cause(log: Path) -> str:
    """The first exception line of the worker's traceback (not the engine's generic EngineDeadError)."""
    lines = log.read_text(errors="replace").splitlines()
    pattern = re.compile(r"\b(\w+(Error|Exception)): (.*)")
    causes = [m.group(0) for line in lines if (m := pattern.search(line)) and "EngineDeadError" not in line]
    return (causes[0] if causes else (lines[-1] if lines else ""))[:400]


def format_table(results: list[dict]) -> str:
    base = {r["model"]: r for r in results if "error" not in r}
    columns = ["model", "kernel", "decode_tok_s_bs1", "decode_tok_s_bs8", "prefill_tok_s", "weight_bytes", "startup_s"]
    header = columns + ["bs1/bf16", "bs8/bf16", "bs1/gptq", "bs8/gptq"]  # MoE rows: against the bf16 MoE model
    rows = [header]
    for r in results:
        if "error" in r:
            rows.append([r["model"], r["kernel"], "error: " + r["error"][:90]] + [""] * (len(header) - 3))
            continue
        row = [str(r[c]) if c != "weight_bytes" else f"{r[c] / 2**20:.1f} MiB" for c in columns]
        for ref in (r.get("reference", "bf16"), "gptq-w4" if "reference" not in r else None):
            for key in ("decode_tok_s_bs1", "decode_tok_s_bs8"):
                row.append(f"{r[key] / base[ref][key]:.2f}x" if ref in base else "-")
        rows.append(row)
    widths = [max(len(row[i]) for row in rows if i < len(row)) for i in range(len(header))]
    return "\n".join("  ".join(cell.ljust(w) for cell, w in zip(row, widths)) for row in rows)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--probe", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--only", nargs="*", help="model[:kernel] filters, e.g. bf16 gsq-w2:torch-int4")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--label", default="", help="results file serve_<device>_<label>.json (a partial run "
                        "beside the full one)")
    parser.add_argument("--note", default="", help="free text stored with the results (e.g. machine load)")
    parser.add_argument("--from-log", type=Path, help="write the results file from the records a run printed "
                        "(a run whose final write failed), instead of running")
    args = parser.parse_args(argv)
    if args.child:
        spec = json.loads(args.child)
        Path(spec["result_file"]).write_text(json.dumps(run_child(spec)))
        return 0
    if args.probe:
        print("PROBE " + json.dumps(probe_kernels()), flush=True)
        return 0

    probe_run = subprocess.run([sys.executable, __file__, "--probe"], cwd=REPO, capture_output=True, text=True, timeout=300)
    probe_lines = [line for line in probe_run.stdout.splitlines() if line.startswith("PROBE ")]
    if not probe_lines:
        raise SystemExit(f"kernel probe failed:\n{probe_run.stderr[-3000:]}")
    probe = json.loads(probe_lines[-1][len("PROBE ") :])
    if args.from_log:
        printed = [line.strip() for line in args.from_log.read_text().splitlines() if line.startswith("   {")]
        results = [json.loads(line) for line in printed]
        note = f"{args.note} (records taken from the printed log of that run)".strip()
        return write_results(args.out, probe, results, note, None, args.label)
    configs = configurations(probe)
    if args.only:
        keep = lambda c: any(  # noqa: E731
            f == c["model"] or f == f"{c['model']}:{c['kernel']}" for f in args.only
        )
        configs = [c for c in configs if keep(c)]
    from gsq_vllm.data import cache_dir

    log_dir = cache_dir() / "serve-bench-logs"  # one engine log per configuration
    log_dir.mkdir(parents=True, exist_ok=True)
    results = []
    began = time.perf_counter()
    for config in configs:
        print(f"== {config['model']} / {config['kernel']}", flush=True)
        record = run_config(config, log_dir)
        print("   " + json.dumps(record), flush=True)
        results.append(record)
    return write_results(args.out, probe, results, args.note, round(time.perf_counter() - began, 1), args.label)


def write_results(folder: Path, probe: dict, results: list[dict], note: str, wall_s: float | None,
                  label: str = "") -> int:
    out = folder / f"serve_{probe['device']}{f'_{label}' if label else ''}.json"
    payload = {
        "device": probe["device"],
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_description(),
        "settings": {
            "dtype": "bfloat16",
            "max_model_len": 2048,
            "enforce_eager": probe["device"] == "cpu",
            "new_tokens": NEW_TOKENS,
            "prefill": f"{PREFILL_PROMPTS} x {PREFILL_LEN} tokens",
            "timing": f"best of {REPEATS} runs (spread: (slowest - fastest) / fastest)",
            "prefix_caching": False,
        },
        "kernels": probe["kernels"],
        "note": note,
        "wall_s": wall_s,
        "results": results,
    }
    folder.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, payload)
    print(format_table(results))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
