"""What Torch-Pruning removes together, as DPM channels: attention heads, head dims
across heads, grouped-convolution channel groups; and the attention modules' shape
attributes, kept true at every physical removal.

Torch-Pruning's ``BasePruner`` selects, per group, root indices that always go in fixed
sets (``_prune``):

* with ``num_heads={qkv_layer: heads}`` and ``prune_num_heads=True``
  (``prune_head_dims=False``), whole heads: root indices ``[h*d, (h+1)*d)`` of the
  attention group re-rooted at the output projection (``head_dim`` ``d``);
* otherwise, when the group has channel groups ``g > 1`` (``out_channel_groups`` /
  ``in_channel_groups``, grouped convolutions and GroupNorm found automatically,
  ``num_heads`` merged in), the same in-group index from every group: ``{j + i*R/g}``;
* with ``prune_num_heads=True`` and ``prune_head_dims=True``, the union of both: whole
  heads and head dims ``j`` of every head (:func:`heads_and_dims`: two engine groups).

Each such set is ONE DPM channel (:func:`group_units`, :func:`head_dim_units`), so
Self-Rectifying releases a whole head / a whole channel set and never breaks a
divisibility Torch-Pruning relies on.

Torch-Pruning's examples fix the attention modules' shape attributes after pruning by hand
(``num_heads``, ``head_dim``, ...). A decay pruner removes inside ``step()``, so it does
this itself at every removal (:func:`sync_attention_attributes`): the model runs between
any two optimizer steps.
"""

from __future__ import annotations

import torch
import torch.nn as nn

__all__ = ["AttentionInfo", "attention_modules", "group_units", "head_dim_units", "head_layers",
           "heads_and_dims", "sync_attention_attributes", "whole_units",
           "equal_heads_per_kv_head"]

# attribute name -> what it holds; set only where the module already has an int attribute
_HEAD_COUNT = ("num_heads", "num_attention_heads")
_HEAD_DIM = ("head_dim", "attention_head_size", "head_size")


class AttentionInfo:
    """The ``num_heads`` layers of one attention module (their common parent)."""

    def __init__(self, module: nn.Module, layers: list):
        self.module = module
        self.layers = layers   # the q/k/v (or fused qkv) Linear layers in num_heads


def head_layers(pruner, group) -> list:
    """The layers of ``num_heads`` whose output channels ``group`` prunes."""
    return [dep.target.module for dep, _ in group
            if pruner.DG.is_out_channel_pruning_fn(dep.handler) and dep.target.module in
            pruner.num_heads]


