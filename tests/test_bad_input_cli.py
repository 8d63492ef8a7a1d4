"""Bad input to the command line, tried as a new user would: each class ends in one line naming the
file or option and the problem, a non-zero exit status, no traceback and nothing half-written."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import HAS_LLMCOMPRESSOR

needs_llmcompressor = pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")


def gsq_vllm(*args, timeout: float = 600) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "gsq_vllm.cli", *map(str, args)], capture_output=True, text=True,
                          timeout=timeout)


def assert_one_line_error(result: subprocess.CompletedProcess, command: str, *fragments: str) -> None:
    assert result.returncode == 2, (result.returncode, result.stderr[-3000:])
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    ours = [line for line in result.stderr.splitlines() if line.startswith(f"gsq-vllm {command}: error: ")]
    assert len(ours) == 1, result.stderr[-3000:]
    for fragment in fragments:
        assert fragment in ours[0], ours[0]


@pytest.fixture
def text_file(tmp_path) -> Path:
    path = tmp_path / "text.txt"
    path.write_text("The quick brown fox jumps over the lazy dog. " * 400)
    return path


def quantize_rtn(model: Path, output: Path, text: Path) -> subprocess.CompletedProcess:
    return gsq_vllm("quantize", "--model", model, "--recipe", "rtn_w3a16_g64", "--calibration-text", text,
                    "--calibration-samples", 4, "--calibration-seq-len", 64, "--no-eval", "--output", output)


def test_non_finite_weights_are_an_error_not_a_nan_perplexity(tiny_model_dir, tmp_path, text_file):
    from safetensors.torch import load_file, save_file

    broken = tmp_path / "nan-model"
    shutil.copytree(tiny_model_dir, broken)
    tensors = load_file(broken / "model.safetensors")
    name = next(key for key in tensors if key.endswith("mlp.down_proj.weight"))
    tensors[name][0, 0] = float("nan")
    save_file(tensors, broken / "model.safetensors", metadata={"format": "pt"})
    result = gsq_vllm("eval", "--model", broken, "--text", text_file, "--windows", 1, "--seq-len", 64)
    assert_one_line_error(result, "eval", "hold NaN or Inf", "no score is reported")


def test_windows_longer_than_the_context_are_refused_before_loading(tiny_model_dir, text_file):
    result = gsq_vllm("eval", "--model", tiny_model_dir, "--text", text_file, "--windows", 1, "--seq-len", 4096)
    assert_one_line_error(result, "eval", "max_position_embeddings is 512", str(tiny_model_dir / "config.json"),
                          "--seq-len 512")


def test_a_text_path_that_is_a_folder_is_named_as_one(tiny_model_dir, tmp_path):
    result = gsq_vllm("eval", "--model", tiny_model_dir, "--text", tmp_path, "--windows", 1, "--seq-len", 64)
    assert_one_line_error(result, "eval", f"text file {tmp_path} is a folder")


@needs_llmcompressor
def test_quantizing_a_quantized_checkpoint_is_refused(tiny_model_dir, tmp_path, text_file):
    first = quantize_rtn(tiny_model_dir, tmp_path / "rtn", text_file)
    assert first.returncode == 0, first.stderr[-3000:]
    again = quantize_rtn(tmp_path / "rtn", tmp_path / "rtn-again", text_file)
    assert_one_line_error(again, "quantize", f"{tmp_path / 'rtn'} is already a quantized checkpoint")
    assert not (tmp_path / "rtn-again").exists()


def test_a_recipe_without_config_groups_or_scheme_is_named(tiny_model_dir, tmp_path, text_file):
    recipe = tmp_path / "no-groups.yaml"
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GSQModifier:\n      steps: 2\n      ignore: [lm_head]\n")
    result = gsq_vllm("quantize", "--model", tiny_model_dir, "--recipe", recipe, "--calibration-text", text_file,
                      "--no-eval", "--output", tmp_path / "out")
    assert_one_line_error(result, "quantize", "GSQModifier in the recipe has neither `config_groups` nor a `scheme`")
    assert not (tmp_path / "out").exists()


@needs_llmcompressor
def test_a_full_disk_while_saving_is_one_line_and_leaves_nothing(tiny_model_dir, tmp_path, text_file):
    """The output's folder on a 256 KiB tmpfs: the checkpoint cannot fit (root is needed to mount one)."""
    disk = tmp_path / "small-disk"
    disk.mkdir()
    mounted = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(disk)], capture_output=True,
                             text=True)
    if mounted.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here to fill a disk: {mounted.stderr.strip()}")
    try:
        result = quantize_rtn(tiny_model_dir, disk / "out", text_file)
        assert_one_line_error(result, "quantize", "no space left on the device", f"nothing was written to {disk / 'out'}")
        assert list(disk.iterdir()) == [], f"left behind: {list(disk.iterdir())}"
    finally:
        subprocess.run(["umount", str(disk)], capture_output=True)
