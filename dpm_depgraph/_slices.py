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
physical removal, see :func:`apply_removal`). Handlers that delete several positions
per index, or along several dimensions (MultiheadAttention's packed q/k/v rows, LSTM
gates), are measured again on a small real copy whose entries are their own positions,
with indices 0, 1 and the last: the deleted positions must be a fixed pattern shifted by
the index (:class:`PositionMap`). A grouped convolution's input index ``i`` is weight
position ``i % (in_channels / groups)``. Measurements are cached per layer size.
Deletions that follow no such pattern raise :class:`UnsupportedGroupError` (the pruner
leaves the group unpruned with a warning); a Torch-Pruning function that fails on the
copy raises :class:`TorchPruningError`.
"""

from __future__ import annotations

import copy
from collections import OrderedDict
from dataclasses import dataclass, field

import torch
import torch.nn as nn
from torch_pruning import ops

__all__ = ["UnsupportedGroupError", "TorchPruningError", "GroupLayout", "group_layout", "apply_removal", "prune_group",
           "remap_optimizer_param", "PositionMap", "root_size", "drop_items"]


class UnsupportedGroupError(ValueError):
    """A DepGraph group whose deletions cannot be expressed as DPM channel slices."""


class TorchPruningError(UnsupportedGroupError):
    """Torch-Pruning's own pruning function fails on a layer (plain Torch-Pruning would
    fail on the model as well)."""


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


@dataclass(frozen=True)
class PositionMap:
    """The positions a pruning function deletes along one dim for pruning index ``i``:
    ``offsets + stride * i`` (``i % modulo`` first when ``modulo`` is set: a grouped
    convolution's weight holds only one group's input channels)."""

    offsets: tuple = (0,)
    stride: int = 1
    modulo: int | None = None

    def __call__(self, idxs) -> torch.Tensor:
        """``LongTensor [len(idxs), k]``: the deleted positions of each index."""
        i = torch.as_tensor(idxs, dtype=torch.int64)
        if self.modulo:
            i = i % self.modulo
        return i[:, None] * self.stride + torch.as_tensor(self.offsets, dtype=torch.int64)[None]


_UNIT = PositionMap()


def _index_domain(dep) -> int | None:
    owner = getattr(dep.handler, "__self__", None)
    target = dep.target.module
    try:
        if owner is not None and "out" in dep.handler.__name__:
            return owner.get_out_channels(target)
        if owner is not None and "in" in dep.handler.__name__:
            return owner.get_in_channels(target)
    except Exception:  # noqa: BLE001
        return None
    return None


def _value_probe(dep, n: int) -> dict:
    """``{(param_name, dim): PositionMap}`` measured on a real copy whose values are
    their own flat positions (for functions that delete several positions per index,
    e.g. MultiheadAttention's packed q/k/v rows or an LSTM's gate rows)."""
    target = dep.target.module
    removed: dict = {}
    probes = sorted({0, min(1, n - 1), n - 1})
    for idx in probes:
        memo = {id(p): nn.Parameter(torch.arange(p.numel(), dtype=torch.float64).view(p.shape))
                for p in target.parameters()}
        for b in target.buffers():
            memo[id(b)] = b.detach().clone()
        clone = copy.deepcopy(target, memo)
        before = {n_: p for n_, p in clone.named_parameters()}
        try:
            dep.handler(clone, [idx])
        except Exception as e:  # noqa: BLE001
            raise TorchPruningError(
                f"{dep}: Torch-Pruning's pruning function fails on this layer for channel "
                f"{idx} ({type(e).__name__}: {e})") from e
        for name, old in before.items():
            new = clone.get_parameter(name)
            left = new.detach().reshape(-1).long()
            for dim, size in enumerate(old.shape):
                stride = int(torch.tensor(old.shape[dim + 1:]).prod()) if dim + 1 < old.dim() else 1
                kept = torch.unique((left // stride) % size)
                if kept.numel() == size:
                    continue
                mask = torch.ones(size, dtype=torch.bool)
                mask[kept] = False
                removed.setdefault((name, dim), {})[idx] = mask.nonzero().squeeze(1)
    maps = {}
    for key, by_idx in removed.items():
        first = by_idx.get(0)
        if first is None or len(by_idx) != len(probes):
            raise UnsupportedGroupError(f"{dep}: parameter {key[0]} loses positions along dim "
                                        f"{key[1]} for some channels only")
        step = (by_idx[probes[1]] - first) if len(probes) > 1 else torch.zeros_like(first)
        stride = int(step[0]) if step.numel() else 0
        ok = step.numel() and bool((step == stride).all()) and all(
            v.numel() == first.numel() and torch.equal(v, first + stride * i)
            for i, v in by_idx.items())
        if not ok:
            raise UnsupportedGroupError(
                f"{dep}: parameter {key[0]} loses positions along dim {key[1]} that are not a "
                f"fixed pattern shifted by the channel index; a decay pruner cannot express it")
        maps[key] = PositionMap(tuple(int(o) for o in first), stride or 1)
    return maps


def _probe_handler(dep) -> list:
    """``[(param_name, dim, PositionMap)]``: what ``dep.handler`` deletes per index.

    ``param_name`` is relative to the target module ("" for an unwrapped parameter). One
    position along one dim per index is measured on a meta copy; anything else (several
    positions, several dims) on a real copy holding position numbers.
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
    out, complex_ = [], False
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
            complex_ = True
            break
        out.append((name, changed[0][0], _UNIT))
    if complex_:
        n = _index_domain(dep)
        if not isinstance(target, nn.Module) or not n:
            raise UnsupportedGroupError(
                f"{dep}: removing one channel changes several positions of a parameter in a "
                f"way the decay pruner cannot measure")
        return [(name, dim, pm) for (name, dim), pm in _value_probe(dep, n).items()]
    groups = getattr(target, "groups", 1)
    if isinstance(target, nn.modules.conv._ConvNd) and groups > 1 and "in_channels" in \
            getattr(handler, "__name__", "") and target.in_channels != groups:
        # Torch-Pruning deletes the same in-group position from every group of a grouped
        # convolution: index i is weight position i % (in_channels / groups).
        per_group = target.in_channels // groups
        out = [(n_, d, PositionMap(modulo=per_group) if n_ == "weight" else pm)
               for n_, d, pm in out]
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
    """``{(id(param), dim): [param, dim, roots(LongTensor), positions(LongTensor)]}``.

    ``roots[j]`` is the root index that deletes position ``positions[j]``. Deletions of the
    same tensor along the same dim by several items are merged.
    """
    cache = {} if probe_cache is None else probe_cache
    entries: OrderedDict = OrderedDict()
    for dep, idxs, roots in _items(group):
        if not idxs:
            continue
        target = dep.target.module
        shapes = (tuple(target.shape),) if isinstance(target, torch.Tensor) else \
            tuple(tuple(p.shape) for p in target.parameters())
        # what a function deletes depends on the layer's current size (e.g. the offsets of
        # MultiheadAttention's packed q/k/v rows): measure again after a removal
        key = (id(target), dep.handler, dep.target.pruning_dim, shapes)
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
        r = torch.as_tensor(roots, dtype=torch.int64)
        for name, dim, pmap in dims:
            p = _get_param(dep.target.module, name)
            pos = pmap(idxs)                                   # [n, k]
            rr = r[:, None].expand_as(pos).reshape(-1)
            e = entries.get((id(p), dim))
            if e is None:
                entries[(id(p), dim)] = [p, dim, rr, pos.reshape(-1)]
            else:
                e[2] = torch.cat([e[2], rr])
                e[3] = torch.cat([e[3], pos.reshape(-1)])
    return entries


