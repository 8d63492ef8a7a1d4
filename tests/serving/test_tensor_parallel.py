"""Tensor parallelism on the CPU: the real ``vllm serve --tensor-parallel-size 3`` on the default
model's 3-bit checkpoint, against one worker.

vLLM's CPU backend starts one worker process per rank and binds each to the cores named in
``VLLM_CPU_OMP_THREADS_BIND`` (ranks separated by ``|``); on a machine with one NUMA node it
refuses to start without it. Three ranks, not two: the default model has 9 attention heads. With
3 ranks every row-parallel layer is cut for real (o_proj 576 -> 192 input columns, down_proj
1536 -> 512), so the plugin's shard planning and its unpack-then-slice loading run in the workers.
"""

from __future__ import annotations

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]
pytest.importorskip("vllm")

from serving_support import compare_greedy, get_checkpoint, prompt_ids, transformers_greedy  # noqa: E402

from harness.server import VLLMServer  # noqa: E402

FP32_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
#: three ranks on a 2-core machine: rank 0 on core 0, ranks 1 and 2 share core 1
THREE_RANKS = ["--tensor-parallel-size", "3"]
THREE_RANKS_ENV = {"VLLM_CPU_OMP_THREADS_BIND": "0|1|1"}


def _greedy(model, tmp_path, name: str, extra: list[str], env: dict | None = None) -> tuple[list[list[int]], str]:
    with VLLMServer(model, tmp_path / f"{name}.log", extra_args=FP32_ARGS + extra, env=env,
                    startup_timeout=1200) as server:
        tokens = [server.complete(ids, 16, timeout=600)["choices"][0]["token_ids"] for ids in prompt_ids(model)]
        return tokens, server.log_tail(400_000)


def test_three_ranks_serve_the_greedy_tokens_of_one(tmp_path):
    model = get_checkpoint("gsq-w3")
    one, _ = _greedy(model, tmp_path, "tp1", [])
    three, log = _greedy(model, tmp_path, "tp3", THREE_RANKS, THREE_RANKS_ENV)
    assert "GSQ plugin serves this compressed-tensors checkpoint" in log
    assert log.count("GSQ: using kernel") >= 3, log[-3000:]  # every rank chose its kernels
    # the same tokens, but for steps where the fp32 reference itself is nearly tied (a different
    # summation order may pick either): both against transformers, then against each other
    reference = transformers_greedy(model, prompt_ids(model))
    assert not compare_greedy(one, reference)
    problems = compare_greedy(three, reference)
    assert not problems, "\n".join(problems)
    same = sum(a == b for a, b in zip(one, three))
    assert same >= len(one) - 1, f"only {same} of {len(one)} prompts identical at 1 and 3 ranks: {one} vs {three}"


def test_a_rank_that_would_cut_a_quantization_group_is_refused_by_name(tmp_path):
    model = get_checkpoint("gsq-w3-down-g768")  # down_proj: 1536 columns in groups of 768, 512 per rank
    with pytest.raises(RuntimeError) as failed:
        with VLLMServer(model, tmp_path / "tp3-g768.log", extra_args=FP32_ARGS + THREE_RANKS, env=THREE_RANKS_ENV,
                        startup_timeout=1200):
            pass
    message = str(failed.value) + (tmp_path / "tp3-g768.log").read_text(errors="replace")
    assert "down_proj" in message and "would split a quantization group of 768 columns" in message, message[-4000:]
