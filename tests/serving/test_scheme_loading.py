"""gsq_vllm.serving.scheme / sharding / parameters on real vLLM linear layers: both 3-bit layouts,
merged (QKV) and row layers, simulated tensor parallelism, and the load-time errors."""

from __future__ import annotations

import pytest
import torch

pytestmark = pytest.mark.serve
vllm = pytest.importorskip("vllm")

from contextlib import contextmanager

from gsq_vllm.packing import PackLayout, pack_codes  # noqa: E402

from serving_support import GROUP, assert_close, gsq_config, quant_config, random_codes, random_scales, reference  # noqa: E402

@contextmanager
def simulated_tp(monkeypatch, rank: int, size: int):
    """Make vLLM's linear layers and parameters (and the scheme) believe they are rank/size."""
    import vllm.distributed
    import vllm.model_executor.layers.linear as linear
    import vllm.model_executor.layers.vocab_parallel_embedding as vocab
    import vllm.model_executor.parameter as parameter

    with monkeypatch.context() as patch:
        for module in (linear, parameter, vocab, vllm.distributed):
            patch.setattr(module, "get_tensor_model_parallel_rank", lambda: rank)
            patch.setattr(module, "get_tensor_model_parallel_world_size", lambda: size)
        yield


def load(layer, name: str, tensor: torch.Tensor, shard_id=None) -> None:
    param = getattr(layer, name)
    args = () if shard_id is None else (shard_id,)
    param.weight_loader(param, tensor, *args)


def load_gsq(layer, codes, scales, bits, layout, shard_id=None) -> None:
    load(layer, "weight_packed", pack_codes(codes, bits, layout), shard_id)
    load(layer, "weight_scale", scales, shard_id)
    load(layer, "weight_shape", torch.tensor(list(codes.shape)), shard_id)


def finish(layer):
    layer.quant_method.process_weights_after_loading(layer)
    return layer


def row_layer(config, k, n, prefix="model.layers.0.mlp.down_proj"):
    from vllm.model_executor.layers.linear import RowParallelLinear

    return RowParallelLinear(k, n, bias=False, quant_config=config, prefix=prefix, params_dtype=torch.bfloat16, return_bias=False)


