"""Make the checkpoints the serving tests and the serving benchmark use (run it with .venv/bin/python).

The serving environment has no llmcompressor (its compressed-tensors is 0.17, llmcompressor 0.14
needs 0.19), so the serve-env tests and ``benchmarks/serve_throughput.py`` call this script in
the quantize environment in a subprocess and cache what it writes.

Kinds (all group size 64, symmetric int, weight-only, ``lm_head`` kept in full precision but in ``gsq-w3-h4``):

* ``gsq-w2``, ``gsq-w3``: round-to-nearest (``QuantizationModifier``), which writes exactly the GSQ
  on-disk format (2/3-bit codes, group scales); compressed-tensors 0.19 writes the dense layout.
* ``gsq-w3-old``: ``gsq-w3`` rewritten into the word-aligned 3-bit layout of compressed-tensors
  0.17 (10 codes a word), with ``version`` 0.17.0 in config.json.
* ``gptq-w4``: ``GPTQModifier`` W4A16 group 64, the stock-vLLM baseline of the benchmark.
* ``mixed-w2-w4``: round-to-nearest with two config groups, attention projections 4-bit and MLP
  2-bit (``lm_head`` dense): mixed widths in one checkpoint.
* ``autoround-w3``: llmcompressor's ``AutoRoundModifier`` (10 iterations per layer), the peer in
  the accuracy benchmark, so a user can serve whichever quantizer wins.
* ``gsq-made-w3``: GSQModifier itself (a short budget: 3 steps per decoder layer, no end-to-end
  stage), so the serving tests also run a checkpoint that GSQ wrote (signed scales included);
  ``gsq-made-w3-old`` is it in the word-aligned layout.
* ``gsq-moe-w3``: round-to-nearest 3-bit of the MoE model derived from the default one
  (:mod:`gsq_vllm.moe_model`): every routed expert and attention projection, router kept.
* ``gsq-w3-h4``: ``gsq-w3`` with the output head quantized too (4 bits, group 64, a config group
  of its own; llmcompressor unties it from the input embedding, which stays dense), the format of
  ``benchmarks/serve_shapes.py``'s ``-h4`` rows.
* ``gsq-w3-down-g768``: round-to-nearest 3-bit, group 64 except ``down_proj`` in groups of 768
  columns (in_features 1536): a checkpoint that three tensor-parallel ranks (512 columns each)
  cannot split without cutting a group.

Usage: ``python tests/serving/make_checkpoints.py KIND OUTPUT_DIR [--model DIR]``.
Each checkpoint is written to a temporary folder and renamed into place, so a cached folder is
always complete.
"""

from __future__ import annotations

import argparse
import json
import shutil
import sys
from pathlib import Path

KINDS = ("gsq-w2", "gsq-w3", "gsq-w3-old", "gptq-w4", "mixed-w2-w4", "gsq-made-w3", "gsq-made-w3-old", "autoround-w3",
         "gsq-w3-down-g768", "gsq-moe-w3", "gsq-w3-h4")
GROUP_SIZE = 64


def _weights(bits: int, group_size: int = GROUP_SIZE) -> dict:
    return {"num_bits": bits, "type": "int", "symmetric": True, "strategy": "group", "group_size": group_size}


def _scheme(bits: int) -> dict:
    return {"group_0": {"targets": ["Linear"], "weights": _weights(bits)}}


#: attention 4-bit, MLP 2-bit (the same split as recipes/gsq_w2mlp_w4attn_g64.yaml)
MIXED_SCHEME = {
    "attention": {"targets": [r"re:.*self_attn\.(q|k|v|o)_proj$"], "weights": _weights(4)},
    "mlp": {"targets": [r"re:.*mlp\.(gate|up|down)_proj$"], "weights": _weights(2)},
}

#: 3-bit decoder layers, 4-bit output head
HEAD4_SCHEME = {
    "decoder": {"targets": [r"re:.*layers\.\d+\..*_proj$"], "weights": _weights(3)},
    "head": {"targets": ["lm_head"], "weights": _weights(4)},
}

#: 3-bit, down_proj in groups of 768 columns: whole at one or two tensor-parallel ranks, split at three
DOWN_G768_SCHEME = {
    "rest": {"targets": [r"re:.*(q|k|v|o|gate|up)_proj$"], "weights": _weights(3)},
    "down": {"targets": [r"re:.*mlp\.down_proj$"], "weights": _weights(3, 768)},
}


def _calibration_dataset(tokenizer, samples: int = 16, seq_len: int = 256):
    from datasets import Dataset

    from gsq_vllm.data import text_path

    text = text_path("calibration").read_text()
    ids = tokenizer(text, return_tensors="pt").input_ids[0]
    rows = [ids[i * seq_len : (i + 1) * seq_len].tolist() for i in range(samples)]
    return Dataset.from_dict({"input_ids": rows, "attention_mask": [[1] * seq_len for _ in rows]})


