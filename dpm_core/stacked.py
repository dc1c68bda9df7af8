"""The per-step kernels of the engine, batched across layers.

A model has many layers but few distinct weight shapes (a CIFAR ResNet-56 has 57
convolutions and 6 conv weight shapes), and on a CPU a kernel launch on a small tensor
costs more than the arithmetic. :class:`StackedLayout` therefore stacks the tensors of
the groups that are decaying into one persistent buffer per (shape, dtype, device)
(float32; float64 for float64 tensors) and runs each step's kernels once per buffer
instead of once per slice:

* ``grad_sq_norms()``: squared gradient norm of every channel (Eq. 5's ``||g_c||``);
* ``snapshot()``: the weights ``x`` before the optimizer step;
* ``measure()``: ``||x~||``, ``||x||`` and ``||x~ - x||`` of every channel (Eq. 4);
* ``apply(factor)``: ``x <- x~ * factor`` per channel (Eq. 1), in place, one
  ``_foreach_mul_`` per buffer;
* ``grad_sq_norms(keep=True)`` / ``restore_grads(channels)``: keep penalty-free gradients and
  write them back for the decaying channels (``DecayEngine.capture_clean_grads``).

Channel numbering is global: group ``i``'s channel ``c`` is ``offset_i + c``, and ``C``
(the total) is a dump bin for positions no channel owns. Each buffer keeps, per
(dim, layer), an *owner* map ``[B, size(dim)]`` from positions to global channels; a
position claimed along one dim by two groups (rare) uses a second layer. A reduction
squares the buffer in place, sums it over contiguous memory per dim, and adds the small
result up per channel with one deterministic segment sum for the whole model (no atomic
adds, so DDP ranks on a GPU compute bit-identical norms and decisions). The math is
the per-slice definition of :func:`dpm_core.functional.channel_sq_norms`; only the
order of summation differs (float rounding).
"""

from __future__ import annotations

import math

import torch

from . import functional as F

__all__ = ["StackedLayout"]


def _foreach(op: str, dst: list[torch.Tensor], src: list[torch.Tensor]) -> None:
    """``d.<op>_(s)`` for every pair (``s`` may broadcast), in one dispatch where torch
    offers ``torch._foreach_<op>_``."""
    foreach = getattr(torch, f"_foreach_{op}_", None)
    if foreach is not None:
        foreach(dst, src)
    else:  # pragma: no cover - torch without the foreach op
        for d, s in zip(dst, src):
            getattr(d, f"{op}_")(s)


class _Buffer:
    """Parameters of one shape/dtype/device, stacked along a new leading dim ``B``.

    ``data`` is ``[3, B, *shape]`` and persistent (no allocation per step):
    slot 1 holds ``x`` from the pre-hook, slot 0 ``x~`` and slot 2 ``x~ - x`` at the
    post-hook (then all three are squared in place); slot 2 is also the gradient
    scratch at the pre-hook.
    """

    __slots__ = ("params", "shapes", "specs", "views", "bshapes", "owner", "data", "clean")

    def __init__(self, params: list[torch.Tensor], owners: dict, dump: int):
        p0 = params[0]
        self.params = params
        self.shapes = [p.shape for p in params]
        shape = tuple(p0.shape)
        nd = len(shape)
        b = len(params)
        dims = sorted({d for p in params for d in owners[id(p)]})
        # per spec dim d: [Q * B, pre, size(d) * post]; summed over pre, then over post
        self.views = {}
        for d in dims:
            self.views[d] = (math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:]))
        self.specs: list[int] = []  # the dim of each (dim, layer) spec, in owner order
        owner_rows = []
        self.bshapes = []
        for d in dims:
            layers = max(len(owners[id(p)].get(d, ())) for p in params)
            for layer in range(layers):
                rows = []
                for p in params:
                    maps = owners[id(p)].get(d, ())
                    rows.append(maps[layer] if layer < len(maps) else
                                torch.full((p.shape[d],), dump, dtype=torch.int64,
                                           device=p.device))
                owner_rows.append(torch.stack(rows).reshape(-1))
                self.specs.append(d)
                bshape = [b] + [1] * nd
                bshape[1 + d] = shape[d]
                self.bshapes.append(tuple(bshape))
        self.owner = owner_rows
        # float32 (exact for float16/bfloat16), float64 for float64 tensors
        work = torch.float64 if p0.dtype == torch.float64 else torch.float32
        self.data = torch.empty((3, b) + shape, dtype=work, device=p0.device)
        self.clean = None  # [B, *shape]: gradients kept by grad_sq_norms(keep=True)

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def combine(self, per_spec: list[torch.Tensor], op) -> torch.Tensor:
        """``op`` over the specs of per-entry values (``torch.mul`` for scales,
        ``torch.logical_or`` for masks): ``[B, ...]``, broadcastable to the data."""
        out = None
        for values, bshape in zip(per_spec, self.bshapes):
            v = values.view(bshape)
            out = v if out is None else op(out, v)
        return out

    def reduce(self, sq: torch.Tensor) -> list[torch.Tensor]:
        """Per spec, the sums ``[Q, B * size(d)]`` of ``sq`` (``[Q, B, *shape]``, squared).

        Each sum runs over contiguous memory (an outer-dim sum, then a row sum of a
        small result); torch's strided multi-dim reductions are an order of magnitude
        slower on CPU for conv weights.
        """
        q, b = sq.shape[0], sq.shape[1]
        per_dim = {}
        for d, (pre, size, post) in self.views.items():
            t = sq.reshape(q * b, pre, size * post)
            if pre > 1:
                t = t.sum(dim=1)
            t = t.reshape(q * b * size, post)
            if post > 1:
                t = t.sum(dim=1)
            per_dim[d] = t.reshape(q, b * size)
        return [per_dim[d] for d in self.specs]


