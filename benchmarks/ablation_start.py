"""Ablation: how far GSQ gets from llmcompressor's act-order GPTQ start in a 60-step budget.

GPTQModifier quantizes with ``actorder: static`` by default, a much stronger start than plain
GPTQ (layer 3 q_proj at 3 bits: objective 0.00835 vs 0.01186). From it, what limits a short GSQ
run is how noisy its first samples are: with the authors' prior strength 6 the Gumbel noise
re-samples ~9% of the codes each step and 60 steps do not win that back. This sweeps the prior
strength, the temperature and the learning rate on one real layer (q_proj, layer objective) and
its MLP (block objective), fp inputs from the start of the calibration text.

    .venv/bin/python benchmarks/ablation_start.py --layer 3
Writes benchmarks/results/ablation_start_smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from ablation_layer import capture, gptq_start
from gsq_vllm.gsq import GSQConfig, get_grid, optimize_block, optimize_layer

RESULTS = Path(__file__).resolve().parent / "results"

LAYER_VARIANTS = {
    "prior 6 (authors')": dict(prior_strength=6.0),
    "prior 6, tau 1->0.1": dict(prior_strength=6.0, tau=(1.0, 0.1)),
    "prior 6, tau 0.5->0.05": dict(prior_strength=6.0, tau=(0.5, 0.05)),
    "prior 6, kappa 200->1000": dict(prior_strength=6.0, kappa=(200.0, 1000.0)),
    "prior 12 (default)": dict(prior_strength=12.0),
    "prior 12, lr 4e-3": dict(prior_strength=12.0, lr_logits=4e-3),
    "prior 20": dict(prior_strength=20.0),
}
BLOCK_VARIANTS = {
    "prior 6 (authors')": dict(prior_strength=6.0),
    "prior 12 (default)": dict(prior_strength=12.0),
    "prior 12, lr 4e-3": dict(prior_strength=12.0, lr_logits=4e-3),
    "prior 20": dict(prior_strength=20.0),
    "prior 30": dict(prior_strength=30.0),
}


def act_order_gptq(weight: torch.Tensor, hessian: torch.Tensor, grid, group_size: int = 64):
    """llmcompressor's GPTQ with GPTQModifier's default ``actorder: static``."""
    return gptq_start(weight, hessian, grid, group_size, actorder="static")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--samples", type=int, default=16)
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--tokens-per-step", type=int, default=1024)
    args = parser.parse_args()
    captured = capture(args.layer, args.samples, 512)
    names = ["gate_proj", "up_proj", "down_proj"]
    attn_in, mlp_in = captured["attn_in"], captured["mlp_in"]
    hess_q = attn_in.T @ attn_in / attn_in.shape[0]
    hess_in = mlp_in.T @ mlp_in / mlp_in.shape[0]
    hidden = torch.nn.functional.silu(mlp_in @ captured["gate_proj"].T) * (mlp_in @ captured["up_proj"].T)
    hess_down = hidden.T @ hidden / hidden.shape[0]

    def forward(weights, x):
        return (torch.nn.functional.silu(x @ weights["gate_proj"].T) * (x @ weights["up_proj"].T)) @ weights["down_proj"].T

    rows = []
    for bits in (3, 2):
        grid = get_grid(bits)
        codes, scales = act_order_gptq(captured["q_proj"], hess_q, grid)
        for variant, overrides in LAYER_VARIANTS.items():
            begin = time.time()
            result = optimize_layer(captured["q_proj"], hess_q, codes, scales, grid, GSQConfig(steps=args.steps, **overrides),
                                    name="q_proj", progress=False)
            rows.append(dict(bits=bits, target="q_proj (layer objective)", variant=variant, gptq=result.initial_loss,
                             gsq=result.final_loss, seconds=time.time() - begin))
            print(json.dumps(rows[-1]), flush=True)
        starts = {n: act_order_gptq(captured[n], hess_down if n == "down_proj" else hess_in, grid) for n in names}
        for variant, overrides in BLOCK_VARIANTS.items():
            begin = time.time()
            result = optimize_block(forward, {n: captured[n] for n in names}, mlp_in, {n: starts[n][0] for n in names},
                                    {n: starts[n][1] for n in names}, grid,
                                    GSQConfig(steps=args.steps, tokens_per_step=args.tokens_per_step, **overrides),
                                    name="mlp", progress=False)
            rows.append(dict(bits=bits, target="MLP (block objective)", variant=variant, gptq=result.initial_loss,
                             gsq=result.final_loss, seconds=time.time() - begin))
            print(json.dumps(rows[-1]), flush=True)
    settings = {"model": "SmolLM2-135M-Instruct", "layer": args.layer, "group_size": 64, "steps": args.steps,
                "tokens_per_step": args.tokens_per_step, "start": "llmcompressor GPTQ, actorder static",
                "calibration": f"{args.samples} x 512 tokens, start of wiki_calibration.txt, fp inputs"}
    (RESULTS / "ablation_start_smollm2.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lines = ["| bits | target | variant | GPTQ (act-order) | GSQ | GSQ / GPTQ | seconds |", "|---|---|---|---|---|---|---|"]
    lines += [f"| {r['bits']} | {r['target']} | {r['variant']} | {r['gptq']:.5f} | {r['gsq']:.5f} | {r['gsq'] / r['gptq']:.3f} "
              f"| {r['seconds']:.0f} |" for r in rows]
    (RESULTS / "ablation_start_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
