"""How decaying channels take part in Torch-Pruning's selection: they count as removed.

Torch-Pruning's rules (the per-layer ``max_pruning_ratio`` floor, the top-k over an
importance) see the physical model, in which decaying and zeroed channels are still
present. These functions give the pruner what it needs to treat them as gone: per layer,
how many channels they own, and an importance in which they rank first (``-inf``) while
the live channels are normalised among themselves; while the importances are computed,
the decaying channels' weights read as 0 (a live channel's filter loses the columns that a
decaying channel of the previous layer owns, as in the smaller model Torch-Pruning would
hold); and the local head count of a step that Torch-Pruning compounds over the heads
left.
"""

from __future__ import annotations

import contextlib
import math
from typing import Callable

import torch
from torch_pruning.pruner.importance import GroupMagnitudeImportance

__all__ = ["dead_channel_counts", "dead_weights_hidden", "live_head_ratio", "live_importance"]


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
    view = pruner._views.get(name)
    dead = pruner._dead(name)
    if view is None and not bool(dead.any()):
        return imp
    dead = pruner._roots_of_units(name, dead)
    if view is not None:   # an attention group seen without its dead heads / head dims
        dead = torch.ones(dead.numel(), dtype=torch.bool)
        dead[view.live] = False
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
        if view is not None:
            return live_imp
        imp = torch.empty_like(raw, dtype=torch.float32)
        imp[~dead] = live_imp
    else:
        if view is not None:
            return imp[~dead].float()
        imp = imp.clone().float()
    # -inf: the base pruner's top-k takes them first, so they fill their share of the
    # step's target; _start_decay skips them (they are decaying or zeroed already).
    imp[dead] = -math.inf
    return imp


@contextlib.contextmanager
def dead_weights_hidden(pruner):
    """While inside, every element of a decaying channel reads exactly 0 (zeroed channels
    are 0 already); the values are restored on exit.

    Torch-Pruning computes the importance of a channel over all of its elements, some of
    which another group's channel owns (a filter's input columns belong to the previous
    layer's channels). Once that channel is removed they are gone; while it decays they
    are still there, at a fraction of their size. A zero is what a removed element adds
    to a magnitude (or Taylor, ``w * grad``) importance, so the importances, and with
    them a global ranking, are those of the model Torch-Pruning would hold.
    """
    saved = []
    with torch.no_grad():
        for name in pruner.engine.groups():
            chans = pruner.engine.decaying_channels(name)
            if chans.numel() == 0:
                continue
            for sl in pruner._slices.get(name, []):
                param, dim = sl[0], sl[1]
                ch = chans.to(param.device)
                pos = ch if len(sl) == 2 else sl[2].to(param.device)[ch].reshape(-1)
                saved.append((param, dim, pos, param.index_select(dim, pos)))
                param.index_fill_(dim, pos, 0)
    try:
        yield
    finally:
        with torch.no_grad():
            # reverse order: a position held by two decaying channels gets its value back
            for param, dim, pos, value in reversed(saved):
                param.index_copy_(dim, pos, value)


def live_head_ratio(pruner, layer, ratio: float) -> float:
    """The head pruning ratio to give Torch-Pruning's local head selection of ``layer``'s
    attention group so that it removes what it would from the live heads.

    Torch-Pruning's local head pruning removes ``ceil(ratio * H)`` of the ``H`` heads in
    the model at each step (``BasePruner._prune``; compounding: ``H`` shrinks after every
    step). Here the decaying and zeroed heads (``d``) are still in the model, ranked first
    (importance ``-inf``); the step must take them plus ``ceil(ratio * (H - d))`` live
    heads, so the ratio returned is ``(n - 1/2) / H`` with ``n = d + ceil(ratio * (H -
    d))`` (``ceil`` of it times ``H`` is exactly ``n``). With grouped-query attention
    ``d`` is a multiple of the key/value heads, so Torch-Pruning's per-kv-group count
    ``ceil(n / kv)`` is also ``d / kv`` plus its own. Global head pruning needs nothing:
    its target is fixed against the initial head count.
    """
    name = pruner._head_groups.get(layer)
    if ratio <= 0 or name is None or not pruner.prune_num_heads or name in pruner._views:
        return ratio   # (a view shows Torch-Pruning the live heads only)
    dead = int(pruner._dead(name).sum())
    if dead == 0:
        return ratio
    heads = pruner._units[name].shape[0]
    n = dead + math.ceil(ratio * (heads - dead))
    return (n - 0.5) / heads