def quantize(kind: str, model_dir: Path, out: Path) -> None:
    """Run llmcompressor's oneshot for ``gsq-w2``/``gsq-w3`` (RTN) or ``gptq-w4`` (GPTQ)."""
    import torch
    from llmcompressor import oneshot
    from llmcompressor.modifiers.quantization import GPTQModifier, QuantizationModifier
    from transformers import AutoModelForCausalLM, AutoTokenizer

    torch.manual_seed(0)
    tokenizer = AutoTokenizer.from_pretrained(str(model_dir))
    model = AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32)
    if kind in ("gptq-w4", "gsq-made-w3", "autoround-w3"):
        if kind == "gptq-w4":
            recipe = GPTQModifier(config_groups=_scheme(4), ignore=["lm_head"])
        elif kind == "autoround-w3":
            from llmcompressor.modifiers.autoround import AutoRoundModifier

            recipe = AutoRoundModifier(config_groups=_scheme(3), ignore=["lm_head"], iters=10, batch_size=8,
                                       enable_torch_compile=False)
        else:
            from gsq_vllm.compress.gsq_modifier import GSQModifier

            recipe = GSQModifier(config_groups=_scheme(3), ignore=["lm_head"], steps=3, tokens_per_step=512,
                                 fused=False)  # no torch.compile warm-up for a 3-step run
        dataset = _calibration_dataset(tokenizer)
        oneshot(
            model=model,
            recipe=recipe,
            dataset=dataset,
            processor=tokenizer,
            num_calibration_samples=len(dataset),
            max_seq_length=256,
            output_dir=str(out),
            save_compressed=True,
        )
    else:
        scheme = ({"mixed-w2-w4": MIXED_SCHEME, "gsq-w3-down-g768": DOWN_G768_SCHEME, "gsq-w3-h4": HEAD4_SCHEME}.get(kind)
                  or _scheme(int(kind[-1])))
        ignore = [r"re:.*\.gate$"] + ([] if kind == "gsq-w3-h4" else ["lm_head"])
        recipe = QuantizationModifier(config_groups=scheme, ignore=ignore)
        oneshot(model=model, recipe=recipe, output_dir=str(out), save_compressed=True)
    tokenizer.save_pretrained(str(out))


def rewrite_word_aligned(source: Path, out: Path) -> None:
    """Copy a dense-layout 3-bit checkpoint into the word-aligned (compressed-tensors 0.17) layout."""
    from safetensors.torch import load_file, save_file

    from gsq_vllm.checkpoint import inspect_checkpoint
    from gsq_vllm.packing import PackLayout, pack_codes, unpack_codes

    info = inspect_checkpoint(source)
    shutil.copytree(source, out)
    for file in sorted(out.glob("*.safetensors")):
        state = load_file(str(file))
        for key in list(state):
            if not key.endswith(".weight_packed"):
                continue
            layer = info.layers[key[: -len(".weight_packed")]]
            codes = unpack_codes(state[key], layer.quant.num_bits, layer.shape[1], layer.layout, name=key)
            state[key] = pack_codes(codes, layer.quant.num_bits, PackLayout.WORD_ALIGNED)
        save_file(state, str(file), metadata={"format": "pt"})
    config_file = out / "config.json"
    config = json.loads(config_file.read_text())
    config["quantization_config"]["version"] = "0.17.0"
    config_file.write_text(json.dumps(config, indent=2))


def make(kind: str, out: Path, model_dir: Path) -> Path:
    if kind.startswith("gsq-moe"):
        from gsq_vllm.data import moe_model_dir

        model_dir = moe_model_dir()
    if (out / "config.json").is_file():
        return out
    tmp = out.with_name(out.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    if kind.endswith("-old"):  # the same checkpoint in compressed-tensors 0.17's 3-bit layout
        base = kind[: -len("-old")]
        source = make(base, out.with_name(base), model_dir)
        rewrite_word_aligned(source, tmp)
    else:
        quantize(kind, model_dir, tmp)
    tmp.rename(out)
    return out


def main(argv: list[str] | None = None) -> int:
    from gsq_vllm.data import default_model_dir

    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("kind", choices=KINDS)
    parser.add_argument("output_dir", type=Path)
    parser.add_argument("--model", type=Path, default=None)
    args = parser.parse_args(argv)
    path = make(args.kind, args.output_dir, args.model or default_model_dir())
    print(path)
    return 0


if __name__ == "__main__":
    sys.exit(main())
