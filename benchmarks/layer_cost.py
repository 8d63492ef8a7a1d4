"""The cost of quantizing ONE decoder layer at Llama-3.1-8B and -70B shapes: seconds and peak memory.

What it measures: each recipe's real per-layer work on a one-decoder-layer ``LlamaForCausalLM`` of
the target shape (8B: hidden 4096, MLP 14336, 32 heads / 8 KV heads, head_dim 128; 70B: hidden
8192, MLP 28672, 64 heads / 8 KV heads) with RANDOM weights (cost does not depend on the values)
and a small vocabulary (embeddings and the head are not per-layer cost), run through
llmcompressor's ``oneshot`` with a calibration set of random token ids, every method in its own
process so its peak resident memory is its own:

* GSQ: ``gsq_w3a16_g64``'s ``GSQModifier`` (Hessians, GPTQ start, every Linear of the layer
  trained jointly on the layer's output, ``tokens_per_step`` 1024), without the end-to-end stage;
* GPTQ: ``gptq_w3a16_g64``; AutoRound: ``autoround_w3a16_g64`` (batch 8).

Full budgets (GSQ 100 steps, AutoRound 200 iterations) are too slow on a small CPU, so each
iterative method runs a few steps (``--steps``, ``--iters``) and its time is modelled as
``fixed + per_step * steps``: per_step from the optimizer's step times inside the run (the first
step's set-up left out), fixed the rest of that work (with runs at two budgets, a least-squares
fit over them is recorded as a cross-check); the recipe's budget is a projection, labelled so. Calibration is run with fewer
sequences than the recipes' 128 x 512 and the token-proportional part of each run (the
sequential pipeline's forward passes, Hessians, GSQ's targets) is scaled up to 128 x 512. A
method that cannot fit in ``--memory-limit-gb`` is not run: its memory comes from a stated formula
and its time from the 8B-shape measurement scaled by the shapes' work ratio, both labelled
estimates. GSQ may be measured on the attention sub-block (``blocks: [re:.*self_attn$]``, the
MLP kept at its GPTQ start) and scaled by parameter count; the results say so.

The end-to-end stage (``GSQEndToEndModifier``) is costed per step at 8B shape: one decoder
layer's forward + backward on 4 x 512 tokens (weights rebuilt from codes x scales as the stage
does) and the head's (vocab 128256: teacher logits from kept hidden states, student logits,
KL, backward) are measured, and ``step = layers x layer + head``.

    .venv/bin/python benchmarks/layer_cost.py                       # 8B and 70B shapes, all methods
    .venv/bin/python benchmarks/layer_cost.py --shapes 8b --methods gptq --calibration 32

Writes benchmarks/results/layer_cost_cpu.json (layer_cost_cuda.json on a CUDA machine), with
every raw measurement, the projection and its formula, and a labelled H100 projection. Runs
unchanged on a CUDA machine (the device that measured is recorded).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from random_llama import MODEL_SHAPES, linear_shapes  # noqa: E402  (the one owner of the Llama shapes)

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"
SEQ_LEN = 512
FULL_SEQUENCES = 128  # the recipes' calibration: 128 x 512 tokens
VOCAB = 512  # the one-layer model's vocabulary (not per-layer cost)
E2E_VOCAB = MODEL_SHAPES["8b"]["vocab"]  # Llama-3.1's, for the end-to-end stage's head
E2E_STAGE = ("per sequence, layers checkpointed, weights rebuilt per call, KL chunked over positions, "
             "the model's own head for the teacher")
E2E_CHUNK = 128  # GSQEndToEndModifier's positions_per_chunk
RECIPES = {"gsq": "gsq_w3a16_g64", "gptq": "gptq_w3a16_g64", "autoround": "autoround_w3a16_g64"}
MODIFIERS = {"gsq": "GSQModifier", "gptq": "GPTQModifier", "autoround": "AutoRoundModifier"}
BUDGET_KEY = {"gsq": "steps", "autoround": "iters"}

SHAPES: dict[str, dict[str, int]] = {
    "8b": MODEL_SHAPES["8b"],
    "70b": MODEL_SHAPES["70b"],
    "tiny": dict(hidden=64, intermediate=128, heads=4, kv_heads=2, layers=2),  # the test's
}
E2E_LAYERS = {name: shape["layers"] for name, shape in SHAPES.items()}

# Memory formulas (bytes), the same for the CPU estimate and the GPU projection.
GSQ_BYTES_PER_WEIGHT = 69  # 5 fp32 logits (20) + Lion momentum (20) + logit gradient (20) + soft weight and its gradient (8) + int8 start code (1)
AUTOROUND_BYTES_PER_WEIGHT = 16  # rounding offset v, its gradient, best-so-far copy, fake-quantised weight (fp32 each)
GPTQ_SOLVE_SQUARES = 3  # Hessian inverse / Cholesky work matrices of the widest input, fp32

# GPU projection assumptions (one H100 SXM)
H100 = dict(name="NVIDIA H100 SXM (80 GB)", bf16_dense_tflops=989.0, fp32_tflops=67.0, matmul_utilization=0.4,
            solve_utilization=0.05, hbm_tb_s=3.35, memory_utilization=0.6)


# -- shapes ---------------------------------------------------------------------------------------

def linears(shape: dict[str, int]) -> dict[str, tuple[int, int]]:
    """(out, in) of the seven Linears of a Llama decoder layer, by projection name."""
    return {name.rsplit(".", 1)[-1]: dims for name, dims in linear_shapes(shape).items()}


def layer_params(shape: dict[str, int], only: str | None = None) -> int:
    attention = ("q_proj", "k_proj", "v_proj", "o_proj")
    return sum(o * i for name, (o, i) in linears(shape).items()
               if only is None or (only == "attention") == (name in attention))


def gptq_solve_work(shape: dict[str, int]) -> float:
    """GPTQ's solve, in multiply-adds: out * in^2 (column updates) + in^3 (Cholesky / inverse) per Linear."""
    return float(sum(o * i * i + i ** 3 for o, i in linears(shape).values()))


def hessian_bytes(shape: dict[str, int]) -> int:
    return 4 * sum(i * i for _o, i in linears(shape).values())


