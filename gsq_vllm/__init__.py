"""gsq-vllm: GSQ (Gumbel-Softmax Quantization) for llmcompressor and vLLM.

Importing the package is cheap: it imports neither llmcompressor, nor transformers, nor vLLM.
``from gsq_vllm import GSQModifier`` (or ``GSQEndToEndModifier``) imports llmcompressor and
registers both modifiers with its modifier factory, so YAML recipes that name them work in
``oneshot``. The vLLM side is registered by vLLM itself through the ``vllm.general_plugins``
entry point.
"""

from __future__ import annotations

__version__ = "0.1.0"
__all__ = ["GSQModifier", "GSQEndToEndModifier", "__version__"]


def __getattr__(name: str):
    if name in ("GSQModifier", "GSQEndToEndModifier"):
        from gsq_vllm import compress  # imports llmcompressor and registers both modifiers

        return getattr(compress, name)
    raise AttributeError(f"module 'gsq_vllm' has no attribute {name!r}")
