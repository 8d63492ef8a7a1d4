"""Ablation on one real decoder layer: how far GSQ's settings take the layer's objective.

Captures one decoder layer of the default model as the modifier sees it (its real inputs from a
full-precision forward over calibration windows: hidden states, position embeddings, mask; and
the Hessian of every Linear), starts from GPTQ on the GSQ grid (:func:`gsq_vllm.gsq.gptq_quantize`,
the modifier's own start) and trains all seven Linears jointly on the layer's output with each
variant. The objective is the relative MSE of the layer's output on held-out sequences. Minutes
per variant, so it tells which knobs matter before the whole-model benchmark spends hours.

    .venv/bin/python benchmarks/ablation_layer.py --layer 3 --bits 3 2
Writes benchmarks/results/ablation_layer_smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gsq_vllm import data
from gsq_vllm.gsq import GSQConfig, accumulate_hessian, get_grid, gptq_quantize, initial_scales, optimize_block, quantize_to_grid
from gsq_vllm.gsq.blocks import BlockInputs, linears_with_weights

RESULTS = Path(__file__).resolve().parent / "results"

# each variant changes the default (first row) in one way
VARIANTS = {
    "start: GPTQ, compressed-tensors' clipped grid": dict(steps=0, scale_init="symmetric"),
    "start: GPTQ, full-range signed grid": dict(steps=0),
    "start: round to nearest, full range": dict(steps=0, init="rtn"),
    "GSQ default (100 steps, lr 1e-3, 1024 tokens/step)": dict(),
    "lr 2e-3 (the previous default)": dict(lr_logits=2e-3),
    "lr 5e-4": dict(lr_logits=5e-4),
    "lr 5e-4, 200 steps": dict(lr_logits=5e-4, steps=200),
    "lr 5e-4, 4096 tokens/step (gsq3-lr-half-4x-tokens)": dict(lr_logits=5e-4, tokens_per_step=4096),
    "prior strength 6 (the authors')": dict(prior_strength=6.0),
    "prior strength 20": dict(prior_strength=20.0),
    "4096 tokens/step": dict(tokens_per_step=4096),
    "scales frozen (lr_scales 0)": dict(lr_scales=0.0),
    "clipped grid start": dict(scale_init="symmetric"),
}


def capture(layer_index: int, sequences: int, seq_len: int):
    """The layer, its Linears, its recorded calls and each Linear's Hessian (full-precision inputs)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = data.default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    tokens = data.tokenize_file(data.text_path("calibration"), tokenizer)
    windows = data.take_windows(tokens, data.WindowSpec(sequences, seq_len, spread=True))
    layer = model.model.layers[layer_index]
    linears = {name: module for name, module in layer.named_modules() if isinstance(module, torch.nn.Linear)}
    calls = BlockInputs(dtype=torch.float32)
    hessians: dict[str, torch.Tensor] = {}

    def hessian_hook(name):
        return lambda _m, args, _o: hessians.__setitem__(name, accumulate_hessian(hessians.get(name), args[0]))

    hooks = [layer.register_forward_pre_hook(calls.capture, with_kwargs=True)]
    hooks += [module.register_forward_hook(hessian_hook(name)) for name, module in linears.items()]
    with torch.no_grad():
        for row in windows:
            model.model(row[None])
    for hook in hooks:
        hook.remove()
    return layer, linears, calls, {name: h / (sequences * seq_len) for name, h in hessians.items()}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--bits", nargs="+", default=["3", "2"])
    parser.add_argument("--sequences", type=int, default=64)
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    args = parser.parse_args()
    layer, linears, calls, hessians = capture(args.layer, args.sequences, 512)
    originals = {name: module.weight.detach().float().clone() for name, module in linears.items()}

    def run(weights, index):
        call_args, call_kwargs = calls.call(index, "cpu")
        with linears_with_weights(linears, weights):
            return layer(*call_args, **call_kwargs)

    with torch.no_grad():
        targets = [run(originals, i) for i in range(len(calls))]
    rows = []
    for bits in args.bits:
        grid = get_grid(int(bits) if bits.isdigit() else bits)
        for variant in args.variants:
            options = dict(VARIANTS[variant])
            scale_rule, init = options.pop("scale_init", "full_range"), options.pop("init", "gptq")
            scales = {n: initial_scales(w, grid, 64, scale_rule) for n, w in originals.items()}
            codes = {n: gptq_quantize(w, hessians[n], scales[n], grid) if init == "gptq" else quantize_to_grid(w, scales[n], grid)
                     for n, w in originals.items()}
            begin = time.time()
            result = optimize_block(run, originals, targets, codes, scales, grid, GSQConfig(**options), name=variant,
                                    progress=False)
            rows.append(dict(bits=bits, variant=variant, start=result.initial_loss, final=result.final_loss,
                             kept_start=result.kept_initial, seconds=time.time() - begin))
            print(json.dumps(rows[-1]), flush=True)
    settings = {"model": "SmolLM2-135M-Instruct", "layer": args.layer, "group_size": 64,
                "calibration": f"{args.sequences} x 512 tokens spread over wiki_calibration.txt, full-precision inputs",
                "objective": "relative MSE of the decoder layer's output on the 10% held-out sequences",
                "start": "gsq_vllm.gsq.gptq_quantize (act-order) unless the variant says otherwise"}
    (RESULTS / "ablation_layer_smollm2.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    reference = {r["bits"]: r["start"] for r in rows if r["variant"] == "start: GPTQ, full-range signed grid"}
    lines = ["| bits | variant | objective | / GPTQ full-range start | seconds |", "|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['variant']} | {r['final']:.5f} | "
              f"{r['final'] / reference[r['bits']]:.3f} | {r['seconds']:.0f} |" for r in rows if r["bits"] in reference]
    (RESULTS / "ablation_layer_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
