"""A wheel built from the repository, installed without ``-e`` in a fresh environment, has its
recipes (package data) and a command line that answers ``--help``."""

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


def test_installed_wheel_finds_its_recipes(tmp_path):
    source = tmp_path / "source"  # a copy: building must not leave build/ or egg-info in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(ROOT / name, source / name)
    shutil.copytree(ROOT / "gsq_vllm", source / "gsq_vllm", ignore=shutil.ignore_patterns("__pycache__"))
    run(sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w", tmp_path / "dist",
        source, cwd=tmp_path)
    wheel = next((tmp_path / "dist").glob("gsq_vllm-*.whl"))

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
