"""``prune_num_heads=True`` with ``prune_head_dims=True``: whole heads and head dims of
every head, as two engine groups over the same attention tensors.

Torch-Pruning removes, in one step, whole heads and the same head dims ``j`` of every
head (``BasePruner._prune``: the union of both selections). A head and a head dim overlap
(root index ``h * head_dim + j`` belongs to both), so they cannot be channels of one
engine group. The attention group's engine group ``name`` has one channel per head
(:func:`dpm_depgraph.attention.group_units`) and ``name:dims`` one channel per head-dim
position across the heads (:func:`dpm_depgraph.attention.head_dim_units`); an element of
a decaying head and a decaying head dim takes the smaller factor (engine rule). What is
zeroed in both leaves in one DepGraph removal (``DecayPrunerMixin._remove``).
"""

from __future__ import annotations

import warnings

import torch

from .attention import kv_layers_to_skip, whole_units
from .live_view import viewable

__all__ = ["register_head_dims", "start_heads_and_dims_decay", "finish_heads_and_dims"]


def register_head_dims(pruner, name: str, group) -> None:
    """Add the head-dims engine group of attention group ``name``."""
    if kv_layers_to_skip(pruner, group):
        raise NotImplementedError(
            f"{type(pruner).__name__}: prune_num_heads=True with prune_head_dims=True on "
            f"grouped-query attention ({name!r}) is not supported by the decay pruners; "
            f"use prune_head_dims=False, as Torch-Pruning's LLM example does")
    dims = f"{name}:dims"
    pruner._pair_of[dims] = name
    pruner._dims_of[name] = dims
    layout, units, _ = pruner._layout_of(group, dims)
    pruner.engine.add_group(dims, layout.slices)
    pruner._roots[dims] = pruner._roots[name]
    pruner._coverage[dims] = layout.coverage
    pruner._units[dims] = units
    pruner._slices[dims] = layout.slices


def start_heads_and_dims_decay(pruner, name: str, chans: list) -> torch.Tensor:
    """Split Torch-Pruning's selection (root indices ``chans`` of group ``name``) into
    whole heads, which start decaying in ``name``, and whole head dims, in ``name:dims``.
    Decaying / zeroed heads and head dims count as picked: the selection saw the group
    without them (:mod:`dpm_depgraph.live_view`), and ``engine.mark`` skips them."""
    dims = pruner._dims_of[name]
    heads_u, dims_u = pruner._units[name], pruner._units[dims]
    picked = torch.zeros(heads_u.numel(), dtype=torch.bool)
    picked[torch.as_tensor(chans, dtype=torch.int64)] = True
    picked |= pruner._roots_of_units(name, pruner._dead(name))
    picked |= pruner._roots_of_units(dims, pruner._dead(dims))
    roots = picked.nonzero().squeeze(1)
    heads, hdims = whole_units(heads_u, roots), whole_units(dims_u, roots)
    covered = torch.zeros_like(picked)
    covered[heads_u[heads].reshape(-1)] = True
    covered[dims_u[hdims].reshape(-1)] = True
    if not torch.equal(covered, picked):
        raise RuntimeError(
            f"group {name!r}: the selection is not a union of whole heads and whole head "
            f"dims; please report this model")
    pruner.engine.mark(dims, hdims.nonzero().squeeze(1))
    return pruner.engine.mark(name, heads.nonzero().squeeze(1))


def finish_heads_and_dims(pruner) -> None:
    """Where an attention group cannot be shown live to the selection
    (:func:`dpm_depgraph.live_view.viewable`), its heads and head dims still decaying at a
    pruning step are zeroed now (with a warning): Torch-Pruning ranks heads by their mean
    over the head dims and head dims by their mean over the heads, from one importance
    vector, so a head still in the model cannot both rank first among the heads and stay
    out of the head dims' means (nor a head dim the other way round)."""
    late = [n for pair in pruner._dims_of.items() if viewable(pruner, pair[0]) is None
            for n in pair if bool(pruner.engine.is_decaying(n).any())]
    if not late:
        return
    warnings.warn(
        f"{type(pruner).__name__}.step(): with prune_num_heads and prune_head_dims, the heads "
        f"and head dims still decaying at a pruning step are zeroed now ({late[:3]}); run "
        f"at least decay.steps={pruner.decay.steps} optimizer steps between pruning steps "
        f"to let them decay smoothly", RuntimeWarning, stacklevel=3)
    for n in late:
        pruner.engine.zero_now(n)
