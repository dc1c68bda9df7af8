"""Gate Decorator pruning (You et al., NeurIPS 2019) with the Decay Pruning Method hook.

``GateDecorator(model, example_inputs, min_keep_ratio=0.1, decay=None)`` installs gated
BatchNorms, gathers Taylor scores (the original's tick), prunes globally by the original's
rules (:mod:`dpm_gatedecorator.selection`), adds the L1 gate penalty for the tock phase and
melts the result into a plain, smaller model. See ``docs/gatedecorator.md``.
"""

from .decorator import GateDecorator, GateGroup
from .gates import GatedBatchNorm

__all__ = ["GateDecorator", "GateGroup", "GatedBatchNorm"]
