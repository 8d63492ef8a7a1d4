"""The README's code layout is the code's: every path it names exists, and every module of the
package is named there (directly, or by the folder it sits in)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def layout_section() -> str:
    text = (ROOT / "README.md").read_text()
    start = text.index("### How the code is laid out")
    return text[start:text.index("\n## ", start)]


def named_paths() -> set[str]:
    return {name for name in re.findall(r"`([^`\s]+)`", layout_section())
            if name.startswith(("gsq_vllm/", "benchmarks/", "tests/"))}


def test_every_path_the_layout_names_exists():
    missing = sorted(path for path in named_paths() if not (ROOT / path).exists())
    assert not missing, f"README's layout names paths that do not exist: {missing}"


def test_every_module_of_the_package_is_in_the_layout():
    named = named_paths()
    folders = {path.rstrip("/") for path in named if path.endswith("/")}
    unnamed = []
    for module in sorted((ROOT / "gsq_vllm").rglob("*.py")):
        relative = module.relative_to(ROOT).as_posix()
        if module.name == "__init__.py" and module.parent == ROOT / "gsq_vllm":
            continue
        if relative in named or any(relative.startswith(folder + "/") for folder in folders):
            continue
        unnamed.append(relative)
    assert not unnamed, f"modules the README's layout does not name: {unnamed}"
