"""Bad model folders: ``gsq-vllm eval`` and ``gsq-vllm quantize`` answer with one line that names
the file and the problem (no traceback), and write nothing."""

from __future__ import annotations

import shutil

import pytest

from gsq_vllm.checkpoint import CheckpointError, check_safetensors_file, inspect_checkpoint
from tests.bad_folders import BAD_FOLDERS, no_tokenizer, broken_copy
from tests.conftest import HAS_LLMCOMPRESSOR


@pytest.fixture(params=sorted(BAD_FOLDERS))
def bad_folder(request, tiny_model_dir, tmp_path):
    return broken_copy(tiny_model_dir, request.param, tmp_path / "model")


def _one_line_error(capsys, command: str) -> str:
    err = capsys.readouterr().err  # library log lines aside, one line of ours and no traceback
    lines = [line for line in err.splitlines() if line.startswith("gsq-vllm")]
    assert len(lines) == 1 and "Traceback" not in err, err
    assert lines[0].startswith(f"gsq-vllm {command}: error: "), err
    return lines[0]


def test_eval_names_the_file_and_the_problem(bad_folder, capsys):
    from gsq_vllm.cli import main

    folder, file, message = bad_folder
    assert main(["eval", "--model", str(folder), "--windows", "1", "--seq-len", "16"]) == 2
    line = _one_line_error(capsys, "eval")
    assert str(file) in line and message in line, line


@pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")
def test_quantize_names_the_file_and_writes_nothing(bad_folder, capsys, tmp_path):
    from gsq_vllm.cli import main

    folder, file, message = bad_folder
    out = tmp_path / "out"
    assert main(["quantize", "--model", str(folder), "--output", str(out), "--no-eval"]) == 2
    line = _one_line_error(capsys, "quantize")
    assert str(file) in line and message in line, line
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model"]  # no output, no temporary folder


def test_a_whole_file_passes_and_trailing_garbage_is_refused(tiny_model_dir, tmp_path):
    header = check_safetensors_file(tiny_model_dir / "model.safetensors")
    assert "model.embed_tokens.weight" in header
    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    with open(folder / "model.safetensors", "ab") as handle:
        handle.write(b"\0" * 10)
    with pytest.raises(CheckpointError, match="has trailing bytes after its tensors"):
        inspect_checkpoint(folder)


def test_a_reference_without_a_tokenizer_is_fine_when_the_model_has_one(tiny_model_dir, tmp_path):
    """The evaluator tokenizes with the reference's tokenizer if given, else the model's: only the
    folder whose tokenizer is used must have one."""
    from gsq_vllm.evaluation import evaluate_models

    folder = tmp_path / "model"
    shutil.copytree(tiny_model_dir, folder)
    no_tokenizer(folder)
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog " * 40)
    record = evaluate_models(folder, tiny_model_dir, str(text), 1, 16)
    assert record["ear"] == pytest.approx(1.0)
