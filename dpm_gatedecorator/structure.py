"""Finding the gate groups and each channel's whole structure with Torch-Pruning's DependencyGraph.

A *gate group* is a set of M channels that must be pruned together: channel ``c`` of the
group is one output channel in each of its member BatchNorms (for a ResNet stage, the stem
or first block's BN and every block's second BN, joined by the residual additions) plus
every tensor slice Torch-Pruning would remove with it (producing conv filters, consuming
convs'/linears' input slices, ...). Nothing here is written by hand per architecture: the
groups are whatever ``DependencyGraph.get_pruning_group`` couples to a BN's output channels.
"""

from __future__ import annotations

import warnings
from dataclasses import dataclass, field
from typing import Dict, List, Tuple

import torch
import torch.nn as nn
import torch_pruning as tp

from .gates import SUPPORTED_BN

__all__ = ["GroupSpec", "StructItem", "build_groups", "trace_spatial", "run_traced"]

_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class StructItem:
    """One module's share of a gate group: ``index[c]`` are the positions of channel ``c``
    along the module's output (``role="out"``) or input (``role="in"``) channel dimension."""

    module_name: str
    module: nn.Module
    role: str  # "out" or "in"
    index: torch.Tensor  # LongTensor [M, k]


@dataclass
class GroupSpec:
    """A gate group found by the DependencyGraph (see module docstring)."""

    name: str  # the root BatchNorm's module name (also the engine group name)
    m: int
    members: List[Tuple[str, torch.Tensor]]  # (BN module name, LongTensor [M] channel map)
    items: List[StructItem] = field(default_factory=list)


def run_traced(model: nn.Module, fn):
    """Run ``fn()`` with ``model`` in eval mode (BN running stats untouched), then restore
    every submodule's train/eval flag."""
    flags = {m: m.training for m in model.modules()}
    model.eval()
    try:
        return fn()
    finally:
        for m, f in flags.items():
            m.training = f


def _forward(model, example_inputs):
    if isinstance(example_inputs, dict):
        return model(**example_inputs)
    if isinstance(example_inputs, (list, tuple)):
        return model(*example_inputs)
    return model(example_inputs)


def trace_spatial(model: nn.Module, example_inputs) -> Dict[nn.Module, int]:
    """Output positions per channel (e.g. H*W) of every conv/linear/BatchNorm for
    ``example_inputs`` (1 for a BatchNorm1d on ``[N, C]``)."""
    area: Dict[nn.Module, int] = {}
    hooks = []

    def hook(mod, inp, out):
        if isinstance(out, torch.Tensor) and out.dim() >= 2:
            if isinstance(mod, nn.Linear):
                area[mod] = int(out[0].numel() // out.shape[-1])
            else:
                area[mod] = int(out[0, 0].numel())

    for m in model.modules():
        if isinstance(m, _CONV + (nn.Linear,) + SUPPORTED_BN):
            hooks.append(m.register_forward_hook(hook))
    try:
        with torch.no_grad():
            run_traced(model, lambda: _forward(model, example_inputs))
    finally:
        for h in hooks:
            h.remove()
    return area


def _index_matrix(idxs, root_idxs, m: int) -> torch.Tensor | None:
    """``[M, k]`` positions of each root channel, or None if channels own unequal counts."""
    idx = torch.as_tensor(list(idxs), dtype=torch.long)
    root = torch.as_tensor(list(root_idxs), dtype=torch.long)
    if idx.numel() == 0 or idx.numel() % m:
        return None
    order = torch.sort(root * (idx.max() + 1) + idx, stable=True).indices
    idx, root = idx[order], root[order]
    k = idx.numel() // m
    if not torch.equal(root, torch.arange(m).repeat_interleave(k)):
        return None
    return idx.view(m, k)


def build_groups(model: nn.Module, example_inputs) -> Tuple[List[GroupSpec], tp.DependencyGraph]:
    """Gate groups of every BatchNorm in ``model`` (a plain model: gates not yet installed)."""
    names = {m: n for n, m in model.named_modules()}
    bns = [(n, m) for n, m in model.named_modules() if isinstance(m, SUPPORTED_BN)]
    DG = run_traced(model, lambda: tp.DependencyGraph().build_dependency(
        model, example_inputs=example_inputs, verbose=False))
    covered: Dict[nn.Module, torch.Tensor] = {m: torch.zeros(m.num_features, dtype=torch.bool)
                                              for _, m in bns}
    groups: List[GroupSpec] = []
    for name, bn in bns:
        if bool(covered[bn].all()):
            continue
        m = bn.num_features
        group = DG.get_pruning_group(bn, tp.prune_batchnorm_out_channels, list(range(m)))
        spec = GroupSpec(name=name, m=m, members=[])
        seen_items = set()
        for it in group.items:
            mod = it.dep.target.module
            if not isinstance(mod, nn.Module) or mod not in names:
                continue  # element-wise ops, unwrapped parameters: no weights of their own
            handler = it.dep.handler
            role = "out" if DG.is_out_channel_pruning_fn(handler) else "in"
            index = _index_matrix(it.idxs, it.root_idxs, m)
            if index is None:
                warnings.warn(f"dpm_gatedecorator: group {name!r}: cannot map the channels of "
                              f"{names[mod]!r} one-to-one; it is left out of the decayed "
                              f"structure (it is still pruned by melt())")
                continue
            if isinstance(mod, SUPPORTED_BN):
                if index.shape[1] != 1:
                    continue
                if mod in covered and not any(mn == names[mod] for mn, _ in spec.members):
                    spec.members.append((names[mod], index[:, 0].clone()))
                    covered[mod][index[:, 0]] = True
                continue
            key = (names[mod], role)
            if key in seen_items:
                continue
            seen_items.add(key)
            spec.items.append(StructItem(names[mod], mod, role, index))
        if not spec.members or spec.members[0][0] != name:
            # the root itself is always the first member
            spec.members = [(name, torch.arange(m))] + [x for x in spec.members if x[0] != name]
            covered[bn][:] = True
        groups.append(spec)
    return groups, DG