def estimate_memory_mb(method: str, shape: dict[str, int], tokens: int, block: str = "layer") -> dict:
    """Peak resident memory from a formula (MB) and the formula: used to skip what cannot fit,
    and recorded beside every measurement so the formula's accuracy is visible."""
    p = layer_params(shape)
    h = shape["hidden"]
    widest = max(i for _o, i in linears(shape).values())
    runtime = 1200e6  # python, torch, llmcompressor, transformers (measured ~1.1-1.3 GB on CPU)
    parts = {"runtime": runtime, "layer weights fp32": 4 * p,
             "pipeline activations (fp32 in + out)": 2 * 4 * tokens * h}
    if method in ("gptq", "gsq"):
        parts["Hessians fp32 (7 Linears)"] = hessian_bytes(shape)
        parts["GPTQ solve work matrices"] = GPTQ_SOLVE_SQUARES * 4 * widest * widest
    if method == "gsq":
        trained = p if block == "layer" else layer_params(shape, "attention")
        parts["block inputs + targets (bf16)"] = 2 * 2 * tokens * h
        parts[f"relaxation state ({GSQ_BYTES_PER_WEIGHT} B/weight)"] = GSQ_BYTES_PER_WEIGHT * trained
    if method == "autoround":
        parts["cached inputs + reference outputs fp32"] = 2 * 4 * tokens * h
        parts[f"rounding state ({AUTOROUND_BYTES_PER_WEIGHT} B/weight)"] = AUTOROUND_BYTES_PER_WEIGHT * p
    total = sum(parts.values())
    return {"mb": total / 2**20, "parts_mb": {k: round(v / 2**20) for k, v in parts.items()},
            "formula": " + ".join(parts)}


# -- children (each measurement in its own process) ------------------------------------------------

def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _rss_mb() -> float:
    with open("/proc/self/statm") as handle:
        return int(handle.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2**20


def build_model(shape: dict[str, int], seed: int = 0):
    """A one-decoder-layer LlamaForCausalLM of the shape, random weights, fp32."""
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(hidden_size=shape["hidden"], intermediate_size=shape["intermediate"], num_hidden_layers=1,
                         num_attention_heads=shape["heads"], num_key_value_heads=shape["kv_heads"],
                         vocab_size=VOCAB, max_position_embeddings=SEQ_LEN, tie_word_embeddings=False,
                         bos_token_id=1, eos_token_id=2, pad_token_id=0)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)  # transformers' random initialisation: the values do not change the cost
    return model.eval()


def byte_tokenizer():
    """A byte-level tokenizer (oneshot wants a processor; the token ids are random anyway)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    byte_vocab = {token: index for index, token in enumerate(pre_tokenizers.ByteLevel.alphabet())}
    vocab = {"<unk>": len(byte_vocab), "<s>": len(byte_vocab) + 1, "</s>": len(byte_vocab) + 2, **byte_vocab}
    core = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    core.decoder = decoders.ByteLevel()
    return PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", bos_token="<s>", eos_token="</s>",
                                   pad_token="<unk>")


def _recipe(method: str, budget: int | None, block: str, sizes: dict[str, int] | None = None) -> dict:
    from gsq_vllm.recipes import load_recipe

    recipe = copy.deepcopy(load_recipe(RECIPES[method]))
    for stage in recipe.values():
        for group in stage.values():
            group.pop("GSQEndToEndModifier", None)  # costed separately, per step
            options = group.get(MODIFIERS[method])
            if options is None:
                continue
            if budget is not None:
                options[BUDGET_KEY[method]] = budget
            if method == "gsq" and block == "attention":
                options["blocks"] = ["re:.*self_attn$"]
                options["layer_objective"] = "none"  # the MLP keeps its GPTQ start (cost scaled by parameters)
            for key, value in (sizes or {}).items():
                options[key] = value
            if sizes and "group_size" in sizes:
                for scheme in options["config_groups"].values():
                    scheme["weights"]["group_size"] = sizes["group_size"]
                options.pop("group_size", None)
    return recipe


class _Timers:
    """Seconds spent inside given functions (wrapped on their class or module for this process)."""

    def __init__(self):
        self.seconds: dict[str, float] = {}
        self._saved: list[tuple[Any, str, Any]] = []

    def restore(self) -> None:
        for owner, attribute, original in reversed(self._saved):
            setattr(owner, attribute, original)
        self._saved = []

    def wrap(self, owner: Any, attribute: str, bucket: str) -> None:
        """Add the time spent in ``owner.attribute`` to ``seconds[bucket]``; keep each call's (start, end)."""
        original = getattr(owner, attribute)
        self._saved.append((owner, attribute, owner.__dict__[attribute]))
        self.intervals: dict[str, list[tuple[float, float]]] = getattr(self, "intervals", {})

        def timed(*args, **kwargs):
            begin = time.perf_counter()
            try:
                return original(*args, **kwargs)
            finally:
                end = time.perf_counter()
                self.seconds[bucket] = self.seconds.get(bucket, 0.0) + end - begin
                self.intervals.setdefault(bucket, []).append((begin, end))

        setattr(owner, attribute, timed)

    def step_clock(self, phase: str, step: str) -> dict:
        """Per-step time inside the last ``phase`` call, from the ends of its optimizer steps
        (``(last - first) / (n - 1)``: the first step's set-up is left out) and the rest of that call."""
        begin, end = self.intervals[phase][-1]
        ends = [e for _b, e in self.intervals.get(step, []) if begin <= e <= end]
        if len(ends) < 2:
            return {"steps_seen": len(ends)}
        per_step = (ends[-1] - ends[0]) / (len(ends) - 1)
        return {"steps_seen": len(ends), "per_step_seconds": per_step,
                "fixed_seconds": (end - begin) - per_step * len(ends),
                "step_end_offsets": [round(e - begin, 3) for e in ends]}


def compile_warmup() -> float:
    """Compile GSQ's fused relaxation and Lion kernels once before the timed job (two sizes, so the
    kernels are compiled for dynamic sizes): a one-off per process, not per layer, so it is kept
    out of the per-layer figures and recorded separately."""
    from gsq_vllm.gsq import GSQConfig, get_grid, initial_scales, optimize_layer, quantize_to_grid

    begin = time.perf_counter()
    grid = get_grid(3)
    for rows, cols in ((64, 128), (96, 192)):
        weight = torch.randn(rows, cols)
        scales = initial_scales(weight, grid, 64)
        hessian = torch.eye(cols)
        optimize_layer(weight, hessian, quantize_to_grid(weight, scales, grid), scales, grid,
                       GSQConfig(steps=2), progress=False)
    return time.perf_counter() - begin


