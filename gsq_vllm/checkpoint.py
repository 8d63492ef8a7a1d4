"""Reading and checking model folders: plain Hugging Face ones and compressed-tensors checkpoints.

:func:`inspect_checkpoint` reads only ``config.json`` and the safetensors headers (plus the tiny
``weight_shape`` tensors), so it is cheap, and it refuses what we cannot serve or evaluate with an
error that names the file, the layer and the expected vs found values. Both the evaluator and the
vLLM plugin call it before loading anything.
"""

from __future__ import annotations

import json
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path

import torch

from gsq_vllm.weight_format import CHECKPOINT_BITS
from gsq_vllm.packing import PackingError, PackLayout, detect_layout, layout_for_compressed_tensors_version



class CheckpointError(ValueError):
    """A model folder or checkpoint that cannot be used as it is."""


@dataclass(frozen=True)
class WeightQuantization:
    """The ``weights`` entry of one compressed-tensors config group (only what we use)."""

    num_bits: int
    group_size: int | None
    symmetric: bool
    strategy: str
    type: str = "int"

    @classmethod
    def from_config(cls, cfg: dict, where: str) -> "WeightQuantization":
        bits = cfg.get("num_bits")
        if bits not in CHECKPOINT_BITS:
            raise CheckpointError(
                f"{where}.num_bits = {bits!r} is not supported (expected one of {', '.join(map(str, CHECKPOINT_BITS))})"
            )
        return cls(
            num_bits=int(bits),
            group_size=cfg.get("group_size"),
            symmetric=bool(cfg.get("symmetric", True)),
            strategy=str(cfg.get("strategy", "group")),
            type=str(cfg.get("type", "int")),
        )


@dataclass(frozen=True)
class PackedLinear:
    """One packed Linear of a ``pack-quantized`` checkpoint."""

    name: str
    shape: tuple[int, int]  # (out_features, in_features)
    packed_shape: tuple[int, int]
    scale_shape: tuple[int, ...]
    quant: WeightQuantization
    layout: PackLayout


@dataclass
class CheckpointInfo:
    path: Path
    config: dict
    quant_config: dict | None
    format: str | None
    layers: dict[str, PackedLinear] = field(default_factory=dict)

    @property
    def is_quantized(self) -> bool:
        return self.quant_config is not None

    @property
    def layouts(self) -> set[PackLayout]:
        return {layer.layout for layer in self.layers.values()}


_PACKED_LINEAR = torch.nn.Linear(1, 1, device="meta")  # what every packed layer is, for class targets


def safetensors_files(path: Path) -> list[Path]:
    """The folder's weight files, each checked whole (:func:`check_safetensors_file`)."""
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no *.safetensors file (only safetensors checkpoints are supported)")
    for file in files:
        check_safetensors_file(file)
    return files


_MAX_HEADER_BYTES = 100 << 20  # safetensors' own limit on the JSON header


def check_safetensors_file(file: str | os.PathLike) -> dict:
    """The JSON header of a safetensors file, after checking that the file is whole.

    Reads only the header (the file size tells a truncated file: its tensors must end exactly at
    the end of the file), so it costs nothing beside loading, and turns what safetensors would report
    as a bare ``HeaderTooLarge`` or ``MetadataIncompleteBuffer`` into an error naming the file.
    """
    file = Path(file)
    size = file.stat().st_size
    if size == 0:
        raise CheckpointError(f"{file}: empty file (0 bytes); the weights were not written or were truncated")
    with open(file, "rb") as handle:
        prefix = handle.read(8)
        if len(prefix) < 8:
            raise CheckpointError(f"{file}: not a safetensors file ({size} bytes, shorter than a header)")
        header_bytes = int.from_bytes(prefix, "little")
        if header_bytes > min(size - 8, _MAX_HEADER_BYTES):
            raise CheckpointError(
                f"{file}: not a safetensors file, or truncated (its first 8 bytes announce a {header_bytes}-byte "
                f"header; the file has {size} bytes)"
            )
        raw = handle.read(header_bytes)
    try:
        header = json.loads(raw)
        if not isinstance(header, dict):
            raise ValueError("not a JSON object")
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{file}: not a safetensors file (its header is not JSON: {err})") from err
    ends = [int(entry["data_offsets"][1]) for key, entry in header.items()
            if key != "__metadata__" and isinstance(entry, dict) and "data_offsets" in entry]
    data_bytes = size - 8 - header_bytes
    needed = max(ends, default=0)
    if needed != data_bytes:
        what = "truncated" if needed > data_bytes else "has trailing bytes after its tensors"
        raise CheckpointError(
            f"{file}: {what}: its header describes {needed} bytes of tensor data, the file holds {data_bytes}"
        )
    return header


