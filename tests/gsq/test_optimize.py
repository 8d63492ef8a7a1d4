import pytest
import torch

from gsq_vllm.gsq import (
    GSQConfig,
    dequantize,
    full_range_scales,
    get_grid,
    gptq_quantize,
    hessian_factor,
    layer_objective,
    optimize_block,
    optimize_layer,
    rtn_quantize,
)


def layer_with_outliers(seed: int = 0, out_features: int = 64, in_features: int = 128):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, in_features, generator=gen)
    inputs[:, :4] *= 25.0  # outlier channels, as in real LLM activations
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    return weight, inputs, inputs.T @ inputs / inputs.shape[0]


def gptq_init(weight, hessian, grid, group_size):
    scales = full_range_scales(weight, grid, group_size)
    return gptq_quantize(weight, hessian, scales, grid), scales


@pytest.mark.parametrize("bits", [2, 3])
def test_gsq_lowers_the_gptq_objective_on_a_layer_with_outliers(bits):
    grid = get_grid(bits)
    weight, _, hessian = layer_with_outliers()
    codes, scales = gptq_init(weight, hessian, grid, 32)
    factor = hessian_factor(hessian, 0.01)
    gptq_loss = layer_objective(weight, dequantize(codes, scales), factor)
    result = optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=200), name="synthetic", progress=False)
    assert result.initial_loss == pytest.approx(gptq_loss, rel=1e-5)
    assert not result.kept_initial
    assert result.final_loss < 0.97 * gptq_loss
    assert result.codes["synthetic"].min() >= grid.qmin and result.codes["synthetic"].max() <= grid.qmax


def two_layer_block(items: int = 8, tokens: int = 128):
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(96, 64, generator=gen) * 0.1, torch.randn(64, 96, generator=gen) * 0.1
    inputs = [torch.randn(tokens, 64, generator=gen) for _ in range(items)]

    def forward(weights, index):
        return torch.nn.functional.silu(inputs[index] @ weights["up"].T) @ weights["down"].T

    return {"up": up, "down": down}, forward


def test_block_objective_trains_two_layers_jointly():
    grid = get_grid(2)
    weights, forward = two_layer_block()
    targets = [forward(weights, i) for i in range(8)]
    init = {name: rtn_quantize(w, grid, 32) for name, w in weights.items()}
    result = optimize_block(forward, weights, targets, {n: c for n, (c, _) in init.items()},
                            {n: s for n, (_, s) in init.items()}, grid, GSQConfig(steps=40, tokens_per_step=256),
                            progress=False)
    assert result.final_loss < 0.9 * result.initial_loss


def test_block_result_is_judged_on_held_out_items_only():
    """The check "never worse than the start" uses items the optimiser never saw: here the
    held-out item's target is unreachable garbage, so whatever training did, the start wins."""
    grid = get_grid(2)
    weights, forward = two_layer_block(items=10)
    targets = [forward(weights, i) for i in range(9)] + [torch.full((128, 64), 50.0)]
    init = {name: rtn_quantize(w, grid, 32) for name, w in weights.items()}
    config = GSQConfig(steps=20, tokens_per_step=256, holdout=0.1)
    seen = []

    def spying_forward(w, index):
        seen.append(index)
        return forward(w, index)

    result = optimize_block(spying_forward, weights, targets, {n: c for n, (c, _) in init.items()},
                            {n: s for n, (_, s) in init.items()}, grid, config, progress=False)
    training_calls = seen[: 20 * 2]  # 2 items of 128 tokens per step
    assert 9 not in training_calls and set(seen[20 * 2:]) == {9}
    assert result.initial_loss == result.final_loss or result.final_loss < result.initial_loss


def test_gptq_matches_llmcompressor_and_beats_rounding():
    """Our GPTQ (act-order, groups kept contiguous) is llmcompressor's ``actorder: static`` GPTQ."""
    pytest.importorskip("llmcompressor")
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    weight, _, hessian = layer_with_outliers()
    for bits in (2, 3):
        grid = get_grid(bits)
        codes, scales = gptq_init(weight, hessian, grid, 32)
        args = QuantizationArgs(num_bits=bits, type="int", symmetric=True, strategy="group", group_size=32,
                                actorder="static")
        theirs, _, _ = quantize_weight(weights=weight.clone()[None], hessians=hessian.clone()[None], scale=scales[None],
                                       zero_point=torch.zeros_like(scales, dtype=torch.int8)[None], global_scale=None,
                                       quant_args=args, blocksize=128, percdamp=0.01)
        factor = hessian_factor(hessian, 0.01)
        ours = layer_objective(weight, dequantize(codes, scales), factor)
        assert ours == pytest.approx(layer_objective(weight, theirs[0], factor), rel=1e-3)
        rounded = layer_objective(weight, dequantize(*rtn_quantize(weight, grid, 32)), factor)
        assert ours < rounded