def measure_method(spec: dict) -> dict:
    """One quantize job on a one-layer model: seconds in all, in the modifier's per-layer work, and
    (GSQ) in the GPTQ start and the optimisation; peak resident memory."""
    import yaml
    from datasets import Dataset
    from llmcompressor import oneshot
    from transformers import AutoModelForCausalLM

    import gsq_vllm.compress.gsq_modifier as gsq_modifier
    from gsq_vllm.peak_memory import PeakMemory

    method, shape = spec["method"], SHAPES[spec["shape"]] if isinstance(spec["shape"], str) else spec["shape"]
    sequences, seq_len = spec["sequences"], spec.get("seq_len", SEQ_LEN)
    timers = _Timers()
    warmup = compile_warmup() if method == "gsq" else 0.0
    if method == "gsq":
        from gsq_vllm.gsq.optimize import Lion

        timers.wrap(gsq_modifier.GSQModifier, "on_sequential_epoch_end", "layer_work")
        timers.wrap(gsq_modifier.GSQModifier, "_start", "gptq_start")
        timers.wrap(gsq_modifier, "optimize_block", "optimize")
        timers.wrap(Lion, "step", "optimizer_step")
    elif method == "gptq":
        from llmcompressor.modifiers.gptq import GPTQModifier
        timers.wrap(GPTQModifier, "on_sequential_epoch_end", "layer_work")
    else:
        from auto_round.algorithms.quantization.sign_round.sign_sgd import SignSGD
        from llmcompressor.modifiers.autoround import AutoRoundModifier
        timers.wrap(AutoRoundModifier, "on_sequential_epoch_end", "layer_work")
        timers.wrap(SignSGD, "step", "optimizer_step")
    folder = tempfile.TemporaryDirectory(prefix="layer-cost-model-")
    build_model(shape, spec.get("seed", 0)).save_pretrained(folder.name)  # oneshot reloads the config by path
    processor = byte_tokenizer()
    processor.save_pretrained(folder.name)
    model = AutoModelForCausalLM.from_pretrained(folder.name, dtype=torch.float32)
    ids = torch.randint(3, VOCAB, (sequences, seq_len), generator=torch.Generator().manual_seed(1))
    dataset = Dataset.from_dict({"input_ids": ids.tolist(), "attention_mask": torch.ones_like(ids).tolist()})
    recipe = _recipe(method, spec.get("budget"), spec.get("block", "layer"), spec.get("recipe_overrides"))
    if _device() == "cuda":
        torch.cuda.reset_peak_memory_stats()
    before_mb = _rss_mb()
    torch.manual_seed(0)
    begin = time.perf_counter()
    try:
        with PeakMemory() as memory:
            oneshot(model=model, dataset=dataset, recipe=yaml.safe_dump(recipe, sort_keys=False),
                    processor=processor, max_seq_length=seq_len, num_calibration_samples=sequences)
    finally:
        timers.restore()
    seconds = time.perf_counter() - begin
    folder.cleanup()
    result = {
        "seconds": seconds, **{f"{k}_seconds": v for k, v in timers.seconds.items()},
        "compile_warmup_seconds": warmup, "peak_rss_mb": memory.peak_mb, "rss_before_mb": before_mb,
        "ru_maxrss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
        "torch_threads": torch.get_num_threads(), "device": _device(),
    }
    if method in BUDGET_KEY:  # per step / iteration, from the optimizer's step times inside this run
        result["step_clock"] = timers.step_clock("optimize" if method == "gsq" else "layer_work", "optimizer_step")
    if _device() == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def _timed(fn: Callable[[], Any], repeats: int) -> float:
    """Best of ``repeats`` wall times of ``fn`` after one warm-up call."""
    fn()
    best = float("inf")
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        begin = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        best = min(best, time.perf_counter() - begin)
    return best


