"""The engine's per-step kernels for large tensors: only the decaying channels' slices.

For a tensor above :data:`SLICED_MIN_NUMEL` elements the engine never touches the whole
tensor in the weight path: it gathers the slices of the channels that are decaying
(``index_select``), works on them, and scatters them back (``index_copy_``). A slice
``(param, dim[, index])`` is seen through a 3-D view ``[pre, blocks, block]`` of the
tensor in which every channel owns whole blocks of contiguous memory: a plain slice
along ``dim`` owns one block of ``prod(shape[dim+1:])`` elements per pre-row; an index
slice whose positions come in aligned runs (``index[c] = start + arange(r)``, ``start``
a multiple of ``r``: the H*W columns of a conv channel after a Flatten, the 64 rows of
an attention head) owns whole runs, so the gather copies runs instead of scalars.

Per step and per slice with decaying channels (the *region*):

* pre-hook: ``||g_c||`` of every channel of the group (Eq. 5 needs the mean over all
  channels: one read of the gradient, no copy); with Self-Rectifying, the region of
  ``x`` into one persistent buffer (the only copy of the decaying slices kept);
* post-hook, pass 1: ``||x~||`` (and ``||x||``, ``||x~ - x||``) of the region's channels,
  chunk by chunk (a few MB at a time, so temporaries stay in cache); the region of
  ``x~`` ends up in the persistent buffer (it replaces ``x``);
* pass 2, only where several slices share the tensor: the sums the exact rule for
  shared elements needs (``dpm_core.functional.shared_element_terms``);
* pass 3: scale the buffer per element and write it back.

Work and memory are proportional to the decaying slices; the gradient read for C_len is
proportional to the groups' slices (it is Eq. 5's definition).
"""

from __future__ import annotations

import math

import torch

from . import functional as F

__all__ = ["SlicedTensor", "SLICED_MIN_NUMEL", "CHUNK_ELEMENTS"]

SLICED_MIN_NUMEL = 1 << 18  # tensors at least this large take the sliced path
CHUNK_ELEMENTS = 1 << 20    # elements per chunk of a region (4 MB in float32)


