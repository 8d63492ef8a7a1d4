"""Write the README's results tables from the committed results files (never by hand).

Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers in README.md and is
rendered from one results file:

* ``accuracy-table``, ``ablation-table``: benchmarks/results/accuracy_smollm2.json
* ``serve-table``: benchmarks/results/serve_cpu.json
* ``moe-accuracy-table``: benchmarks/results/accuracy_smollm2_moe.json
* ``moe-serve-table``: benchmarks/results/serve_cpu_moe.json
* ``shapes-serve-table``: benchmarks/results/serve_shapes_cpu.json
* ``serve-load-table``: benchmarks/results/serve_load_cpu.json
* ``layer-cost-table``: benchmarks/results/layer_cost_cpu.json
* ``head-quantization-table``: benchmarks/results/head_quantization.json

    python benchmarks/readme_tables.py            # rewrite README.md
    python benchmarks/readme_tables.py --check    # exit 1 if README.md is not what the files say

tests/test_readme_tables.py runs the check, so a table edited by hand or left stale fails CI.
"""

from __future__ import annotations

import argparse
import json
import re
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
README = ROOT / "README.md"


def _num(value, digits: int = 2) -> str:
    if value is None:
        return "-"
    if abs(value) >= 1000:
        return f"{value:.0f}"
    return f"{value:.{digits}f}"


def _ratio(record: dict, key: str) -> str:
    value = record.get(key)
    return "-" if value is None else f"{value:.2f}"


def autoround_peer(rows: list[dict], bits) -> str | None:
    """The AutoRound row a width's GSQ is measured against: the lowest wiki CE among that width's AutoRound rows."""
    candidates = [r for r in rows if r["method"] == "autoround" and r["bits"] == bits]
    return min(candidates, key=lambda r: r["ce"])["name"] if candidates else None


def _ppl(row: dict, suffix: str = "") -> str:
    """A row's perplexity; over several seeds their mean, +- half the range of the seeds' values."""
    text = _num(row[f"ppl{suffix}"])
    seeds = row.get("seeds")
    if seeds and len(seeds) > 1:
        values = [seed[f"ppl{suffix}"] for seed in seeds.values()]
        text += f" ±{_num((max(values) - min(values)) / 2)} ({len(values)} seeds)"
    return text


