"""Ways a model folder arrives broken, shared by the quantize-side and the serve-side tests."""

from __future__ import annotations

import json
import shutil
from pathlib import Path


def _truncate(folder: Path) -> None:
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2])


def _empty(folder: Path) -> None:
    (folder / "model.safetensors").write_bytes(b"")


def _git_lfs_pointer(folder: Path) -> None:  # what a clone without git-lfs leaves
    (folder / "model.safetensors").write_text(
        "version https://git-lfs.github.com/spec/v1\noid sha256:0123456789abcdef\nsize 538090408\n"
    )


def _config_not_json(folder: Path) -> None:
    (folder / "config.json").write_text('{"architectures": ["LlamaForCausalLM"], ')


def _unknown_method(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "sparse-magic", "bits": 2}
    (folder / "config.json").write_text(json.dumps(config))


def _unknown_format(folder: Path) -> None:
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "compressed-tensors", "format": "pack-quantized-v9",
                                     "config_groups": {}}
    (folder / "config.json").write_text(json.dumps(config))


def no_tokenizer(folder: Path) -> None:
    (folder / "tokenizer.json").unlink()


#: (how the folder is broken, the file the message must name, what the message must say)
BAD_FOLDERS = {
    "truncated": (_truncate, "model.safetensors", "truncated: its header describes"),
    "empty": (_empty, "model.safetensors", "empty file (0 bytes)"),
    "not-safetensors": (_git_lfs_pointer, "model.safetensors", "not a safetensors file, or truncated"),
    "config-not-json": (_config_not_json, "config.json", "not valid JSON"),
    "unknown-method": (_unknown_method, "config.json", "quant_method 'sparse-magic' is not supported"),
    "unknown-format": (_unknown_format, "config.json", "format 'pack-quantized-v9' is not a compressed-tensors format"),
    "no-tokenizer": (no_tokenizer, "", "no tokenizer (none of tokenizer.json"),
}


def broken_copy(source: Path, kind: str, destination: Path) -> tuple[Path, Path, str]:
    """Copy ``source`` to ``destination``, break it as ``kind`` says; returns (folder, the file the
    message must name, what it must say)."""
    breaks, file, message = BAD_FOLDERS[kind]
    shutil.copytree(source, destination)
    breaks(destination)
    return destination, (destination / file if file else destination), message
