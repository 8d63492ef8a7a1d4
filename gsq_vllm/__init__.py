"""gsq-vllm: GSQ (Gumbel-Softmax Quantization) for llmcompressor and vLLM.

Importing the package registers :class:`GSQModifier` and :class:`GSQEndToEndModifier` with
llmcompressor's modifier factory (when llmcompressor is installed), so YAML recipes that name them
work in ``oneshot``. The
vLLM side is registered by vLLM itself through the ``vllm.general_plugins`` entry point.
"""

from __future__ import annotations

import importlib.util
import logging

__version__ = "0.1.0"
logger = logging.getLogger(__name__)


def _register_modifier() -> None:
    if importlib.util.find_spec("llmcompressor") is None:
        return  # the serving environment: no quantization here
    from llmcompressor.modifiers.factory import ModifierFactory

    from gsq_vllm.end_to_end import GSQEndToEndModifier
    from gsq_vllm.modifier import GSQModifier

    ModifierFactory.register("GSQModifier", GSQModifier)
    ModifierFactory.register("GSQEndToEndModifier", GSQEndToEndModifier)


_register_modifier()


def __getattr__(name: str):
    if name == "GSQModifier":
        from gsq_vllm.modifier import GSQModifier

        return GSQModifier
    if name == "GSQEndToEndModifier":
        from gsq_vllm.end_to_end import GSQEndToEndModifier

        return GSQEndToEndModifier
    raise AttributeError(name)