LAYOUTS = [(2, PackLayout.DENSE), (3, PackLayout.DENSE), (3, PackLayout.WORD_ALIGNED)]


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_qkv_merged_and_row_layers_load_both_layouts(vllm_tp1, bits, layout):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear, QKVParallelLinear

    config = gsq_config(bits, version="0.17.0" if layout is PackLayout.WORD_ALIGNED else "0.19.0")
    k = 320  # 3-bit: dense width 30 words, word-aligned 32
    x = torch.randn(4, k).to(torch.bfloat16)

    qkv = QKVParallelLinear(k, 64, 4, 2, bias=False, quant_config=config, prefix="model.layers.0.self_attn.qkv_proj",
                            params_dtype=torch.bfloat16, return_bias=False)
    parts = {"q": 256, "k": 128, "v": 128}
    tensors = {s: (random_codes(n, k, bits, i), random_scales(n, k // GROUP, i)) for i, (s, n) in enumerate(parts.items())}
    for shard_id, (codes, scales) in tensors.items():
        load_gsq(qkv, codes, scales, bits, layout, shard_id)
    assert qkv.weight_packed.pack_layout is layout
    finish(qkv)
    ref = torch.cat([reference(x, c, s) for c, s in tensors.values()], dim=1)
    assert_close(qkv.quant_method.apply(qkv, x), ref, "qkv")

    merged = MergedColumnParallelLinear(k, [96, 96], bias=False, quant_config=config, prefix="model.layers.0.mlp.gate_up_proj",
                                        params_dtype=torch.bfloat16, return_bias=False)
    halves = [(random_codes(96, k, bits, 7 + i), random_scales(96, k // GROUP, 7 + i)) for i in range(2)]
    for i, (codes, scales) in enumerate(halves):
        load_gsq(merged, codes, scales, bits, layout, i)
    finish(merged)
    assert_close(merged.quant_method.apply(merged, x), torch.cat([reference(x, c, s) for c, s in halves], 1), "gate_up")

    row = row_layer(config, k, 48)
    codes, scales = random_codes(48, k, bits, 11), random_scales(48, k // GROUP, 11)
    load_gsq(row, codes, scales, bits, layout)
    finish(row)
    assert_close(row(x), reference(x, codes, scales), "row")


@pytest.mark.parametrize("bits,layout", LAYOUTS)
def test_simulated_tensor_parallel_shards(vllm_tp1, monkeypatch, bits, layout):
    """tp=2 simulated: row-parallel partial products sum to the full output, column shards concatenate,
    every rank loading the same full checkpoint tensors as vLLM does."""
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    config = gsq_config(bits)
    # 192 columns per rank: rank 1 starts mid-word in the word-aligned 3-bit layout (10 codes a word);
    # with groups of 64 a dense-layout shard always starts on a word (64 * 3 bits = 6 words)
    k, n = 384, 96
    codes, scales = random_codes(n, k, bits, 3), random_scales(n, k // GROUP, 3)
    gate = (random_codes(n, k, bits, 4), random_scales(n, k // GROUP, 4))
    x = torch.randn(3, k).to(torch.bfloat16)
    partial, column = [], []
    for rank in range(2):
        with simulated_tp(monkeypatch, rank, 2):
            row = row_layer(config, k, n)
            assert row.input_size_per_partition == k // 2
            load_gsq(row, codes, scales, bits, layout)
            finish(row)
            partial.append(row.quant_method.apply(row, x[:, rank * k // 2 : (rank + 1) * k // 2]).float())
            merged = MergedColumnParallelLinear(k, [n, n], bias=False, quant_config=config, prefix="mlp.gate_up_proj",
                                                params_dtype=torch.bfloat16, return_bias=False)
            load_gsq(merged, *gate, bits, layout, 0)
            load_gsq(merged, codes, scales, bits, layout, 1)
            finish(merged)
            column.append(merged.quant_method.apply(merged, x).float())
    assert_close(partial[0] + partial[1], reference(x, codes, scales), "row-parallel sum")
    half = n // 2
    gate_ref, up_ref = reference(x, *gate), reference(x, codes, scales)
    for rank in range(2):
        expected = torch.cat([gate_ref[:, rank * half : (rank + 1) * half], up_ref[:, rank * half : (rank + 1) * half]], 1)
        assert_close(column[rank], expected, f"column shard {rank}")


@pytest.mark.parametrize("bits", [2, 4])
def test_a_quantized_output_head_computes_the_logits_of_its_codes(vllm_tp1, monkeypatch, bits):
    """lm_head in a config group of its own: vLLM routes its ParallelLMHead through the layer's scheme
    (the plugin's kernel for 2/3 bits, and for 4 on the CPU). A vocabulary of 1000 pads to 1024 rows
    (zero there); two simulated ranks each hold their half of the vocabulary, as vLLM shards it."""
    from vllm.model_executor.layers.vocab_parallel_embedding import ParallelLMHead

    from gsq_vllm.serving.config import GSQQuantizationConfig

    raw = quant_config(bits)
    raw["config_groups"]["group_1"] = {**raw["config_groups"]["group_0"], "targets": ["lm_head"]}
    raw["config_groups"]["group_0"]["weights"] = {**raw["config_groups"]["group_0"]["weights"], "num_bits": 3}
    config = GSQQuantizationConfig.from_config({**raw, "ignore": []})
    vocab, k = 1000, 256
    codes, scales = random_codes(vocab, k, bits, 5), random_scales(vocab, k // GROUP, 5)
    x = torch.randn(3, k).to(torch.bfloat16)
    full = reference(x, codes, scales)
    for rank, size in ((0, 1), (0, 2), (1, 2)):
        with simulated_tp(monkeypatch, rank, size):
            head = ParallelLMHead(vocab, k, quant_config=config, prefix="lm_head", params_dtype=torch.bfloat16)
            assert head.scheme.num_bits == bits  # the head's own group, not the Linear one
            load_gsq(head, codes, scales, bits, PackLayout.DENSE)
            finish(head)
            logits = head.quant_method.apply(head, x)
        rows = head.shard_indices
        assert logits.shape == (3, head.num_embeddings_per_partition)
        real = rows.org_vocab_end_index - rows.org_vocab_start_index
        assert_close(logits[:, :real], full[:, rows.org_vocab_start_index:rows.org_vocab_end_index], f"head {rank}/{size}")
        assert not logits[:, real:].any()  # padded rows: zero scales, zero logits


def test_row_shard_splitting_a_group_fails_at_load(vllm_tp1, monkeypatch):
    from gsq_vllm.serving.sharding import GSQShardError

    with simulated_tp(monkeypatch, 1, 4), pytest.raises(
        GSQShardError, match=r"model.layers.0.mlp.down_proj: a tensor-parallel shard of 96 input columns .* group of 64"
    ):
        row_layer(gsq_config(3), 384, 64)


# ----------------------------------------------------------------------------------------------
# bad checkpoints fail at load, naming the layer and the shapes
# ----------------------------------------------------------------------------------------------


def test_packed_width_that_fits_no_layout(vllm_tp1):
    row = row_layer(gsq_config(3), 320, 32)
    with pytest.raises(ValueError, match=r"model.layers.0.mlp.down_proj.weight_packed: packed width 31 matches no layout .* expected 30 \(dense.* or 32 \(word-aligned"):
        load(row, "weight_packed", torch.zeros(32, 31, dtype=torch.int32))


def test_missing_weight_scale(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(2), 256, 32)
    codes = random_codes(32, 256, 2)
    load(row, "weight_packed", pack_codes(codes, 2))
    load(row, "weight_shape", torch.tensor([32, 256]))
    with pytest.raises(GSQLoadError, match=r"model.layers.0.mlp.down_proj: the checkpoint has no model.layers.0.mlp.down_proj.weight_scale"):
        finish(row)


def test_missing_fused_shard(vllm_tp1):
    from vllm.model_executor.layers.linear import MergedColumnParallelLinear

    from gsq_vllm.serving.scheme import GSQLoadError

    merged = MergedColumnParallelLinear(256, [32, 32], bias=False, quant_config=gsq_config(2), prefix="mlp.gate_up_proj",
                                        params_dtype=torch.bfloat16, return_bias=False)
    load_gsq(merged, random_codes(32, 256, 2), random_scales(32, 4), 2, PackLayout.DENSE, 0)
    with pytest.raises(GSQLoadError, match=r"mlp.gate_up_proj: weight_packed of fused shard\(s\) \[1\] missing"):
        finish(merged)


def test_scale_with_wrong_group_count(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(3), 256, 32)
    with pytest.raises(GSQLoadError, match=r"down_proj.weight_scale: expected \[out, 4\] \(in_features / group_size\), found shape \[32, 8\]"):
        load(row, "weight_scale", random_scales(32, 8))


def test_group_size_that_does_not_divide_the_input(vllm_tp1):
    from gsq_vllm.serving.sharding import GSQShardError

    with pytest.raises(GSQShardError, match=r"down_proj: group_size 64 does not divide in_features 352"):
        row_layer(gsq_config(3), 352, 32)


def test_weight_shape_disagreeing_with_the_model(vllm_tp1):
    from gsq_vllm.serving.scheme import GSQLoadError

    row = row_layer(gsq_config(2), 256, 32)
    load_gsq(row, random_codes(32, 256, 2), random_scales(32, 4), 2, PackLayout.DENSE)
    load(row, "weight_shape", torch.tensor([32, 512]))
    with pytest.raises(GSQLoadError, match=r"weight_shape says in_features 512, the model expects 256"):
        finish(row)
