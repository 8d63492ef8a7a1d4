"""Bad model folders at vLLM load time: ``gsq-vllm serve`` refuses them in one line naming the
file before the engine starts, and plain vLLM (``vllm.LLM``, the plugin's config hook) stops on a
damaged GSQ checkpoint with the same message instead of reading it."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.serve
pytest.importorskip("vllm")

from serving_support import get_checkpoint  # noqa: E402

from tests.bad_folders import BAD_FOLDERS, broken_copy  # noqa: E402

#: what gsq-vllm serve says where it differs from the quantize side (vLLM knows other methods)
SERVE_MESSAGES = {"unknown-method": "quant_method 'sparse-magic' is not a method this vLLM knows"}


@pytest.mark.parametrize("kind", sorted(BAD_FOLDERS))
def test_gsq_vllm_serve_refuses_a_bad_folder_in_one_line(kind, tiny_model_dir, tmp_path):
    folder, file, message = broken_copy(tiny_model_dir, kind, tmp_path / "model")
    message = SERVE_MESSAGES.get(kind, message)
    result = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "serve", str(folder), "--port", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith("gsq-vllm serve: error: ")]
    assert len(ours) == 1 and "Traceback" not in result.stderr, result.stderr[-3000:]
    assert str(file) in ours[0] and message in ours[0], ours[0]


@pytest.mark.parametrize("which,message", [("missing", "no such model folder"), ("file", "is a file, not a model folder")])
def test_gsq_vllm_serve_names_a_model_path_that_is_not_a_folder(which, message, tmp_path):
    """No hub lookup, no traceback: a path that cannot be a hub name and is not a folder is one line."""
    model = tmp_path / "no-such-model"
    if which == "file":
        model.write_text("{}")
    result = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "serve", str(model), "--port", "1"],
                            capture_output=True, text=True, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert f"gsq-vllm serve: error: {model}" in result.stderr and message in result.stderr, result.stderr[-2000:]


@pytest.mark.slow  # needs the real model's checkpoint
def test_a_damaged_gsq_checkpoint_stops_plain_vllm_before_loading(tmp_path):
    """``vllm.LLM`` (no gsq-vllm command in front): the plugin's ``maybe_update_config`` hook checks
    the checkpoint it claimed, so a truncated weight file is named before any weight is read."""
    folder, file, message = broken_copy(get_checkpoint("gsq-w3"), "truncated", tmp_path / "gsq-w3")
    script = textwrap.dedent(
        f"""
        from vllm import LLM
        if __name__ == "__main__":
            LLM(model={str(folder)!r}, max_model_len=512, enforce_eager=True)
        """
    )
    (tmp_path / "load.py").write_text(script)
    result = subprocess.run(
        [sys.executable, "-c", f"import runpy; runpy.run_path({str(tmp_path / 'load.py')!r}, run_name='__main__')"],
        capture_output=True, text=True, timeout=600, env={**__import__("os").environ, "VLLM_CPU_KVCACHE_SPACE": "1"},
    )
    assert result.returncode != 0
    # vLLM wraps it in its config's pydantic error: "Value error, <file>: truncated: ..."
    assert any(str(file) in line and message in line for line in result.stderr.splitlines()), result.stderr[-3000:]
