"""``torch.optim.SGD``'s update of a large decaying tensor, run by the engine a chunk of
rows at a time so that the decay reads each chunk while it is still in cache.

Why: on a CPU both the optimizer step and Smooth Pruning are memory-bound. Run one after
the other, torch's SGD makes several passes over a large tensor (gradient plus weight
decay into a new tensor, the momentum buffer, the weights) and the decay then reads the
weights again for the channel norms (Eq. 1 needs ``||x~||`` after the step). Fused, the
update of a chunk of rows and that chunk's share of the norms happen back to back, and
only the final scale (one read and one write) is an extra pass.

How: at the step pre-hook the engine takes ``.grad`` off such a tensor (``torch.optim.SGD``
skips a parameter whose ``.grad`` is None) and keeps it here; in the post-hook its
streaming norm pass calls :meth:`DeferredSGD.rows` on every chunk before reading it, and
:meth:`DeferredSGD.finish` puts ``.grad`` back. The update is torch's single-tensor SGD
formula, element for element:

    d = g (or -g with maximize) + weight_decay * x
    buf = momentum * buf + (1 - dampening) * d        (when momentum != 0)
    d = d + momentum * buf (nesterov)  or  d = buf
    x = x - lr * d

and the momentum buffer is the one in ``optimizer.state[x]``, updated in place, so
``state_dict()``, checkpoints and schedulers see exactly what torch's SGD would leave.

:func:`sgd_hyperparameters` decides where this is exact: a plain ``torch.optim.SGD`` (not a
subclass, not ``fused``, not ``differentiable``, no AMP ``grad_scale``), a step called
without a closure, a dense gradient of the tensor's dtype and device, and a momentum
buffer that exists already (torch creates it from the first gradient; that first step is
left to torch). One visible difference remains: the deferred tensors are updated inside
the engine's post-hook, so a step post-hook registered *before* the engine attached sees
them not yet updated (hooks registered after it, and all code after ``step()``, see the
finished step). Anything else keeps torch's own step and the unfused decay, and so do
tensors below ``DecayEngine.fuse_sgd_min_numel`` elements: those stay in the last-level
cache through torch's own step, and chunking their update gains nothing.
"""

from __future__ import annotations

import torch

from .reductions import scratch_for

__all__ = ["DeferredSGD", "sgd_hyperparameters"]


_SLOT = "sgd"  # the scratch slot of the update's temporaries


def _group_of(optimizer: torch.optim.Optimizer, param: torch.Tensor):
    for group in optimizer.param_groups:
        for p in group["params"]:
            if p is param:
                return group
    return None


def sgd_hyperparameters(optimizer, param: torch.Tensor, args: tuple = (),
                        kwargs: dict | None = None) -> dict | None:
    """The hyperparameters with which the engine can run ``optimizer``'s update of
    ``param`` itself, exactly as torch would, or None where it cannot (see the module
    docstring)."""
    # the step hooks see step's own arguments, ``self`` first
    rest = args[1:] if args and args[0] is optimizer else args
    if type(optimizer) is not torch.optim.SGD or any(a is not None for a in rest) or \
            any(v is not None for v in (kwargs or {}).values()):
        return None  # another optimizer, or step(closure): the closure makes the gradient
    if getattr(optimizer, "grad_scale", None) is not None or \
            getattr(optimizer, "found_inf", None) is not None:
        return None
    g = param.grad
    if g is None or g.is_sparse or g.dtype != param.dtype or g.device != param.device \
            or g.shape != param.shape or not g.is_contiguous() or not param.is_contiguous():
        return None
    group = _group_of(optimizer, param)
    if group is None or group.get("fused") or group.get("differentiable"):
        return None
    hp = {}
    for key in ("lr", "momentum", "dampening", "weight_decay"):
        v = group[key]
        if isinstance(v, torch.Tensor):
            if v.requires_grad or v.numel() != 1:
                return None
            v = v.item()
        hp[key] = float(v)
    hp["nesterov"] = bool(group["nesterov"])
    hp["maximize"] = bool(group["maximize"])
    buf = None
    if hp["momentum"] != 0:
        buf = optimizer.state.get(param, {}).get("momentum_buffer")
        if buf is None or buf.shape != param.shape or buf.dtype != param.dtype \
                or not buf.is_contiguous():
            return None  # torch makes the buffer from the first gradient: leave it that step
    hp["buf"] = buf
    return hp


class DeferredSGD:
    """The SGD update of one tensor, deferred from ``optimizer.step()`` to the engine's
    post-hook and run over chunks of rows of dim 0 (:meth:`rows`), each exactly once."""

    __slots__ = ("param", "grad", "buf", "lr", "momentum", "dampening", "weight_decay",
                 "nesterov", "maximize", "done")

    def __init__(self, param: torch.Tensor, hp: dict):
        self.param = param
        self.grad = param.grad
        self.buf = hp["buf"]
        self.lr = hp["lr"]
        self.momentum = hp["momentum"]
        self.dampening = hp["dampening"]
        self.weight_decay = hp["weight_decay"]
        self.nesterov = hp["nesterov"]
        self.maximize = hp["maximize"]
        self.done = 0          # rows updated so far (chunks come in order)
        param.grad = None      # torch.optim.SGD skips it; the post-hook runs the update

    @torch.no_grad()
    def rows(self, a: int, b: int) -> None:
        """Update rows ``a:b`` of dim 0 (the next ones: ``a`` is the rows done so far)."""
        if a != self.done:
            raise RuntimeError(f"DeferredSGD: rows {a}:{b} out of order (next is {self.done})")
        x = self.param[a:b]
        g = self.grad[a:b]
        # the temporaries torch allocates per tensor live in one chunk-sized scratch
        tmp = None
        if self.maximize:
            tmp = torch.neg(g, out=scratch_for(g.shape, g.dtype, g.device, _SLOT))
            g = tmp
        if self.weight_decay != 0:
            if tmp is None:
                tmp = torch.add(g, x, alpha=self.weight_decay,
                                out=scratch_for(g.shape, g.dtype, g.device, _SLOT))
            else:
                tmp.add_(x, alpha=self.weight_decay)
            g = tmp
        if self.momentum != 0:
            buf = self.buf[a:b]
            buf.mul_(self.momentum).add_(g, alpha=1 - self.dampening)
            if not self.nesterov:
                g = buf
            elif tmp is None:
                g = torch.add(g, buf, alpha=self.momentum,
                              out=scratch_for(g.shape, g.dtype, g.device, _SLOT))
            else:
                g = tmp.add_(buf, alpha=self.momentum)
        x.add_(g, alpha=-self.lr)
        self.done = b

    def finish(self) -> None:
        """Update the rows not done yet (all of them if the decay never read this tensor)
        and give ``.grad`` back to the parameter."""
        n = self.param.shape[0] if self.param.dim() else 0
        try:
            if self.done < n:
                self.rows(self.done, n)
        finally:
            if self.param.grad is None:
                self.param.grad = self.grad
