"""The gated BatchNorm of Gate Decorator (You et al., NeurIPS 2019, "GBN").

A :class:`GatedBatchNorm` wraps an existing BatchNorm module ``bn`` and multiplies its
output by a per-channel gate ``g`` (an ``nn.Parameter``) and a 0/1 ``mask`` (a buffer)::

    y = bn(x) * g * mask          (broadcast over every dimension but the channel one)

As in the original method (``GatedBatchNorm2d.extract_from_bn``), the BN scale is moved into
the gate when the gate is installed: ``g <- gamma``, ``beta <- clamp(beta / gamma, -10, 10)``
and ``gamma <- 1`` (frozen). Where ``|beta / gamma| <= 10`` the layer computes the same function
as before (up to float rounding); where the clamp acts (tiny ``|gamma|``) the channel's shift
changes, exactly as in the original. The gate *is* the channel's scale (so the L1 penalty of the
"tock" phase acts on the BN scales as in the paper), and
``|g * dL/dg|`` is the first-order Taylor estimate of the loss change when the channel's
whole output is set to zero. :meth:`GatedBatchNorm.folded` merges gate and mask back into a
plain BatchNorm.
"""

from __future__ import annotations

import torch
import torch.nn as nn
from torch.nn.modules.batchnorm import _BatchNorm

__all__ = ["GatedBatchNorm", "SUPPORTED_BN", "SHIFT_CLAMP"]

#: BatchNorm classes a gate can be installed on.
SUPPORTED_BN = (nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)

#: The original clamps the BN shift to [-SHIFT_CLAMP, SHIFT_CLAMP] when the scale moves into
#: the gate (``torch.clamp(bias / weight, -10, 10)``).
SHIFT_CLAMP = 10.0


class GatedBatchNorm(nn.Module):
    """``bn(x) * g * mask`` with a per-channel gate ``g`` and a 0/1 ``mask``.

    Args:
        bn: the BatchNorm1d/2d/3d module to wrap (kept as ``self.bn``, same object).
        absorb_scale: move the BN scale ``gamma`` into the gate (Gate Decorator's GBN; the
            default): ``g = gamma``, ``beta <- clamp(beta / gamma, -10, 10)`` (``0 / 0``, which
            the original turns into NaN, gives 0), ``gamma <- 1`` frozen. With ``False`` the gate
            starts at 1 and ``gamma`` stays trainable.

    Attributes:
        g: ``nn.Parameter`` of shape ``[C]``, the gate.
        mask: float buffer ``[C]`` of 0/1 (saved in the model's ``state_dict``).
        score: float buffer ``[C]``, accumulated Taylor scores (not in ``state_dict``;
            :class:`~dpm_gatedecorator.GateDecorator` saves it).
        penalty_mask: float buffer ``[C]``, 1 where the gate takes part in the L1 penalty.
    """

    def __init__(self, bn: _BatchNorm, absorb_scale: bool = True):
        super().__init__()
        if not isinstance(bn, SUPPORTED_BN):
            raise TypeError(f"GatedBatchNorm wraps nn.BatchNorm1d/2d/3d, got {type(bn).__name__}")
        self.bn = bn
        c = bn.num_features
        ref = bn.weight if bn.weight is not None else bn.running_mean
        dev = ref.device if ref is not None else torch.device("cpu")
        dtype = bn.weight.dtype if bn.weight is not None else torch.float32
        gate = torch.ones(c, device=dev, dtype=dtype)
        if absorb_scale and bn.affine:
            with torch.no_grad():
                gamma = bn.weight.detach().clone()
                shift = torch.clamp(bn.bias / gamma, -SHIFT_CLAMP, SHIFT_CLAMP)
                gate.copy_(gamma)
                bn.bias.copy_(torch.nan_to_num(shift, nan=0.0))
                bn.weight.fill_(1.0)
            bn.weight.requires_grad_(False)
        self.absorbed = bool(absorb_scale and bn.affine)
        self.g = nn.Parameter(gate)
        self.register_buffer("mask", torch.ones(c, device=dev, dtype=dtype))
        self.register_buffer("score", torch.zeros(c, device=dev, dtype=torch.float32),
                             persistent=False)
        self.register_buffer("penalty_mask", torch.ones(c, device=dev, dtype=dtype),
                             persistent=False)
        self.scored_batches = 0
        self.skipped_batches = 0
        # positions per channel (H*W) of the last output: the "area" of the FLOPs term
        self.out_area = 1

    @property
    def num_features(self) -> int:
        return self.bn.num_features

    def extra_repr(self) -> str:
        return f"{self.bn.num_features} channels, {int(self.mask.sum())} unmasked"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = self.bn(x)
        shape = (1, -1) + (1,) * (y.dim() - 2)
        if y.dim() > 2:
            self.out_area = int(y[0, 0].numel())
        return y * (self.g * self.mask).view(shape)

    # -------------------------------------------------------------- Taylor scores
    def add_score(self, grad: torch.Tensor, inv_scale: float = 1.0) -> bool:
        """Add ``|g * grad|`` (one backward pass's gate gradient) to ``score``.

        ``inv_scale`` undoes a loss scale (AMP). A non-finite pass adds nothing and is
        counted in ``skipped_batches``. Returns whether it was added.
        """
        contrib = (grad.detach().float() * self.g.detach().float()).abs()
        if inv_scale != 1.0:
            contrib = contrib * inv_scale
        if not bool(torch.isfinite(contrib).all()):
            self.skipped_batches += 1
            return False
        self.score.add_(contrib)
        self.scored_batches += 1
        return True

    def reset_scores(self) -> None:
        self.score.zero_()
        self.scored_batches = 0
        self.skipped_batches = 0

    # -------------------------------------------------------------- melting
    @torch.no_grad()
    def folded(self) -> _BatchNorm:
        """A plain BatchNorm (same class and channel count) computing ``bn(x) * g * mask``."""
        bn = self.bn
        scale = (self.g.detach() * self.mask).to(bn.running_mean.dtype if bn.running_mean
                                                 is not None else self.g.dtype)
        new = type(bn)(bn.num_features, eps=bn.eps, momentum=bn.momentum, affine=True,
                       track_running_stats=bn.track_running_stats,
                       device=self.g.device, dtype=self.g.dtype)
        if bn.track_running_stats:
            new.running_mean.copy_(bn.running_mean)
            new.running_var.copy_(bn.running_var)
            new.num_batches_tracked.copy_(bn.num_batches_tracked)
        w = bn.weight.detach() if bn.affine else torch.ones_like(scale)
        b = bn.bias.detach() if bn.affine else torch.zeros_like(scale)
        new.weight.copy_(w * scale)
        new.bias.copy_(b * scale)
        new.train(self.training)
        return new
