"""Write the README's results tables from the committed results files (never by hand).

Each table sits between ``<!-- NAME -->`` and ``<!-- /NAME -->`` markers in README.md and is
rendered from one results file:

* ``accuracy-table``, ``ablation-table``: benchmarks/results/accuracy_smollm2.json
* ``serve-table``: benchmarks/results/serve_cpu.json
* ``serve-load-table``: benchmarks/results/serve_load_cpu.json

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


def accuracy_tables(payload: dict) -> dict[str, str]:
    rows = payload["results"]
    settings = payload["settings"]
    calibration = settings["calibration"]
    cpu = payload.get("cpu", {})
    head = (f"Measured with `.venv/bin/python benchmarks/accuracy.py` on {cpu.get('model', 'a CPU')} "
            f"({cpu.get('cores', '?')} cores; {'AVX-512' if 'avx512f' in cpu.get('flags', []) else 'AVX2'}"
            f"{', AMX' if 'amx_tile' in cpu.get('flags', []) else ''}). Calibration: {calibration['samples']} x "
            f"{calibration['seq_len']} tokens {'spread over' if calibration.get('spread') else 'from the start of'} "
            f"the Wikipedia calibration text, the same for every method; wiki = last "
            f"{settings['evaluation']['wiki']['windows']} x 2048 tokens of held-out Wikipedia articles, news = last "
            f"{settings['evaluation']['news']['windows']} x 2048 tokens of the Lee newswire corpus (never calibrated on). "
            "Gap = CE(method) - CE(full precision); a ratio below 1 means a smaller gap than that peer's. "
            "All Linear layers but lm_head quantized by every method, symmetric int, group 64.\n\n")
    peers = {bits: autoround_peer(rows, bits) for bits in sorted({r["bits"] for r in rows}, key=str)}
    columns = ("| row | method | bits | wiki ppl | news ppl | EAR | gap / GPTQ (wiki, news) "
               "| gap / GPTQ-MSE (wiki, news) | gap / AutoRound (wiki, news) | quant s |")
    lines = [columns, "|" + "---|" * (columns.count("|") - 1)]
    for r in rows:
        if r["ablation"]:
            continue
        bits = r["bits"]
        ratios = [f"{_ratio(r, f'gap_over_{peer}')}, {_ratio(r, f'gap_news_over_{peer}')}"
                  for peer in (f"gptq{bits}", f"gptq{bits}-mse", peers.get(bits))]
        lines.append("| " + " | ".join([
            f"**{r['name']}**" if r["method"] == "gsq" else r["name"], r["label"], str(bits), _num(r["ppl"]),
            _num(r["ppl_news"]), f"{r['ear']:.3f}", *ratios, f"{r['quant_seconds']:.0f}"]) + " |")
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
        ablation_lines.append(f"| {r['name']} | {r['label']} | {_num(r['ppl'])} | {_num(r['ppl_news'])} | {gaps} "
                              f"| {r['ear']:.3f} | {r['quant_seconds']:.0f} |")
    return {"accuracy-table": head + "\n".join(lines),
            "ablation-table": "\n".join(ablation_lines) if ablations else "(no ablation rows in the results file)"}


def _cpu_line(payload: dict) -> str:
    cpu = payload.get("cpu")
    if not cpu:
        return "CPU not recorded"
    flags = ", ".join(f for f in cpu.get("flags", []) if f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16"))
    return f"{cpu.get('model', '?')}, {cpu.get('cores', '?')} cores; {flags}"


def serve_table(payload: dict) -> str:
    head = "| model | kernel | decode tok/s, batch 1 | decode tok/s, batch 8 | prefill tok/s | weights | start-up |"
    lines = [f"One run of `.venv-serve/bin/python benchmarks/serve_throughput.py` ({payload.get('machine', '')}; "
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


def render() -> dict[str, str]:
    tables = {}
    accuracy = RESULTS / "accuracy_smollm2.json"
    if accuracy.exists():
        tables.update(accuracy_tables(json.loads(accuracy.read_text())))
    serving = RESULTS / "serve_cpu.json"
    if serving.exists():
        tables["serve-table"] = serve_table(json.loads(serving.read_text()))
    load = RESULTS / "serve_load_cpu.json"
    if load.exists():
        tables["serve-load-table"] = serve_load_table(json.loads(load.read_text()))
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