def _run_length(index: torch.Tensor, size: int) -> int:
    """The largest ``r`` dividing ``k`` and ``size`` such that every row of ``index`` is
    a list of aligned runs ``[s, s + 1, ..., s + r - 1]`` with ``s % r == 0`` (1 if none)."""
    m, k = index.shape
    for r in sorted((d for d in range(2, k + 1) if k % d == 0 and size % d == 0),
                    reverse=True):
        runs = index.view(m, k // r, r)
        start = runs[:, :, :1]
        if bool((start % r == 0).all()) and bool(
                (runs == start + torch.arange(r, device=index.device)).all()):
            return r
    return 1


def _sq_sums(t: torch.Tensor, dims) -> torch.Tensor:
    """Sum of squares of ``t`` over ``dims``, float32 (float64 math for float64)."""
    if t.dtype == torch.float64:
        n = torch.linalg.vector_norm(t, dim=dims)
    else:
        n = torch.linalg.vector_norm(t, dim=dims, dtype=torch.float32)
    return (n * n).float()


def reduce_to_cells(t: torch.Tensor, lead: int, keep: tuple[int, ...]) -> torch.Tensor:
    """Sum ``t`` over every dim after the first ``lead`` except those in ``keep``
    (dims counted after ``lead``), innermost first, each over contiguous memory."""
    shape = list(t.shape)
    blocks: list[list] = []  # [size, kept]
    for d, s in enumerate(shape[lead:]):
        if d in keep:
            blocks.append([s, True])
        elif blocks and not blocks[-1][1]:
            blocks[-1][0] *= s
        else:
            blocks.append([s, False])
    t = t.reshape(shape[:lead] + [b[0] for b in blocks])
    for i in reversed(range(len(blocks))):
        if not blocks[i][1]:
            n = blocks[i][0]
            if i == len(blocks) - 1 and 1 < n < 64:
                # a short innermost sum (a 3x3 kernel) is far faster as a matrix-vector
                # product than as torch's inner reduction
                ones = torch.ones(n, dtype=t.dtype, device=t.device)
                t = (t.reshape(-1, n) @ ones).reshape(t.shape[:-1])
            else:
                t = t.sum(dim=lead + i)
    return t


_scratch: dict[tuple, torch.Tensor] = {}


def _scratch_like(t: torch.Tensor) -> torch.Tensor:
    """A chunk-sized work tensor shaped like ``t``, shared by every sliced tensor of a
    device and dtype (one chunk of memory in all, grown only when a chunk is larger)."""
    key = (t.device, t.dtype)
    buf = _scratch.get(key)
    if buf is None or buf.numel() < t.numel():
        buf = torch.empty(t.numel(), dtype=t.dtype, device=t.device)
        _scratch[key] = buf
    return buf[: t.numel()].view(t.shape)


class _Spec:
    """One slice of the tensor: its dim, its group's channel offset, its blocks."""

    __slots__ = ("dim", "offset", "m", "r", "kb", "blocks", "owner", "view",
                 "region_ch", "region_blocks", "snap", "clean")

    def __init__(self, shape: tuple, s, offset: int, dump: int):
        d = s.dim
        self.dim = d
        self.offset = offset
        pre, size, post = math.prod(shape[:d]), shape[d], math.prod(shape[d + 1:])
        if s.index is None:
            self.m, self.r, self.kb = size, 1, 1
            self.blocks = torch.arange(size, device=s.param.device).view(size, 1)
        else:
            self.m = s.index.shape[0]
            self.r = _run_length(s.index, size)
            self.kb = s.index.shape[1] // self.r
            self.blocks = s.index.view(self.m, self.kb, self.r)[:, :, 0] // self.r
        self.view = (pre, size // self.r, self.r * post)
        local = s.local_owner
        self.owner = torch.where(local >= 0, local + offset, torch.full_like(local, dump))
        self.region_ch = None      # global ids of the region's channels [n]
        self.region_blocks = None  # their blocks along the view's dim 1 [n * kb]
        self.snap = None           # [pre, n * kb, block]: x, then x~, of the region
        self.clean = None          # (blocks, channels, gathered gradients) of a capture

    def positions(self) -> torch.Tensor:
        """The region's positions along ``dim``, in the order of the gathered data."""
        b = self.region_blocks.view(-1, 1) * self.r
        return (b + torch.arange(self.r, device=b.device)).reshape(-1)


class SlicedTensor:
    """One large tensor and its slices in a :class:`~dpm_core.stacked.StackedLayout`."""

    def __init__(self, param: torch.Tensor, slices: list[tuple], dump: int):
        """``slices``: ``(slice, channel offset)`` pairs for every group slice of ``param``."""
        self.param = param
        self.shape = tuple(param.shape)
        self.specs = [_Spec(self.shape, s, off, dump) for s, off in slices]
        self.spec_dims = tuple(sorted({sp.dim for sp in self.specs}))
        self.shared = len(self.specs) > 1
        self.dump = dump

    # ---------------------------------------------------------------- helpers
    def _view(self, t: torch.Tensor, sp: _Spec) -> torch.Tensor:
        return t.view(sp.view)

    def _chunks(self, sp: _Spec):
        """``(rows, blocks)``: ranges over the region's ``[pre, n * kb, block]`` data,
        each about :data:`CHUNK_ELEMENTS` elements; along ``pre`` when the tensor's dims
        before ``dim`` exist (in steps of whole rows of dim 0), else along the blocks."""
        pre, _, blk = sp.view
        nb = sp.region_blocks.numel()
        if pre > 1:
            q = pre // self.shape[0]  # view rows per index of dim 0
            per = max(1, CHUNK_ELEMENTS // max(1, nb * blk * q)) * q
            for a in range(0, pre, per):
                yield slice(a, min(pre, a + per)), slice(0, nb)
        else:
            per = max(1, CHUNK_ELEMENTS // max(1, blk))
            for b in range(0, nb, per):
                yield slice(0, 1), slice(b, min(nb, b + per))

    def _gather(self, src: torch.Tensor, sp: _Spec, rows: slice, blocks: slice,
                out: torch.Tensor | None = None) -> torch.Tensor:
        idx = sp.region_blocks[blocks]
        v = self._view(src, sp)[rows]
        if out is None:
            return v.index_select(1, idx)
        return torch.index_select(v, 1, idx, out=out)

    def _per_channel(self, sp: _Spec, per_block: torch.Tensor, out: torch.Tensor,
                     q: int | None = None) -> None:
        """Add region per-block sums ``[..., n * kb]`` into ``out`` (``[C + 1]`` or
        ``[Q, C + 1]``) at the region's channels (each channel once: deterministic)."""
        per_ch = per_block.view(per_block.shape[:-1] + (-1, sp.kb)).sum(-1)
        if q is None:
            out.index_add_(0, sp.region_ch, per_ch)
        else:
            out[q].index_add_(0, sp.region_ch, per_ch)

    def _natural(self, chunk: torch.Tensor, sp: _Spec, rows: slice) -> torch.Tensor:
        """A gathered chunk ``[rows, blocks, block]`` in the tensor's own dims, the
        region dim holding the chunk's positions and dim 0 the chunk's rows."""
        shape = list(self.shape)
        shape[sp.dim] = -1
        if sp.dim > 0:
            shape[0] = (rows.stop - rows.start) // (sp.view[0] // self.shape[0])
        return chunk.view(shape)

    # ---------------------------------------------------------------- regions
    def set_regions(self, decaying: torch.Tensor) -> None:
        """The channels (bool ``[C]``, global numbering) whose slices are worked on."""
        for sp in self.specs:
            local = decaying[sp.offset: sp.offset + sp.m]
            ch = local.nonzero().squeeze(1)
            if ch.numel() == 0:
                sp.region_ch = sp.region_blocks = None
                continue
            sp.region_ch = ch + sp.offset
            sp.region_blocks = sp.blocks[ch].reshape(-1)

    def active_specs(self):
        return [sp for sp in self.specs if sp.region_ch is not None]

    # ---------------------------------------------------------------- pre-hook
    @torch.no_grad()
    def grad_sq_norms(self, out: torch.Tensor, keep: bool = False) -> None:
        """Add every channel's squared gradient norm into ``out`` (``[C + 1]``).

        All channels of the groups (Eq. 5's mean), read in place. With ``keep``, the
        regions' gradients are kept for :meth:`restore_grads`.
        """
        g = self.param.grad
        for sp in self.specs:
            if keep:
                sp.clean = None
            if g is None:
                continue
            v = self._view(g, sp)
            pre, nb, blk = sp.view
            per = max(1, CHUNK_ELEMENTS // max(1, nb * blk))
            acc = None
            for a in range(0, pre, per):
                part = _sq_sums(v[a:a + per], 2).sum(0)
                acc = part if acc is None else acc + part
            per_ch = acc[sp.blocks].sum(1)
            out[sp.offset: sp.offset + sp.m] += per_ch
            if keep and sp.region_ch is not None:
                sp.clean = (sp.region_blocks.clone(), sp.region_ch.clone(),
                            v.index_select(1, sp.region_blocks))

    @torch.no_grad()
    def restore_grads(self, channels: torch.Tensor) -> None:
        """Write kept gradients back for the captured channels in ``channels`` (bool)."""
        g = self.param.grad
        for sp in self.specs:
            if sp.clean is None:
                continue
            blocks, chans, data = sp.clean
            sp.clean = None
            if g is None:
                continue
            sel = channels[chans]
            if not bool(sel.any()):
                continue
            if not bool(sel.all()):
                keep = sel.repeat_interleave(sp.kb).nonzero().squeeze(1)
                blocks, data = blocks[keep], data.index_select(1, keep)
            self._view(g, sp).index_copy_(1, blocks, data)

    @torch.no_grad()
    def snapshot(self) -> None:
        """Copy the regions of ``x`` into the persistent buffers (before the step)."""
        for sp in self.active_specs():
            shape = (sp.view[0], sp.region_blocks.numel(), sp.view[2])
            if sp.snap is None or sp.snap.dtype != self.param.dtype:
                sp.snap = torch.empty(shape, dtype=self.param.dtype, device=self.param.device)
            else:
                sp.snap.resize_(shape)  # storage only grows: no allocation per step
            torch.index_select(self._view(self.param, sp), 1, sp.region_blocks, out=sp.snap)

    # ---------------------------------------------------------------- post-hook
    @torch.no_grad()
    def measure(self, out: torch.Tensor, with_old: bool) -> None:
        """Pass 1: add ``||x~||²`` (and ``||x||²``, ``||x~ - x||²``) of the regions'
        channels into ``out`` (``[Q, C + 1]``); leaves ``x~`` in the buffers."""
        for sp in self.active_specs():
            shape = (sp.view[0], sp.region_blocks.numel(), sp.view[2])
            if not with_old:
                if sp.snap is None or sp.snap.dtype != self.param.dtype:
                    sp.snap = torch.empty(shape, dtype=self.param.dtype,
                                          device=self.param.device)
                else:
                    sp.snap.resize_(shape)
            acc = None
            for rows, blocks in self._chunks(sp):
                snap = sp.snap[rows, blocks]
                if with_old:
                    new = self._gather(self.param, sp, rows, blocks, out=_scratch_like(snap))
                    part = torch.stack([_sq_sums(new, 2).sum(0), _sq_sums(snap, 2).sum(0),
                                        _sq_sums(snap.sub_(new), 2).sum(0)])
                    snap.copy_(new)
                else:
                    self._gather(self.param, sp, rows, blocks, out=snap)
                    part = _sq_sums(snap, 2).sum(0).unsqueeze(0)
                if acc is None:
                    acc = part
                elif blocks.start == 0 and rows.start > 0:
                    acc = acc + part
                else:
                    acc = torch.cat([acc, part], dim=1)
            per_ch = acc.view(acc.shape[0], -1, sp.kb).sum(-1)
            out[: acc.shape[0]].index_add_(1, sp.region_ch, per_ch)

    def _cell_ids(self, sp: _Spec, rows: slice, blocks: slice) -> list[torch.Tensor]:
        """Per slice of the tensor, the global channel owning each cell of a region
        chunk (cells: the chunk reduced to the slices' dims), broadcastable."""
        keep = self.spec_dims
        cell_shape = [1] * len(keep)
        ids = []
        pos = None
        for other in self.specs:
            j = keep.index(other.dim)
            if other.dim == sp.dim:
                if pos is None:
                    start, stop = blocks.start * sp.r, blocks.stop * sp.r
                    pos = sp.positions()[start:stop]
                o = other.owner[pos]
            elif other.dim == 0:
                q = sp.view[0] // self.shape[0]
                o = other.owner[rows.start // q: rows.stop // q]
            else:
                o = other.owner
            shape = list(cell_shape)
            shape[j] = -1
            ids.append(o.view(shape))
        return ids

    @torch.no_grad()
    def shared_terms(self, factor: torch.Tensor, scaled: torch.Tensor,
                     own: torch.Tensor, shared: torch.Tensor) -> None:
        """Pass 2 (tensors with several slices): add each scaled channel's
        ``own_sq`` / ``shared_sq`` (:func:`dpm_core.functional.shared_element_terms`)
        into ``own`` and ``shared`` (``[C + 1]``)."""
        if not self.shared:
            return
        for sp in self.active_specs():
            j = self.spec_dims.index(sp.dim)
            own_acc, shared_acc = [], []
            for rows, blocks in self._chunks(sp):
                chunk = sp.snap[rows, blocks]
                cells = reduce_to_cells(self._natural(chunk.float() if chunk.dtype
                                                      != torch.float64 else chunk, sp, rows)
                                        .square(), 0, self.spec_dims)
                ids = self._cell_ids(sp, rows, blocks)
                k = [scaled[i] for i in ids]
                f = [factor[i] for i in ids]
                mine = self.specs.index(sp)
                own_w, shared_w = F.shared_element_terms(k, f, mine)  # (mass, m² mass)
                dims = tuple(d for d in range(cells.dim()) if d != j)
                o = (cells * own_w).sum(dims) if dims else cells * own_w
                s = (cells * shared_w).sum(dims) if dims else cells * shared_w
                own_acc.append(o)
                shared_acc.append(s)
            # chunks along dim 0 of the tensor hold every region position: add them up;
            # chunks along the region dim hold consecutive positions: concatenate them
            along_rows = sp.view[0] > 1
            o = sum(own_acc) if along_rows else torch.cat(own_acc)
            s = sum(shared_acc) if along_rows else torch.cat(shared_acc)
            per_pos = torch.stack([o, s]).float()  # [2, n * kb * r]
            per_ch = per_pos.view(2, -1, sp.kb * sp.r).sum(-1)
            own.index_add_(0, sp.region_ch, per_ch[0])
            shared.index_add_(0, sp.region_ch, per_ch[1])

    @torch.no_grad()
    def apply(self, factor: torch.Tensor, scaled: torch.Tensor, own: torch.Tensor) -> None:
        """Pass 3: scale the buffers (``x~``) per element and write them back."""
        for sp in self.active_specs():
            for rows, blocks in self._chunks(sp):
                chunk = sp.snap[rows, blocks]
                ids = self._cell_ids(sp, rows, blocks)
                scale = F.shared_element_scale([scaled[i] for i in ids],
                                               [factor[i] for i in ids],
                                               [own[i] for i in ids])
                nat = self._natural(chunk, sp, rows)
                shape = [1] * nat.dim()
                for j, d in enumerate(self.spec_dims):
                    shape[d] = scale.shape[j]
                # the scaled chunk goes to the (cache-sized) scratch, then into place
                out = _scratch_like(chunk)
                torch.mul(nat, scale.view(shape), out=out.view(nat.shape))
                v = self._view(self.param, sp)[rows]
                v.index_copy_(1, sp.region_blocks[blocks], out)
