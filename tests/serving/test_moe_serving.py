"""Mixture of experts, served: the real ``vllm serve`` on a 3-bit checkpoint of the MoE model derived
from the default one (:mod:`gsq_vllm.moe_model`), its routed experts on GSQ's own CPU MoE method,
against the checkpoint's greedy output under transformers (fp32 on both sides, as in
``test_serving_e2e.py``)."""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]
pytest.importorskip("vllm")

from serving_support import compare_greedy, get_checkpoint, prompt_ids, transformers_greedy  # noqa: E402

from harness.server import VLLMServer  # noqa: E402

FP32_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]


@pytest.fixture(scope="module")
def moe_checkpoint():
    from gsq_vllm.data import moe_model_dir

    if not (moe_model_dir() / "config.json").is_file():
        pytest.skip(f"the MoE model is not prepared at {moe_model_dir()} (run scripts/setup.sh)")
    return get_checkpoint("gsq-moe-w3")


def test_vllm_serves_3_bit_experts_on_the_cpu_like_transformers(moe_checkpoint, tmp_path):
    prompts = prompt_ids(moe_checkpoint)
    with VLLMServer(moe_checkpoint, tmp_path / "moe.log", extra_args=FP32_ARGS, startup_timeout=1200) as server:
        served = [server.complete(ids, 16, timeout=600)["choices"][0]["token_ids"] for ids in prompts]
        chat = server.chat([{"role": "user", "content": "Name a colour."}], max_tokens=8)
        completion = server.complete("The capital of France is", 8)
        log = server.log_tail(400_000)
    assert "3-bit experts on GSQ's native CPU kernels" in log, log[-3000:]
    problems = compare_greedy(served, transformers_greedy(moe_checkpoint, prompts))
    assert not problems, "\n".join(problems)
    # both endpoints answer with generated tokens (a 3-bit 135M model's words need not be sensible)
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["usage"]["completion_tokens"] > 0
    assert completion["usage"]["completion_tokens"] == 8
