"""Serving at Llama-3.2-1B and Llama-3.1-8B shapes on the CPU: vLLM against llama.cpp, one run.

    .venv-serve/bin/python benchmarks/serve_shapes.py --shapes 1b
    .venv-serve/bin/python benchmarks/serve_shapes.py --shapes 1b 8b

The weights are random (``benchmarks/random_llama.py``): the speed of a checkpoint does not depend
on its values, so these figures hold for the real models of these shapes; their text means nothing.
Rows, each in a fresh child process:

* vLLM (``benchmarks/serve_throughput.py``'s child: decode tok/s at batch 1 and 8, prefill tok/s,
  the weight bytes the worker holds): bf16; W4A16 group 128 (the format GPTQ writes, stock vLLM
  kernel); GSQ W3 and W2 group 128 through the plugin's default CPU kernel; each of the three
  quantized kinds again with a 4-bit group-128 output head (``-h4``: the head is the largest single
  read of a small model's decode step, 501 of the 763 MiB a 1B W2 step reads with a bf16 head;
  llama.cpp's K-quants keep it at 6 bits); GSQ W2 with ``--tensor-parallel-size 2`` on the 1B
  shape (one core per rank). torch.compile on, as
  ``vllm serve`` runs on the CPU by default (``serve_throughput.py``'s own rows run eager), and
  every core computing (``VLLM_CPU_OMP_THREADS_BIND``, see :func:`threads_binding`).
* llama.cpp through llama-cpp-python (``scripts/setup.sh --llama-cpp`` builds it for this CPU into
  ``.venv-llamacpp``): GGUF F16, Q4_0, Q3_K_S, Q2_K written from the same bf16 safetensors by
  llama.cpp's own ``convert_hf_to_gguf.py`` and quantizer. Batch 1 decode and prefill only: its
  Python API decodes one sequence at a time.

Beside each row, the memory-bandwidth bound of batch-1 decode: the bytes one decode step must read
(every weight but an untied input embedding, of which a step reads one row) over this machine's
read bandwidth (a 2 GiB reduction in torch on every core, best of 5). Results:
``benchmarks/results/serve_shapes_<device>.json``; the README's table is generated from it.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

from gsq_vllm.files import write_json_atomic
from gsq_vllm.machine import cpu_description

sys.path.insert(0, str(Path(__file__).resolve().parent))
import random_llama  # noqa: E402
import serve_throughput  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
RESULTS = REPO / "benchmarks" / "results"
LLAMA_PYTHON = REPO / ".venv-llamacpp" / "bin" / "python"
LLAMA_CHILD = Path(__file__).resolve().parent / "llama_cpp_child.py"
#: llama.cpp's own names of the GGUF types compared, and the llama_ftype enum value of each
GGUF_TYPES = {"f16": 1, "q4_0": 2, "q3_k_s": 11, "q2_k": 10}
VLLM_KINDS = ("bf16", "gptq-w4", "gsq-w3", "gsq-w2", "gptq-w4-h4", "gsq-w3-h4", "gsq-w2-h4")
LLAMA_CHILD_TIMEOUT_S = 1800
VLLM_SETTINGS = ("torch.compile on (vLLM's CPU default: no --enforce-eager), bf16, every core computing "
                 "(VLLM_CPU_OMP_THREADS_BIND, as llama.cpp's threads)")
#: tokens per decode run and repeats per timing: an 8B bf16 step takes about a second on 2 cores
BUDGET = {"1b": {"new_tokens": 64, "repeats": 3}, "8b": {"new_tokens": 16, "repeats": 2}}


# ----------------------------------------------------------------------------------------------
# parent
# ----------------------------------------------------------------------------------------------


def measure_bandwidth() -> float:
    """Read bandwidth in bytes/s: a 2 GiB float32 sum on every core, best of 5."""
    import torch

    data = torch.ones(1 << 29, dtype=torch.float32)
    best = float("inf")
    for _ in range(6):
        begin = time.perf_counter()
        data.sum()
        best = min(best, time.perf_counter() - begin)
    return data.numel() * 4 / best


def shape_dir(shape: str) -> Path:
    from gsq_vllm.data import cache_dir

    return cache_dir() / "shapes" / shape


def vllm_checkpoint(shape: str, kind: str) -> Path:
    from gsq_vllm.data import default_model_dir

    path = shape_dir(shape) / kind
    if not (path / "config.json").is_file():
        print(f"writing random {shape} {kind} checkpoint ...", flush=True)
        random_llama.write_random_llama(shape, kind, path, default_model_dir())
    return path


def gguf_file(shape: str, gguf_type: str, convert_script: Path) -> Path:
    """The GGUF of the random bf16 checkpoint: F16 by llama.cpp's converter, the rest quantized from it."""
    folder = shape_dir(shape) / "gguf"
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{shape}-{gguf_type}.gguf"
    if path.is_file():
        return path
    tmp = path.with_suffix(".part")
    if gguf_type == "f16":
        source = vllm_checkpoint(shape, "bf16")
        print(f"converting {source} to GGUF F16 ...", flush=True)
        subprocess.run([str(LLAMA_PYTHON), str(convert_script), str(source), "--outtype", "f16", "--outfile", str(tmp)],
                       check=True)
    else:
        source = gguf_file(shape, "f16", convert_script)
        print(f"quantizing {source.name} to {gguf_type} ...", flush=True)
        code = ("import sys, llama_cpp as l; p = l.llama_model_quantize_default_params(); p.ftype = int(sys.argv[3]); "
                "sys.exit(l.llama_model_quantize(sys.argv[1].encode(), sys.argv[2].encode(), p))")
        subprocess.run([str(LLAMA_PYTHON), "-c", code, str(source), str(tmp), str(GGUF_TYPES[gguf_type])], check=True)
    tmp.replace(path)
    return path