#: files any one of which gives transformers (and vLLM) a tokenizer
TOKENIZER_FILES = ("tokenizer.json", "tokenizer.model", "vocab.json", "tiktoken.model")


def check_tokenizer(path: str | os.PathLike) -> Path:
    """Refuse a model folder without a tokenizer, naming the files looked for."""
    path = Path(path)
    if not any((path / name).is_file() for name in TOKENIZER_FILES):
        raise CheckpointError(
            f"{path}: no tokenizer (none of {', '.join(TOKENIZER_FILES)}); copy the tokenizer files of the "
            "original model into this folder"
        )
    for name in ("tokenizer.json", "tokenizer_config.json"):
        file = path / name
        if file.is_file():
            try:
                json.loads(file.read_text(encoding="utf-8"))
            except (ValueError, UnicodeDecodeError) as err:
                raise CheckpointError(f"{file}: not valid JSON ({err})") from err
    return path


def load_tokenizer(path: str | os.PathLike):
    """The model folder's tokenizer (transformers ``AutoTokenizer``), after :func:`check_tokenizer`."""
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(check_tokenizer(path)))


def _group_for(name: str, groups: dict[str, tuple[list[str], WeightQuantization]]) -> WeightQuantization | None:
    """The config group of a packed Linear, by compressed-tensors' own matcher and precedence
    (exact name, then regex, then class name), as compressed-tensors applies a config."""
    from compressed_tensors.utils.match import match_targets

    module = name.rsplit(".", 1)[0] if name.endswith(".weight_packed") else name
    by_target = {target: quant for targets, quant in groups.values() for target in targets}
    matched = match_targets(module, _PACKED_LINEAR, list(by_target))
    return by_target[matched[0]] if matched else None


def read_config(path: str | os.PathLike) -> dict:
    """A model folder's ``config.json``, refused with the file named if missing or not a JSON object."""
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"model folder {path} does not exist" if not path.exists() else f"{path} is not a folder")
    config_file = path / "config.json"
    if not config_file.is_file():
        raise CheckpointError(f"{path}: no config.json (is this a Hugging Face model folder?)")
    try:
        config = json.loads(config_file.read_text())
    except (ValueError, UnicodeDecodeError) as err:
        raise CheckpointError(f"{config_file}: not valid JSON ({err})") from err
    if not isinstance(config, dict):
        raise CheckpointError(f"{config_file}: expected a JSON object, found {type(config).__name__}")
    return config


