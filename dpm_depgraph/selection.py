"""How decaying channels take part in Torch-Pruning's selection: they count as removed.

Torch-Pruning's rules (the per-layer ``max_pruning_ratio`` floor, the top-k over an
importance) see the physical model, in which decaying and zeroed channels are still
present. These functions give the pruner what it needs to treat them as gone: per layer,
how many channels they own, and an importance in which they rank first (``-inf``) while
the live channels are normalised among themselves.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
from torch_pruning.pruner.importance import GroupMagnitudeImportance

__all__ = ["dead_channel_counts", "live_importance"]


def dead_channel_counts(pruner) -> dict:
    """``{(id(module), 'out'|'in'): number of channels owned by decaying/zeroed channels}``
    over all groups (a consumer may be fed by several groups)."""
    counts: dict = {}
    for name in pruner.engine.groups():
        dead = pruner._dead(name)
        if not bool(dead.any()):
            continue
        d = dead.long()
        for module, is_out, is_in, per_root in pruner._coverage.get(name, []):
            n = int((per_root.to(d.device) * d).sum())
            if is_out:
                counts[(id(module), "out")] = counts.get((id(module), "out"), 0) + n
            if is_in:
                counts[(id(module), "in")] = counts.get((id(module), "in"), 0) + n
    return counts


def live_importance(pruner, group, imp: torch.Tensor,
                    base_importance: Callable[[object], torch.Tensor]) -> torch.Tensor:
    """``imp`` (the base pruner's importance of ``group``) with the decaying / zeroed
    channels at ``-inf`` and, for a normalised :class:`GroupMagnitudeImportance`, the live
    channels normalised over the live channels only. ``base_importance``: the base
    pruner's ``estimate_importance`` (called again without normalisation)."""
    name = pruner._name_of(group)
    if name is None:
        return imp
    dead = pruner._dead(name)
    if not bool(dead.any()):
        return imp
    dead = pruner._roots_of_units(name, dead)
    if dead.numel() != imp.numel():
        return imp
    dead = dead.to(imp.device)
    scorer = pruner.importance
    norm = getattr(scorer, "normalizer", None)
    if isinstance(scorer, GroupMagnitudeImportance) and norm is not None:
        # Normalise over the live channels only, as if the decaying/zeroed ones were
        # already removed (they are, as far as the pruning target is concerned).
        scorer.normalizer = None
        try:
            raw = base_importance(group)
        finally:
            scorer.normalizer = norm
        live_imp = scorer._normalize(raw[~dead].float(), norm)
        imp = torch.empty_like(raw, dtype=torch.float32)
        imp[~dead] = live_imp
    else:
        imp = imp.clone().float()
    # -inf: the base pruner's top-k takes them first, so they fill their share of the
    # step's target; _start_decay skips them (they are decaying or zeroed already).
    imp[dead] = -math.inf
    return imp
