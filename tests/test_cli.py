"""The command line answers at once: parsing arguments imports no heavy library."""

from __future__ import annotations

import subprocess
import sys

import pytest

HEAVY = ("torch", "transformers", "llmcompressor", "vllm", "datasets")


def _modules_after(code: str) -> set[str]:
    probe = f"import sys\n{code}\nprint(' '.join(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, timeout=120)
    return set(result.stdout.split()) if result.returncode == 0 else set(result.stdout.split() + ["<failed>"])


@pytest.mark.parametrize("argv", [["--help"], ["quantize", "--help"], ["quantize", "--bits", "5"], ["eval", "--help"]])
def test_parsing_arguments_imports_nothing_heavy(argv):
    loaded = _modules_after(
        "from gsq_vllm.cli import build_parser\n"
        f"try:\n    build_parser().parse_args({argv!r})\nexcept SystemExit:\n    pass"
    )
    assert "gsq_vllm.cli" in loaded
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}


def test_help_and_bad_bits_print_only_ours():
    help_run = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "--help"], capture_output=True, text=True, timeout=120)
    assert help_run.returncode == 0 and help_run.stdout.startswith("usage: gsq-vllm") and help_run.stderr == ""
    bad = subprocess.run([sys.executable, "-m", "gsq_vllm.cli", "quantize", "--bits", "5"], capture_output=True,
                         text=True, timeout=120)
    assert bad.returncode == 2 and bad.stdout == ""
    assert bad.stderr.strip().splitlines()[-1] == "gsq-vllm quantize: error: argument --bits: bits must be 2, 3, 4 or ternary, got '5'"


def test_importing_the_package_is_light():
    loaded = _modules_after("import gsq_vllm")
    assert not {name for name in loaded if name.split(".")[0] in HEAVY}
