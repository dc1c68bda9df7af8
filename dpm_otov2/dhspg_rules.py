"""DHSPG's per-layer rules as small pure functions (OTOv2, Chen et al., ICLR 2023, Alg. 2).

Each function restates one rule of OTOv2's DHSPG (only-train-once 2.x,
``only_train_once/optimizer/dhspg.py``, identical to the 2.0.16 release) on ``[M, D]`` row
matrices, one row per zero-invariant group (ZIG). :class:`dpm_otov2.DHSPG` does the
bookkeeping around them.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["redundancy_scores", "num_kept", "adaptive_lambdas", "wide"]

#: OTOv2's safeguard in denominators (``safe_guard``) and in the cosine similarity.
SAFE = 1e-8


def wide(t: torch.Tensor) -> torch.Tensor:
    """``t`` in at least float32 (half / bfloat16 scores and norms lose too much)."""
    return t if t.dtype in (torch.float32, torch.float64) else t.float()


def redundancy_scores(xs: list[torch.Tensor], ds: list[torch.Tensor]) -> list[torch.Tensor]:
    """Redundancy score of every ZIG of the model (Alg. 2, line "partition").

    ``xs[i]`` / ``ds[i]``: ``[M_i, D_i]`` rows of the weights and of the update direction
    (the gradient estimate) of layer ``i``. The score is
    ``0.5 * cos(-x, -d) / ||cos|| + 0.5 * (1 / (avg|x| + 1e-6)) / ||1 / (avg|x| + 1e-6)||``
    with ``avg|x| = ||x|| / D`` and the norms taken over all ZIGs of the model; higher means
    more redundant. Returns one ``[M_i]`` tensor per layer.
    """
    cos = [F.cosine_similarity(-wide(x), -wide(d), dim=1, eps=SAFE) for x, d in zip(xs, ds)]
    inv = [1.0 / (wide(x).norm(dim=1) / max(x.shape[1], 1) + 1e-6) for x in xs]
    cos_all, inv_all = torch.cat(cos), torch.cat(inv)
    score = 0.5 * F.normalize(cos_all, dim=0) + 0.5 * F.normalize(inv_all, dim=0)
    return list(torch.split(score, [x.shape[0] for x in xs]))


def num_kept(m: int, num_not_selected: int, group_divisible: int) -> int:
    """How many of a layer's ``m`` ZIGs stay out of the penalised set G_p.

    ``num_not_selected``: ZIGs of the layer outside the model-wide top-K. OTOv2 rounds that
    to a multiple of ``group_divisible`` (Python's ``round``, halves to even), **at least one
    multiple** (so every layer keeps at least ``group_divisible`` ZIGs, at least one ZIG with
    ``group_divisible=1``), and a layer with ``m <= group_divisible`` is never penalised.
    Capped at ``m``.
    """
    if m <= group_divisible:
        return m
    kept = int(max(round(num_not_selected / group_divisible), 1) * group_divisible)
    return min(kept, m)


def adaptive_lambdas(x: torch.Tensor, d: torch.Tensor, x_norm: torch.Tensor,
                     penalised: torch.Tensor, lmbda: float, lmbda_amplify: float,
                     hat_lmbda_coeff: float) -> torch.Tensor:
    """Per-ZIG penalty coefficient lambda_g (Alg. 2, "adjust lambda").

    ``lmbda`` everywhere, except for penalised ZIGs whose direction pushes them outwards
    (``<x, d> < 0``): ``clip(lmbda_amplify * lower, lmbda, lmbda * hat_lmbda_coeff)`` with
    ``lower = -<x, d> / ||x||``; if that reaches ``upper = ||d||^2 ||x|| / -<x, d>`` (beyond
    which ``-(d + lambda x / ||x||)`` is no longer a descent direction of f) it becomes the
    mid-point ``(lower + upper) / 2``.
    """
    lam = torch.full_like(x_norm, lmbda)
    inner = (x * d).sum(dim=1)
    adj = penalised & (inner < 0)
    if not bool(adj.any()):
        return lam
    one = torch.ones_like(inner)
    safe_norm = torch.where(adj, x_norm, one)
    safe_inner = torch.where(adj, inner, -one)
    d_norm = d.norm(dim=1)
    lower = -safe_inner / safe_norm
    upper = d_norm * d_norm * safe_norm / (-safe_inner)
    lam_adj = torch.clamp(lmbda_amplify * lower, min=lmbda, max=lmbda * hat_lmbda_coeff)
    lam_adj = torch.where(lam_adj >= upper, 0.5 * (lower + upper), lam_adj)
    return torch.where(adj, lam_adj, lam)
