"""Checkpoint claiming and tensor-parallel shard arithmetic: pure Python, run in both environments."""

from __future__ import annotations

import copy

import pytest
import torch

from gsq_vllm.packing import PackLayout, pack_codes, unpack_codes
from gsq_vllm.serving.claim import claims_checkpoint, override_method
from gsq_vllm.serving.sharding import GSQShardError, plan_input_shard, take_input_shard
from serving_support import quant_config


@pytest.mark.parametrize("bits", [2, 3])
def test_claims_2_and_3_bit_weight_only(bits, monkeypatch):
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert claims_checkpoint(quant_config(bits))
    assert override_method(quant_config(bits), None) == "gsq"


@pytest.mark.parametrize(
    "cfg",
    [
        quant_config(4),
        quant_config(8),
        quant_config(2, symmetric=False),
        quant_config(3, type="float"),
        {**quant_config(2), "format": "int-quantized"},
        {**quant_config(2), "quant_method": "gptq"},
    ],
    ids=["4bit", "8bit", "asymmetric", "float", "other-format", "not-compressed-tensors"],
)
def test_leaves_everything_else_to_stock_vllm(cfg, monkeypatch):
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert not claims_checkpoint(cfg)
    assert override_method(cfg, None) is None


def test_activation_quantized_group_is_not_claimed(monkeypatch):
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    cfg = copy.deepcopy(quant_config(2))
    cfg["config_groups"]["group_0"]["input_activations"] = {"num_bits": 8, "type": "int"}
    assert override_method(cfg, None) is None


def test_explicit_choice_and_opt_out(monkeypatch):
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    assert override_method(quant_config(4), "gsq") == "gsq"  # asked for: 4-bit layers go to stock code inside
    assert override_method(quant_config(2), "compressed-tensors") is None  # user asked for stock
    monkeypatch.setenv("GSQ_VLLM_DISABLE", "1")
    assert override_method(quant_config(2), None) is None
    assert override_method(quant_config(2), "gsq") is None
    monkeypatch.setenv("GSQ_VLLM_DISABLE", "0")
    assert override_method(quant_config(2), None) == "gsq"


def test_per_group_format_is_honoured(monkeypatch):
    monkeypatch.delenv("GSQ_VLLM_DISABLE", raising=False)
    cfg = copy.deepcopy(quant_config(3))
    cfg["format"] = "mixed-precision"
    cfg["config_groups"]["group_0"]["format"] = "pack-quantized"
    assert claims_checkpoint(cfg)


def test_column_parallel_shards_keep_all_columns():
    shard = plan_input_shard("l", 576, 576, 0, 64)
    assert not shard.row_parallel and shard.scale_columns == 9


@pytest.mark.parametrize("bits,layout", [(3, PackLayout.DENSE), (3, PackLayout.WORD_ALIGNED), (2, PackLayout.DENSE)])
@pytest.mark.parametrize("tp", [2, 3, 4])
def test_row_parallel_shards_from_full_packed_rows(bits, layout, tp):
    """Each rank unpacks the full packed rows and keeps its columns: the shards tile the matrix
    exactly, in both 3-bit layouts, even where a shard starts inside a packed word."""
    group, in_features = 32, 32 * 12  # 384 columns: 3-bit dense shards of 192/128/96 columns
    generator = torch.Generator().manual_seed(tp)
    low, high = -(1 << (bits - 1)), (1 << (bits - 1)) - 1
    codes = torch.randint(low, high + 1, (8, in_features), generator=generator, dtype=torch.int8)
    packed = pack_codes(codes, bits, layout)
    pieces = []
    for rank in range(tp):
        shard = plan_input_shard("model.layers.0.mlp.down_proj", in_features, in_features // tp, rank, group)
        assert shard.row_parallel and shard.start == rank * in_features // tp
        assert shard.scale_columns == in_features // tp // group
        pieces.append(take_input_shard(unpack_codes(packed, bits, in_features, layout), shard))
    assert torch.equal(torch.cat(pieces, dim=1), codes)


def test_row_parallel_shard_that_splits_a_group_is_refused():
    with pytest.raises(GSQShardError, match=r"model.layers.3.mlp.down_proj: .* 48 input columns .* would split a quantization group of 64"):
        plan_input_shard("model.layers.3.mlp.down_proj", 1536, 1536 // 32, 1, 64)


def test_group_size_must_divide_input():
    with pytest.raises(GSQShardError, match=r"layer: group_size 64 does not divide in_features 100"):
        plan_input_shard("layer", 100, 100, 0, 64)


def test_channel_wise_scales_are_replicated():
    shard = plan_input_shard("l", 512, 256, 1, None)
    assert shard.row_parallel and shard.scale_columns == 1 and shard.start == 256
