"""Print the METADATA of a wheel on PyPI without downloading it (HTTP range requests).

The satisfiability test (tests/test_packaging.py) checks gsq-vllm's declared ranges against the
requirements of the vLLM releases users install; their METADATA is kept in tests/data/ and was
written by this script, e.g.

    python scripts/wheel_metadata.py vllm 0.33.0 > tests/data/vllm-0.33.0.METADATA
"""

from __future__ import annotations

import io
import json
import sys
import urllib.request
import zipfile


class RemoteFile(io.RawIOBase):
    """A read-only, seekable view of a URL, fetched with HTTP range requests."""

    def __init__(self, url: str):
        self.url, self.position = url, 0
        request = urllib.request.Request(url, method="HEAD")
        with urllib.request.urlopen(request, timeout=60) as response:
            self.size = int(response.headers["Content-Length"])

    def seekable(self) -> bool:
        return True

    def readable(self) -> bool:
        return True

    def seek(self, offset: int, whence: int = 0) -> int:
        self.position = {0: offset, 1: self.position + offset, 2: self.size + offset}[whence]
        return self.position

    def tell(self) -> int:
        return self.position

    def readinto(self, buffer) -> int:
        if self.position >= self.size or len(buffer) == 0:
            return 0
        end = min(self.position + len(buffer), self.size) - 1
        request = urllib.request.Request(self.url, headers={"Range": f"bytes={self.position}-{end}"})
        with urllib.request.urlopen(request, timeout=120) as response:
            data = response.read()
        buffer[: len(data)] = data
        self.position += len(data)
        return len(data)


def wheel_url(name: str, version: str, platform: str = "manylinux_2_28_x86_64") -> str:
    request = urllib.request.Request(f"https://pypi.org/simple/{name}/",
                                     headers={"Accept": "application/vnd.pypi.simple.v1+json"})
    with urllib.request.urlopen(request, timeout=60) as response:
        files = json.load(response)["files"]
    prefix = f"{name.replace('-', '_')}-{version}-"
    for entry in files:
        if entry["filename"].startswith(prefix) and entry["filename"].endswith(f"{platform}.whl"):
            return entry["url"]
    raise SystemExit(f"no {platform} wheel of {name} {version} on PyPI")


def main() -> None:
    name, version = sys.argv[1], sys.argv[2]
    remote = io.BufferedReader(RemoteFile(wheel_url(name, version)), buffer_size=1 << 16)
    with zipfile.ZipFile(remote) as wheel:
        member = next(n for n in wheel.namelist() if n.endswith(".dist-info/METADATA"))
        metadata = wheel.read(member).decode()
    # the long description is not needed: keep the header block
    sys.stdout.write(metadata.split("\n\n", 1)[0] + "\n")


if __name__ == "__main__":
    main()
