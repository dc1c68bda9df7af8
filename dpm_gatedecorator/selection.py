"""The original Gate Decorator's pruning decision ("tick"), as small pure functions.

These restate the rules of the original research code (You et al., NeurIPS 2019,
``prune/universal.py``: ``GatedBatchNorm2d.get_score``, ``IterRecoverFramework.get_threshold``
and ``set_mask``) on per-group tensors. A *group* is a set of M channels shared by ``units``
BatchNorms (a residual stage: the stem or projection-shortcut BN and every block's second BN;
a plain layer: one BN). All scores are float64.

1. **Score** of a group channel (``get_score``, summed over the group's BNs): for each member
   BN, its accumulated Taylor score minus the FLOPs penalty ``eta / smallest_area * area *
   remaining`` (:func:`flops_penalty`), added up over the members; channels already removed
   score exactly 0.
2. **Minimum** per group: ``max(1, int(M * min_keep_ratio))`` channels (:func:`keep_min`,
   rounded down).
3. **Candidate pool** (``get_threshold``): per group, the sorted scores of all M channels
   without the ``keep_min`` largest, and without exact zeros (removed channels, and channels
   whose score is exactly 0); each entry repeated ``units`` times, so a residual channel
   shared by k BNs costs k units of the budget (:func:`candidate_pool`).
4. **Threshold**: the entry at index ``num`` (0-based) of the sorted pool
   (:func:`threshold`).
5. **Decision** (``set_mask``): a channel is pruned iff its score is ``<= threshold`` (ties
   included: at least ``num + 1`` units go) and it is not *hard-kept*; hard-kept are the
   channels scoring ``>=`` the ``keep_min``-th largest score of the group (:func:`hard_kept`).
   Open channels scoring exactly 0 are not in the pool but are pruned whenever the threshold
   is ``>= 0``: without spending budget (:func:`decide`).

One guard differs from the original (``strict_minimum=True``, the default; see
``docs/gatedecorator.md``): the ``keep_min`` highest-scoring *open* channels of a group are
always hard-kept. Normally they are exactly the channels the original keeps; they differ only
when the ``keep_min``-th largest score is that of a removed channel (0). That happens with the
FLOPs term once fewer than ``keep_min`` open channels of a group score above 0 (and at least
``keep_min`` are removed): the original then lets the layer fall below its minimum, down to no
channel at all. ``strict_minimum=False`` drops the guard (the original to the letter).
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch

__all__ = ["keep_min", "flops_penalty", "candidate_pool", "hard_kept", "threshold", "decide"]


def keep_min(channels: int, ratio: float) -> int:
    """Channels a layer keeps at least: ``max(1, int(channels * ratio))`` (rounded down)."""
    return max(1, int(channels * ratio))


def flops_penalty(eta: float, smallest_area: int, area: int, remaining: int) -> float:
    """The original's FLOPs term of one BN, subtracted from each of its channels' scores:
    ``eta / smallest_area * area * remaining`` (``area``: the BN output's positions per
    channel, H*W; ``smallest_area``: the smallest such area over all BNs; ``remaining``: the
    BN's channels not yet removed)."""
    if eta == 0:
        return 0.0
    return eta / smallest_area * area * remaining


def candidate_pool(scores: torch.Tensor, keep: int, units: int) -> torch.Tensor:
    """The group's entries of the candidate pool: ``sort(scores)[:-keep]`` without exact
    zeros, each repeated ``units`` times."""
    srt = torch.sort(scores).values[:max(0, scores.numel() - keep)]
    srt = srt[srt != 0]
    return srt.repeat(units) if units > 1 else srt


def hard_kept(scores: torch.Tensor, open_: torch.Tensor, keep: int,
              strict: bool = True) -> torch.Tensor:
    """bool[M]: channels scoring at least the ``keep``-th largest score (ties included), plus
    (``strict``) the ``keep`` highest-scoring open channels (the guard described in the module
    docstring)."""
    m = scores.numel()
    kept = scores >= torch.sort(scores).values[max(0, m - keep)]
    n_open = int(open_.sum())
    if strict and n_open:
        masked = scores.masked_fill(~open_, float("-inf"))
        kept[torch.topk(masked, min(keep, n_open)).indices] = True
    return kept


def threshold(pool: torch.Tensor, num: int) -> float:
    """The ``num``-th (0-based) smallest entry of the pool."""
    return float(torch.kthvalue(pool, num + 1).values)


def decide(groups: Sequence[Tuple[torch.Tensor, torch.Tensor, int, int]], num: int,
           strict: bool = True) -> Tuple[List[torch.Tensor], float, int]:
    """Apply the rule to ``groups`` = ``[(scores float64[M], open bool[M], keep, units)]``;
    ``strict``: the minimum guard (see the module docstring).

    Returns ``(chosen bool[M] per group, threshold, pool size in units)``. ``num`` must be
    below the pool size (checked by the caller, which knows how to word the error).
    """
    pool = torch.cat([candidate_pool(s, k, u).cpu() for s, _, k, u in groups]) \
        if groups else torch.zeros(0, dtype=torch.float64)
    if num >= pool.numel():
        return [torch.zeros_like(o) for _, o, _, _ in groups], float("nan"), int(pool.numel())
    thr = threshold(pool, num)
    chosen = [o & ~hard_kept(s, o, k, strict) & (s <= thr) for s, o, k, _ in groups]
    return chosen, thr, int(pool.numel())
