"""Ablation on one real layer: how much each GSQ setting lowers the objective of its start.

Captures the calibration inputs of one decoder layer of the default model (full-precision
forward, the start of the calibration text), then, for one Linear (the layer objective
``||(W - Q) L||^2 / ||W L||^2``) and for the whole MLP (the block objective, gate/up/down jointly),
runs llmcompressor's GPTQ and RTN as starts and GSQ with several settings. Cheap enough to run
beside the full accuracy benchmark, and it tells which knobs matter before spending hours there.

    .venv/bin/python benchmarks/ablation_layer.py --layer 3
Writes benchmarks/results/ablation_layer_smollm2.json and .md.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import torch

from gsq_vllm import data
from gsq_vllm.gsq import GSQConfig, dequantize, get_grid, hessian_factor, layer_objective, optimize_block, optimize_layer, rtn_quantize

RESULTS = Path(__file__).resolve().parent / "results"

# the settings its committed table was measured with (the defaults have moved on since)
SESSION1 = {"prior_strength": 6.0}

LAYER_VARIANTS = {
    "default (lr 2e-3, kappa 100->500, tau 2->0.2, 100 steps)": {},
    "lr 1e-3": {"lr_logits": 1e-3},
    "lr 5e-3": {"lr_logits": 5e-3},
    "kappa 30->300, tau 1->0.1": {"kappa": (30.0, 300.0), "tau": (1.0, 0.1)},
    "tau 2->0.5": {"tau": (2.0, 0.5)},
    "200 steps": {"steps": 200},
    "bf16 logits": {"logits_dtype": "bfloat16"},
}


def capture(layer_index: int, samples: int, seq_len: int) -> dict[str, torch.Tensor]:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model_dir = data.default_model_dir()
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    windows = data.take_windows(data.tokenize_file(data.text_path("calibration"), tokenizer), data.WindowSpec(samples, seq_len))
    layer = model.model.layers[layer_index]
    store: dict[str, list[torch.Tensor]] = {"attn_in": [], "mlp_in": []}
    hooks = [layer.self_attn.q_proj.register_forward_hook(lambda m, a, o: store["attn_in"].append(a[0].reshape(-1, a[0].shape[-1]))),
             layer.mlp.register_forward_hook(lambda m, a, o: store["mlp_in"].append(a[0].reshape(-1, a[0].shape[-1])))]
    with torch.no_grad():
        for start in range(0, samples, 8):
            model(windows[start : start + 8])
    for hook in hooks:
        hook.remove()
    out = {k: torch.cat(v) for k, v in store.items()}
    out["q_proj"] = layer.self_attn.q_proj.weight.detach().clone()
    out.update({n: getattr(layer.mlp, n).weight.detach().clone() for n in ["gate_proj", "up_proj", "down_proj"]})
    return out


def gptq_start(weight, hessian, grid, group_size, actorder=None):
    """llmcompressor's GPTQ codes and scales (``actorder="static"`` is GPTQModifier's default)."""
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    _, scales = rtn_quantize(weight, grid, group_size)
    args = QuantizationArgs(num_bits=grid.storage_bits, type="int", symmetric=True, strategy="group", group_size=group_size,
                            actorder=actorder)
    quantized, _, _ = quantize_weight(weights=weight.clone()[None], hessians=hessian.clone()[None], scale=scales[None],
                                      zero_point=torch.zeros_like(scales, dtype=torch.int8)[None], global_scale=None,
                                      quant_args=args, blocksize=128, percdamp=0.01)
    codes = torch.round(quantized[0] / scales.repeat_interleave(group_size, 1)).clamp(grid.qmin, grid.qmax)
    return codes.to(torch.int8), scales


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--layer", type=int, default=3)
    parser.add_argument("--samples", type=int, default=32)
    parser.add_argument("--seq-len", type=int, default=512)
    parser.add_argument("--bits", nargs="+", default=["3", "2"])
    parser.add_argument("--block-steps", type=int, default=60)
    args = parser.parse_args()
    captured = capture(args.layer, args.samples, args.seq_len)
    rows = []
    for bits_arg in args.bits:
        grid = get_grid(int(bits_arg) if bits_arg.isdigit() else bits_arg)
        weight, inputs = captured["q_proj"], captured["attn_in"]
        hessian = inputs.T @ inputs / inputs.shape[0]
        factor = hessian_factor(hessian, 0.01)
        starts = {"gptq": gptq_start(weight, hessian, grid, 64), "rtn": rtn_quantize(weight, grid, 64)}
        gptq_loss = layer_objective(weight, dequantize(*starts["gptq"]), factor)
        rows.append(dict(bits=bits_arg, target="q_proj (layer objective)", variant="GPTQ (start)", objective=gptq_loss,
                         vs_gptq=1.0, seconds=0.0))
        rows.append(dict(bits=bits_arg, target="q_proj (layer objective)", variant="RTN", vs_gptq=None, seconds=0.0,
                         objective=layer_objective(weight, dequantize(*starts["rtn"]), factor)))
        for variant, overrides in LAYER_VARIANTS.items():
            begin = time.time()
            result = optimize_layer(weight, hessian, *starts["gptq"], grid, GSQConfig(**{**SESSION1, **overrides}), name="q_proj", progress=False)
            rows.append(dict(bits=bits_arg, target="q_proj (layer objective)", variant=f"GSQ from GPTQ, {variant}",
                             objective=result.final_loss, vs_gptq=result.final_loss / gptq_loss, seconds=time.time() - begin))
        begin = time.time()
        result = optimize_layer(weight, hessian, *starts["rtn"], grid, GSQConfig(**SESSION1), name="q_proj", progress=False)
        rows.append(dict(bits=bits_arg, target="q_proj (layer objective)", variant="GSQ from RTN (ablation), default",
                         objective=result.final_loss, vs_gptq=result.final_loss / gptq_loss, seconds=time.time() - begin))
        # the MLP as one block: gate, up and down trained jointly on the MLP's output
        names = ["gate_proj", "up_proj", "down_proj"]
        mlp_in = captured["mlp_in"]
        hess_in = mlp_in.T @ mlp_in / mlp_in.shape[0]
        with torch.no_grad():
            hidden = torch.nn.functional.silu(mlp_in @ captured["gate_proj"].T) * (mlp_in @ captured["up_proj"].T)
        hess_down = hidden.T @ hidden / hidden.shape[0]
        mlp_starts = {n: gptq_start(captured[n], hess_down if n == "down_proj" else hess_in, grid, 64) for n in names}

        def forward(weights, x):
            return (torch.nn.functional.silu(x @ weights["gate_proj"].T) * (x @ weights["up_proj"].T)) @ weights["down_proj"].T

        begin = time.time()
        result = optimize_block(forward, {n: captured[n] for n in names}, mlp_in, {n: c for n, (c, _) in mlp_starts.items()},
                                {n: s for n, (_, s) in mlp_starts.items()}, grid, GSQConfig(steps=args.block_steps, **SESSION1),
                                name="mlp", progress=False)
        rows.append(dict(bits=bits_arg, target="MLP (block objective)", variant="GPTQ (start)", objective=result.initial_loss,
                         vs_gptq=1.0, seconds=0.0))
        rows.append(dict(bits=bits_arg, target="MLP (block objective)", variant=f"GSQ from GPTQ, {args.block_steps} steps",
                         objective=result.final_loss, vs_gptq=result.final_loss / result.initial_loss,
                         seconds=time.time() - begin))
        print(json.dumps(rows[-1]), flush=True)
    settings = {"model": "SmolLM2-135M-Instruct", "layer": args.layer, "group_size": 64,
                "calibration": f"{args.samples} x {args.seq_len} tokens, start of wiki_calibration.txt, fp inputs",
                "block_steps": args.block_steps}
    (RESULTS / "ablation_layer_smollm2.json").write_text(json.dumps({"settings": settings, "rows": rows}, indent=1))
    lines = ["| bits | target | variant | objective | / GPTQ | seconds |", "|---|---|---|---|---|---|"]
    for r in rows:
        ratio = "-" if r["vs_gptq"] is None else f"{r['vs_gptq']:.3f}"
        lines.append(f"| {r['bits']} | {r['target']} | {r['variant']} | {r['objective']:.5f} | {ratio} | {r['seconds']:.0f} |")
    (RESULTS / "ablation_layer_smollm2.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
