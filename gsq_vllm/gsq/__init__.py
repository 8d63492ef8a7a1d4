"""GSQ in plain torch: tensors in, tensors out. No llmcompressor or vLLM import here.

    grid = get_grid(2)                                  # or "ternary", 3, 4
    codes, scales = rtn_quantize(weight, grid, 64)      # or GPTQ's codes and scales
    result = optimize_layer(weight, hessian, codes, scales, grid, GSQConfig(steps=200))
    result.codes[name], result.scales[name]             # final int8 codes, fp32 scales
"""

from gsq_vllm.gsq.grids import GRIDS, Grid, dequantize, get_grid, quantize_to_grid, rtn_quantize, symmetric_scales
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
    "GRIDS", "Grid", "get_grid", "rtn_quantize", "symmetric_scales", "quantize_to_grid", "dequantize",
    "GSQConfig", "GSQResult", "Lion", "hessian_factor", "layer_objective", "optimize_layer", "optimize_block",
    "RelaxedWeight", "gumbel_noise",
]
