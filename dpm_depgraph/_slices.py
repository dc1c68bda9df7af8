"""Translate Torch-Pruning (DepGraph) groups into dpm_core engine slices, and keep an
optimizer consistent when DepGraph replaces parameters by smaller ones.

A DepGraph group is a list of ``(dependency, idxs)`` items; each item's handler (a
Torch-Pruning pruning function such as ``prune_conv_out_channels``) deletes positions
``idxs`` of some parameters of its target module, and ``item.root_idxs`` says which
root channel each position belongs to. What exactly a handler deletes is not declared
anywhere in Torch-Pruning, so it is *measured*: the handler is run once on a
"meta" clone of the target module (same shapes, no storage, nothing touched in the
real model) with ``idxs=[0]``, and every parameter whose size shrank by one along one
dimension is recorded as ``(parameter, dim)``. Position ``i`` handed to the handler is
then position ``i`` along that dimension (checked against the real tensors at every
physical removal, see :func:`apply_removal`). Handlers that delete more than one
position per index or along several dimensions (multi-head attention's packed
projections, LSTM gates, grouped convolutions' inputs, splits) cannot be expressed as
DPM channel slices; they raise :class:`UnsupportedGroupError`, and the pruner leaves such
a group unpruned with a warning.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch_pruning import ops

__all__ = ["UnsupportedGroupError", "GroupLayout", "group_layout", "apply_removal", "prune_group",
           "remap_optimizer_param"]


class UnsupportedGroupError(ValueError):
    """A DepGraph group whose deletions cannot be expressed as DPM channel slices."""


# ----------------------------------------------------------------------------- probing
def _meta_clone(module: nn.Module) -> nn.Module:
    """A deep copy of ``module`` whose parameters and buffers are storage-less meta tensors
    of the same shapes. It shares nothing mutable with ``module`` (containers such as an
    RNN's ``_flat_weights`` list are copied and point at the meta twins), so a pruning
    function run on it never touches ``module``."""
    memo: dict = {}
    for p in module.parameters():
        memo[id(p)] = nn.Parameter(torch.empty(p.shape, dtype=p.dtype, device="meta"),
                                   requires_grad=p.requires_grad)
    for b in module.buffers():
        memo[id(b)] = torch.empty(b.shape, dtype=b.dtype, device="meta")
    return copy.deepcopy(module, memo)


def _probe_handler(dep) -> list[tuple[str, int]]:
    """``[(param_name, dim)]`` that ``dep.handler`` deletes one position from, per index.

    ``param_name`` is relative to the target module ("" for an unwrapped parameter).
    """
    target = dep.target.module
    handler = dep.handler
    if isinstance(target, nn.Parameter):
        before = {"": tuple(target.shape)}
        probe = nn.Parameter(torch.empty(target.shape, dtype=target.dtype, device="meta"))
    elif isinstance(target, nn.Module):
        before = {n: tuple(p.shape) for n, p in target.named_parameters()}
        if not before:
            return []
        probe = _meta_clone(target)
    else:
        return []
    owner = getattr(handler, "__self__", None)
    if owner is not None and hasattr(owner, "pruning_dim"):
        owner.pruning_dim = dep.target.pruning_dim   # what Dependency.__call__ does
    try:
        result = handler(probe, [0])
    except Exception as e:  # noqa: BLE001 - report which layer we could not measure
        raise UnsupportedGroupError(
            f"could not measure what {getattr(handler, '__qualname__', handler)} deletes from "
            f"{dep.target.name}: {type(e).__name__}: {e}") from e
    if isinstance(target, nn.Parameter):
        after = {"": tuple(result.shape)} if isinstance(result, torch.Tensor) else before
    else:
        after = {n: tuple(p.shape) for n, p in probe.named_parameters()}
    out = []
    for name, shape in before.items():
        new = after.get(name)
        if new is None or len(new) != len(shape):
            raise UnsupportedGroupError(
                f"{dep}: the pruning function replaced parameter {name or '<param>'} in an "
                f"unexpected way")
        changed = [(d, a - b) for d, (a, b) in enumerate(zip(shape, new)) if a != b]
        if not changed:
            continue
        if len(changed) != 1 or changed[0][1] != 1:
            raise UnsupportedGroupError(
                f"{dep}: removing one channel changes parameter {name or '<param>'} of shape "
                f"{shape} to {new}; a decay pruner can only decay structures that lose one "
                f"position along one dimension per channel (multi-head attention and LSTM "
                f"gates are not supported yet)")
        out.append((name, changed[0][0]))
    return out


def _get_param(target, name: str) -> torch.Tensor:
    if isinstance(target, nn.Parameter):
        return target
    return target.get_parameter(name)


# ----------------------------------------------------------------------------- layouts
@dataclass
class GroupLayout:
    """One DepGraph group as engine slices plus per-module channel coverage."""

    m: int
    slices: list                  # engine slices: (param, dim) or (param, dim, index[M,k])
    # (module, is_out, is_in, counts[M]): how many channels of the module each root channel
    # owns; used to count live channels per layer for max_pruning_ratio.
    coverage: list = field(default_factory=list)


def _items(group):
    for i in range(len(group)):
        item = group[i]
        yield item.dep, list(item.idxs), item.root_idxs


def group_entries(group, probe_cache: dict | None = None) -> "OrderedDict":
    """``{(id(param), dim): [param, dim, roots(list), positions(list)]}`` for a group.

    Deletions of the same tensor along the same dim by several items are merged.
    """
    cache = {} if probe_cache is None else probe_cache
    entries: OrderedDict = OrderedDict()
    for dep, idxs, roots in _items(group):
        if not idxs:
            continue
        key = (id(dep.target.module), dep.handler, dep.target.pruning_dim)
        dims = cache.get(key)
        if dims is None:
            dims = _probe_handler(dep)
            cache[key] = dims
        if not dims:
            continue
        if roots is None or any(r is None for r in roots):
            raise UnsupportedGroupError(
                f"{dep}: Torch-Pruning could not map its indices back to the group's root "
                f"channels")
        for name, dim in dims:
            p = _get_param(dep.target.module, name)
            e = entries.get((id(p), dim))
            if e is None:
                entries[(id(p), dim)] = [p, dim, list(roots), list(idxs)]
            else:
                e[2].extend(roots)
                e[3].extend(idxs)
    return entries


def group_layout(DG, group, root_name: str, probe_cache: dict | None = None) -> GroupLayout:
    """Engine slices of a *full* DepGraph group (all M channels of its root)."""
    root = group[0].dep.target.module
    m = DG.get_out_channels(root)
    entries = group_entries(group, probe_cache)
    slices = []
    for p, dim, roots, pos in entries.values():
        r = torch.as_tensor(roots, dtype=torch.int64)
        q = torch.as_tensor(pos, dtype=torch.int64)
        size = p.shape[dim]
        if int(q.min()) < 0 or int(q.max()) >= size or int(r.min()) < 0 or int(r.max()) >= m:
            raise UnsupportedGroupError(
                f"group {root_name!r}: the pruning indices of a tensor of shape "
                f"{tuple(p.shape)} (dim {dim}) are not positions along that dim (e.g. the "
                f"input channels of a grouped convolution)")
        key = torch.unique(r * size + q)          # dedupe (root, position) pairs, sorted
        r, q = key // size, key % size
        if torch.unique(q).numel() != q.numel():
            raise UnsupportedGroupError(
                f"group {root_name!r}: a position of a tensor of shape {tuple(p.shape)} "
                f"(dim {dim}) belongs to two channels of the group")
        counts = torch.bincount(r, minlength=m)
        if counts.numel() != m or not bool((counts == counts[0]).all()) or int(counts[0]) == 0:
            raise UnsupportedGroupError(
                f"group {root_name!r}: the channels own different numbers of positions of a "
                f"tensor of shape {tuple(p.shape)} (dim {dim}) (e.g. a split or a partial "
                f"concatenation), which is not supported yet")
        k = int(counts[0])
        if k == 1 and q.numel() == size and bool((q == torch.arange(size)).all()):
            slices.append((p, dim))
        else:
            slices.append((p, dim, q.view(m, k).to(p.device)))
    coverage = []
    for dep, idxs, roots in _items(group):
        if dep.target.type == ops.OPTYPE.PARAMETER or not idxs or roots is None \
                or any(r is None for r in roots):
            continue
        counts = torch.bincount(torch.as_tensor(roots, dtype=torch.int64), minlength=m)
        coverage.append((dep.target.module, DG.is_out_channel_pruning_fn(dep.handler),
                         DG.is_in_channel_pruning_fn(dep.handler), counts))
    return GroupLayout(m=m, slices=slices, coverage=coverage)


# ----------------------------------------------------------------------------- removal
def _param_owners(model: nn.Module) -> dict:
    owners: dict = {}
    for mod in model.modules():
        for name, p in mod._parameters.items():
            if p is not None:
                owners.setdefault(id(p), []).append((mod, name))
    return owners


def remap_optimizer_param(optimizer, old: torch.Tensor, new: torch.Tensor,
                          keeps: list[tuple[int, torch.Tensor]]) -> None:
    """Replace ``old`` by ``new`` in ``optimizer``, carrying its per-parameter state.

    Every state tensor shaped like ``old`` (momentum_buffer, exp_avg, exp_avg_sq, ...) is
    sliced with ``keeps`` (``[(dim, kept_positions)]``, applied in order); scalars (e.g.
    Adam's ``step``) and tensors of other shapes are carried over unchanged.
    """
    if optimizer is None:
        return
    for pg in optimizer.param_groups:
        params = pg["params"]
        for i, p in enumerate(params):
            if p is old:
                params[i] = new
    state = optimizer.state.pop(old, None)
    if state is None:
        return
    carried = {}
    for key, value in state.items():
        if isinstance(value, torch.Tensor) and value.dim() == old.dim() and value.dim() > 0 \
                and tuple(value.shape) == tuple(old.shape):
            for dim, keep in keeps:
                value = value.index_select(dim, keep.to(value.device))
        carried[key] = value
    optimizer.state[new] = carried


def apply_removal(DG, model: nn.Module, root_module, root_fn, channels: list[int],
                  optimizer=None, probe_cache: dict | None = None) -> list:
    """Physically remove ``channels`` of the group rooted at ``root_module`` through
    DepGraph (``group.prune()``, which also records the pruning history), then re-point
    ``optimizer`` at the new parameters with their state sliced.

    Returns ``[(old_param, new_param)]`` for every replaced parameter.
    """
    group = DG.get_pruning_group(root_module, root_fn, channels)
    entries = group_entries(group, probe_cache)
    plan: dict = {}   # id(old) -> (old, {dim: removed positions})
    for p, dim, _roots, pos in entries.values():
        plan.setdefault(id(p), (p, {}))[1].setdefault(dim, set()).update(pos)
    owners = _param_owners(model)
    before = {id(p): p for p in (q for q, _ in plan.values())}
    all_before = {(id(mod), name): p for owned in owners.values() for mod, name in owned
                  for p in [mod._parameters[name]]}
    group.prune()
    replaced = []
    for pid, (old, dims) in plan.items():
        locs = owners.get(pid)
        if not locs:
            raise RuntimeError(f"internal error: a pruned tensor of shape {tuple(old.shape)} "
                               f"is not a parameter of the model")
        mod, name = locs[0]
        new = mod._parameters[name]
        keeps = []
        expect = old.detach()
        for dim, removed in sorted(dims.items()):
            keep_mask = torch.ones(old.shape[dim], dtype=torch.bool)
            keep_mask[torch.as_tensor(sorted(removed), dtype=torch.int64)] = False
            keep = keep_mask.nonzero().squeeze(1)
            keeps.append((dim, keep))
            expect = expect.index_select(dim, keep.to(expect.device))
        if new is old or tuple(new.shape) != tuple(expect.shape) or not torch.equal(new.detach(), expect):
            raise RuntimeError(
                f"internal error: Torch-Pruning removed other positions of {mod.__class__.__name__}."
                f"{name} (shape {tuple(old.shape)} -> {tuple(new.shape)}) than the decay pruner "
                f"expected; please report this model")
        for other_mod, other_name in locs[1:]:   # the same tensor registered twice
            if other_mod._parameters[other_name] is old:
                other_mod._parameters[other_name] = new
        remap_optimizer_param(optimizer, old, new, keeps)
        replaced.append((old, new))
    # any parameter replaced that we did not plan for would leave a stale optimizer entry
    for (mid, name), p in all_before.items():
        if id(p) in before:
            continue
        for mod, nm in owners.get(id(p), []):
            if id(mod) == mid and nm == name and mod._parameters[nm] is not p:
                raise RuntimeError(
                    f"internal error: Torch-Pruning replaced {mod.__class__.__name__}.{nm}, "
                    f"which the decay pruner did not expect; please report this model")
    return replaced


def prune_group(DG, group, optimizer: torch.optim.Optimizer | None = None) -> list:
    """``group.prune()`` that keeps the optimizer: for plain Torch-Pruning loops too.

    ``group`` is a Torch-Pruning group (from ``pruner.step(interactive=True)`` or
    ``DG.get_pruning_group(...)``). The channels are removed through DepGraph exactly as
    ``group.prune()`` would, and ``optimizer`` (if given) is re-pointed at the new,
    smaller parameters with its per-parameter state (momentum, Adam moments, ``step``)
    sliced to the channels that remain, instead of being rebuilt from scratch.

    Returns ``[(old_param, new_param)]`` for every replaced parameter.
    """
    try:
        root = group[0]
        module, fn, idxs = root.dep.target.module, root.dep.handler, list(root.idxs)
    except (TypeError, IndexError, AttributeError):
        raise TypeError(f"prune_group() expects a torch_pruning Group (from "
                        f"pruner.step(interactive=True) or DG.get_pruning_group), got "
                        f"{type(group).__name__}") from None
    if optimizer is not None and not isinstance(optimizer, torch.optim.Optimizer):
        raise TypeError(f"prune_group(): optimizer must be a torch.optim.Optimizer or None, "
                        f"got {type(optimizer).__name__}")
    model = getattr(DG, "model", None)
    if model is None:
        raise ValueError("prune_group(): the DependencyGraph has no model; build it with "
                         "DG.build_dependency(model, example_inputs) first")
    return apply_removal(DG, model, module, fn, idxs, optimizer)
