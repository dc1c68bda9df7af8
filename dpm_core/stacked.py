"""The per-step kernels of the engine, batched across layers.

A model has many layers but few distinct weight shapes (a CIFAR ResNet-56 has 57
convolutions and 6 conv weight shapes), and on a CPU a kernel launch on a small tensor
costs more than the arithmetic. :class:`StackedLayout` therefore stacks the *small*
tensors of the groups that are decaying (below ``dpm_core.sliced.SLICED_MIN_NUMEL``
elements) into one persistent buffer per (shape, dtype, device) (float32; float64 for
float64 tensors) and runs each step's kernels once per buffer instead of once per slice.
Large tensors (a VGG classifier, a transformer's MLP) take the sliced path instead
(:class:`dpm_core.sliced.SlicedTensor`): never copied whole, they are worked on through
their decaying channels' slices (gathered and written back) or, where those cover much of
the tensor, by a streaming pass and an in-place broadcast scale, whichever costs less.
Both feed the same per-channel sums. The stacked kernels:

* ``grad_sq_norms()``: squared gradient norm of every channel (Eq. 5's ``||g_c||``);
* ``snapshot()``: the weights ``x`` before the optimizer step;
* ``measure()``: ``||x~||``, ``||x||`` and ``||x~ - x||`` of every channel (Eq. 4);
* ``shared_terms(...)``: the sums the rule for elements shared by several scaled
  channels needs (:func:`dpm_core.functional.compensated_factor`);
* ``apply(...)``: ``x <- x~ * scale`` per element (Eq. 1, shared elements by
  :func:`dpm_core.functional.shared_element_scale`), in place, one ``_foreach_mul_`` per
  buffer;
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
from .reductions import reduce_to_cells
from .sliced import SLICED_MIN_NUMEL, SlicedTensor

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


class _Scatter:
    """Per-entry values -> per-channel sums, as one deterministic segment sum.

    ``owner`` gives the global channel of every entry (``C``: none); entries are sorted
    by channel once, so each step's scatter is an ``index_select`` and a segment sum
    (no atomic adds: DDP ranks on a GPU compute bit-identical sums).
    """

    def __init__(self, owner: torch.Tensor, total: int):
        self.total = total
        self.empty = owner.numel() == 0
        self.by_channel = torch.argsort(owner, stable=True)
        self.per_channel = torch.bincount(owner, minlength=total + 1)

    def __call__(self, parts: list[torch.Tensor], q: int, device) -> torch.Tensor:
        """``[Q, C]`` float32: the per-entry ``parts`` (``[Q, n_i]``) summed per channel."""
        if self.empty:
            return torch.zeros(q, self.total, device=device)
        vals = torch.cat(parts, dim=1).index_select(1, self.by_channel).t().contiguous()
        per_channel = F.segment_sum(vals, self.per_channel)  # [C + 1, Q]
        return per_channel[: self.total].t().float()


class _Buffer:
    """Parameters of one shape/dtype/device, stacked along a new leading dim ``B``.

    ``data`` is ``[3, B, *shape]`` and persistent (no allocation per step):
    slot 1 holds ``x`` from the pre-hook, slot 0 ``x~`` and slot 2 ``x~ - x`` at the
    post-hook (then all three are squared in place); slot 2 is also the gradient
    scratch at the pre-hook. ``cells`` keeps ``x~ ** 2`` summed to the slices' dims
    (``[B, *sizes of those dims]``) for the shared-element terms.
    """

    __slots__ = ("params", "shapes", "specs", "spec_dims", "owner", "data", "clean",
                 "cells", "shared")

    def __init__(self, params: list[torch.Tensor], owners: dict, dump: int):
        p0 = params[0]
        self.params = params
        self.shapes = [p.shape for p in params]
        shape = tuple(p0.shape)
        dims = sorted({d for p in params for d in owners[id(p)]})
        self.spec_dims = tuple(dims)
        self.specs: list[int] = []  # the dim of each (dim, layer) spec, in owner order
        owner_rows = []
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
        self.owner = owner_rows
        self.shared = len(self.specs) > 1  # elements may belong to several channels
        # float32 (exact for float16/bfloat16), float64 for float64 tensors
        work = torch.float64 if p0.dtype == torch.float64 else torch.float32
        self.data = torch.empty((3, len(params)) + shape, dtype=work, device=p0.device)
        self.clean = None  # [B, *shape]: gradients kept by grad_sq_norms(keep=True)
        self.cells = None

    def grads(self) -> list[torch.Tensor]:
        return [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]

    def cell_view(self, values: torch.Tensor, spec: int) -> torch.Tensor:
        """Per-entry values of spec ``spec`` (``[B * size]``) in cell space
        ``[B, *sizes of the slices' dims]`` (broadcastable)."""
        shape = [len(self.params)] + [1] * len(self.spec_dims)
        shape[1 + self.spec_dims.index(self.specs[spec])] = -1
        return values.view(shape)

    def spec_sums(self, cells: torch.Tensor, lead: int) -> list[torch.Tensor]:
        """Per spec, ``cells`` (``[*lead, B, *sizes]``) summed to that spec's dim,
        flattened to ``[*lead, B * size]`` (the owner order)."""
        out = []
        nd = len(self.spec_dims)
        for d in self.specs:
            j = self.spec_dims.index(d)
            other = tuple(lead + 1 + i for i in range(nd) if i != j)
            t = cells.sum(dim=other) if other else cells
            out.append(t.reshape(cells.shape[:lead] + (-1,)))
        return out

    def reduce(self, sq: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """``sq`` (``[Q, B, *shape]``, squared) summed to the slices' dims (cells,
        ``[Q, B, *sizes]``), innermost dims first over contiguous memory, and per spec
        ``[Q, B * size(d)]``."""
        cells = reduce_to_cells(sq, 2, self.spec_dims)
        return cells, self.spec_sums(cells, 1)

    def combine(self, per_spec: list[torch.Tensor], op) -> torch.Tensor:
        """``op`` over the specs of per-entry masks (``torch.logical_or``): ``[B, ...]``,
        broadcastable to the data."""
        out = None
        nd = self.data.dim() - 2
        for values, d in zip(per_spec, self.specs):
            shape = [len(self.params)] + [1] * nd
            shape[1 + d] = -1
            v = values.view(shape)
            out = v if out is None else op(out, v)
        return out


class StackedLayout:
    """The decaying groups' tensors: small ones stacked by shape, large ones sliced."""

    def __init__(self, groups, sliced_min_numel: int = SLICED_MIN_NUMEL,
                 streaming: tuple[float, float] | None = None):
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
        sliced: dict[int, tuple] = {}
        offset = 0
        for g in self.groups:
            for s in g.slices:
                if s.param.numel() >= sliced_min_numel:
                    sliced.setdefault(id(s.param), (s.param, []))[1].append((s, offset))
                    continue
                own = torch.where(s.local_owner >= 0, s.local_owner + offset,
                                  torch.full_like(s.local_owner, dump))
                params.setdefault(id(s.param), s.param)
                owners.setdefault(id(s.param), {}).setdefault(s.dim, []).append(own)
            offset += g.m
        by_kind: dict[tuple, list[torch.Tensor]] = {}
        for p in params.values():
            by_kind.setdefault((tuple(p.shape), p.dtype, p.device), []).append(p)
        self.buffers = [_Buffer(ps, owners, dump) for ps in by_kind.values()]
        self.sliced = [SlicedTensor(p, sl, dump, streaming) for p, sl in sliced.values()]
        empty = torch.zeros(0, dtype=torch.int64, device=self.device)
        owner = torch.cat([o for buf in self.buffers for o in buf.owner] or [empty])
        self._owner = owner
        self._scatter = _Scatter(owner, self.total)
        self._split = [o.numel() for buf in self.buffers for o in buf.owner]
        shared_owner = torch.cat([o for buf in self.buffers if buf.shared for o in buf.owner]
                                 or [empty])
        self._shared_scatter = _Scatter(shared_owner, self.total)
        self.any_shared = any(b.shared for b in self.buffers) or \
            any(t.shared for t in self.sliced)
        self._where: dict[int, tuple[_Buffer, int]] = {
            id(p): (buf, i) for buf in self.buffers for i, p in enumerate(buf.params)}
        self._new_sq = None

    def params(self) -> list[torch.Tensor]:
        return [p for buf in self.buffers for p in buf.params] + \
            [t.param for t in self.sliced]

    def _per_buffer(self, per_channel: torch.Tensor, fill):
        """Per-channel values ``[C]`` spread to every owner entry, then cut per buffer:
        yields ``(buffer, [values of each of its specs])``; ``fill`` for unowned entries."""
        if not self.buffers:
            return
        ext = torch.cat([per_channel, per_channel.new_full((1,), fill)])
        per_spec = ext.index_select(0, self._owner).split(self._split)
        k = 0
        for buf in self.buffers:
            n = len(buf.specs)
            yield buf, per_spec[k:k + n]
            k += n

    def _ext(self, values: torch.Tensor, fill) -> torch.Tensor:
        return torch.cat([values, values.new_full((1,), fill)])

    # ---------------------------------------------------------------- validity
    @staticmethod
    def key_of(groups) -> tuple:
        """What a layout depends on: the groups, in order, at their layout versions."""
        return tuple((g.name, g.version) for g in groups)

    def shapes_unchanged(self) -> bool:
        """No tensor changed shape in place since the layout was built."""
        return all(p.shape == s for buf in self.buffers for p, s in zip(buf.params, buf.shapes)) \
            and all(tuple(t.param.shape) == t.shape for t in self.sliced)

    def valid_for(self, key: tuple) -> bool:
        """Same groups at the same layout versions, and no tensor changed shape."""
        return key == self.key and self.shapes_unchanged()

    def set_regions(self, decaying: torch.Tensor, snap: torch.Tensor | None = None) -> None:
        """The channels (bool ``[C]``) whose slices the sliced tensors work on, and those
        (a subset, default the same) whose ``x`` their :meth:`snapshot` keeps."""
        for t in self.sliced:
            t.set_regions(decaying, snap)

    def defer_updates(self, optimizer, args: tuple, kwargs: dict, blocked: set,
                      min_numel: int = 0) -> None:
        """Let the sliced tensors of at least ``min_numel`` elements on the streaming path
        run ``optimizer``'s update of themselves inside :meth:`measure`
        (:mod:`dpm_core.fused_sgd`), except those in ``blocked`` (ids of tensors holding
        zeroed channels, which must be zero-filled after the update and before any norm
        is read)."""
        for t in self.sliced:
            if id(t.param) not in blocked and t.param.numel() >= min_numel:
                t.defer_update(optimizer, args, kwargs)

    def finish_updates(self) -> None:
        """Finish every deferred update and give the gradients back (post-hook, always)."""
        err = None
        for t in self.sliced:
            try:
                t.finish_update()
            except Exception as e:  # finish the others: no tensor may be left without .grad
                err = err or e
        if err is not None:
            raise err

    # ---------------------------------------------------------------- kernels
    @torch.no_grad()
    def grad_sq_norms(self, keep: bool = False) -> torch.Tensor:
        """Squared L2 norm of every channel's gradient, float32 ``[C]`` (missing = 0).

        With ``keep``, a copy of the gradients (of the stacked tensors; of the decaying
        regions of the sliced ones, see :meth:`set_regions`) is kept for
        :meth:`restore_grads`.
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
            parts.extend(buf.reduce(scratch.unsqueeze(0))[1])
        out = self._scatter(parts, 1, self.device)[0]
        if self.sliced:
            ext = self._ext(out, 0.0)
            for t in self.sliced:
                t.grad_sq_norms(ext, keep)
            out = ext[: self.total]
        return out

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
        ext = self._ext(channels, False)
        for t in self.sliced:
            t.restore_grads(ext)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Record the weights ``x`` (call right before the optimizer step)."""
        for buf in self.buffers:
            torch.stack(buf.params, out=buf.data[1])
        for t in self.sliced:
            t.snapshot()

    @torch.no_grad()
    def measure(self, with_old: bool = True) -> torch.Tensor:
        """Norms ``[3, C]`` (``||x~||``, ``||x||``, ``||x~ - x||``) or ``[1, C]`` (``||x~||``).

        Reads ``x~`` from the parameters (call right after the optimizer step); uses up
        the snapshot.
        """
        parts = []
        q = 3 if with_old else 1
        for buf in self.buffers:
            data = buf.data
            torch.stack(buf.params, out=data[0])
            if with_old:
                torch.sub(data[0], data[1], out=data[2])
                data.square_()
            else:
                data = data[:1]
                data.square_()
            cells, per_spec = buf.reduce(data)
            buf.cells = cells[0] if buf.shared else None
            parts.extend(per_spec)
        sq = self._scatter(parts, q, self.device)
        if self.sliced:
            ext = torch.cat([sq, sq.new_zeros(q, 1)], dim=1)
            for t in self.sliced:
                t.measure(ext, with_old)
            sq = ext[:, : self.total]
        self._new_sq = sq[0]
        return sq.sqrt()

    @torch.no_grad()
    def apply(self, factor: torch.Tensor, scaled: torch.Tensor) -> torch.Tensor:
        """Scale the parameters' ``x~`` per element (Eq. 1; shared elements by the rule
        in the ``dpm_core.engine`` docstring) and return every channel's own factor.

        ``factor`` (``[C]``) is used where ``scaled`` (bool ``[C]``); call after
        :meth:`measure`. Where several scaled channels share elements, their own
        factors come from :func:`dpm_core.functional.compensated_factor` (one more
        pass over the shared tensors' cells); elsewhere they equal ``factor``.
        """
        fx = self._ext(factor, 1.0)
        kx = self._ext(scaled, False)
        per_buf = []
        for buf in self.buffers:
            ids = [buf.cell_view(o, i) for i, o in enumerate(buf.owner)]
            per_buf.append((ids, [kx[i] for i in ids], [fx[i] for i in ids]))
        own = factor
        if self.any_shared and bool(scaled.any()):
            parts = []
            for buf, (ids, k, f) in zip(self.buffers, per_buf):
                if not buf.shared:
                    continue
                mass, sq = F.shared_element_terms(k, f)
                terms = torch.stack([buf.cells * mass, buf.cells * sq])  # [2, B, *sizes]
                for i, t in enumerate(buf.spec_sums(terms, 1)):
                    parts.append(t * kx[buf.owner[i]])
            sums = self._shared_scatter(parts, 2, self.device)
            if self.sliced:
                mass = self._ext(sums[0], 0.0)
                sq = self._ext(sums[1], 0.0)
                for t in self.sliced:
                    t.shared_terms(fx, kx, mass, sq)
                sums = torch.stack([mass[: self.total], sq[: self.total]])
            own = F.compensated_factor(factor, self._new_sq, sums[0], sums[1])
        gx = self._ext(own, 1.0)
        for buf, (ids, k, f) in zip(self.buffers, per_buf):
            scale = F.shared_element_scale(k, f, [gx[i] for i in ids])
            shape = list(scale.shape[:1]) + [1] * (buf.data.dim() - 2)
            for j, d in enumerate(buf.spec_dims):
                shape[1 + d] = scale.shape[1 + j]
            _foreach("mul", buf.params, list(scale.reshape(shape).unbind(0)))
        for t in self.sliced:
            t.apply(fx, kx, gx)
        return own
