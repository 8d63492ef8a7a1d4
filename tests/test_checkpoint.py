"""Checkpoint checks on small hand-made pack-quantized folders: layouts, config groups, clear errors."""

from __future__ import annotations

import json

import pytest
import torch

from gsq_vllm.checkpoint import CheckpointError, inspect_checkpoint, load_causal_lm
from gsq_vllm.packing import pack_codes
from tests.conftest import HAS_LLMCOMPRESSOR

def fake_checkpoint(path, num_bits=3, in_features=64, width=None, with_scale=True, version="0.19.0"):
    from safetensors.torch import save_file

    path.mkdir()
    codes = torch.zeros(8, in_features, dtype=torch.int8)
    packed = pack_codes(codes, num_bits if num_bits in range(1, 9) else 2)
    if width is not None:
        packed = torch.zeros(8, width, dtype=torch.int32)
    tensors = {"layer.weight_packed": packed, "layer.weight_shape": torch.tensor([8, in_features])}
    if with_scale:
        tensors["layer.weight_scale"] = torch.ones(8, in_features // 32)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"quantization_config": {"quant_method": "compressed-tensors", "format": "pack-quantized",
                                      "version": version, "config_groups": {"group_0": {
                                          "targets": ["Linear"], "weights": {
                                              "num_bits": num_bits, "type": "int", "symmetric": True,
                                              "strategy": "group", "group_size": 32}}}}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_checkpoint_layouts_are_detected(tmp_path):
    assert {l.layout.value for l in inspect_checkpoint(fake_checkpoint(tmp_path / "a")).layers.values()} == {"dense"}
    old = fake_checkpoint(tmp_path / "b", width=7)  # ceil(64 / 10) words: compressed-tensors 0.17
    assert inspect_checkpoint(old).layers["layer"].layout.value == "word_aligned"


def test_unknown_num_bits(tmp_path):
    with pytest.raises(CheckpointError, match=r"config.json: config_groups.group_0.weights.num_bits = 5 is not supported"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "c", num_bits=5))


def test_width_matching_no_layout_names_layer(tmp_path):
    with pytest.raises(CheckpointError, match=r"layer.weight_packed: packed width 9 matches no layout for 64 3-bit codes"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "d", width=9))


