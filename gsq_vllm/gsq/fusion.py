"""Optional ``torch.compile`` for GSQ's elementwise hot loops, with an eager fallback.

The relaxation and the optimiser touch K floats per weight several times per step; eager
PyTorch runs each operation as its own pass over memory, and on a CPU those passes, not the
matmuls, dominate a step. Compiled, each function becomes one loop. Scalars that change every
step (temperature, learning rate, noise seed) are passed as 0-d tensors so one compilation serves
the whole run; shapes are dynamic so one compilation serves every layer.
"""

from __future__ import annotations

import logging
from collections.abc import Callable

import torch

logger = logging.getLogger(__name__)


class MaybeCompiled:
    """Call ``fn`` compiled when ``fused=True``; eager when not, or once compiling has failed."""

    def __init__(self, fn: Callable):
        self.fn, self.compiled, self.broken = fn, None, False

    def __call__(self, *args, fused: bool):
        if fused and not self.broken:
            try:
                if self.compiled is None:
                    self.compiled = torch.compile(self.fn, dynamic=True)
                return self.compiled(*args)
            except Exception as error:  # no C++ compiler, unsupported backend, ...
                logger.warning("GSQ: torch.compile of %s failed (%s); using eager PyTorch", self.fn.__name__, error)
                self.broken = True
        return self.fn(*args)
