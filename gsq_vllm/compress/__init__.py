"""The llmcompressor side: GSQ as recipe steps, and the job that runs a recipe.

* :mod:`~gsq_vllm.compress.gsq_modifier`: ``GSQModifier``, layer-wise GSQ in llmcompressor's
  sequential pipeline (a thin adapter over :mod:`gsq_vllm.gsq`);
* :mod:`~gsq_vllm.compress.end_to_end_modifier`: ``GSQEndToEndModifier``, the scales tuned end to
  end after any int quantizer;
* :mod:`~gsq_vllm.compress.quantize`: the quantize job (``oneshot``, ``torchrun``, the checkpoint
  moved into place only when complete);
* :mod:`~gsq_vllm.compress.resume`: a killed run's finished layers.

Importing this package (or anything in it) registers both modifiers with llmcompressor's modifier
factory, so that YAML recipes find them by name; this is the one place that does.
"""

from __future__ import annotations

from llmcompressor.modifiers.factory import ModifierFactory

from gsq_vllm.compress.end_to_end_modifier import GSQEndToEndModifier
from gsq_vllm.compress.gsq_modifier import GSQModifier

__all__ = ["GSQModifier", "GSQEndToEndModifier"]

for _modifier in (GSQModifier, GSQEndToEndModifier):
    ModifierFactory.register(_modifier.__name__, _modifier)
