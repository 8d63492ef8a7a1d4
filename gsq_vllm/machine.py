"""Which machine a measurement comes from: every benchmark records it beside its figures (CPUs
with and without AVX-512 / bf16 / AMX give very different speeds)."""

from __future__ import annotations

from pathlib import Path


def cpu_description() -> dict:
    """Model name and the vector/matrix flags that change speed (recorded with every benchmark)."""
    info = {"model": "unknown", "flags": []}
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return info
    for line in text.splitlines():
        if line.startswith("model name") and info["model"] == "unknown":
            info["model"] = line.split(":", 1)[1].strip()
        if line.startswith("flags"):
            flags = set(line.split(":", 1)[1].split())
            info["flags"] = sorted(f for f in flags if f.startswith(("avx", "amx", "fma")))
            break
    info["cores"] = len([line for line in text.splitlines() if line.startswith("processor")])
    return info