def _text_ids(count: int, length: int) -> list[list[int]]:
    """The prompts the vLLM child uses (the default model's tokenizer on the Wikipedia text)."""
    from transformers import AutoTokenizer

    from gsq_vllm.data import default_model_dir

    return serve_throughput._text_ids(AutoTokenizer.from_pretrained(str(default_model_dir())), count, length)


# the signals llama.cpp's AMX repacking has died with here (return codes of a killed child)
LAYOUT_DEATHS = {-signal.SIGILL: "SIGILL", -signal.SIGSEGV: "SIGSEGV"}


def run_llama(shape: str, gguf_type: str, convert_script: Path, log_dir: Path) -> dict:
    record = {"engine": "llama.cpp", "shape": shape, "model": f"{shape}-{gguf_type}", "kernel": f"llama.cpp {gguf_type.upper()}",
              "format": gguf_type}
    try:
        path = gguf_file(shape, gguf_type, convert_script)
    except (subprocess.CalledProcessError, OSError) as error:
        return {**record, "error": f"GGUF not written: {error}"}
    spec = {"path": str(path), **BUDGET[shape], "short": _text_ids(1, 16)[0],
            "long": _text_ids(serve_throughput.PREFILL_PROMPTS, serve_throughput.PREFILL_LEN)}
    log = log_dir / f"{record['model']}-llama-cpp.log"
    # llama.cpp first as it runs by default; where its extra weight layouts kill it (its AMX repacking
    # of Q4_0 and Q2_K dies with SIGILL or SIGSEGV on this project's AMX virtual machines), again
    # without them, and said so
    first_death = ""
    for extra_buffers in (True, False):
        with open(log, "w") as handle:
            try:
                result = subprocess.run([str(LLAMA_PYTHON), str(LLAMA_CHILD), json.dumps({**spec, "extra_buffers": extra_buffers})],
                                        cwd=REPO, stdout=subprocess.PIPE, stderr=handle, text=True,
                                        timeout=LLAMA_CHILD_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                return {**record, "error": f"timed out after {LLAMA_CHILD_TIMEOUT_S} s (log {log})"}
        lines = [line for line in result.stdout.splitlines() if line.startswith("RESULT ")]
        if result.returncode == 0 and lines:
            extra = {} if extra_buffers else {"note": f"died with {first_death} using llama.cpp's extra weight "
                                                      "layouts (AMX / repacked); measured without them"}
            return {**record, **json.loads(lines[-1][len("RESULT "):]), "extra_buffers": extra_buffers, **extra}
        if result.returncode not in LAYOUT_DEATHS:  # not how its repacking dies: no second try
            break
        first_death = LAYOUT_DEATHS[result.returncode]
    return {**record, "error": f"exit {result.returncode} (log {log})"}


def threads_binding(ranks: int, cores: int | None = None) -> str:
    """VLLM_CPU_OMP_THREADS_BIND giving ``ranks`` ranks equal shares of every core ("0-1" for one rank
    on 2 cores, "0|1" for two). Set for every row: vLLM's default ("auto") keeps one core of a small
    machine for its scheduler, so one worker would compute on 1 of 2 cores while llama.cpp uses both."""
    cores = cores or os.cpu_count() or 2
    span = lambda first, last: str(first) if first == last else f"{first}-{last}"  # noqa: E731
    bounds = [round(i * cores / ranks) for i in range(ranks + 1)]
    return "|".join(span(bounds[i], max(bounds[i], bounds[i + 1] - 1)) for i in range(ranks))


def vllm_configs(shape: str, tensor_parallel: bool) -> list[dict]:
    configs = []
    for kind in VLLM_KINDS:
        kernel = "stock (dense bf16)" if kind == "bf16" else "stock (vLLM W4A16)" if kind.startswith("gptq") else "plugin default"
        kernel += ", 4-bit head" if random_llama.KINDS[kind].head_bits else ""
        configs.append({"engine": "vLLM", "shape": shape, "model": f"{shape}-{kind}", "kernel": kernel, "format": kind,
                        "env": {"VLLM_CPU_OMP_THREADS_BIND": threads_binding(1)}, "compile": True, **BUDGET[shape]})
    if tensor_parallel:
        configs.append({"engine": "vLLM", "shape": shape, "model": f"{shape}-gsq-w2", "format": "gsq-w2",
                        "kernel": "plugin default, tensor parallel 2", "tensor_parallel_size": 2,
                        "env": {"VLLM_CPU_OMP_THREADS_BIND": threads_binding(2)}, "compile": True, **BUDGET[shape]})
    return configs


def vllm_read_bytes(shape: str, kind: str, weight_bytes: int) -> int:
    """Bytes a decode step reads of what the worker holds: all but an untied bf16 input embedding."""
    dims = random_llama.MODEL_SHAPES[shape]
    return weight_bytes - (0 if random_llama.ties_embeddings(dims, kind) else dims["vocab"] * dims["hidden"] * 2)


def add_bounds(record: dict, bandwidth: float) -> dict:
    if "error" in record or "read_bytes" not in record:
        return record
    bound = bandwidth / record["read_bytes"]
    return {**record, "bound_tok_s": round(bound, 2), "of_bound_bs1": round(record["decode_tok_s_bs1"] / bound, 3)}


def vllm_rows(shape: str, configs: list[dict], log_dir: Path, bandwidth: float, delete_after: bool = False) -> list[dict]:
    rows = []
    for index, config in enumerate(configs):
        print(f"== {config['model']} / {config['kernel']}", flush=True)
        config["path"] = str(vllm_checkpoint(shape, config["format"]))
        record = serve_throughput.run_config(config, log_dir)
        record = {**record, "engine": "vLLM", "shape": shape, "format": config["format"],
                  "tensor_parallel_size": config.get("tensor_parallel_size", 1),
                  "omp_threads_bind": config["env"]["VLLM_CPU_OMP_THREADS_BIND"], "torch_compile": config["compile"]}
        if "error" not in record:
            record["read_bytes"] = vllm_read_bytes(shape, config["format"], record["weight_bytes"])
        rows.append(add_bounds(record, bandwidth))
        print("   " + json.dumps(rows[-1]), flush=True)
        if delete_after and all(later["format"] != config["format"] for later in configs[index + 1:]):
            shutil.rmtree(config["path"], ignore_errors=True)
    return rows


def llama_rows(shape: str, gguf_types: list[str], convert_script: Path, log_dir: Path, bandwidth: float,
               ready: bool, delete_after: bool = False) -> list[dict]:
    rows = []
    for gguf_type in gguf_types:
        print(f"== {shape} llama.cpp {gguf_type}", flush=True)
        if not ready:
            rows.append({"engine": "llama.cpp", "shape": shape, "model": f"{shape}-{gguf_type}", "format": gguf_type,
                         "kernel": f"llama.cpp {gguf_type.upper()}",
                         "error": f"llama.cpp not installed ({LLAMA_PYTHON}): run scripts/setup.sh --llama-cpp"})
            continue
        rows.append(add_bounds(run_llama(shape, gguf_type, convert_script, log_dir), bandwidth))
        print("   " + json.dumps(rows[-1]), flush=True)
        if delete_after and gguf_type != "f16":  # F16 is the quantizers' input: main() deletes it last
            (shape_dir(shape) / "gguf" / f"{shape}-{gguf_type}.gguf").unlink(missing_ok=True)
    return rows


def merge_runs(previous: dict, shapes: list[str], results: list[dict], run: dict) -> dict:
    """The results file after a run of ``shapes``: their rows replaced, other shapes' rows kept with
    the run (machine, bandwidth, note) that measured them, so 1B and 8B can be measured in two sittings."""
    runs = {shape: kept for shape, kept in previous.get("runs", {}).items() if shape not in shapes}
    runs.update({shape: {**run, "budget": BUDGET[shape]} for shape in shapes})
    kept = [r for r in previous.get("results", []) if r["shape"] not in shapes]
    return {
        "device": "cpu",
        "weights": "random (benchmarks/random_llama.py): speed only, no accuracy",
        "shapes": {shape: random_llama.MODEL_SHAPES[shape] for shape in runs},
        "settings": {"prefill": f"{serve_throughput.PREFILL_PROMPTS} x {serve_throughput.PREFILL_LEN} tokens",
                     "group_size": random_llama.GROUP_SIZE, "vllm": VLLM_SETTINGS},
        "runs": runs,
        "results": kept + results,
    }


def format_table(results: list[dict]) -> str:
    lines = ["shape engine     format        kernel                               bs1 tok/s  bs8 tok/s  prefill  "
             "read MiB  bound tok/s  of bound"]
    for r in results:
        if "error" in r:
            lines.append(f"{r['shape']:5} {r['engine']:10} {r['format']:13} {r['kernel']:36} error: {r['error'][:100]}")
            continue
        lines.append(f"{r['shape']:5} {r['engine']:10} {r['format']:13} {r['kernel']:36} {r['decode_tok_s_bs1']:9.2f}  "
                     f"{r.get('decode_tok_s_bs8', float('nan')):9.2f}  {r['prefill_tok_s']:7.1f}  "
                     f"{r['read_bytes'] / 2**20:8.0f}  {r['bound_tok_s']:11.2f}  {r['of_bound_bs1']:8.2f}")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", nargs="+", default=["1b"], choices=list(BUDGET))
    parser.add_argument("--skip", nargs="*", default=[], help="row formats to leave out, e.g. bf16 f16 (8B bf16 may "
                        "not fit in memory)")
    parser.add_argument("--convert-script", type=Path, default=REPO / ".venv-llamacpp" / "llama.cpp" / "convert_hf_to_gguf.py",
                        help="llama.cpp's converter (setup.sh --llama-cpp puts it here)")
    parser.add_argument("--delete-after", action="store_true", help="delete each checkpoint and GGUF once its rows are "
                        "measured (every 8B file together is ~54 GB; one at a time peaks near 21 GB: the F16 GGUF and one quantized from it)")
    parser.add_argument("--out", type=Path, default=RESULTS)
    parser.add_argument("--note", default="", help="free text stored with the results")
    args = parser.parse_args(argv)
    from gsq_vllm.data import cache_dir

    log_dir = cache_dir() / "serve-bench-logs"
    log_dir.mkdir(parents=True, exist_ok=True)
    bandwidth = measure_bandwidth()
    print(f"read bandwidth: {bandwidth / 1e9:.1f} GB/s", flush=True)
    llama_ready = LLAMA_PYTHON.is_file() and args.convert_script.is_file()
    results, began = [], time.perf_counter()
    for shape in args.shapes:
        # llama.cpp first: where the F16 row is skipped, its GGUF (the quantizer's input, 2 bytes a
        # weight) goes before vLLM's checkpoints are written: an 8B run peaks at ~41 GB of disk, not ~55
        llama = llama_rows(shape, [t for t in GGUF_TYPES if t not in args.skip], args.convert_script, log_dir,
                           bandwidth, llama_ready, args.delete_after)
        if "f16" in args.skip or args.delete_after:
            (shape_dir(shape) / "gguf" / f"{shape}-f16.gguf").unlink(missing_ok=True)
        results += vllm_rows(shape, [c for c in vllm_configs(shape, shape == "1b") if c["format"] not in args.skip],
                             log_dir, bandwidth, args.delete_after) + llama
    out = args.out / "serve_shapes_cpu.json"
    payload = merge_runs(json.loads(out.read_text()) if out.exists() else {}, args.shapes, results, {
        "machine": f"{platform.machine()}, {os.cpu_count()} CPUs",
        "cpu": cpu_description(),
        "read_bandwidth_gb_s": round(bandwidth / 1e9, 2),
        "command": "benchmarks/serve_shapes.py --shapes " + " ".join(args.shapes + (["--skip", *args.skip] if args.skip else [])
                                                                     + (["--delete-after"] if args.delete_after else [])),
        "note": args.note,
        "wall_s": round(time.perf_counter() - began, 1),
    })
    write_json_atomic(out, payload)
    print(format_table(results))
    print(f"written {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
