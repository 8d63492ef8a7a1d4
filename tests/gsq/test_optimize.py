import pytest
import torch

from gsq_vllm.gsq import GSQConfig, get_grid, layer_objective, optimize_block, optimize_layer, rtn_quantize, hessian_factor, dequantize


def layer_with_outliers(seed: int = 0, out_features: int = 64, in_features: int = 128):
    gen = torch.Generator().manual_seed(seed)
    inputs = torch.randn(2048, in_features, generator=gen)
    inputs[:, :4] *= 25.0  # outlier channels, as in real LLM activations
    weight = torch.randn(out_features, in_features, generator=gen) * 0.05
    return weight, inputs, inputs.T @ inputs / inputs.shape[0]


def gptq_init(weight, hessian, grid, group_size):
    """llmcompressor's own GPTQ, as the modifier uses it."""
    pytest.importorskip("llmcompressor")
    from compressed_tensors.quantization import QuantizationArgs
    from llmcompressor.modifiers.gptq.gptq_quantize import quantize_weight

    _, scales = rtn_quantize(weight, grid, group_size)
    args = QuantizationArgs(num_bits=grid.storage_bits, type="int", symmetric=True, strategy="group",
                            group_size=group_size)
    quantized, _, _ = quantize_weight(weights=weight.clone()[None], hessians=hessian.clone()[None], scale=scales[None],
                                      zero_point=torch.zeros_like(scales, dtype=torch.int8)[None], global_scale=None,
                                      quant_args=args, blocksize=128, percdamp=0.01)
    codes = torch.round(quantized[0] / scales.repeat_interleave(group_size, 1)).clamp(grid.qmin, grid.qmax)
    return codes.to(torch.int8), scales


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


def test_block_objective_trains_two_layers_jointly():
    grid = get_grid(2)
    gen = torch.Generator().manual_seed(0)
    up, down = torch.randn(96, 64, generator=gen) * 0.1, torch.randn(64, 96, generator=gen) * 0.1
    inputs = torch.randn(1024, 64, generator=gen)

    def forward(weights, x):
        return torch.nn.functional.silu(x @ weights["up"].T) @ weights["down"].T

    init = {name: rtn_quantize(w, grid, 32) for name, w in {"up": up, "down": down}.items()}
    result = optimize_block(forward, {"up": up, "down": down}, inputs, {n: c for n, (c, _) in init.items()},
                            {n: s for n, (_, s) in init.items()}, grid, GSQConfig(steps=40, tokens_per_step=256),
                            progress=False)
    assert result.final_loss < 0.9 * result.initial_loss


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
