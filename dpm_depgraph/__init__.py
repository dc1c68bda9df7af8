"""dpm_depgraph: Decay Pruning Method for Torch-Pruning (DepGraph) pruners.

``DecayMetaPruner``, ``DecayGroupNormPruner`` and ``DecayBNScalePruner`` take the base
pruner's arguments plus ``decay=DecayConfig(...)``; :func:`decay_pruner` makes the same
for any ``torch_pruning.pruner.BasePruner`` subclass. :func:`prune_group` is
``group.prune()`` that slices the optimizer's state instead of losing it;
:func:`torch_pruning_fixes` lets plain Torch-Pruning build its graph of HF LLaMA (rotary
embedding). See ``docs/depgraph.md``.
"""

from dpm_core import DecayConfig

from ._slices import TorchPruningError, UnsupportedGroupError, prune_group
from .pruner import (DecayBNScalePruner, DecayGroup, DecayGroupNormPruner, DecayMetaPruner,
                     DecayPrunerMixin, decay_pruner)
from .tp_compat import torch_pruning_fixes

__all__ = ["DecayConfig", "DecayMetaPruner", "DecayGroupNormPruner", "DecayBNScalePruner",
           "DecayPrunerMixin", "DecayGroup", "decay_pruner", "UnsupportedGroupError", "TorchPruningError",
           "prune_group", "torch_pruning_fixes"]