def accuracy_tables(payload: dict, moe: bool = False) -> dict[str, str]:
    """The accuracy and ablation tables of the dense model's results, or the MoE model's accuracy table."""
    rows = payload["results"]
    suffix = "-moe" if moe else ""
    settings = payload["settings"]
    calibration = settings["calibration"]
    head = (f"Measured with `.venv/bin/python benchmarks/accuracy.py{' --model moe' if moe else ''}` on {_machines(rows, payload.get('cpu', {}))}. "
            f"Calibration: {calibration['samples']} x "
            f"{calibration['seq_len']} tokens {'spread over' if calibration.get('spread') else 'from the start of'} "
            f"the Wikipedia calibration text, the same for every method; wiki = last "
            f"{settings['evaluation']['wiki']['windows']} x 2048 tokens of held-out Wikipedia articles, news = last "
            f"{settings['evaluation']['news']['windows']} x 2048 tokens of the Lee newswire corpus (never calibrated on). "
            "Gap = CE(method) - CE(full precision); a ratio below 1 means a smaller gap than that peer's. "
            + ("Quantized by every method: every Linear layer but lm_head and the router, symmetric int, group 64 "
               "(2-bit rows: experts 2-bit, attention 4-bit).\n\n" if moe else
               "All Linear layers but lm_head quantized by every method, symmetric int, group 64.\n\n"))
    peers = {bits: autoround_peer(rows, bits) for bits in sorted({r["bits"] for r in rows}, key=str)}
    columns = ("| row | method | bits | wiki ppl | news ppl | EAR | gap / GPTQ (wiki, news) "
               "| gap / GPTQ-MSE (wiki, news) | gap / AutoRound (wiki, news) | quant s | peak MB |")
    lines = [columns, "|" + "---|" * (columns.count("|") - 1)]
    for r in rows:
        if r["ablation"]:
            continue
        bits = r["bits"]
        ratios = [f"{_ratio(r, f'gap_over_{peer}')}, {_ratio(r, f'gap_news_over_{peer}')}"
                  for peer in (f"gptq{bits}{suffix}", f"gptq{bits}{suffix}-mse", peers.get(bits))]
        lines.append("| " + " | ".join([
            f"**{r['name']}**" if r["method"] == "gsq" else r["name"], r["label"], str(bits), _ppl(r),
            _ppl(r, "_news"), f"{r['ear']:.3f}", *ratios, f"{r['quant_seconds']:.0f}",
            "-" if r.get("peak_mem_mb") is None else f"{r['peak_mem_mb']:.0f}"]) + " |")
    named = [f"{bits}-bit: {peer}" for bits, peer in peers.items() if peer]
    if named:
        lines.append("")
        lines.append("AutoRound column: each width's gap over its strongest AutoRound row in the file ("
                     + "; ".join(named) + ").")
    times = payload.get("time_ratios", {})
    if times:
        lines.append("")
        lines.append("Quantization time ratios (wall time on the same machine; not every row ran alone, see each record's `threads` and `provenance`): " + ", ".join(
            f"{key.replace('/', ' / ')} = {value:.2f}" for key, value in sorted(times.items())) + ".")
    ablations = [r for r in rows if r["ablation"]]
    ablation_lines = ["| row | what changes (3-bit) | wiki ppl | news ppl | CE gap (wiki, news) | EAR | quant s |",
                      "|---|---|---|---|---|---|---|"]
    for r in ablations:
        gaps = f"{r['gap']:.3f}, {r['gap_news']:.3f}" if "gap" in r else "-"
        ablation_lines.append(f"| {r['name']} | {r['label']} | {_ppl(r)} | {_ppl(r, '_news')} | {gaps} "
                              f"| {r['ear']:.3f} | {r['quant_seconds']:.0f} |")
    if moe:
        return {"moe-accuracy-table": head + "\n".join(lines)}
    return {"accuracy-table": head + "\n".join(lines),
            "ablation-table": "\n".join(ablation_lines) if ablations else "(no ablation rows in the results file)"}


def _machine(cpu: dict) -> str:
    return (f"{cpu.get('model', 'a CPU')} ({cpu.get('cores', '?')} cores; "
            f"{'AVX-512' if 'avx512f' in cpu.get('flags', []) else 'AVX2'}{', AMX' if 'amx_tile' in cpu.get('flags', []) else ''})")


def _machines(rows: list[dict], default: dict) -> str:
    """The machine of every row (rows computed on different machines are named with theirs: their
    seconds compare only within one machine)."""
    groups: dict[str, list[str]] = {}
    for r in rows:
        groups.setdefault(_machine(r.get("cpu") or default), []).append(r["name"])
    if len(groups) == 1:
        return next(iter(groups))
    return "; ".join(f"{machine} for {', '.join(names)}" for machine, names in groups.items()) + \
        " (quantization seconds compare only between rows of one machine)"


