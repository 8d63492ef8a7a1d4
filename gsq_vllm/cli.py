"""``gsq-vllm``: the command line.

    gsq-vllm eval [--model DIR] [--reference DIR] [--text wiki|news|calibration|FILE] ...
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path

from gsq_vllm import data

logger = logging.getLogger("gsq_vllm")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="wiki", help="wiki | news | calibration | path to a UTF-8 text file")
    parser.add_argument("--windows", type=int, default=10, help="number of evaluation windows (default 10)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    parser.add_argument(
        "--from-start", action="store_true", help="take the windows from the start of the text (default: its end)"
    )


def evaluate_models(
    model_dir: str | Path,
    reference_dir: str | Path | None,
    text: str,
    windows: int,
    seq_len: int,
    from_end: bool = True,
) -> dict:
    """Load, tokenize and evaluate: the shared core of ``gsq-vllm eval`` and ``quantize``."""
    import torch
    from transformers import AutoTokenizer

    from gsq_vllm.checkpoint import load_causal_lm
    from gsq_vllm.evaluation import evaluate

    text_file = data.resolve_text(text)
    model = load_causal_lm(model_dir)
    reference = load_causal_lm(reference_dir) if reference_dir else None
    tokenizer = AutoTokenizer.from_pretrained(str(reference_dir or model_dir))
    tokens = data.tokenize_file(text_file, tokenizer)
    spec = data.WindowSpec(count=windows, length=seq_len, from_end=from_end)
    batch = data.take_windows(tokens, spec, source=str(text_file))
    torch.manual_seed(0)
    result = evaluate(model, batch, reference, description=f"eval {Path(model_dir).name}")
    return {"model": str(model_dir), "reference": str(reference_dir) if reference_dir else None,
            "text": str(text_file), **result.to_dict()}


def cmd_eval(args: argparse.Namespace) -> int:
    from gsq_vllm.evaluation import format_table

    model = args.model or data.default_model_dir()
    record = evaluate_models(model, args.reference, args.text, args.windows, args.seq_len, not args.from_start)
    print(format_table([record], ["model", "ppl", "ce", "ear", "kl", "tokens"]))
    if args.json:
        _write_json_atomic(Path(args.json), record)
    return 0


def _write_json_atomic(path: Path, payload: dict) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".part")
    tmp.write_text(json.dumps(payload, indent=1) + "\n")
    tmp.replace(path)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="gsq-vllm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    ev = sub.add_parser("eval", help="perplexity of a model folder or checkpoint; EAR and KL against a reference")
    ev.add_argument("--model", default=None, help="HF folder or compressed-tensors checkpoint (default: the default model)")
    ev.add_argument("--reference", default=None, help="full-precision model for EAR and KL")
    ev.add_argument("--json", default=None, help="also write the result as JSON to this file")
    _add_eval_options(ev)
    ev.set_defaults(func=cmd_eval)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[%(name)s] %(message)s")
    try:
        return args.func(args)
    except (FileNotFoundError, ValueError) as err:  # bad input: one clear line, no traceback
        print(f"gsq-vllm {args.command}: error: {err}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