class StackedLayout:
    """The decaying groups' tensors, stacked by shape; see the module docstring."""

    def __init__(self, groups):
        self.groups = list(groups)
        self.key = self.key_of(self.groups)
        self.sizes = [g.m for g in self.groups]
        self.total = sum(self.sizes)
        self.device = self.groups[0].device
        # the group of each global channel
        self.segments = torch.repeat_interleave(
            torch.arange(len(self.groups), device=self.device),
            torch.tensor(self.sizes, device=self.device))
        dump = self.total
        owners: dict[int, dict[int, list[torch.Tensor]]] = {}
        params: dict[int, torch.Tensor] = {}
        offset = 0
        for g in self.groups:
            for s in g.slices:
                own = torch.where(s.local_owner >= 0, s.local_owner + offset,
                                  torch.full_like(s.local_owner, dump))
                params.setdefault(id(s.param), s.param)
                owners.setdefault(id(s.param), {}).setdefault(s.dim, []).append(own)
            offset += g.m
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params.values():
            by_kind.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        self.buffers = [_Buffer(ps, owners, dump) for ps in by_kind.values()]
        owner = torch.cat([o for buf in self.buffers for o in buf.owner])
        self._owner = owner
        # entries sorted by channel, and how many each channel has (the dump bin last):
        # the scatter into channels is a deterministic segment sum
        self._by_channel = torch.argsort(owner, stable=True)
        self._per_channel = torch.bincount(owner, minlength=dump + 1)
        self._split = [o.numel() for buf in self.buffers for o in buf.owner]
        self._where: dict[int, tuple[_Buffer, int]] = {
            id(p): (buf, i) for buf in self.buffers for i, p in enumerate(buf.params)}

    def params(self) -> list[torch.Tensor]:
        return [p for buf in self.buffers for p in buf.params]

    def _per_buffer(self, per_channel: torch.Tensor, fill):
        """Per-channel values ``[C]`` spread to every owner entry, then cut per buffer:
        yields ``(buffer, [values of each of its specs])``; ``fill`` for unowned entries."""
        ext = torch.cat([per_channel, per_channel.new_full((1,), fill)])
        per_spec = ext.index_select(0, self._owner).split(self._split)
        k = 0
        for buf in self.buffers:
            n = len(buf.specs)
            yield buf, per_spec[k:k + n]
            k += n

    # ---------------------------------------------------------------- validity
    @staticmethod
    def key_of(groups) -> tuple:
        """What a layout depends on: the groups, in order, at their layout versions."""
        return tuple((g.name, g.version) for g in groups)

    def shapes_unchanged(self) -> bool:
        """No tensor changed shape in place since the layout was built."""
        return all(p.shape == s for buf in self.buffers for p, s in zip(buf.params, buf.shapes))

    def valid_for(self, key: tuple) -> bool:
        """Same groups at the same layout versions, and no tensor changed shape."""
        return key == self.key and self.shapes_unchanged()

    # ---------------------------------------------------------------- kernels
    def _scatter(self, parts: list[torch.Tensor]) -> torch.Tensor:
        """``[Q, C]`` float32: the per-entry sums of ``parts`` added up per channel."""
        # entries along dim 0 (the plainest segment_reduce layout, on every device)
        vals = torch.cat(parts, dim=1).index_select(1, self._by_channel).t().contiguous()
        per_channel = F.segment_sum(vals, self._per_channel)  # [C + 1, Q]
        return per_channel[: self.total].t().float()

    @torch.no_grad()
    def grad_sq_norms(self, keep: bool = False) -> torch.Tensor:
        """Squared L2 norm of every channel's gradient, float32 ``[C]`` (missing = 0).

        With ``keep``, a copy of the gradients is kept for :meth:`restore_grads`.
        """
        parts = []
        for buf in self.buffers:
            scratch = buf.data[2]
            if keep:
                if buf.clean is None:
                    buf.clean = torch.empty_like(buf.data[0])
                torch.stack(buf.grads(), out=buf.clean)
                torch.mul(buf.clean, buf.clean, out=scratch)
            else:
                torch.stack(buf.grads(), out=scratch)
                scratch.square_()
            parts.extend(buf.reduce(scratch.unsqueeze(0)))
        return self._scatter(parts)[0]

    @torch.no_grad()
    def restore_grads(self, channels: torch.Tensor) -> None:
        """Write the captured gradients back for the elements of ``channels`` (bool ``[C]``).

        Parameters whose ``.grad`` is None now are left alone.
        """
        for buf, per_spec in self._per_buffer(channels, False):
            if buf.clean is None:
                continue
            mask = buf.combine(per_spec, torch.logical_or)
            if all(p.grad is not None for p in buf.params):
                scratch = buf.data[2]
                grads = [p.grad for p in buf.params]
                torch.stack(grads, out=scratch)
                torch.where(mask, buf.clean, scratch, out=scratch)
                _foreach("copy", grads, list(scratch.unbind(0)))
            else:
                for p, mk, cg in zip(buf.params, mask.unbind(0), buf.clean.unbind(0)):
                    if p.grad is not None:
                        p.grad.copy_(torch.where(mk, cg, p.grad))

    @torch.no_grad()
    def snapshot(self) -> None:
        """Record the weights ``x`` (call right before the optimizer step)."""
        for buf in self.buffers:
            torch.stack(buf.params, out=buf.data[1])

    @torch.no_grad()
    def snapshot_from(self, other: "StackedLayout") -> None:
        """Take ``x`` from another layout's snapshot (its groups changed between hooks)."""
        for buf in self.buffers:
            olds = []
            for p in buf.params:
                src, i = other._where[id(p)]
                olds.append(src.data[1][i])
            torch.stack(olds, out=buf.data[1])

    @torch.no_grad()
    def measure(self, with_old: bool = True) -> torch.Tensor:
        """Norms ``[3, C]`` (``||x~||``, ``||x||``, ``||x~ - x||``) or ``[1, C]`` (``||x~||``).

        Reads ``x~`` from the parameters (call right after the optimizer step); uses up
        the snapshot.
        """
        parts = []
        for buf in self.buffers:
            data = buf.data
            torch.stack(buf.params, out=data[0])
            if with_old:
                torch.sub(data[0], data[1], out=data[2])
            else:
                data = data[:1]
            data.square_()
            parts.extend(buf.reduce(data))
        return self._scatter(parts).sqrt()

    @torch.no_grad()
    def apply(self, factor: torch.Tensor, zero: torch.Tensor | None = None) -> None:
        """Scale the parameters' ``x~`` by ``factor`` per channel (Eq. 1).

        An element owned by channels of several groups gets the product of their
        factors. Zeroed channels should have factor 0; for finite ``x~`` that gives
        exact zeros. Pass ``zero`` (bool ``[C]``) when a zeroed channel's ``x~`` may not
        be finite (``0 * inf`` is NaN): its elements are then filled with 0 instead.
        """
        for buf, per_spec in self._per_buffer(factor, 1.0):
            scale = buf.combine(per_spec, torch.mul)
            _foreach("mul", buf.params, list(scale.unbind(0)))
        if zero is not None:
            for buf, per_spec in self._per_buffer(zero, False):
                mask = buf.combine(per_spec, torch.logical_or)
                for p, mk in zip(buf.params, mask.unbind(0)):
                    p.masked_fill_(mk, 0)