def root_size(DG, group) -> int:
    """Number of root indices of a group (output or input channels of its root)."""
    root, fn = group[0].dep.target.module, group[0].dep.handler
    if DG.is_out_channel_pruning_fn(fn):
        return DG.get_out_channels(root)
    return DG.get_in_channels(root)


def group_layout(DG, group, root_name: str, probe_cache: dict | None = None,
                 units: torch.Tensor | None = None) -> GroupLayout:
    """Engine slices of a *full* DepGraph group (all root indices).

    ``units`` (``LongTensor [M, u]``, default: one root index each) partitions the root
    indices into the DPM channels: everything the root indices of a unit delete is one
    channel (a head, a set of grouped-conv channels that go together).
    """
    n_roots = root_size(DG, group)
    if units is None:
        units = torch.arange(n_roots).view(-1, 1)
    m = units.shape[0]
    unit_of = torch.full((n_roots,), -1, dtype=torch.int64)
    unit_of[units.reshape(-1)] = torch.arange(m).repeat_interleave(units.shape[1])
    if bool((unit_of < 0).any()):
        raise UnsupportedGroupError(f"group {root_name!r}: the DPM channels do not cover "
                                    f"every root index")
    entries = group_entries(group, probe_cache)
    slices = []
    for p, dim, roots, pos in entries.values():
        size = p.shape[dim]
        if int(pos.min()) < 0 or int(pos.max()) >= size or int(roots.min()) < 0 \
                or int(roots.max()) >= n_roots:
            raise UnsupportedGroupError(
                f"group {root_name!r}: the pruning indices of a tensor of shape "
                f"{tuple(p.shape)} (dim {dim}) are not positions along that dim")
        key = torch.unique(unit_of[roots] * size + pos)   # dedupe (unit, position), sorted
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
        counts = torch.bincount(unit_of[torch.as_tensor(roots, dtype=torch.int64)],
                                minlength=m)
        coverage.append((dep.target.module, DG.is_out_channel_pruning_fn(dep.handler),
                         DG.is_in_channel_pruning_fn(dep.handler), counts))
    return GroupLayout(m=m, slices=slices, coverage=coverage)


def drop_items(group, modules) -> None:
    """Remove the items of ``group`` whose target is in ``modules`` (in place), e.g. the
    shared key/value projections when Torch-Pruning removes whole query heads of a
    grouped-query attention."""
    if modules:
        keep = [it for it in group._group if not any(it.dep.target.module is m for m in modules)]
        group._group[:] = keep


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


def _same_values(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Same shape and elements, NaN equal to NaN (a diverged model's weights are removed
    like any others; ``torch.equal`` would call them different)."""
    return tuple(a.shape) == tuple(b.shape) and (
        torch.equal(a, b) or torch.allclose(a, b, rtol=0.0, atol=0.0, equal_nan=True))


def apply_removal(DG, model: nn.Module, root_module, root_fn, channels: list[int],
                  optimizer=None, probe_cache: dict | None = None, skip=()) -> list:
    """Physically remove ``channels`` of the group rooted at ``root_module`` through
    DepGraph (``group.prune()``, which also records the pruning history), then re-point
    ``optimizer`` at the new parameters with their state sliced.

    Returns ``[(old_param, new_param)]`` for every replaced parameter.
    """
    group = DG.get_pruning_group(root_module, root_fn, channels)
    drop_items(group, skip)
    entries = group_entries(group, probe_cache)
    plan: dict = {}   # id(old) -> (old, {dim: removed positions})
    for p, dim, _roots, pos in entries.values():
        plan.setdefault(id(p), (p, {}))[1].setdefault(dim, set()).update(pos.tolist())
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
        if new is old or not _same_values(new.detach(), expect):
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