def test_gptq_on_the_ternary_grid_feeds_back_the_clamp():
    """GPTQ run on {-1, 0, 1} itself beats int2 GPTQ clamped to ternary afterwards (the clamp's
    error is then never compensated); half-range scales make clamping frequent."""
    weight, _, hessian = layer_with_outliers()
    ternary = get_grid("ternary")
    scales = full_range_scales(weight, ternary, 32) / 2
    direct = gptq_quantize(weight, hessian, scales, ternary)
    clamped = gptq_quantize(weight, hessian, scales, get_grid(2)).clamp(-1, 1)
    factor = hessian_factor(hessian, 0.01)
    assert direct.min() >= -1 and direct.max() <= 1
    assert layer_objective(weight, dequantize(direct, scales), factor) < layer_objective(weight, dequantize(clamped, scales), factor)


def test_gptq_honours_zero_dampening_and_names_a_singular_hessian():
    weight, inputs, _ = layer_with_outliers(out_features=8, in_features=64)
    grid = get_grid(3)
    scales = full_range_scales(weight, grid, 32)
    hessian = inputs.T @ inputs
    undamped = gptq_quantize(weight, hessian, scales, grid, dampening=0.0)
    assert not torch.equal(undamped, gptq_quantize(weight, hessian, scales, grid, dampening=0.1))
    low_rank = inputs[:16].T @ inputs[:16]  # 16 tokens, 64 features: singular
    with pytest.raises(ValueError, match="not positive definite.*raise dampening"):
        gptq_quantize(weight, low_rank, scales, grid, dampening=0.0)


def test_same_seed_same_result_and_bf16_logits():
    grid = get_grid(3)
    weight, _, hessian = layer_with_outliers(out_features=32, in_features=64)
    codes, scales = rtn_quantize(weight, grid, 32)
    runs = [optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=15, seed=3), name="w", progress=False)
            for _ in range(2)]
    assert torch.equal(runs[0].codes["w"], runs[1].codes["w"])
    assert torch.equal(runs[0].scales["w"], runs[1].scales["w"])
    half = optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=15, logits_dtype="bfloat16"), name="w",
                          progress=False)
    assert half.final_loss <= half.initial_loss


def test_nan_weights_are_refused():
    grid = get_grid(2)
    weight, _, hessian = layer_with_outliers(out_features=8, in_features=64)
    codes, scales = rtn_quantize(weight, grid, 32)
    weight[3, 5] = float("nan")
    with pytest.raises(ValueError, match="bad_layer: weight has NaN or Inf"):
        optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=1), name="bad_layer", progress=False)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_lion_step_matches_eager(dtype):
    from gsq_vllm.gsq import Lion

    gen = torch.Generator().manual_seed(0)
    start, grads = torch.randn(64, 32, 5, generator=gen).to(dtype), [torch.randn(64, 32, 5, generator=gen) for _ in range(3)]
    finals = []
    for fused in (False, True):
        param = torch.nn.Parameter(start.clone())
        optimizer = Lion([param], lr=1e-2, betas=(0.9, 0.95), weight_decay=1.0, fused=fused)
        for grad in grads:
            param.grad = grad.to(dtype)
            optimizer.step()
        finals.append(param.detach())
    torch.testing.assert_close(finals[1], finals[0], rtol=1e-5, atol=1e-6)
    assert not torch.equal(finals[0], start)


def test_eager_and_fused_runs_reach_similar_objectives():
    """Same algorithm, same noise; only float rounding differs between the two code paths."""
    grid = get_grid(3)
    weight, _, hessian = layer_with_outliers(out_features=32, in_features=64)
    codes, scales = rtn_quantize(weight, grid, 32)
    runs = [optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=30, fused=fused), name="w", progress=False)
            for fused in (False, True)]
    assert runs[1].final_loss == pytest.approx(runs[0].final_loss, rel=0.1)
    assert runs[1].final_loss < runs[1].initial_loss