def test_missing_scale_and_missing_folder(tmp_path):
    with pytest.raises(CheckpointError, match="layer layer has weight_packed but no weight_scale"):
        inspect_checkpoint(fake_checkpoint(tmp_path / "e", with_scale=False))
    with pytest.raises(CheckpointError, match="does not exist"):
        inspect_checkpoint(tmp_path / "missing")


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_old_3bit_layout_loads_to_the_same_model(tiny_model_dir, tmp_path):
    """A word-aligned (compressed-tensors 0.17) 3-bit checkpoint decodes to the same weights."""
    import yaml
    from safetensors.torch import load_file, save_file

    from gsq_vllm.packing import PackLayout, unpack_codes
    from gsq_vllm.compress.quantize import quantize

    recipe = yaml.safe_load(open("recipes/rtn_w3a16_g64.yaml"))
    dense = quantize(tiny_model_dir, recipe, tmp_path / "dense").output_dir
    old = tmp_path / "old"
    old.mkdir()
    for item in dense.iterdir():
        if item.is_file():
            (old / item.name).write_bytes(item.read_bytes())
    state = load_file(str(old / "model.safetensors"))
    for name in [k for k in state if k.endswith(".weight_packed")]:
        cols = int(state[name.replace("packed", "shape")][1])
        codes = unpack_codes(state[name], 3, cols, PackLayout.DENSE)
        state[name] = pack_codes(codes, 3, PackLayout.WORD_ALIGNED)
    save_file(state, str(old / "model.safetensors"), metadata={"format": "pt"})
    config = json.loads((old / "config.json").read_text())
    config["quantization_config"]["version"] = "0.17.0"
    (old / "config.json").write_text(json.dumps(config))
    assert {l.layout for l in inspect_checkpoint(old).layers.values()} == {PackLayout.WORD_ALIGNED}
    batch = torch.randint(3, 250, (1, 32), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(load_causal_lm(old)(batch).logits, load_causal_lm(dense)(batch).logits)


def test_config_groups_match_as_compressed_tensors_does(tmp_path):
    """A regex target wins over a class target (``Linear``) whatever the order of the groups."""
    path = fake_checkpoint(tmp_path / "groups", num_bits=2)
    config = json.loads((path / "config.json").read_text())
    by_class = config["quantization_config"]["config_groups"]["group_0"]
    by_regex = {"targets": ["re:^lay.*"], "weights": {**by_class["weights"], "symmetric": False}}
    for groups in ({"a": by_class, "b": by_regex}, {"a": by_regex, "b": by_class}):
        config["quantization_config"]["config_groups"] = groups
        (path / "config.json").write_text(json.dumps(config))
        assert inspect_checkpoint(path).layers["layer"].quant.symmetric is False
    config["quantization_config"]["config_groups"] = {"a": {**by_class, "targets": ["re:^other"]}}
    (path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="layer layer has packed weights but no config group targets it"):
        inspect_checkpoint(path)


def fake_moe_checkpoint(path, experts=4, hidden=64, intermediate=96, widths=None, drop=None):
    """One MoE layer of ``experts`` 3-bit experts; ``widths`` {expert: intermediate} gives some another
    width, ``drop`` (expert, projection) leaves one projection out."""
    from safetensors.torch import save_file

    path.mkdir()
    tensors = {}
    for expert in range(experts):
        width = (widths or {}).get(expert, intermediate)
        for projection, (rows, cols) in {"gate_proj": (width, hidden), "up_proj": (width, hidden),
                                         "down_proj": (hidden, width)}.items():
            if drop == (expert, projection):
                continue
            name = f"model.layers.0.block_sparse_moe.experts.{expert}.{projection}"
            tensors[name + ".weight_packed"] = pack_codes(torch.zeros(rows, cols, dtype=torch.int8), 3)
            tensors[name + ".weight_shape"] = torch.tensor([rows, cols])
            tensors[name + ".weight_scale"] = torch.ones(rows, cols // 32)
    tensors["model.layers.0.block_sparse_moe.gate.weight"] = torch.zeros(experts, hidden)
    save_file(tensors, str(path / "model.safetensors"))
    config = {"model_type": "mixtral", "num_local_experts": experts, "quantization_config": {
        "quant_method": "compressed-tensors", "format": "pack-quantized", "version": "0.19.0",
        "ignore": ["re:.*\\.gate$"], "config_groups": {"group_0": {"targets": ["Linear"], "weights": {
            "num_bits": 3, "type": "int", "symmetric": True, "strategy": "group", "group_size": 32}}}}}
    (path / "config.json").write_text(json.dumps(config))
    return path


def test_moe_checkpoint_with_every_expert_is_accepted(tmp_path):
    layers = inspect_checkpoint(fake_moe_checkpoint(tmp_path / "ok")).layers
    assert len([name for name in layers if ".experts." in name]) == 4 * 3


def test_moe_expert_of_another_width_is_refused_with_layer_and_expert(tmp_path):
    with pytest.raises(CheckpointError, match=r"layer model.layers.0.block_sparse_moe.experts: expert 2 down_proj has "
                                              r"shape \[64, 128\], expected \[64, 96\] as in experts 0-1, 3"):
        inspect_checkpoint(fake_moe_checkpoint(tmp_path / "wide", widths={2: 128}))


def test_moe_missing_expert_tensor_is_refused_with_layer_and_expert(tmp_path):
    with pytest.raises(CheckpointError, match=r"layer model.layers.0.block_sparse_moe.experts: expert 3 has no up_proj "
                                              r"weight \(config.json declares 4 experts; up_proj found for experts 0-2\)"):
        inspect_checkpoint(fake_moe_checkpoint(tmp_path / "missing", drop=(3, "up_proj")))
    # an expert missing whole: the config's count says so
    folder = fake_moe_checkpoint(tmp_path / "three", experts=3)
    config = json.loads((folder / "config.json").read_text())
    config["num_local_experts"] = 4
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match=r"expert 3 has no down_proj weight \(config.json declares 4 experts"):
        load_causal_lm(folder)
