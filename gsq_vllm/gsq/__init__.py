"""GSQ in plain torch: tensors in, tensors out. No llmcompressor or vLLM import here.

    grid = get_grid(2)                                  # or "ternary", 3, 4
    scales = full_range_scales(weight, grid, 64)
    codes = gptq_quantize(weight, hessian, scales, grid)
    result = optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=200))
    result.codes[name], result.scales[name]             # final int8 codes, fp32 scales
"""

from gsq_vllm.gsq.end_to_end import EndToEndConfig, EndToEndResult, kl_divergence, tune_end_to_end
from gsq_vllm.gsq.gptq import accumulate_hessian, damped_hessian, gptq_quantize
from gsq_vllm.gsq.grids import (
    GRIDS,
    SCALE_RULES,
    Grid,
    dequantize,
    full_range_scales,
    get_grid,
    initial_scales,
    quantize_to_grid,
    rtn_quantize,
    symmetric_scales,
)
from gsq_vllm.gsq.optimize import (
    GSQConfig,
    GSQResult,
    Lion,
    hessian_factor,
    layer_objective,
    optimize_block,
    optimize_layer,
)
from gsq_vllm.gsq.relaxation import RelaxedWeight, gumbel_noise

__all__ = [
    "GRIDS", "SCALE_RULES", "Grid", "get_grid", "rtn_quantize", "symmetric_scales", "full_range_scales",
    "initial_scales", "quantize_to_grid", "dequantize", "accumulate_hessian", "damped_hessian", "gptq_quantize",
    "GSQConfig", "GSQResult", "Lion", "hessian_factor", "layer_objective", "optimize_layer", "optimize_block",
    "RelaxedWeight", "gumbel_noise", "EndToEndConfig", "EndToEndResult", "kl_divergence", "tune_end_to_end",
]