def _cpu_line(payload: dict) -> str:
    cpu = payload.get("cpu")
    if not cpu:
        return "CPU not recorded"
    flags = ", ".join(f for f in cpu.get("flags", []) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores; {flags}"


def serve_table(payload: dict, options: str = "") -> str:
    head = "| model | kernel | decode tok/s, batch 1 | decode tok/s, batch 8 | prefill tok/s | weights | start-up |"
    lines = [f"One run of `.venv-serve/bin/python benchmarks/serve_throughput.py{options}` ({payload.get('machine', '')}; "
             f"{_cpu_line(payload)}; {payload.get('note', '')}). **bold**: what the plugin picks without any flag.",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in payload["results"]:
        kernel = f"**{r['kernel']}**" if r.get("default") and r["model"].startswith("gsq") else r["kernel"]
        if "error" in r:
            lines.append(f"| {r['model']} | {kernel} | fails: {r['error'].split(' (log')[0]} | | | | |")
            continue
        lines.append(f"| {r['model']} | {kernel} | {r['decode_tok_s_bs1']:.2f} | {r['decode_tok_s_bs8']:.2f} "
                     f"| {r['prefill_tok_s']:.1f} | {r['weight_bytes'] / 2**20:.1f} MiB | {r['startup_s']:.1f} s |")
    return "\n".join(lines)


def shapes_serve_table(payload: dict) -> str:
    """vLLM and llama.cpp at 1B-8B shapes, each row beside its memory-bandwidth bound, then the ratios
    the serving issue asks for."""
    head = ("| shape | engine | format | decode tok/s, batch 1 | batch 8 | prefill tok/s | bytes read per token "
            "| bound tok/s | of bound |")
    lines = [f"{shape.upper()} rows: one run of `.venv-serve/bin/python {run['command']}` ({run['machine']}; "
             f"{_cpu_line(run)}; read bandwidth {run['read_bandwidth_gb_s']} GB/s; {run['wall_s'] / 60:.0f} min"
             f"{'; ' + run['note'] if run.get('note') else ''})." for shape, run in payload["runs"].items()]
    vllm = payload["settings"].get("vllm")
    lines = [" ".join(lines) + f" Weights: {payload['weights']}." + (f" vLLM: {vllm}." if vllm else ""), "", head,
             "|" + "---|" * (head.count("|") - 1)]
    rows: dict[tuple[str, str, str], dict] = {}
    for r in payload["results"]:
        name = r["format"] + (f", TP {r['tensor_parallel_size']}" if r.get("tensor_parallel_size", 1) > 1 else "")
        label = name + (" (†)" if r.get("extra_buffers") is False else "")
        if "error" in r:
            lines.append(f"| {r['shape']} | {r['engine']} | {label} | fails: {r['error'].split(' (log')[0][:120]} | | | | | |")
            continue
        rows[(r["shape"], r["engine"], name)] = r
        lines.append(f"| {r['shape']} | {r['engine']} | {label} | {r['decode_tok_s_bs1']:.2f} "
                     f"| {_num(r.get('decode_tok_s_bs8'))} | {r['prefill_tok_s']:.1f} | {r['read_bytes'] / 2**20:.0f} MiB "
                     f"| {r['bound_tok_s']:.2f} | {100 * r['of_bound_bs1']:.0f}% |")
    ratios = []
    pairs = (("GSQ W2 / bf16", ("vLLM", "gsq-w2"), ("vLLM", "bf16")), ("GSQ W2 / W4A16", ("vLLM", "gsq-w2"), ("vLLM", "gptq-w4")),
             ("GSQ W3 / W4A16", ("vLLM", "gsq-w3"), ("vLLM", "gptq-w4")),
             ("GSQ W2 / llama.cpp Q2_K", ("vLLM", "gsq-w2"), ("llama.cpp", "q2_k")),
             ("GSQ W3 / llama.cpp Q3_K_S", ("vLLM", "gsq-w3"), ("llama.cpp", "q3_k_s")),
             # a 4-bit head on both sides (llama.cpp's K-quants quantize theirs too)
             ("GSQ W2-h4 / bf16", ("vLLM", "gsq-w2-h4"), ("vLLM", "bf16")),
             ("GSQ W2-h4 / W4A16-h4", ("vLLM", "gsq-w2-h4"), ("vLLM", "gptq-w4-h4")),
             ("GSQ W3-h4 / W4A16-h4", ("vLLM", "gsq-w3-h4"), ("vLLM", "gptq-w4-h4")),
             ("GSQ W2-h4 / llama.cpp Q2_K", ("vLLM", "gsq-w2-h4"), ("llama.cpp", "q2_k")),
             ("GSQ W3-h4 / llama.cpp Q3_K_S", ("vLLM", "gsq-w3-h4"), ("llama.cpp", "q3_k_s")))
    for shape in payload["shapes"]:
        found = [f"{name} {rows[(shape, *a)]['decode_tok_s_bs1'] / rows[(shape, *b)]['decode_tok_s_bs1']:.2f}x"
                 for name, a, b in pairs if (shape, *a) in rows and (shape, *b) in rows]
        if found:
            ratios.append(f"{shape}: " + ", ".join(found))
    if ratios:
        lines += ["", "Decode at batch 1, ratios: " + "; ".join(ratios) + "."]
    deaths = sorted({re.search(r"died with (\w+)", r.get("note", "")).group(1) if "died with" in r.get("note", "") else "a signal"
                     for r in payload["results"] if r.get("extra_buffers") is False})
    if deaths:
        lines += ["", f"(†) llama.cpp died ({' / '.join(deaths)}) in its default weight layouts for this format (its AMX "
                      "repacking) on this machine, so the row runs without its extra layouts (AMX and repacked)."]
    return "\n".join(lines)


def serve_load_table(payload: dict) -> str:
    head = ("| model | kernel | requests at once | failed valid | lost | invalid refused (4xx) | healthy after "
            "| p50 s | p99 s | requests/s | answer tok/s | greedy under load = alone |")
    lines = [f"One run of `.venv-serve/bin/python benchmarks/serve_load.py` ({_cpu_line(payload)})"
             f"{'; ' + payload['note'] if payload.get('note') else ''}.",
             "", head, "|" + "---|" * (head.count("|") - 1)]
    for r in payload["results"]:
        ties = [d["margin"] for d in r.get("greedy_differences", []) if d.get("margin") is not None]
        why = f" (the rest at near-ties: top-2 margin <= {max(ties):.3f} nats)" if ties else ""
        lines.append(f"| {r['name']} ({r['model']}) | {r['kernel']} | {r['concurrency']} | {r['failed_valid']} "
                     f"| {r['lost']} | {r['invalid_rejected_4xx']}/{r['invalid']} | {'yes' if r['healthy_after'] else 'NO'} "
                     f"| {r['p50_s']} | {r['p99_s']} | {r['requests_s']} | {r['tok_s']} | {r['greedy_equal']}/{r['greedy_compared']}{why} |")
    return "\n".join(lines)


def layer_cost_table(payload: dict) -> str:
    """Seconds and peak memory per decoder layer at Llama-3.1 shapes, measured vs projected."""
    calibration = payload["calibration"]
    budgets = payload["budgets_measured"]
    lines = [f"`{payload.get('command', 'python benchmarks/layer_cost.py')}` on {payload.get('device', 'cpu')} "
             f"({_cpu_line(payload)}; {payload.get('torch_threads', '?')} torch threads; other jobs were running "
             "beside it, see each run's load averages in the file). One decoder layer, **random weights** (cost does "
             f"not depend on the values); calibration measured at {calibration['measured']} and projected to "
             f"{calibration['projected_to']} tokens; GSQ measured at {' and '.join(map(str, budgets['gsq_steps']))} "
             f"steps, AutoRound at {' and '.join(map(str, budgets['autoround_iters']))} iterations, both projected "
             "to their recipe's budget (GSQ 100 steps, AutoRound 200 iterations) with time = fixed + per_step x steps, "
             "per_step from the optimizer's step times inside the run.",
             "", "| shape | method | measured runs (s) | s per layer at the recipe's budget | how | peak memory MB |",
             "|---|---|---|---|---|---|"]
    unit = {"gsq": "steps", "autoround": "iters"}
    for shape, entry in payload["shapes"].items():
        for method, record in entry["methods"].items():
            runs = [r for r in record.get("runs", []) if "seconds" in r]
            measured = ", ".join(f"{r['budget']} {unit[method]}: {r['seconds']:.0f}" if r.get("budget") is not None
                                 else f"{r['seconds']:.0f}" for r in runs) or "-"
            name = method + (" (attention sub-block)" if record.get("block") == "attention" and runs else "")
            if "projection" in record:
                p = record["projection"]
                how = ("measured, token-proportional part x " + f"{p['calibration_scale']:g}" if method == "gptq" else
                       f"projected from {' and '.join(str(r['budget']) for r in runs)} {unit[method]} measured "
                       f"({p['per_step_seconds']:.1f} s per {unit[method][:-1]})")
                if record.get("block") == "attention":
                    how += f"; x {p['parameter_ratio']:.2f} (layer / attention parameters)"
                memory = (f"{record['measured_peak_rss_mb']:.0f} measured at {calibration['sequences']} x 512; "
                          f"{record['projected_peak_rss_mb_full']:.0f} at 128 x 512 (estimated)")
                seconds = f"{p['seconds']:.0f}"
            elif "projection_from_other_shape" in record:
                p = record["projection_from_other_shape"]
                seconds = f"{p['seconds']:.0f}"
                how = f"not run: projected from the {p['from']} shape's parts (work ratios in the file)"
                memory = f"{record['projected_peak_rss_mb_full']:.0f}: does not fit in this machine's memory (estimated)"
            else:
                seconds, how, memory = "-", record.get("skipped", "not run"), "-"
            lines.append(f"| {shape} | {name} | {measured} | {seconds} | {how} | {memory} |")
    for shape, e2e in payload.get("end_to_end", {}).items():
        trained = e2e.get("head_fwd_bwd_s_with_head_gradient")
        lines += ["", f"End-to-end stage (`GSQEndToEndModifier`) at {shape} shape: **{e2e['seconds_per_step']:.0f} s per "
                      f"step** on this CPU = {e2e['formula']}; {e2e['recipe_steps']} steps = {e2e['seconds_recipe']:.0f} s"
                      + (f" (the head's {e2e['head_fwd_bwd_s']:.0f} s with its weight frozen, as the stage runs it; "
                         f"{trained:.0f} s if it took a gradient)" if trained is not None else "")
                      + f". Its memory for the whole model, estimated from a formula (not run): "
                        f"{e2e['memory_estimate_total_mb'] / 1024:.0f} GiB in fp32 ("
                      + ", ".join(f"{k} {v / 1024:.1f}" for k, v in e2e["memory_estimate_mb"].items()) + " GiB)."]
    gpu = payload.get("gpu_projection", {})
    if gpu:
        a = next(iter(gpu.values()))["assumptions"]
        lines += ["", f"GPU, **projection only (not measured)**, one {a['name']}: matmul FLOPs / (peak x "
                      f"{a['matmul_utilization']:.0%}), GPTQ solve FLOPs / (fp32 peak x {a['solve_utilization']:.0%}), "
                      f"elementwise bytes / ({a['hbm_tb_s']} TB/s x {a['memory_utilization']:.0%}); peak "
                      f"{a['bf16_dense_tflops']:.0f} TFLOP/s bf16 or {a['fp32_tflops']:.0f} fp32 (the quantize job loads "
                      "the model in fp32); memory from the same formula as the CPU estimate (GSQ at its formula's "
                      "69 B per trained weight, an upper bound).", "",
                  "| shape | GPTQ s (bf16 / fp32) | GSQ s, 100 steps (bf16 / fp32) | AutoRound s, 200 iters (bf16 / fp32) "
                  "| GSQ memory MB | end-to-end s per step (bf16 / fp32) |", "|---|---|---|---|---|---|"]
        for shape, g in gpu.items():
            rows = g["rows"]
            pair = lambda r: f"{r['seconds_bf16']:.1f} / {r['seconds_fp32']:.1f}"  # noqa: E731
            e2e = g.get("e2e")
            e2e = f"{e2e['seconds_per_step_bf16']:.2f} / {e2e['seconds_per_step_fp32']:.2f}" if e2e else "-"
            lines.append(f"| {shape} | {pair(rows['gptq'])} | {pair(rows['gsq'])} | {pair(rows['autoround'])} "
                         f"| {rows['gsq']['memory_mb']:.0f} | {e2e} |")
    return "\n".join(lines)


def head_quantization_table(payload: dict) -> str:
    """The output head's own share of a quantized model's gap (only the head quantized)."""
    head = "| output head | wiki CE | news CE | wiki gap | news gap |"
    lines = [f"One run of `.venv/bin/python {payload['command']}` ({_cpu_line(payload)}; {payload['wall_s'] / 60:.0f} min); "
             f"the default model in full precision but its head; GPTQ calibrated on {payload['calibration']}"
             f"{'; ' + payload['note'] if payload.get('note') else ''}.",
             "", head, "|---|---|---|---|---|"]
    for r in payload["results"]:
        lines.append(f"| {r['head']} | {r['wiki_ce']:.4f} | {r['news_ce']:.4f} | {_num(r.get('wiki_gap'), 4)} "
                     f"| {_num(r.get('news_gap'), 4)} |")
    return "\n".join(lines)


def render() -> dict[str, str]:
    tables = {}
    accuracy = RESULTS / "accuracy_smollm2.json"
    if accuracy.exists():
        tables.update(accuracy_tables(json.loads(accuracy.read_text())))
    moe_accuracy = RESULTS / "accuracy_smollm2_moe.json"
    if moe_accuracy.exists():
        tables.update(accuracy_tables(json.loads(moe_accuracy.read_text()), moe=True))
    serving = RESULTS / "serve_cpu.json"
    if serving.exists():
        tables["serve-table"] = serve_table(json.loads(serving.read_text()))
    moe = RESULTS / "serve_cpu_moe.json"
    if moe.exists():
        tables["moe-serve-table"] = serve_table(json.loads(moe.read_text()), " --only bf16-moe gsq-moe-w3 --label moe")
    shapes = RESULTS / "serve_shapes_cpu.json"
    if shapes.exists():
        tables["shapes-serve-table"] = shapes_serve_table(json.loads(shapes.read_text()))
    load = RESULTS / "serve_load_cpu.json"
    if load.exists():
        tables["serve-load-table"] = serve_load_table(json.loads(load.read_text()))
    layer_cost = RESULTS / "layer_cost_cpu.json"
    if layer_cost.exists():
        tables["layer-cost-table"] = layer_cost_table(json.loads(layer_cost.read_text()))
    head = RESULTS / "head_quantization.json"
    if head.exists():
        tables["head-quantization-table"] = head_quantization_table(json.loads(head.read_text()))
    return tables


def apply(readme: str, tables: dict[str, str]) -> str:
    for name, table in tables.items():
        pattern = re.compile(rf"(<!-- {name} -->\n)(?:.*?\n)?(<!-- /{name} -->)", re.S)
        if not pattern.search(readme):
            raise SystemExit(f"README.md has no <!-- {name} --> ... <!-- /{name} --> section")
        readme = pattern.sub(lambda m: m.group(1) + table + "\n" + m.group(2), readme)
    return readme


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--check", action="store_true", help="only check that README.md is up to date")
    args = parser.parse_args()
    current = README.read_text()
    wanted = apply(current, render())
    if args.check:
        if wanted != current:
            print("README.md tables differ from the results files; run python benchmarks/readme_tables.py")
            return 1
        return 0
    README.write_text(wanted)
    return 0


if __name__ == "__main__":
    sys.exit(main())
