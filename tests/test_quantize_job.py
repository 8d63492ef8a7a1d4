"""The quantize job as a user runs it: interrupted (Ctrl-C, SIGTERM, a killed process) it leaves
nothing half-written, and the same recipe and seed give the same checkpoint twice."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from gsq_vllm.files import prepare_output, remove_stale_temporaries
from tests.conftest import HAS_LLMCOMPRESSOR, gsq_recipe

needs_llmcompressor = pytest.mark.skipif(not HAS_LLMCOMPRESSOR, reason="llmcompressor is not installed")


def _quantize_command(model: Path, recipe: Path, text: Path, out: Path) -> list[str]:
    return [sys.executable, "-m", "gsq_vllm.cli", "quantize", "--model", str(model), "--recipe", str(recipe),
            "--calibration-text", str(text), "--calibration-samples", "8", "--calibration-seq-len", "64",
            "--output", str(out), "--no-eval"]


@needs_llmcompressor
@pytest.mark.parametrize("sent", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_an_interrupted_run_stops_at_once_and_leaves_nothing(tiny_model_dir, tmp_path, sent):
    recipe = tmp_path / "long.yaml"
    # would run for hours; eager (no torch.compile warm-up), so the signal lands in GSQ's steps
    recipe.write_text(gsq_recipe(2, steps=1_000_000, extra="      fused: false\n"))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    out = tmp_path / "run" / "ckpt"
    process = subprocess.Popen(_quantize_command(tiny_model_dir, recipe, text, out), stdout=subprocess.PIPE,
                               stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 300
    while not list(out.parent.glob(".ckpt.tmp-*")) and process.poll() is None and time.time() < deadline:
        time.sleep(0.2)
    assert process.poll() is None, process.communicate()[1][-3000:]
    time.sleep(5)  # well inside GSQ's optimisation by now
    process.send_signal(sent)
    sent_at = time.time()
    _, err = process.communicate(timeout=120)
    stopped_in = time.time() - sent_at
    assert process.returncode == 130, err[-3000:]
    assert stopped_in < 15, f"took {stopped_in:.1f} s to stop"
    assert f"gsq-vllm quantize: interrupted by {sent.name}; nothing was written to {out}" in err, err[-3000:]
    assert "Traceback" not in err
    assert list(out.parent.iterdir()) == []  # neither the output nor its temporary folder


def test_a_killed_runs_leftovers_are_removed_by_the_next_run(tmp_path):
    out = tmp_path / "ckpt"
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    dead_pid = int(dead.stdout)  # a process that has exited: its folder is a leftover
    leftover = tmp_path / f".ckpt.tmp-{dead_pid}-abc123"
    (leftover / "sub").mkdir(parents=True)
    running = tmp_path / f".ckpt.tmp-{os.getpid()}-def456"  # a live run's (this process): kept
    running.mkdir()
    fresh = prepare_output(out, overwrite=False)
    assert not leftover.exists() and running.exists() and fresh.name.startswith(f".ckpt.tmp-{os.getpid()}-")
    assert remove_stale_temporaries(out) == []


@needs_llmcompressor
def test_same_recipe_and_seed_give_bit_identical_checkpoints(tiny_model_dir, tmp_path):
    """GSQ's randomness (Gumbel noise, token sampling) comes from seeded generators, and CPU kernels
    are deterministic for a fixed thread count: two runs write the same bytes."""
    import yaml
    from safetensors.torch import load_file

    from gsq_vllm.compress.quantize import quantize
    from tests.conftest import tiny_calibration

    recipe = yaml.safe_load(gsq_recipe(3, steps=20))
    states = []
    for run in ("first", "second"):
        result = quantize(tiny_model_dir, recipe, tmp_path / run, calibration_samples=16, calibration_seq_len=128,
                          dataset=tiny_calibration(16, 128))
        states.append(load_file(str(result.output_dir / "model.safetensors")))
    assert states[0].keys() == states[1].keys()
    different = [key for key in states[0] if not states[0][key].equal(states[1][key])]
    assert different == []


@needs_llmcompressor
@pytest.mark.slow
def test_a_run_killed_after_some_layers_resumes_and_writes_the_same_checkpoint(tmp_path):
    """SIGKILL after the first decoder layer is saved; the same command resumes after it (its
    log says so) and writes the bytes an uninterrupted run writes."""
    from safetensors.torch import load_file

    from gsq_vllm.compress.resume import resume_dir_for
    from tests.tiny_llama import save_tiny_llama

    model = save_tiny_llama(tmp_path / "model", num_layers=4)
    recipe = tmp_path / "gsq.yaml"
    recipe.write_text(gsq_recipe(3, steps=150, extra="      fused: false\n"))
    text = tmp_path / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 400)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}

    straight = tmp_path / "straight"
    done = subprocess.run(_quantize_command(model, recipe, text, straight), capture_output=True, text=True, env=env)
    assert done.returncode == 0, done.stderr[-3000:]
    assert not resume_dir_for(straight).exists()  # removed once the checkpoint is complete

    out = tmp_path / "killed"
    saved = resume_dir_for(out)
    process = subprocess.Popen(_quantize_command(model, recipe, text, out), stdout=subprocess.DEVNULL,
                               stderr=subprocess.DEVNULL, env=env)
    deadline = time.time() + 600
    while len(list(saved.glob("*.pt"))) < 2 and process.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    process.kill()  # SIGKILL: no handler runs
    process.wait()
    finished = sorted(p.stem for p in saved.glob("*.pt"))
    assert 2 <= len(finished) < 4, finished
    assert not out.exists()

    resumed = subprocess.run(_quantize_command(model, recipe, text, out), capture_output=True, text=True, env=env)
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    log = resumed.stdout + resumed.stderr  # llmcompressor's logger may write to either
    assert f"{len(finished)} finished blocks/layers are reused" in log
    for name in finished:
        assert f"GSQ {name}: resumed" in log
    assert not saved.exists()
    first, second = load_file(str(straight / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert first.keys() == second.keys()
    assert [key for key in first if not first[key].equal(second[key])] == []


@needs_llmcompressor
def test_saved_layers_of_another_recipe_are_not_resumed(tiny_model_dir, tmp_path):
    import yaml

    from gsq_vllm.compress.quantize import _open_resume, quantize
    from gsq_vllm.compress.resume import resume_dir_for
    from tests.conftest import tiny_calibration

    out = tmp_path / "ckpt"
    recipe = yaml.safe_load(gsq_recipe(3, steps=2))
    calibration = tiny_calibration(16, 128)
    other = yaml.safe_load(gsq_recipe(3, steps=1))
    # a killed run of another recipe left its state
    _open_resume(other, tiny_model_dir, calibration, 0, out, fresh=False)
    with pytest.raises(ValueError, match=r"cannot resume from .*ckpt\.gsq-resume: the recipe differs "
                                         r"\(quant_stage\.quant_modifiers\.GSQModifier\.steps: 1 then, 2 now\)"):
        quantize(tiny_model_dir, recipe, out, calibration_samples=16, calibration_seq_len=128, dataset=calibration)
    with pytest.raises(ValueError, match=r"the seed differs \(0 then, 5 now\)"):
        quantize(tiny_model_dir, other, out, calibration_samples=16, calibration_seq_len=128, dataset=calibration,
                 seed=5)
    assert not out.exists()
    # --fresh discards it and runs
    result = quantize(tiny_model_dir, recipe, out, calibration_samples=16, calibration_seq_len=128,
                      dataset=calibration, fresh=True)
    assert result.output_dir == out and not resume_dir_for(out).exists()