def group_units(pruner, group, n_roots: int) -> torch.Tensor:
    """``LongTensor [M, u]``: the root indices of each DPM channel of ``group``."""
    qkv = head_layers(pruner, group)
    if qkv and pruner.prune_num_heads:
        heads = max(pruner.num_heads[m] for m in qkv)
        if heads < 1 or n_roots % heads:
            raise ValueError(f"{n_roots} attention channels do not split into {heads} heads; "
                             f"check num_heads")
        return torch.arange(n_roots).view(heads, n_roots // heads)
    g = pruner._get_channel_groups(group)
    if g > 1 and n_roots % g == 0:
        return torch.arange(n_roots).view(g, n_roots // g).t().contiguous()
    return torch.arange(n_roots).view(-1, 1)


def heads_and_dims(pruner, group) -> bool:
    """``prune_num_heads`` with ``prune_head_dims`` on an attention group: Torch-Pruning
    removes whole heads AND the same head dims of every head in one step. A head and a
    head dim overlap (one root index each), so they are two engine groups over the same
    tensors: the group's own (one channel per head) and ``<name>:dims`` (one channel per
    head dim position, across all heads; :func:`head_dim_units`)."""
    return bool(pruner.prune_num_heads and pruner.prune_head_dims and head_layers(pruner, group))


def head_dim_units(pruner, group, n_roots: int) -> torch.Tensor:
    """``LongTensor [head_dim, heads]``: head dim ``j`` of every head, one DPM channel."""
    heads = max(pruner.num_heads[m] for m in head_layers(pruner, group))
    if heads < 1 or n_roots % heads:
        raise ValueError(f"{n_roots} attention channels do not split into {heads} heads; "
                         f"check num_heads")
    return torch.arange(n_roots).view(heads, n_roots // heads).t().contiguous()


def whole_units(units: torch.Tensor, roots) -> torch.Tensor:
    """Bool ``[M]``: the units all of whose root indices are in ``roots``."""
    picked = torch.zeros(units.numel(), dtype=torch.bool)
    picked[torch.as_tensor(roots, dtype=torch.int64).reshape(-1)] = True
    return picked[units].all(1)


def kv_layers_to_skip(pruner, group) -> list:
    """Grouped-query attention with ``prune_num_heads``: Torch-Pruning removes query heads
    only and leaves the shared key/value projections whole."""
    qkv = head_layers(pruner, group)
    if not (qkv and pruner.prune_num_heads):
        return []
    counts = [pruner.num_heads[m] for m in qkv]
    if min(counts) == max(counts):
        return []
    return [m for m in qkv if pruner.num_heads[m] == min(counts)]


def equal_heads_per_kv_head(pruner, group, zeroed: torch.Tensor) -> torch.Tensor:
    """Grouped-query attention with ``prune_num_heads``: of the zeroed query heads
    (``zeroed``: unit = head indices), those that can leave now. Query head ``i`` reads KV
    head ``i // (q_heads / kv_heads)``, so every KV head must keep as many query heads as the
    others (Torch-Pruning removes the same number from each). Self-Rectifying may release
    heads of one KV head and not of another; the surplus zeroed heads stay in the model at
    exactly zero until their KV heads catch up."""
    heads = [pruner._heads[m] for m in head_layers(pruner, group)]   # physical counts
    if not heads or zeroed.numel() == 0:
        return zeroed
    q_heads, kv_heads = max(heads), min(heads)
    if kv_heads == q_heads or kv_heads < 1 or q_heads % kv_heads:
        return zeroed
    kv_of = zeroed // (q_heads // kv_heads)
    n = int(torch.bincount(kv_of, minlength=kv_heads).min())
    keep = torch.cat([zeroed[kv_of == k][:n] for k in range(kv_heads)])   # at removal only
    return keep.sort().values


def attention_modules(model: nn.Module, num_heads: dict) -> list:
    """One :class:`AttentionInfo` per parent module of the ``num_heads`` layers."""
    parent_of = {}
    for parent in model.modules():
        for child in parent.children():
            if child in num_heads:
                parent_of.setdefault(id(parent), (parent, []))[1].append(child)
    return [AttentionInfo(p, layers) for p, layers in parent_of.values()]


def _set_int(module, names, value) -> None:
    for name in names:
        if isinstance(getattr(module, name, None), int) and not isinstance(
                getattr(module, name), bool):
            setattr(module, name, int(value))


def sync_attention_attributes(infos: list, num_heads: dict) -> None:
    """Set the head count / head dim attributes of each attention module from its
    layers' current shapes and ``num_heads`` (kept equal to the physical head counts)."""
    for info in infos:
        layers = info.layers
        q_heads = max(num_heads[m] for m in layers)
        kv_heads = min(num_heads[m] for m in layers)
        q_layer = next(m for m in layers if num_heads[m] == q_heads)
        q_width = q_layer.out_features // (3 if len(layers) == 1 else 1)
        if q_heads < 1 or q_width % q_heads:
            continue
        _set_int(info.module, _HEAD_COUNT, q_heads)
        _set_int(info.module, _HEAD_DIM, q_width // q_heads)
        _set_int(info.module, ("all_head_size", "attn_dim"), q_width)
        _set_int(info.module, ("num_key_value_heads",), kv_heads)
        if kv_heads and q_heads % kv_heads == 0:
            _set_int(info.module, ("num_key_value_groups",), q_heads // kv_heads)


def sync_model_attributes(model: nn.Module) -> None:
    """Attributes outside attention modules that a forward pass reads as a width:
    torchvision's ``VisionTransformer.hidden_dim`` (Torch-Pruning's torchvision example
    sets it by hand after pruning)."""
    for m in model.modules():
        conv = getattr(m, "conv_proj", None)
        if isinstance(getattr(m, "hidden_dim", None), int) and isinstance(conv, nn.Conv2d):
            m.hidden_dim = conv.out_channels
