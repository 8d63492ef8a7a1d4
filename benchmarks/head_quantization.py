"""What quantizing the output head alone costs the default model, on wiki and news.

    .venv/bin/python benchmarks/head_quantization.py

The serving benchmark's ``-h4`` rows (``benchmarks/serve_shapes.py``) read a 4-bit head instead of
a bf16 one, the largest single saving at 1B shape. This measures the price in accuracy on the one
real model we have: the full-precision default model with only ``lm_head`` replaced (untied from
the input embedding, which stays exact), by round-to-nearest and by GPTQ on the same grid
(``gsq_vllm.gsq``; Hessian of the head's inputs over the calibration text, as every method's
calibration in ``benchmarks/accuracy.py``). Everything else stays in full precision, so each row is
the head's own share of a quantized model's gap. Results: ``benchmarks/results/head_quantization.json``.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

from gsq_vllm import data
from gsq_vllm.checkpoint import load_causal_lm, load_tokenizer
from gsq_vllm.evaluation import evaluate
from gsq_vllm.files import write_json_atomic
from gsq_vllm.gsq.gptq import accumulate_hessian, gptq_quantize
from gsq_vllm.gsq.grids import get_grid, initial_scales, quantize_to_grid
from gsq_vllm.machine import cpu_description
from gsq_vllm.weight_format import dequantize

RESULTS = Path(__file__).resolve().parent / "results"
#: (bits, group size, method): 192 is the largest group that divides the default model's 576 columns
SETTINGS = [(4, 64, "rtn"), (4, 64, "gptq"), (4, 192, "gptq"), (3, 64, "gptq")]
TEXTS = {"wiki": 10, "news": 4}  # windows of 2048 tokens, as benchmarks/accuracy.py evaluates


def head_hessian(model: torch.nn.Module, tokenizer, samples: int, seq_len: int) -> torch.Tensor:
    """``X^T X`` of the head's inputs (the final norm's output) over the calibration text."""
    windows = data.text_windows("calibration", tokenizer, samples, seq_len, from_end=False)
    hessian = None
    with torch.no_grad():
        for ids in windows:
            hidden = model.model(ids[None]).last_hidden_state
            hessian = accumulate_hessian(hessian, hidden)
    return hessian / (samples * seq_len)


def quantized_head(weight: torch.Tensor, bits: int, group: int, method: str, hessian: torch.Tensor) -> torch.Tensor:
    """The dense weight of the head quantized symmetric, group-wise, on GSQ's grid of ``bits``."""
    grid = get_grid(bits)
    scales = initial_scales(weight, grid, group)
    codes = quantize_to_grid(weight, scales, grid) if method == "rtn" else gptq_quantize(weight, hessian, scales, grid)
    return dequantize(codes, scales).float()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--calibration-samples", type=int, default=128)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--out", type=Path, default=RESULTS / "head_quantization.json")
    parser.add_argument("--note", default="", help="free text stored with the results (what else ran)")
    args = parser.parse_args(argv)
    began = time.perf_counter()
    model_dir = data.default_model_dir()
    tokenizer = load_tokenizer(model_dir)
    model = load_causal_lm(model_dir)
    exact_head = model.lm_head.weight.detach().clone()
    hessian = head_hessian(model, tokenizer, args.calibration_samples, args.seq_len)
    windows = {text: data.text_windows(text, tokenizer, count, 2048) for text, count in TEXTS.items()}
    rows = []
    for setting in [None, *SETTINGS]:
        head = exact_head if setting is None else quantized_head(exact_head, *setting, hessian)
        model.lm_head.weight = torch.nn.Parameter(head.clone(), requires_grad=False)  # untied: the embedding stays exact
        row = {"head": "full precision" if setting is None else f"{setting[0]}-bit g{setting[1]} {setting[2]}"}
        for text, batch in windows.items():
            torch.manual_seed(0)
            row[f"{text}_ce"] = round(evaluate(model, batch, progress=False).ce, 4)
        if rows:
            row.update({f"{text}_gap": round(row[f"{text}_ce"] - rows[0][f"{text}_ce"], 4) for text in TEXTS})
        rows.append(row)
        print(json.dumps(row), flush=True)
    write_json_atomic(args.out, {
        "model": str(model_dir.name), "cpu": cpu_description(),
        "calibration": f"{args.calibration_samples} x {args.seq_len} tokens from the start of the calibration text",
        "evaluation": {text: f"last {count} x 2048 tokens" for text, count in TEXTS.items()},
        "command": "benchmarks/head_quantization.py", "wall_s": round(time.perf_counter() - began, 1), "note": args.note,
        "results": rows,
    })
    print(f"written {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
