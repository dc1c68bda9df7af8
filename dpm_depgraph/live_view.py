"""Attention groups pruned by whole heads, shown to Torch-Pruning's selection as if their
decaying and zeroed heads (and head dims) were already removed.

Torch-Pruning's ``BasePruner._prune`` derives, from ONE importance vector per attention
group, both the head ranking (mean over each head's dims) and the head-dim ranking (mean
over the heads; with ``prune_num_heads`` alone it still enters a global ranking). A head
still in the model cannot rank first among the heads (importance ``-inf``) and stay out
of the head dims' means at the same time. So for such a group, while the selection runs:

* its importance is that of its live root indices only (live heads x live head dims);
* ``num_heads`` / ``out_channel_groups`` of its q/k/v layers are the live head counts;
* DepGraph's channel counts of its layers (``DG.get_out_channels`` / ``get_in_channels``,
  which ``round_to`` and ``check_pruning_group`` read) are the live counts, and its layers
  appear to ``head_dim`` arithmetic with their live widths (:class:`LiveLayer`);

exactly what Torch-Pruning sees on the smaller model it would hold. The selected indices
(in the live numbering) are mapped back to the group's physical root indices
(:func:`physical_group`). Nothing in the model changes.
"""

from __future__ import annotations

import contextlib

import torch
import torch.nn as nn

from .attention import head_layers

__all__ = ["LiveLayer", "attention_views", "live_layers", "live_views", "physical_group",
           "viewable"]


class LiveLayer:
    """Stands for a q/k/v layer in Torch-Pruning's head arithmetic: equal (and hashing
    equal) to the layer, so dictionary look-ups keyed by the layer work, with the live
    ``out_features``."""

    __slots__ = ("module", "out_features")

    def __init__(self, module: nn.Module, out_features: int):
        self.module = module
        self.out_features = out_features

    def __hash__(self):
        return hash(self.module)

    def __eq__(self, other):
        if isinstance(other, LiveLayer):
            return other.module is self.module
        return other is self.module


class View:
    """The live part of one attention group."""

    def __init__(self, live: torch.Tensor, heads: int, counts: dict, layers: list):
        self.live = live        # LongTensor: live root indices, in order (the live numbering)
        self.heads = heads      # live heads
        self.counts = counts    # {(module, "out"|"in"): live channel count}
        self.layers = layers    # the q/k/v layers (num_heads keys)


def viewable(pruner, name: str) -> list | None:
    """The q/k/v layers of attention group ``name`` if it can be viewed live (equal head
    counts, Linear layers only), else None."""
    layers = [m for m, n in pruner._head_groups.items() if n == name]
    if not layers or len({pruner.num_heads[m] for m in layers}) != 1:
        return None   # grouped-query attention: heads of q and k/v differ
    if not all(isinstance(m, nn.Linear) for m, *_ in pruner._coverage.get(name, [])
               if isinstance(m, nn.Module) and next(m.parameters(), None) is not None):
        return None   # layers other than Linear (their width is not out/in_features)
    return layers


def attention_views(pruner) -> dict:
    """``{engine group name: View}`` for the attention groups pruned by whole heads that
    hold decaying or zeroed heads or head dims now."""
    views = {}
    if not pruner.prune_num_heads:
        return views
    for name in dict.fromkeys(pruner._head_groups.values()):
        dead_units = [pruner._roots_of_units(name, pruner._dead(name))]
        dims = pruner._dims_of.get(name)
        if dims is not None:
            dead_units.append(pruner._roots_of_units(dims, pruner._dead(dims)))
        dead = torch.stack(dead_units).any(0)
        if not bool(dead.any()):
            continue
        layers = viewable(pruner, name)
        if layers is None:
            continue
        n_roots = dead.numel()
        live = (~dead).nonzero().squeeze(1)
        counts = {}
        for module, is_out, is_in, per_root in pruner._coverage[name]:
            if not isinstance(module, nn.Linear):
                continue   # DepGraph's parameter-free op nodes have no channel count
            per = int(per_root.sum()) // n_roots          # positions per root index
            for kind, on in (("out", is_out), ("in", is_in)):
                if on:
                    full = pruner.DG.get_out_channels(module) if kind == "out" else \
                        pruner.DG.get_in_channels(module)
                    counts[(module, kind)] = full - per * int(dead.sum())
        heads = int((~pruner._dead(name)).sum())
        views[name] = View(live, heads, counts, layers)
    return views


@contextlib.contextmanager
def live_views(pruner, views: dict):
    """While inside, Torch-Pruning's selection sees the ``views`` (module docstring)."""
    if not views:
        yield
        return
    dg = pruner.DG
    out_counts = {m: c for v in views.values() for (m, k), c in v.counts.items() if k == "out"}
    in_counts = {m: c for v in views.values() for (m, k), c in v.counts.items() if k == "in"}
    get_out, get_in = dg.get_out_channels, dg.get_in_channels
    dead_counts = pruner._dead_counts
    if dead_counts:
        # the live counts below already leave these groups' dead channels out
        viewed = {(id(m), "out") for m in out_counts} | {(id(m), "in") for m in in_counts}
        pruner._dead_counts = {k: v for k, v in dead_counts.items() if k not in viewed}
    dg.get_out_channels = lambda m: out_counts[m] if m in out_counts else get_out(m)
    dg.get_in_channels = lambda m: in_counts[m] if m in in_counts else get_in(m)
    for view in views.values():
        for layer in view.layers:
            pruner.num_heads[layer] = view.heads
            if layer in pruner.out_channel_groups:
                pruner.out_channel_groups[layer] = view.heads
    pruner._views = views
    try:
        yield
    finally:
        pruner._views = {}
        del dg.get_out_channels, dg.get_in_channels     # the class's methods again
        pruner._dead_counts = dead_counts
        pruner._sync_heads()


def live_layers(pruner, layers: list) -> list:
    """``layers`` (Torch-Pruning's q/k/v layers of a group) with :class:`LiveLayer` for
    those of a view."""
    out = []
    for layer in layers:
        view = next((v for v in pruner._views.values() if layer in v.layers), None)
        if view is None:
            out.append(layer)
        else:
            out.append(LiveLayer(layer, view.counts[(layer, "out")]))
    return out


def physical_group(pruner, group, views: dict):
    """``group`` as selected in a view's live numbering, rebuilt on the physical root
    indices; other groups unchanged."""
    name = pruner._name_of(group)
    view = views.get(name)
    if view is None:
        return group
    idxs = torch.as_tensor(list(group[0].idxs), dtype=torch.int64)
    phys = view.live[idxs].tolist()
    return pruner.DG.get_pruning_group(group[0].dep.target.module, group[0].dep.handler, phys)
