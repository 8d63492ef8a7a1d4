"""Tensor parallelism on the CPU: the real ``vllm serve --tensor-parallel-size 3`` on the default
model's 3-bit checkpoint, and ``--tensor-parallel-size 2`` on a 2-bit checkpoint of Llama-3.2-1B's
shape (random weights, group 128), each against one worker.

vLLM's CPU backend starts one worker process per rank and binds each to the cores named in
``VLLM_CPU_OMP_THREADS_BIND`` (ranks separated by ``|``); on a machine with one NUMA node it
refuses to start without it. Three ranks, not two: the default model has 9 attention heads. With
3 ranks every row-parallel layer is cut for real (o_proj 576 -> 192 input columns, down_proj
1536 -> 512), so the plugin's shard planning and its unpack-then-slice loading run in the workers.
"""

from __future__ import annotations

from pathlib import Path

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


def _random_1b_checkpoint() -> Path:
    """The 1B-shape 2-bit checkpoint of benchmarks/serve_shapes.py (random weights), made on first use."""
    from random_llama import write_random_llama  # benchmarks/ is on sys.path (tests/conftest.py)

    from gsq_vllm.data import cache_dir, default_model_dir

    return write_random_llama("1b", "gsq-w2", cache_dir() / "shapes" / "1b" / "gsq-w2", default_model_dir())


def test_two_ranks_serve_the_greedy_tokens_of_one_at_the_1b_shape(tmp_path):
    """Every layer cut in two for real at a real model's width (o_proj 2048 -> 1024 input columns,
    down_proj 8192 -> 4096, both whole groups of 128). Random weights leave many steps nearly tied,
    so where the two runs part, one worker's own log-probabilities must show a near tie there."""
    model = _random_1b_checkpoint()
    prompts = [[1, 400, 2000, 31000, 7], [1, 15, 16, 17, 18, 19, 20, 21]]
    args = FP32_ARGS[:2] + ["--max-model-len", "1024", "--enforce-eager"]  # fp32, as above: one path on CPUs with or without bf16
    runs = {}
    for name, extra, env in (("tp1", [], None),
                             ("tp2", ["--tensor-parallel-size", "2"], {"VLLM_CPU_OMP_THREADS_BIND": "0|1"})):
        with VLLMServer(model, tmp_path / f"{name}.log", extra_args=args + extra, env=env,
                        startup_timeout=1200) as server:
            runs[name] = [server.complete(ids, 12, timeout=600, logprobs=5, return_tokens_as_token_ids=True)["choices"][0]
                          for ids in prompts]
            log = server.log_tail(400_000)
        assert log.count("GSQ: using kernel") >= (2 if name == "tp2" else 1), log[-3000:]
    for index, (one, two) in enumerate(zip(runs["tp1"], runs["tp2"])):
        a, b = one["token_ids"], two["token_ids"]
        assert len(a) == len(b) == 12
        step = next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), None)
        if step is None:
            continue
        top = one["logprobs"]["top_logprobs"][step]  # {"token_id:N": logprob} at one worker's step
        chosen, other = one["logprobs"]["token_logprobs"][step], f"token_id:{b[step]}"
        assert other in top and chosen - top[other] < 0.05, (
            f"prompt {index}: 2 ranks chose {b[step]} at step {step} where one worker chose {a[step]} "
            f"by a log-probability margin of {chosen - top.get(other, float('-inf')):.3f}; {a} vs {b}")