def inspect_checkpoint(path: str | os.PathLike) -> CheckpointInfo:
    """Read and check a model folder without loading its weights."""
    path = Path(path)
    config = read_config(path)
    config_file = path / "config.json"
    quant_config = config.get("quantization_config")
    info = CheckpointInfo(path=path, config=config, quant_config=quant_config, format=None)
    if quant_config is None:
        safetensors_files(path)
        return info
    if quant_config.get("quant_method") != "compressed-tensors":
        raise CheckpointError(
            f"{config_file}: quant_method {quant_config.get('quant_method')!r} is not supported "
            "(expected 'compressed-tensors')"
        )
    info.format = quant_config.get("format")
    check_compression_format(config_file, info.format)
    groups: dict[str, tuple[list[str], WeightQuantization]] = {}
    for group_name, group in (quant_config.get("config_groups") or {}).items():
        weights = group.get("weights")
        if weights is None:
            continue
        where = f"{config_file}: config_groups.{group_name}.weights"
        groups[group_name] = (list(group.get("targets", [])), WeightQuantization.from_config(weights, where))
    if not groups:
        raise CheckpointError(f"{config_file}: quantization_config has no config group with weights")
    hint = layout_for_compressed_tensors_version(quant_config.get("version"))
    from safetensors import safe_open

    shapes: dict[str, list[int]] = {}
    weight_shapes: dict[str, tuple[int, int]] = {}
    for file in safetensors_files(path):
        with safe_open(str(file), framework="pt") as handle:
            for key in handle.keys():
                shapes[key] = list(handle.get_slice(key).get_shape())
                if key.endswith(".weight_shape"):
                    weight_shapes[key[: -len(".weight_shape")]] = tuple(int(v) for v in handle.get_tensor(key).tolist())
    for key, packed_shape in shapes.items():
        if not key.endswith(".weight_packed"):
            continue
        module = key[: -len(".weight_packed")]
        quant = _group_for(key, groups)
        if quant is None:
            raise CheckpointError(f"{path}: layer {module} has packed weights but no config group targets it")
        if module not in weight_shapes:
            raise CheckpointError(f"{path}: layer {module} has weight_packed but no weight_shape")
        out_features, in_features = weight_shapes[module]
        if len(packed_shape) != 2 or packed_shape[0] != out_features:
            raise CheckpointError(
                f"{path}: layer {module}: weight_packed has shape {packed_shape}, expected "
                f"[{out_features}, *] for weight_shape ({out_features}, {in_features})"
            )
        try:
            layout = detect_layout(packed_shape[1], in_features, quant.num_bits, hint=hint, name=f"{module}.weight_packed")
        except PackingError as err:
            raise CheckpointError(f"{path}: {err}") from err
        scale_key = module + ".weight_scale"
        if scale_key not in shapes:
            raise CheckpointError(f"{path}: layer {module} has weight_packed but no weight_scale")
        scale_shape = tuple(shapes[scale_key])
        if quant.strategy == "group" and quant.group_size:
            if in_features % quant.group_size:
                raise CheckpointError(
                    f"{path}: layer {module}: group_size {quant.group_size} does not divide in_features {in_features}"
                )
            expected = (out_features, in_features // quant.group_size)
            if scale_shape != expected:
                raise CheckpointError(
                    f"{path}: layer {module}: weight_scale has shape {list(scale_shape)}, expected {list(expected)}"
                )
        info.layers[module] = PackedLinear(
            name=module,
            shape=(out_features, in_features),
            packed_shape=tuple(packed_shape),
            scale_shape=scale_shape,
            quant=quant,
            layout=layout,
        )
    _check_experts(path, config, shapes, weight_shapes)
    return info


#: a routed expert's weight in a checkpoint: ``<moe block>.experts.<index>.<projection>.weight[_packed]``
_EXPERT_WEIGHT = re.compile(r"^(.*\.experts)\.(\d+)\.(\w+)\.(weight|weight_packed)$")
_EXPERT_COUNT_KEYS = ("num_local_experts", "num_experts", "n_routed_experts")


def _check_experts(path: Path, config: dict, shapes: dict[str, list[int]],
                   weight_shapes: dict[str, tuple[int, int]]) -> None:
    """Every MoE layer has every expert (the count the config declares), each with the same
    projections of the same shapes: a missing or odd expert would otherwise load as random weights
    (transformers) or fail deep inside vLLM's loader."""
    layers: dict[str, dict[str, dict[int, tuple[int, ...]]]] = {}  # layer -> projection -> expert -> shape
    for key, shape in shapes.items():
        match = _EXPERT_WEIGHT.match(key)
        if match:
            layer, expert, projection, kind = match.groups()
            module = key.rpartition(".")[0]
            logical = weight_shapes.get(module, tuple(shape)) if kind == "weight_packed" else tuple(shape)
            layers.setdefault(layer, {}).setdefault(projection, {})[int(expert)] = tuple(logical)
    if not layers:
        return
    text_config = config.get("text_config") or {}
    declared = next((int(c[k]) for c in (config, text_config) for k in _EXPERT_COUNT_KEYS if c.get(k)), None)
    for layer, projections in sorted(layers.items()):
        present = sorted(set().union(*projections.values()))
        count = declared if declared is not None else present[-1] + 1
        for projection, by_expert in sorted(projections.items()):
            missing = [e for e in range(count) if e not in by_expert]
            if missing:
                raise CheckpointError(
                    f"{path}: layer {layer}: expert {missing[0]} has no {projection} weight (config.json declares "
                    f"{count} experts; {projection} found for experts {_ranges(sorted(by_expert))})")
            extra = [e for e in by_expert if e >= count]
            if extra:
                raise CheckpointError(f"{path}: layer {layer}: expert {extra[0]} is beyond the {count} experts "
                                      "config.json declares")
            widths: dict[tuple[int, ...], list[int]] = {}
            for expert, shape in sorted(by_expert.items()):
                widths.setdefault(shape, []).append(expert)
            if len(widths) > 1:
                common = max(widths, key=lambda s: len(widths[s]))
                odd = next(e for s, experts in widths.items() if s != common for e in experts)
                raise CheckpointError(
                    f"{path}: layer {layer}: expert {odd} {projection} has shape {list(by_expert[odd])}, expected "
                    f"{list(common)} as in experts {_ranges(widths[common])} (every expert of a layer must have "
                    "the same widths)")


def _ranges(indices: list[int]) -> str:
    """``0-3, 5`` for [0, 1, 2, 3, 5]."""
    parts, start = [], None
    for i, value in enumerate(indices):
        if start is None:
            start = value
        if i + 1 == len(indices) or indices[i + 1] != value + 1:
            parts.append(str(start) if start == value else f"{start}-{value}")
            start = None
    return ", ".join(parts)


def check_compression_format(config_file: Path, fmt: str | None) -> None:
    """Refuse a compressed-tensors ``format`` the installed compressed-tensors does not know."""
    from compressed_tensors import CompressionFormat

    known = sorted(item.value for item in CompressionFormat)
    if fmt is not None and fmt not in known:
        raise CheckpointError(
            f"{config_file}: quantization_config.format {fmt!r} is not a compressed-tensors format "
            f"(expected one of {', '.join(known)})"
        )


def installed_compressed_tensors_layout() -> PackLayout:
    """The 3-bit layout that the installed compressed-tensors reads and writes."""
    import compressed_tensors

    layout = layout_for_compressed_tensors_version(getattr(compressed_tensors, "__version__", None))
    return layout or PackLayout.DENSE


def load_causal_lm(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> torch.nn.Module:
    """Load a model folder for evaluation: plain weights, or a checkpoint decompressed to dense.

    compressed-tensors checkpoints are decompressed by transformers. Where the checkpoint's 3-bit
    layout is not the one the installed compressed-tensors reads (which would decode garbage
    silently), the weights are decompressed by our packing module instead.
    """
    from transformers import AutoModelForCausalLM

    info = inspect_checkpoint(path)
    foreign = {layer.layout for layer in info.layers.values() if layer.quant.num_bits == 3}
    foreign.discard(installed_compressed_tensors_layout())
    # transformers would load quantized per-expert weights into nothing and leave the fused
    # expert tensors randomly initialised, with a warning only; and it never converts the output
    # head (its quantizers skip lm_head), so a quantized head would fail to load
    experts = any(_EXPERT.search(name) for name in info.layers)
    head = any(_is_output_head(name) for name in info.layers)
    if not info.is_quantized or not (foreign or experts or head):
        model = AutoModelForCausalLM.from_pretrained(str(info.path), dtype=dtype)
        return model.eval()
    return _load_with_own_decompression(info, dtype).eval()


def _is_output_head(name: str) -> bool:
    return name.rsplit(".", 1)[-1] == "lm_head"


def dequantize_packed(
    packed: torch.Tensor, scale: torch.Tensor, layer: PackedLinear, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """Dense weight ``[out, in]`` of one packed layer (symmetric, per-group scales)."""
    from gsq_vllm.packing import unpack_codes

    from gsq_vllm.weight_format import dequantize

    codes = unpack_codes(packed, layer.quant.num_bits, layer.shape[1], layer.layout, name=layer.name)
    return dequantize(codes, scale).to(dtype)


#: a routed expert's Linear as llmcompressor writes it: ``<moe block>.experts.<index>.<projection>``
_EXPERT = re.compile(r"\.experts\.\d+\.(\w+)$")
#: per-expert projection names -> those transformers' loader of the architecture turns into its
#: fused expert tensors (Mixtral's original checkpoints name them w1 / w3 / w2)
EXPERT_NAMES_FOR_TRANSFORMERS = {"mixtral": {"gate_proj": "w1", "up_proj": "w3", "down_proj": "w2"}}


def _load_with_own_decompression(info: CheckpointInfo, dtype: torch.dtype) -> torch.nn.Module:
    from safetensors.torch import load_file
    from transformers import AutoConfig, AutoModelForCausalLM

    config = AutoConfig.from_pretrained(str(info.path))
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    heads = [name for name in info.layers if _is_output_head(name)]
    if heads and getattr(config, "tie_word_embeddings", False):
        raise CheckpointError(f"{info.path}: {heads[0]} is quantized but config.json ties it to the input embedding "
                              "(tie_word_embeddings: true); a quantized head needs tie_word_embeddings: false")
    state: dict[str, torch.Tensor] = {}
    for file in safetensors_files(info.path):
        state.update(load_file(str(file)))
    for name, layer in info.layers.items():
        state[name + ".weight"] = dequantize_packed(
            state.pop(name + ".weight_packed"), state.pop(name + ".weight_scale"), layer, dtype
        )
        state.pop(name + ".weight_shape", None)
    if any(_EXPERT.search(name) for name in info.layers):
        return _load_experts_through_transformers(info, config, state, dtype)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    missing, unexpected = model.load_state_dict(state, strict=False)
    missing = [k for k in missing if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or unexpected:
        raise CheckpointError(f"{info.path}: weights do not match the config: missing {missing}, unexpected {unexpected}")
    if config.tie_word_embeddings:
        model.tie_weights()
    return model


def _load_experts_through_transformers(info: CheckpointInfo, config, state: dict[str, torch.Tensor],
                                       dtype: torch.dtype) -> torch.nn.Module:
    """A mixture-of-experts checkpoint, decompressed: its per-expert weights renamed to the names
    the architecture's original checkpoints use, written to a temporary folder and loaded from
    there, so that transformers' own loader builds its fused expert tensors (layout unknown here)."""
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM

    names = EXPERT_NAMES_FOR_TRANSFORMERS.get(config.model_type)
    if names is None:
        raise CheckpointError(f"{info.path}: evaluating a quantized mixture-of-experts checkpoint of model_type "
                              f"{config.model_type!r} is not supported (supported: "
                              f"{', '.join(sorted(EXPERT_NAMES_FOR_TRANSFORMERS))})")
    renamed = {}
    for key, tensor in state.items():
        prefix, dot, tail = key.rpartition(".")  # tail: weight
        match = _EXPERT.search(prefix)
        if match:
            if match.group(1) not in names:
                raise CheckpointError(f"{info.path}: expert layer {prefix}: expected one of {sorted(names)}, "
                                      f"found {match.group(1)}")
            prefix = prefix[: match.start(1)] + names[match.group(1)]
        renamed[prefix + dot + tail] = tensor.contiguous()
    with tempfile.TemporaryDirectory(prefix=".decompressed-") as folder:
        config.save_pretrained(folder)
        save_file(renamed, str(Path(folder) / "model.safetensors"), metadata={"format": "pt"})
        model, loading = AutoModelForCausalLM.from_pretrained(folder, dtype=dtype, output_loading_info=True)
    missing = [k for k in loading["missing_keys"] if not (k == "lm_head.weight" and config.tie_word_embeddings)]
    if missing or loading["unexpected_keys"]:
        raise CheckpointError(f"{info.path}: decompressed weights do not match the config: missing {missing[:4]}, "
                              f"unexpected {sorted(loading['unexpected_keys'])[:4]}")
    return model
