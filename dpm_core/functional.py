"""The Decay Pruning Method's math as small, pure, vectorised functions.

Every function works on 1-D float tensors holding one value per channel (so a whole
layer is handled by one call) and has no side effects. Equation numbers refer to the
paper (Yang et al., "Decay Pruning Method: Smooth Pruning With a Self-Rectifying
Procedure", arXiv:2406.03879, section 3).
"""

from __future__ import annotations

import torch

__all__ = [
    "segment_sum",
    "channel_sq_norms",
    "step_length",
    "target_length",
    "projection_factor",
    "recalibrated_step",
    "escaping_rate",
    "relative_grad_length",
    "release_condition",
    "decay_step",
    "shared_element_terms",
    "shared_element_scale",
    "compensated_factor",
]


def segment_sum(values: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """Sums of consecutive segments of ``values`` along dim 0 (``lengths[i]`` rows each).

    Deterministic on every device (no atomic adds), unlike ``index_add_`` on CUDA: the
    engine's decisions compare these sums with thresholds, and DDP ranks must reach
    bit-identical decisions. An empty segment sums to 0.
    """
    return torch.segment_reduce(values, "sum", lengths=lengths, axis=0)


def channel_sq_norms(t: torch.Tensor, reduce_dims: tuple[int, ...],
                     index: torch.Tensor | None = None) -> torch.Tensor:
    """Squared L2 norm of each channel's share of ``t``, in float32.

    One norm kernel over ``reduce_dims`` (all dims but the channel dim) gives a value per
    position along the channel dim; with ``index`` (LongTensor ``[M, k]``) the k
    positions of each channel are summed. The weights are read once and never copied.
    """
    if reduce_dims:
        if t.dtype in (torch.float16, torch.bfloat16):
            n = torch.linalg.vector_norm(t, dim=reduce_dims, dtype=torch.float32)
        else:
            n = torch.linalg.vector_norm(t, dim=reduce_dims).float()
        sq = n * n
    else:  # one value per channel (a bias, a BatchNorm scale): its square
        sq = t.detach().float().square()
    if index is not None:
        sq = sq[index].sum(dim=1)
    return sq


def step_length(l_init: torch.Tensor, steps: int) -> torch.Tensor:
    """Eq. 3: ``L_s = L_init / N``, the norm removed per decaying step."""
    return l_init / steps


def target_length(l_init: torch.Tensor, n_step: torch.Tensor, steps: int) -> torch.Tensor:
    """Eq. 2: ``L_target = (N - n_step) * L_s``."""
    return (steps - n_step).to(l_init.dtype) * step_length(l_init, steps)


def projection_factor(norm: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Eq. 1: the scale that brings a vector of L2 norm ``norm`` to ``target``.

    ``x_{k+1} = x~_{k+1} * L_target / ||x~_{k+1}||`` keeps the direction. Where the norm
    is already at or below the target (section 3.1, last paragraph) the factor is 1:
    the vector is left as the optimizer produced it.
    """
    scale = target / norm.clamp_min(torch.finfo(norm.dtype).tiny)
    return torch.where(norm > target, scale, torch.ones_like(norm))


def recalibrated_step(norm: torch.Tensor, l_init: torch.Tensor, n_step: torch.Tensor,
                      steps: int) -> torch.Tensor:
    """Section 3.1, last paragraph: re-align ``n_step`` with a norm already below target.

    Returns ``N - ceil(||x~|| / L_s)``, so that the next target ``(N - n - 1) * L_s``
    lies below the current norm. Mathematically the result is never smaller than the
    current ``n_step`` (because ``||x~|| <= (N - n) * L_s``); it is clamped to it to
    guard against rounding.
    """
    ls = step_length(l_init, steps)
    left = torch.ceil(norm / ls.clamp_min(torch.finfo(ls.dtype).tiny)).to(n_step.dtype)
    return torch.maximum(steps - left, n_step)


def escaping_rate(norm_new: torch.Tensor, norm_old: torch.Tensor,
                  norm_delta: torch.Tensor) -> torch.Tensor:
    """Eq. 4, the actual escaping rate ``C_rate = (||x~|| - ||x||) / ||x~ - x||``.

    0 where the optimizer did not move the channel (denominator 0). By the triangle
    inequality the rate lies in [-1, 1]; it is clamped there so that float rounding on a
    purely radial update cannot push it past a threshold of exactly 1.
    """
    safe = norm_delta.clamp_min(torch.finfo(norm_delta.dtype).tiny)
    rate = ((norm_new - norm_old) / safe).clamp(-1.0, 1.0)
    return torch.where(norm_delta > 0, rate, torch.zeros_like(norm_new))


def relative_grad_length(grad_norms: torch.Tensor, segments: torch.Tensor | None = None,
                         num_segments: int = 1) -> torch.Tensor:
    """Eq. 5, ``C_len = ||g_c|| / mean_j ||g_j||`` over the M parallel channels of a layer.

    With ``segments`` (int64, the layer of each entry, non-decreasing: layers one after
    another) several layers are handled in one call, each against its own mean. A
    layer's ``C_len`` is 0 when its mean is 0.
    Channels with a non-finite gradient norm are left out of the mean (their own ``C_len``
    is then non-finite, and the caller skips them), so one bad channel cannot silence the
    criterion for its neighbours.
    """
    finite = torch.isfinite(grad_norms)
    clean = torch.where(finite, grad_norms, torch.zeros_like(grad_norms))
    if segments is None:
        mean = (clean.sum() / finite.sum().clamp_min(1)).expand_as(grad_norms)
    else:
        lengths = torch.bincount(segments, minlength=num_segments)
        total = segment_sum(clean, lengths)
        count = segment_sum(finite.to(clean.dtype), lengths)
        mean = (total / count.clamp_min(1))[segments]
    return torch.where(mean > 0, grad_norms / mean.clamp_min(torch.finfo(mean.dtype).tiny),
                       torch.zeros_like(grad_norms))


def release_condition(c_rate: torch.Tensor, c_len: torch.Tensor, t_rate: float,
                      t_len: float) -> torch.Tensor:
    """Eq. 6: release where ``C_rate > T_rate AND C_len > T_len``."""
    return (c_rate > t_rate) & (c_len > t_len)


def decay_step(norm_new: torch.Tensor, l_init: torch.Tensor, n_step: torch.Tensor,
               steps: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One Smooth Pruning step (Eqs. 1-3) for channels that were not released.

    Args:
        norm_new: ``||x~||`` after the optimizer's update, float32 ``[D]``.
        l_init: the channels' ``L_init``, float32 ``[D]``.
        n_step: their step counters before this step, int64 ``[D]``.
        steps: N.

    Returns:
        ``(factor, n_next, zeroed)``: the scale to apply to ``x~`` (0 for channels that
        reach ``n = N``), the new counters, and a bool mask of channels that are now
        exactly zero.
    """
    n_next = n_step + 1
    target = target_length(l_init, n_next, steps)
    factor = projection_factor(norm_new, target)
    below = norm_new <= target
    n_next = torch.where(below, recalibrated_step(norm_new, l_init, n_next, steps), n_next)
    zeroed = n_next >= steps
    factor = torch.where(zeroed, torch.zeros_like(factor), factor)
    n_next = torch.where(zeroed, torch.full_like(n_next, steps), n_next)
    return factor, n_next, zeroed


# ---------------------------------------------------------------- shared elements
# Where one tensor element belongs to channels of several groups (a conv's filter row to
# its own layer's group, its input column to the previous layer's), Eq. 1 cannot scale
# the element by each channel's factor independently. The rule (section "Shared
# elements" of the dpm_core.engine docstring): a channel is *scaled* this step when it
# is brought down to a target (factor f < 1, 0 when it reaches n = N). An element owned
# by two or more scaled channels takes the smallest of their factors; an element owned
# by exactly one scaled channel c takes c's compensated factor g_c >= f_c (below); any
# other element is left alone. Each per-cell function below gets, for every slice that
# covers the element, the tensors (broadcastable to the cells) of the owning channel's
# ``scaled`` flag and factor.


def _count_and_min(scaled: list[torch.Tensor], factor: list[torch.Tensor]):
    cnt = None
    low = None
    for k, f in zip(scaled, factor):
        fk = torch.where(k, f, torch.full_like(f, float("inf")))
        cnt = k.to(torch.int32) if cnt is None else cnt + k.to(torch.int32)
        low = fk if low is None else torch.minimum(low, fk)
    return cnt, low


def shared_element_terms(scaled: list[torch.Tensor], factor: list[torch.Tensor],
                         mine: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-element weights for the shared elements.

    Returns ``(mass, scaled_mass)``: 1 and ``min_f ** 2`` where the element is owned by
    two or more scaled channels (one of them slice ``mine``'s, if given), else 0. Summed
    against the squared elements ``x~_e ** 2`` over a scaled channel's elements, they
    give ``S_c`` (the shared part of ``||x~_c||²``) and ``V_c`` (that part after
    scaling) of :func:`compensated_factor`.
    """
    cnt, low = _count_and_min(scaled, factor)
    hit = cnt >= 2
    if mine is not None:
        hit = hit & scaled[mine]
    mass = hit.to(low.dtype)
    return mass, torch.where(hit, low * low, torch.zeros_like(low))


def compensated_factor(factor: torch.Tensor, norm_sq: torch.Tensor,
                       shared_mass: torch.Tensor, shared_sq: torch.Tensor) -> torch.Tensor:
    """The factor ``g_c`` of a scaled channel's own (unshared) elements.

    With ``T_c = f_c * ||x~_c||`` (Eq. 1's target), ``S_c`` the squared norm of its
    elements shared with other scaled channels and ``V_c`` the same after they took the
    smallest factor, ``g_c = sqrt((T_c² - V_c) / (||x~_c||² - S_c))`` brings the channel's
    norm exactly to ``T_c``. It is never below ``f_c`` (shared elements got at most
    ``f_c``) and is capped at 1 (the engine never enlarges a weight): a channel that
    would need more, or that has no element of its own, ends below its target and the
    next step's recalibration (section 3.1) realigns its step counter. ``g_c = f_c``
    where nothing is shared, and 0 for a channel reaching 0.
    """
    own_sq = norm_sq - shared_mass
    target_sq = factor * factor * norm_sq
    tiny = torch.finfo(own_sq.dtype).tiny
    g = torch.sqrt((target_sq - shared_sq).clamp_min(0) / own_sq.clamp_min(tiny))
    g = torch.minimum(torch.maximum(g, factor), torch.ones_like(g))
    return torch.where((shared_mass > 0) & (own_sq > 0), g, factor)


def shared_element_scale(scaled: list[torch.Tensor], factor: list[torch.Tensor],
                         own: list[torch.Tensor]) -> torch.Tensor:
    """The scale of each element (Eq. 1 with shared elements; see above).

    ``own`` holds, per slice, the owning channel's compensated factor
    (:func:`compensated_factor`). Elements with no scaled owner get 1.
    """
    cnt, low = _count_and_min(scaled, factor)
    single = None
    for k, g in zip(scaled, own):
        gk = torch.where(k, g, torch.full_like(g, float("inf")))
        single = gk if single is None else torch.minimum(single, gk)
    return torch.where(cnt >= 2, low, single.clamp_max(1.0))