def measure_forward_backward(spec: dict) -> dict:
    """One decoder layer's no-grad forward per token, and the end-to-end stage's per-layer and head
    work per step, each phase with its own peak memory, as GSQEndToEndModifier runs them (8364fef):

    * layer: forward + backward on ``sequences x seq_len`` tokens, one sequence's graph at a time,
      the layer recomputed in backward (gradient checkpointing), its weights rebuilt from int8 codes
      x scales at every call of each Linear; gradients to the scales, the norms and the layer's
      input (the layers below);
    * head (vocab 128256 at 8B): :mod:`gsq_vllm.gsq.end_to_end`'s own KL, a chunk of positions at a
      time: teacher logits from kept hidden states (bf16), student logits, KL, backward to the final
      hidden states; measured with the head's weight frozen (as the stage runs it) and, for
      comparison, requiring a gradient.
    """
    import gc

    from gsq_vllm.gsq.blocks import linears_with_weights
    from gsq_vllm.peak_memory import PeakMemory

    shape = SHAPES[spec["shape"]] if isinstance(spec["shape"], str) else spec["shape"]
    sequences, seq_len = spec.get("sequences", 4), spec.get("seq_len", SEQ_LEN)
    group, repeats, device = spec.get("group_size", 64), spec.get("repeats", 1), _device()
    h = shape["hidden"]
    result: dict[str, Any] = {"device": device, "torch_threads": torch.get_num_threads(),
                              "sequences": sequences, "seq_len": seq_len}
    positions = torch.arange(seq_len, device=device)[None]
    with PeakMemory() as memory:
        model = build_model(shape).to(device)
        model.requires_grad_(False)
        layer, rotary = model.model.layers[0], model.model.rotary_emb
        for name, parameter in layer.named_parameters():
            parameter.requires_grad_("norm" in name)  # tune_norms: true
        hidden = torch.randn(1, seq_len, h, device=device)
        position_embeddings = rotary(hidden, positions)

        def forward_only():
            with torch.no_grad():
                layer(hidden, position_embeddings=position_embeddings, position_ids=positions)

        result["layer_forward_s_per_token"] = _timed(forward_only, repeats) / seq_len
        if spec.get("forward_only"):
            result["peak_rss_mb"] = result["layer_peak_rss_mb"] = max(memory.peak_mb, _rss_mb())
            return result
        members = {name: m for name, m in layer.named_modules() if isinstance(m, torch.nn.Linear)}
        codes = {name: torch.randint(-4, 4, m.weight.shape, device=device, dtype=torch.int8) for name, m in members.items()}
        scales = {name: torch.rand(m.weight.shape[0], m.weight.shape[1] // group, device=device) for name, m in members.items()}
        gains = {name: torch.zeros_like(s, requires_grad=True) for name, s in scales.items()}
        inputs = [torch.randn(1, seq_len, h, device=device, requires_grad=True) for _ in range(sequences)]

        def weight_of(name: str):  # as GSQEndToEndModifier: int8 codes x scales, rebuilt at every call of the Linear
            return lambda: codes[name].to(torch.float32) * (scales[name] * torch.exp(gains[name])).repeat_interleave(group, 1)

        def run_layer(x):
            output = layer(x, position_embeddings=position_embeddings, position_ids=positions)
            return output[0] if isinstance(output, tuple) else output

        def layer_step():  # one sequence's graph at a time, the layer recomputed in backward (checkpointing)
            with linears_with_weights(members, {name: weight_of(name) for name in members}):
                for x in inputs:
                    output = torch.utils.checkpoint.checkpoint(run_layer, x, use_reentrant=False)
                    output.backward(torch.ones_like(output))

        result["e2e_layer_fwd_bwd_s"] = _timed(layer_step, repeats)
    result["layer_peak_rss_mb"] = memory.peak_mb
    del model, layer, codes, gains, scales, inputs, members
    gc.collect()
    vocab, chunk = spec.get("vocab", E2E_VOCAB), spec.get("positions_per_chunk", E2E_CHUNK)
    if vocab:
        from gsq_vllm.gsq.end_to_end import _accumulate_kl_gradients

        for frozen in (False, True):
            with PeakMemory() as memory:
                head = torch.nn.Linear(h, vocab, bias=False, device=device)
                head.weight.requires_grad_(not frozen)
                kept = torch.randn(seq_len, h, device=device).to(torch.bfloat16)
                final = torch.randn(seq_len, h, device=device, requires_grad=True)

                def head_step():  # one sequence, the stage's own chunked KL through the model's head
                    _accumulate_kl_gradients(lambda items: final, lambda items: kept.float(), [0], [final], head,
                                             chunk=chunk)

                key = "e2e_head_fwd_bwd_s_per_sequence" + ("_frozen_head" if frozen else "")
                result[key] = _timed(head_step, repeats)
            result[key.replace("_s_per_sequence", "_peak_rss_mb")] = memory.peak_mb
            del head, kept, final
            gc.collect()
        result["e2e_head_vocab"], result["e2e_positions_per_chunk"] = vocab, chunk
    result["peak_rss_mb"] = max(v for k, v in result.items() if k.endswith("peak_rss_mb"))
    if device == "cuda":
        result["cuda_peak_allocated_mb"] = torch.cuda.max_memory_allocated() / 2**20
    return result


def run_child(kind: str, spec: dict, log: Callable[[str], None]) -> dict:
    """Run ``measure_<kind>`` in a fresh process; load averages before and after it."""
    with tempfile.TemporaryDirectory(prefix="layer-cost-") as folder:
        out = Path(folder) / "result.json"
        before = os.getloadavg()
        begin = time.time()
        log_path = Path(folder) / "child.log"
        with open(log_path, "w") as child_log:  # a file, not a pipe: a long child's output cannot fill it
            process = subprocess.run([sys.executable, __file__, "--child", kind, json.dumps(spec), str(out)],
                                     stdout=child_log, stderr=subprocess.STDOUT, text=True)
        after = os.getloadavg()
        if process.returncode != 0 or not out.exists():
            tail = log_path.read_text(errors="replace")[-3000:]
            log(f"  failed (exit {process.returncode}):\n{tail}")
            return {"error": f"exit {process.returncode}: {tail.strip().splitlines()[-1] if tail.strip() else ''}",
                    "loadavg_before": before, "loadavg_after": after}
        result = json.loads(out.read_text())
    result.update(loadavg_before=[round(x, 2) for x in before], loadavg_after=[round(x, 2) for x in after],
                  child_wall_seconds=round(time.time() - begin, 1))
    return result


# -- fitting and projecting -------------------------------------------------------------------------

def fit_line(points: list[tuple[float, float]]) -> tuple[float, float]:
    """(intercept, slope) through two or more (budget, seconds) points (least squares)."""
    xs, ys = [p[0] for p in points], [p[1] for p in points]
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    var = sum((x - mean_x) ** 2 for x in xs)
    if var == 0:
        raise ValueError("two different budgets are needed to fit fixed + per_step * steps")
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / var
    return mean_y - slope * mean_x, slope


def recipe_budget(method: str) -> int | None:
    from gsq_vllm.recipes import load_recipe

    if method not in BUDGET_KEY:
        return None
    for stage in load_recipe(RECIPES[method]).values():
        for group in stage.values():
            if MODIFIERS[method] in group:
                return int(group[MODIFIERS[method]][BUDGET_KEY[method]])
    raise ValueError(f"{RECIPES[method]} has no {MODIFIERS[method]}")


def fixed_and_per_step(runs: list[dict], work_key: str) -> tuple[float, float, str, dict]:
    """(fixed, per_step) of the iterative work ``work_key`` (seconds): from the optimizer's step times
    inside the longest run (``(last step end - first step end) / (n - 1)``; fixed = that run's work
    minus n x per_step), and a least-squares fit over the runs' budgets as a cross-check when they differ."""
    longest = max(runs, key=lambda r: r["budget"])
    clock = longest.get("step_clock", {})
    checks = {}
    if len({r["budget"] for r in runs}) > 1:
        fixed, per_step = fit_line([(r["budget"], r[work_key]) for r in runs])
        checks["two_run_fit"] = {"fixed_seconds": fixed, "per_step_seconds": per_step,
                                 "budgets": sorted(r["budget"] for r in runs)}
    if "per_step_seconds" in clock:
        how = (f"per step = (end of step {clock['steps_seen']} - end of step 1) / {clock['steps_seen'] - 1} inside the "
               f"{longest['budget']}-step run (the first step's set-up left out), fixed = that run's work - "
               f"{clock['steps_seen']} x per step")
        return clock["fixed_seconds"], clock["per_step_seconds"], how, checks
    if "two_run_fit" in checks:
        fit = checks["two_run_fit"]
        return fit["fixed_seconds"], fit["per_step_seconds"], f"fitted on the runs of {fit['budgets']} steps", checks
    raise ValueError("per-step time needs a run with two or more steps, or runs at two budgets")


def project_method(method: str, runs: list[dict], shape: dict[str, int], sequences: int, block: str) -> dict:
    """Seconds per layer at the recipe's budget and 128 x 512 calibration tokens, from the runs."""
    scale = FULL_SEQUENCES / sequences
    mean = lambda key: sum(r.get(key, 0.0) for r in runs) / len(runs)  # noqa: E731
    pipeline = mean("seconds") - mean("layer_work_seconds")  # forwards, Hessians, input capture: per token
    out: dict[str, Any] = {"calibration_scale": scale}
    if method == "gptq":
        solve = mean("layer_work_seconds")
        out["seconds"] = pipeline * scale + solve
        out["formula"] = (f"(total - GPTQ solve) x {scale:g} + GPTQ solve = {pipeline:.1f} x {scale:g} + {solve:.1f} "
                          f"(the solve does not depend on the token count)")
        out["parts"] = {"pipeline_per_layer": pipeline * scale, "solve": solve}
        return out
    budget = recipe_budget(method)
    if method == "gsq":
        ratio = layer_params(shape) / layer_params(shape, "attention") if block == "attention" else 1.0
        fixed, per_step, how, checks = fixed_and_per_step(runs, "optimize_seconds")
        out["cross_checks"] = checks
        start = mean("gptq_start_seconds")
        targets = mean("layer_work_seconds") - start - mean("optimize_seconds")
        seconds = pipeline * scale + start + ratio * ((targets + fixed) * scale + per_step * budget)
        out.update(seconds=seconds, per_step_seconds=per_step * ratio, fixed_optimize_seconds=fixed,
                   parameter_ratio=ratio, budget=budget, parts={
                       "pipeline_per_layer": pipeline * scale, "gptq_start": start,
                       "targets_and_optimize_fixed": ratio * (targets + fixed) * scale,
                       "steps": ratio * per_step * budget})
        out["formula"] = (f"(total - layer work) x {scale:g} + GPTQ start + r x ((targets + fixed) x {scale:g} "
                          f"+ per_step x {budget}); on the optimisation time: {how}; r = {ratio:.2f} "
                          + ("(decoder layer / attention parameters: GSQ measured on the attention sub-block)"
                             if block == "attention" else "(whole decoder layer measured)")
                          + "; fixed (holdout check, relaxation set-up) is scaled as token-proportional: an upper bound")
        return out
    fixed, per_step, how, checks = fixed_and_per_step(runs, "layer_work_seconds")
    out["cross_checks"] = checks
    out.update(seconds=pipeline * scale + fixed * scale + per_step * budget, per_step_seconds=per_step,
               fixed_layer_work_seconds=fixed, budget=budget,
               parts={"pipeline_per_layer": pipeline * scale, "setup_and_reference_outputs": fixed * scale,
                      "iterations": per_step * budget})
    out["formula"] = (f"(total - layer work) x {scale:g} + fixed x {scale:g} + per_iteration x {budget}; on the "
                      f"layer work: {how.replace('step', 'iteration')}; fixed (reference outputs, next layer's inputs, "
                      "set-up) is scaled as token-proportional: an upper bound")
    return out


def scale_projection(projection: dict, method: str, source: dict[str, int], target: dict[str, int],
                     forward_ratio: float, fwd_bwd_ratio: float) -> dict:
    """Another shape's seconds from a measured shape's parts: token-proportional parts by the
    measured forward-time ratio, GPTQ solves by their multiply-add ratio, steps by the measured
    forward+backward ratio."""
    solve_ratio = gptq_solve_work(target) / gptq_solve_work(source)
    factors = {"pipeline_per_layer": forward_ratio, "solve": solve_ratio, "gptq_start": solve_ratio,
               "targets_and_optimize_fixed": fwd_bwd_ratio, "steps": fwd_bwd_ratio,
               "setup_and_reference_outputs": forward_ratio, "iterations": fwd_bwd_ratio}
    parts = {k: v * factors[k] for k, v in projection["parts"].items()}
    return {"seconds": sum(parts.values()), "parts": parts,
            "factors": {k: round(factors[k], 3) for k in projection["parts"]},
            "formula": ("from the measured shape's parts: token-proportional parts x (measured layer forward "
                        f"time ratio {forward_ratio:.2f}), GPTQ solves x (multiply-add ratio of out*in^2 + in^3, "
                        f"{solve_ratio:.2f}), steps / iterations x (measured forward+backward time ratio "
                        f"{fwd_bwd_ratio:.2f})")}


def gpu_projection(shape_name: str, shape: dict[str, int], tokens: int = FULL_SEQUENCES * SEQ_LEN) -> dict:
    """Seconds per layer on one H100 from FLOPs and bytes moved, and memory from the same formulas
    as the CPU estimate: a projection, not a measurement. Two columns: matmuls at the bf16 tensor-core
    rate, and at the fp32 rate (the quantize job loads the model in fp32, so that is what it would get
    without TF32 or a bf16 model)."""
    p = layer_params(shape)
    bandwidth = H100["hbm_tb_s"] * 1e12 * H100["memory_utilization"]
    h = shape["hidden"]
    gsq_budget, ar_budget = recipe_budget("gsq"), recipe_budget("autoround")
    # (matmul FLOPs, other FLOPs at low utilisation, elementwise bytes) per method and per layer
    pipeline = tokens * (2 * 2 * p)  # the sequential pipeline runs the layer twice per token (calibrate, propagate)
    hessians = 2 * tokens * hessian_bytes(shape) / 4
    solve = 2 * gptq_solve_work(shape)
    work = {
        "gptq": (pipeline + hessians, solve, 0.0),
        "gsq": (pipeline + hessians + 1.2 * tokens * 2 * p + gsq_budget * 6 * p * 1024, solve, gsq_budget * 160 * p),
        "autoround": (pipeline + 2 * tokens * 2 * p + ar_budget * 6 * p * 8 * SEQ_LEN, 0.0, ar_budget * 40 * p),
    }
    rows = {}
    for method, (matmul, sequential, moved) in work.items():
        row = {"memory_mb": round(estimate_memory_mb(method, shape, tokens)["mb"])}
        for label, peak in (("bf16", H100["bf16_dense_tflops"]), ("fp32", H100["fp32_tflops"])):
            rate = peak * 1e12 * H100["matmul_utilization"]
            solve_rate = H100["fp32_tflops"] * 1e12 * H100["solve_utilization"]  # GPTQ solves in fp32 either way
            row[f"seconds_{label}"] = round(matmul / rate + sequential / solve_rate + moved / bandwidth, 2)
        rows[method] = row
    e2e = None
    if shape_name in E2E_LAYERS:
        layers, t = E2E_LAYERS[shape_name], 4 * SEQ_LEN
        # layers: forward, recomputed forward (checkpointing), backward (2x); head: teacher, student, 2 backward
        flops = layers * 8 * p * t + 2 * t * h * E2E_VOCAB * 4
        e2e = {"flops_per_step": flops,
               **{f"seconds_per_step_{label}": round(flops / (peak * 1e12 * H100["matmul_utilization"]), 3)
                  for label, peak in (("bf16", H100["bf16_dense_tflops"]), ("fp32", H100["fp32_tflops"]))}}
    return {"label": "PROJECTION (not measured): matmul FLOPs / (peak x utilization) + GPTQ solve FLOPs / "
                     "(peak x solve utilization) + elementwise bytes / (bandwidth x utilization)",
            "assumptions": H100,
            "formulas": {
                "pipeline": "tokens x 2 forwards x 2P FLOPs + Hessians 2 x tokens x sum(in^2)",
                "gptq_solve": "2 x sum(out x in^2 + in^3) FLOPs at the fp32 peak x the solve utilization "
                              "(column-sequential, fp32 in both columns)",
                "gsq": "pipeline + solve + targets and holdout (1.2 x tokens x 2P) + steps x (6P x 1024 FLOPs "
                       "+ 160 B/weight of relaxation forward/backward and Lion traffic)",
                "autoround": "pipeline + reference outputs and next inputs (2 x tokens x 2P) + iterations x "
                             "(6P x 8 x 512 FLOPs + 40 B/weight)",
                "memory": f"the CPU estimate's formula (estimate_memory_mb, GSQ at {GSQ_BYTES_PER_WEIGHT} B per trained "
                          "weight: an upper bound, see gsq_bytes_per_weight_measured); on a GPU most of it is device memory",
                "e2e_step": "layers x 8P x 2048 (forward, recomputed forward, backward) + 4 x 2 x 2048 x hidden x "
                            "128256 FLOPs"},
            "rows": rows, "e2e": e2e}


# -- the run ------------------------------------------------------------------------------------------

def cached(child: Callable, path: Path | None) -> Callable:
    """``child`` whose results are also kept in a JSON file by spec, and taken from it when there:
    a run cut off (or a projection fixed) later does not measure again what it already measured."""
    if path is None:
        return child
    store = json.loads(path.read_text()) if path.exists() else {}

    def run_or_reuse(kind: str, spec: dict, log: Callable[[str], None]) -> dict:
        key = json.dumps([kind, spec], sort_keys=True)
        if key in store and "error" not in store[key]:
            log("    (measured before: taken from the cache)")
            return dict(store[key], reused_from_cache=True)
        result = child(kind, spec, log)
        store[key] = result
        write_json(store, path)
        return result

    return run_or_reuse


def run(shapes: list[str], methods: list[str], steps: list[int], iters: list[int], sequences: int,
        memory_limit_gb: float, log: Callable[[str], None] = print, child: Callable = run_child,
        fwd_bwd_spec: dict | None = None, recipe_overrides: dict | None = None) -> dict:
    """Measure what fits, project the rest; returns the results document."""
    from gsq_vllm.machine import cpu_description

    limit_mb = memory_limit_gb * 1024
    measured: dict[str, dict] = {}
    for shape_name in shapes:
        shape = SHAPES[shape_name]
        entry: dict[str, Any] = {"shape": shape, "layer_parameters": layer_params(shape),
                                 "attention_parameters": layer_params(shape, "attention"), "methods": {}}
        measured[shape_name] = entry
        tokens = sequences * SEQ_LEN
        log(f"== {shape_name}: {shape}, {entry['layer_parameters'] / 1e6:.0f}M parameters per layer")
        spec = dict(fwd_bwd_spec or {}, shape=shape_name)
        spec.setdefault("vocab", E2E_VOCAB if shape_name == "8b" else 0)  # the head is costed at 8B shape
        spec["e2e_stage"] = E2E_STAGE
        # layer phase: weights, codes, rebuilt weights and their gradient (fp32) + runtime; forward only: weights
        full, forward = (16 * entry["layer_parameters"] + 1.5e9) / 2**20, (4 * entry["layer_parameters"] + 1.5e9) / 2**20
        if full > limit_mb:
            spec.update(forward_only=True, vocab=0)
        if forward > limit_mb:
            entry["forward_backward"] = {"skipped": f"estimated {forward:.0f} MB > limit"}
        else:
            log("  forward" + ("" if spec.get("forward_only") else " / backward") + " of one layer"
                + (" and the end-to-end head" if spec.get("vocab") else "") + " ...")
            entry["forward_backward"] = child("forward_backward", spec, log)
            if spec.get("forward_only"):
                entry["forward_backward"]["note"] = (f"forward only: the end-to-end layer phase (~{full:.0f} MB "
                                                     "estimated) does not fit the memory limit")
            log(f"    {_short(entry['forward_backward'])}")
        for method in methods:
            record: dict[str, Any] = {"recipe": RECIPES[method], "runs": []}
            entry["methods"][method] = record
            block = "layer"
            memory = estimate_memory_mb(method, shape, tokens, block)
            if method == "gsq" and memory["mb"] > limit_mb:
                block = "attention"
                memory = estimate_memory_mb(method, shape, tokens, block)
            record["block"] = block
            record["estimated_memory_at_measured_calibration"] = memory
            record["estimated_memory_full"] = estimate_memory_mb(method, shape, FULL_SEQUENCES * SEQ_LEN, "layer")
            if memory["mb"] > limit_mb:
                record["skipped"] = (f"does not fit in this machine's memory: estimated {memory['mb']:.0f} MB "
                                     f"> limit {limit_mb:.0f} MB")
                log(f"  {method}: {record['skipped']}")
                continue
            budgets = {"gsq": steps, "autoround": iters}.get(method, [None])
            for budget in budgets:
                run_spec = dict(method=method, shape=shape_name, sequences=sequences, budget=budget, block=block,
                                recipe_overrides=recipe_overrides)
                log(f"  {method} {BUDGET_KEY.get(method, 'budget')}={budget} block={block} "
                    f"calibration={sequences}x{SEQ_LEN} ...")
                result = child("method", run_spec, log)
                result.update(budget=budget)
                record["runs"].append(result)
                log(f"    {_short(result)}")
            if any("error" in r for r in record["runs"]):
                record["skipped"] = "a run failed: " + next(r["error"] for r in record["runs"] if "error" in r)
                continue
            record["projection"] = project_method(method, record["runs"], shape, sequences, block)
            record["measured_peak_rss_mb"] = max(r["peak_rss_mb"] for r in record["runs"])
            growth = (record["estimated_memory_full"]["mb"] - estimate_memory_mb(method, shape, tokens, "layer")["mb"])
            if block == "layer":
                record["projected_peak_rss_mb_full"] = record["measured_peak_rss_mb"] + growth
                record["memory_note"] = (f"measured peak at {sequences}x{SEQ_LEN} tokens + the formula's growth to "
                                         f"{FULL_SEQUENCES}x{SEQ_LEN} ({growth:.0f} MB of cached activations)")
            else:
                trained = layer_params(shape) - layer_params(shape, "attention")
                bytes_per_weight, source = GSQ_BYTES_PER_WEIGHT, "the formula's"
                gptq = entry["methods"].get("gptq", {})
                if "measured_peak_rss_mb" in gptq:  # same pipeline and Hessians: the difference is GSQ's own
                    cache = 2 * 2 * tokens * shape["hidden"]  # block inputs + targets, bf16
                    measured_bpw = ((record["measured_peak_rss_mb"] - gptq["measured_peak_rss_mb"]) * 2**20 - cache) \
                        / layer_params(shape, "attention")
                    record["gsq_bytes_per_weight_measured"] = measured_bpw
                    record["gsq_bytes_per_weight_measured_formula"] = (
                        "(GSQ peak - GPTQ peak at the same shape and calibration - cached block inputs and targets) "
                        "/ attention weights")
                    if measured_bpw > 0:
                        bytes_per_weight, source = measured_bpw, "the measured"
                record["projected_peak_rss_mb_full"] = (record["measured_peak_rss_mb"] + growth
                                                        + bytes_per_weight * trained / 2**20)
                record["projected_peak_rss_mb_full_formula_69"] = (record["measured_peak_rss_mb"] + growth
                                                                   + GSQ_BYTES_PER_WEIGHT * trained / 2**20)
                record["memory_note"] = (f"measured peak on the attention sub-block + {source} {bytes_per_weight:.0f} B x "
                                         f"the MLP's {trained / 1e6:.0f}M weights + the growth of cached activations to "
                                         f"{FULL_SEQUENCES}x{SEQ_LEN} tokens ({growth:.0f} MB); the whole layer was not run")
    # shapes whose methods could not run: scale from a measured shape
    for shape_name, entry in measured.items():
        for method, record in entry["methods"].items():
            if "projection" in record:
                continue
            source = next((s for s, e in measured.items() if s != shape_name
                           and "projection" in e["methods"].get(method, {})), None)
            if source is None:
                continue
            ratios = _work_ratios(measured[source], entry)
            record["projection_from_other_shape"] = {
                "from": source, **scale_projection(measured[source]["methods"][method]["projection"], method,
                                                   measured[source]["shape"], entry["shape"], *ratios)}
            record["projected_peak_rss_mb_full"] = record["estimated_memory_full"]["mb"]
            record["memory_note"] = "estimate from the formula (not run)"
            measured_bpw = measured[source]["methods"][method].get("gsq_bytes_per_weight_measured", 0)
            if method == "gsq" and measured_bpw > 0:
                record["projected_peak_rss_mb_full"] += ((measured_bpw - GSQ_BYTES_PER_WEIGHT)
                                                         * entry["layer_parameters"] / 2**20)
                record["memory_note"] = (f"estimate from the formula (not run), with the {measured_bpw:.0f} B per "
                                         f"trained weight measured at the {source} shape instead of {GSQ_BYTES_PER_WEIGHT}")
    e2e = {}
    for shape_name, entry in measured.items():
        fb = entry.get("forward_backward", {})
        if shape_name in E2E_LAYERS and "e2e_layer_fwd_bwd_s" in fb and "e2e_head_fwd_bwd_s_per_sequence" in fb:
            e2e[shape_name] = end_to_end_cost(shape_name, entry["shape"], fb)
    return {
        "benchmark": "layer_cost",
        "what": ("cost of quantizing ONE decoder layer at Llama-3.1 shapes, random weights (cost does not depend on "
                 f"the values), vocabulary {VOCAB} for the one-layer model (embeddings and head are not per-layer cost)"),
        "random_weights": True,
        "device": _device(),
        "cpu": cpu_description(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "calibration": {"measured": f"{sequences} x {SEQ_LEN} random token ids",
                        "projected_to": f"{FULL_SEQUENCES} x {SEQ_LEN}", "sequences": sequences, "seq_len": SEQ_LEN},
        "budgets_measured": {"gsq_steps": steps, "autoround_iters": iters},
        "memory_limit_gb": memory_limit_gb,
        "formulas": {"gsq_bytes_per_weight": GSQ_BYTES_PER_WEIGHT, "autoround_bytes_per_weight": AUTOROUND_BYTES_PER_WEIGHT,
                     "memory": "runtime + 4P (weights) + 2 x 4 x tokens x hidden (pipeline) + Hessians 4 x sum(in^2) "
                               "+ 3 x 4 x widest_in^2 (GPTQ solve) + GSQ: 4 x tokens x hidden (bf16 inputs, targets) "
                               f"+ {GSQ_BYTES_PER_WEIGHT} B x trained weights; AutoRound: 8 x tokens x hidden + "
                               f"{AUTOROUND_BYTES_PER_WEIGHT} B x weights"},
        "shapes": measured,
        "end_to_end": e2e,
        "gpu_projection": {name: gpu_projection(name, SHAPES[name]) for name in shapes if name in E2E_LAYERS},
    }


def end_to_end_cost(shape_name: str, shape: dict[str, int], fb: dict) -> dict:
    """The end-to-end stage's seconds per step (4 sequences of 512 tokens) from one layer and the head."""
    layers, per_step = E2E_LAYERS[shape_name], 4
    layer = fb["e2e_layer_fwd_bwd_s"] * per_step / fb["sequences"] * SEQ_LEN / fb["seq_len"]
    head = per_step * fb["e2e_head_fwd_bwd_s_per_sequence_frozen_head"] * SEQ_LEN / fb["seq_len"]
    trained = per_step * fb["e2e_head_fwd_bwd_s_per_sequence"] * SEQ_LEN / fb["seq_len"]
    p, h, vocab = layer_params(shape), shape["hidden"], fb["e2e_head_vocab"]
    chunk = fb.get("e2e_positions_per_chunk", E2E_CHUNK)
    tokens = per_step * SEQ_LEN
    activations = tokens * (4 * h + 4 * shape["intermediate"]) * 4  # inputs of the Linears and the MLP's, fp32
    memory = {  # bytes, the whole model at this shape (fp32, as the quantize job loads it); the stage as it runs now
        "model weights fp32": 4 * (layers * p + 2 * vocab * h),
        "codes held as int8": layers * p,
        "one layer's rebuilt weights and activations (checkpointed)": 4 * p + activations // per_step,
        "layer-boundary hidden states of one sequence": layers * SEQ_LEN * h * 4,
        "teacher hidden states kept (bf16, 128 x 512 tokens)": 2 * FULL_SEQUENCES * SEQ_LEN * h,
        f"logits and log-softmaxes of one chunk (fp32, ~6 of [{chunk}, vocab])": 6 * 4 * chunk * vocab,
    }
    return {
        "seconds_per_step": layers * layer + head, "layer_fwd_bwd_s": layer, "head_fwd_bwd_s": head,
        "head_fwd_bwd_s_with_head_gradient": trained, "layers": layers, "vocab": vocab, "recipe_steps": 60,
        "seconds_recipe": 60 * (layers * layer + head),
        "stage_version": E2E_STAGE,
        "formula": (f"{layers} x (one layer's forward + recomputed forward + backward on 4 x 512 tokens, one sequence at "
                    f"a time, {layer:.1f} s) + 4 x (head on one "
                    f"512-token sequence: teacher logits from kept hidden states, student logits, KL, backward, "
                    f"{head / 4:.1f} s); one layer and the head measured, then multiplied"),
        "memory_estimate_mb": {k: round(v / 2**20) for k, v in memory.items()},
        "memory_estimate_total_mb": round(sum(memory.values()) / 2**20),
        "memory_note": "estimate from the formula for the whole model (not run); the layer and head phases' measured "
                       "peaks are in shapes.<shape>.forward_backward",
    }


def _work_ratios(source: dict, target: dict) -> tuple[float, float]:
    """(forward, forward+backward) time ratios target / source, measured if both were, else parameter ratio."""
    params = target["layer_parameters"] / source["layer_parameters"]
    a, b = source.get("forward_backward", {}), target.get("forward_backward", {})
    forward = (b["layer_forward_s_per_token"] / a["layer_forward_s_per_token"]
               if "layer_forward_s_per_token" in a and "layer_forward_s_per_token" in b else params)
    both = (b["e2e_layer_fwd_bwd_s"] / a["e2e_layer_fwd_bwd_s"]
            if "e2e_layer_fwd_bwd_s" in a and "e2e_layer_fwd_bwd_s" in b else forward)
    return forward, both


def _short(result: dict) -> str:
    keys = ("seconds", "layer_work_seconds", "gptq_start_seconds", "optimize_seconds", "peak_rss_mb",
            "layer_forward_s_per_token", "e2e_layer_fwd_bwd_s", "e2e_head_fwd_bwd_s_per_sequence", "error")
    return ", ".join(f"{k}={result[k]:.4g}" if isinstance(result[k], float) else f"{k}={result[k]}"
                     for k in keys if k in result)


def table(payload: dict) -> str:
    """The README's table (benchmarks/readme_tables.py renders it from the results file)."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("readme_tables", Path(__file__).with_name("readme_tables.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.layer_cost_table(payload)


def write_json(payload: dict, path: Path) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    part = path.with_name(path.name + ".part")
    part.write_text(json.dumps(payload, indent=1, default=float) + "\n")
    os.replace(part, path)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--shapes", nargs="+", default=["8b", "70b"], choices=list(SHAPES))
    parser.add_argument("--methods", nargs="+", default=["gptq", "gsq", "autoround"], choices=list(RECIPES))
    parser.add_argument("--steps", nargs="+", type=int, default=[6],
                        help="GSQ steps of the measured run(s) (projected to the recipe's 100 from the per-step time "
                             "inside the longest run; two budgets add a two-run fit as a cross-check)")
    parser.add_argument("--iters", nargs="+", type=int, default=[3],
                        help="AutoRound iterations of the measured run(s) (projected to the recipe's 200, as --steps)")
    parser.add_argument("--calibration", type=int, default=32,
                        help="calibration sequences of 512 tokens measured (projected to 128); at least "
                             "intermediate / 512 (GPTQ needs as many tokens as input features)")
    parser.add_argument("--memory-limit-gb", type=float, default=11.0,
                        help="methods whose formula exceeds this are not run (estimated instead)")
    parser.add_argument("--output", type=Path, default=None)
    parser.add_argument("--cache", type=Path, default=None,
                        help="keep every measured run in this JSON file and reuse those already there")
    parser.add_argument("--child", nargs=3, metavar=("KIND", "SPEC", "OUT"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        kind, spec, out = args.child
        measure = {"method": measure_method, "forward_backward": measure_forward_backward}[kind]
        result = measure(json.loads(spec))
        Path(out).write_text(json.dumps(result))
        return 0
    begin = time.time()
    payload = run(args.shapes, args.methods, args.steps, args.iters, args.calibration, args.memory_limit_gb,
                  child=cached(run_child, args.cache))
    payload["command"] = "python benchmarks/layer_cost.py " + " ".join(sys.argv[1:])
    payload["benchmark_wall_seconds"] = round(time.time() - begin)
    payload["measured_wall_seconds"] = round(sum(  # every child's wall time, also those taken from the cache
        r.get("child_wall_seconds", 0) for e in payload["shapes"].values()
        for r in [e.get("forward_backward", {})] + [x for m in e["methods"].values() for x in m.get("runs", [])]))
    output = args.output or RESULTS / f"layer_cost_{_device()}.json"
    write_json(payload, output)
    print(table(payload))
    for shape_name, e2e in payload["end_to_end"].items():
        print(f"end-to-end stage at {shape_name}: {e2e['seconds_per_step']:.1f} s per step = {e2e['formula']}")
    print(f"wrote {output} in {payload['benchmark_wall_seconds']} s ({payload['measured_wall_seconds']} s of measuring)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
