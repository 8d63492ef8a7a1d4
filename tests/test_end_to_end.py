"""GSQEndToEndModifier on the tiny random Llama: the KL falls, scales move, codes do not."""

from __future__ import annotations

import pytest
import torch

from tests.conftest import HAS_LLMCOMPRESSOR, gsq_recipe
from tests.test_modifier import checkpoint_codes, run

pytestmark = pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")

# after round-to-nearest codes (GSQ with 0 steps from an RTN start: codes known in advance)
RTN_THEN_END_TO_END = gsq_recipe(2, steps=0, extra="      init: rtn\n") + """    GSQEndToEndModifier:
      steps: {steps}
      sequences: 16
      sequences_per_step: 4
      lr: 0.01
"""


def test_end_to_end_stage_lowers_the_kl_and_changes_scales_only(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file
    from transformers import AutoModelForCausalLM

    from gsq_vllm.gsq import get_grid, rtn_quantize

    result = run(tiny_model_dir, RTN_THEN_END_TO_END.replace("{steps}", "30"), tmp_path / "e2e")
    row = next(r for r in result.report if r["name"] == "end_to_end")
    assert not row["kept_initial"] and row["final_kl"] < 0.97 * row["initial_kl"], row
    original = dict(AutoModelForCausalLM.from_pretrained(str(tiny_model_dir), dtype=torch.float32).named_modules())
    _, codes = checkpoint_codes(result.output_dir)
    state = load_file(str(result.output_dir / "model.safetensors"))
    assert len(codes) == 14
    for name, layer_codes in codes.items():
        start_codes, start_scales = rtn_quantize(original[name].weight.detach(), get_grid(2), 32)
        assert torch.equal(layer_codes, start_codes), name
        saved_scales = state[name + ".weight_scale"].float()
        assert not torch.allclose(saved_scales, start_scales), name
        assert torch.equal(torch.sign(saved_scales), torch.sign(start_scales)), name  # a relative change, never a flip


def test_zero_steps_leaves_the_checkpoint_as_gsq_wrote_it(tiny_model_dir, tmp_path):
    from safetensors.torch import load_file

    plain = run(tiny_model_dir, gsq_recipe(2, steps=0, extra="      init: rtn\n"), tmp_path / "plain")
    off = run(tiny_model_dir, RTN_THEN_END_TO_END.replace("{steps}", "0"), tmp_path / "off")
    first, second = (load_file(str(r.output_dir / "model.safetensors")) for r in (plain, off))
    assert first.keys() == second.keys()
    for key in first:
        assert torch.equal(first[key], second[key]), key
