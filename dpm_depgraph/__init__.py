"""dpm_depgraph: Decay Pruning Method for Torch-Pruning (DepGraph) pruners.

``DecayMetaPruner``, ``DecayGroupNormPruner`` and ``DecayBNScalePruner`` take the base
pruner's arguments plus ``decay=DecayConfig(...)``; :func:`decay_pruner` makes the same
for any ``torch_pruning.pruner.BasePruner`` subclass. :func:`prune_group` is
``group.prune()`` that slices the optimizer's state instead of losing it. See
``docs/depgraph.md``.
"""

from dpm_core import DecayConfig

from ._slices import TorchPruningError, UnsupportedGroupError, prune_group
from .pruner import (DecayBNScalePruner, DecayGroup, DecayGroupNormPruner, DecayMetaPruner,
                     DecayPrunerMixin, decay_pruner)

__all__ = ["DecayConfig", "DecayMetaPruner", "DecayGroupNormPruner", "DecayBNScalePruner",
           "DecayPrunerMixin", "DecayGroup", "decay_pruner", "UnsupportedGroupError", "TorchPruningError",
           "prune_group"]
