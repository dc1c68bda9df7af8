"""The engine's per-step kernels for large tensors: work that follows what decays.

A tensor above :data:`SLICED_MIN_NUMEL` elements is never stacked or copied whole. Each
step it takes one of two paths, chosen by the share of the tensor its decaying channels
cover (the *region*) and by what measures fastest on a CPU:

* the **gather** path (sparse regions): the region's slices are gathered
  (``index_select``) a chunk at a time into a cache-sized scratch, worked on and
  scattered back (``index_copy_``). A slice ``(param, dim[, index])`` is seen through a
  3-D view ``[pre, blocks, block]`` of the tensor in which every channel owns whole
  blocks of contiguous memory: a plain slice along ``dim`` owns one block of
  ``prod(shape[dim+1:])`` elements per pre-row; an index slice whose positions come in
  aligned runs (``index[c] = start + arange(r)``, ``start`` a multiple of ``r``: the H*W
  columns of a conv channel after a Flatten, the 64 rows of an attention head) owns
  whole runs, so the gather copies runs instead of scalars;
* the **streaming** path (regions of at least :data:`DENSE_MIN_FRACTION` of the tensor,
  where a gather of interleaved blocks reads almost every cache line anyway): the
  squared tensor is reduced, a chunk of rows of dim 0 at a time (about
  :data:`STREAM_CHUNK` elements, so the squares stay in cache), to its *cells* (the
  tensor summed to the slices' dims: ``[25088]`` for a VGG classifier's columns,
  ``[512, 512]`` for a conv shared by two groups), and the scale is one in-place
  broadcast ``mul_`` of the tensor by a cell-shaped factor (exactly 1 outside the
  region). It needs no copy of the region at all; it is used only where the cells are
  at most :data:`MAX_CELL_SHARE` of the tensor.

On the streaming path with a plain ``torch.optim.SGD``, the optimizer's update of the
tensor is deferred to the norm pass (:mod:`dpm_core.fused_sgd`): each chunk of rows is
updated right before its norms are read, so update and norms share one pass over memory.

Per step and per tensor with decaying channels:

* pre-hook: ``||g_c||`` of every channel of the group (Eq. 5 needs the mean over all
  channels: one streaming read of the gradient, no copy); with Self-Rectifying, the
  slices of the channels whose ``C_len`` passes ``T_len`` (the only ones Eq. 6 can
  release) into one persistent buffer: the only copy kept;
* post-hook, pass 1: ``||x~||`` of the region's channels, and ``||x||``,
  ``||x~ - x||`` of the snapshot's channels;
* pass 2, only where several slices share the tensor: the sums the exact rule for
  shared elements needs (``dpm_core.functional.shared_element_terms``);
* pass 3: scale per element in place.

Work and memory are proportional to the decaying slices (or, on the streaming path, to
one read and one write of the tensor, which costs less there); the gradient read for
C_len is proportional to the groups' slices (it is Eq. 5's definition).
"""

from __future__ import annotations

import math

import torch

from . import functional as F
from .fused_sgd import DeferredSGD, sgd_hyperparameters
from .reductions import ones_for, reduce_to_cells
from .reductions import scratch_for as _scratch_for
from .reductions import sq_sums as _sq_sums

__all__ = ["SlicedTensor", "SLICED_MIN_NUMEL", "CHUNK_ELEMENTS", "STREAM_CHUNK",
           "DENSE_MIN_FRACTION", "MAX_CELL_SHARE"]

SLICED_MIN_NUMEL = 1 << 18  # tensors at least this large take the sliced path
CHUNK_ELEMENTS = 1 << 20    # elements per chunk of a gathered region (4 MB in float32)
STREAM_CHUNK = 1 << 18      # elements per chunk of a streaming pass (1 MB: stays in cache)
#: chunks of a streaming pass that also runs the optimizer's update are this many times
#: larger (measured on the 4096 x 25088 Linear, one thread: update + norms 371 ms at
#: 10 rows per chunk, 311 at 40, 326 at 160; torch's own SGD step alone 400 ms)
FUSED_CHUNK_FACTOR = 4
#: share of a tensor covered by the decaying slices from which the streaming path is used
#: (measured on a 4096 x 25088 Linear with random channels of 49 columns decaying, one
#: thread: gather 134 / streaming 182 ms per step at 1/8, 179 / 176 at 1/4, 260 / 178
#: at 1/2, plain SGD's own pass included)
DENSE_MIN_FRACTION = 0.25
#: the streaming path is open to tensors whose cells are at most this share of them
MAX_CELL_SHARE = 0.125


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


class _Spec:
    """One slice of the tensor: its dim, its group's channel offset, its blocks."""

    __slots__ = ("dim", "offset", "m", "r", "kb", "blocks", "owner", "view", "index",
                 "region_ch", "region_blocks", "snap_ch", "snap_blocks", "snap", "clean")

    def __init__(self, shape: tuple, s, offset: int, dump: int):
        d = s.dim
        self.dim = d
        self.offset = offset
        self.index = s.index  # [M, k] positions along dim, or None (channel c owns c)
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
        self.snap_ch = None        # the channels whose x is kept (a subset of the region)
        self.snap_blocks = None
        self.snap = None           # [pre, n_snap * kb, block]: x of those channels
        self.clean = None          # (blocks, channels, gathered gradients) of a capture

    def positions(self) -> torch.Tensor:
        """The region's positions along ``dim``, in the order of the gathered data."""
        b = self.region_blocks.view(-1, 1) * self.r
        return (b + torch.arange(self.r, device=b.device)).reshape(-1)

    def per_channel(self, per_pos: torch.Tensor) -> torch.Tensor:
        """Values per position along ``dim`` (``[size]``) summed per channel (``[M]``);
        each channel's positions are added up on their own (no atomic adds)."""
        return per_pos if self.index is None else per_pos[self.index].sum(1)


def _select(decaying: torch.Tensor, sp: _Spec) -> tuple:
    """The global ids and blocks of ``sp``'s channels set in ``decaying``, or Nones."""
    ch = decaying[sp.offset: sp.offset + sp.m].nonzero().squeeze(1)
    if ch.numel() == 0:
        return None, None
    return ch + sp.offset, sp.blocks[ch].reshape(-1)


class SlicedTensor:
    """One large tensor and its slices in a :class:`~dpm_core.stacked.StackedLayout`."""

    def __init__(self, param: torch.Tensor, slices: list[tuple], dump: int,
                 streaming: tuple[float, float] | None = None):
        """``slices``: ``(slice, channel offset)`` pairs for every group slice of ``param``;
        ``streaming``: ``(DENSE_MIN_FRACTION, MAX_CELL_SHARE)`` (tests force a path)."""
        self.min_share, max_cells = streaming or (DENSE_MIN_FRACTION, MAX_CELL_SHARE)
        self.param = param
        self.shape = tuple(param.shape)
        self.specs = [_Spec(self.shape, s, off, dump) for s, off in slices]
        self.spec_dims = tuple(sorted({sp.dim for sp in self.specs}))
        self.shared = len(self.specs) > 1
        self.dump = dump
        self.work = torch.float64 if param.dtype == torch.float64 else torch.float32
        self.cell_shape = tuple(self.shape[d] for d in self.spec_dims)
        row = param.numel() // max(1, self.shape[0])
        # the streaming path needs cells much smaller than the tensor and rows of dim 0
        # that fit a chunk
        self.streamable = math.prod(self.cell_shape) <= max_cells * param.numel() \
            and row <= 16 * STREAM_CHUNK
        self.dense = False   # this step's path (set by set_regions)
        self.cells = None    # x~ ** 2 per cell (streaming path, shared tensors)
        self._regx = None    # [C + 1] bool: the region's channels
        self._ids = None     # per spec, the owner of every cell (broadcastable views)
        self.deferred = None  # this step's optimizer update, run by measure (fused_sgd)

    # ---------------------------------------------------------------- helpers
    def _view(self, t: torch.Tensor, sp: _Spec) -> torch.Tensor:
        return t.view(sp.view)

    def _chunks(self, sp: _Spec, nb: int):
        """``(rows, blocks)``: ranges over gathered ``[pre, nb, block]`` data, each about
        :data:`CHUNK_ELEMENTS` elements; along ``pre`` when the tensor's dims before
        ``dim`` exist (in steps of whole rows of dim 0), else along the blocks."""
        pre, _, blk = sp.view
        if pre > 1:
            q = pre // self.shape[0]  # view rows per index of dim 0
            per = max(1, CHUNK_ELEMENTS // max(1, nb * blk * q)) * q
            for a in range(0, pre, per):
                yield slice(a, min(pre, a + per)), slice(0, nb)
        else:
            per = max(1, CHUNK_ELEMENTS // max(1, blk))
            for b in range(0, nb, per):
                yield slice(0, 1), slice(b, min(nb, b + per))

    def _gather(self, src: torch.Tensor, sp: _Spec, idx: torch.Tensor, rows: slice,
                blocks: slice, out: torch.Tensor | None = None) -> torch.Tensor:
        """The blocks ``idx[blocks]`` of ``src``'s rows ``rows`` (in ``sp``'s view)."""
        v = self._view(src, sp)[rows]
        if out is None:
            return v.index_select(1, idx[blocks])
        return torch.index_select(v, 1, idx[blocks], out=out)

    def _gather_scratch(self, sp: _Spec, idx: torch.Tensor, rows: slice,
                        blocks: slice) -> torch.Tensor:
        shape = (rows.stop - rows.start, blocks.stop - blocks.start, sp.view[2])
        return self._gather(self.param, sp, idx, rows, blocks,
                            out=_scratch_for(shape, self.param.dtype, self.param.device))

    def _natural(self, chunk: torch.Tensor, sp: _Spec, rows: slice) -> torch.Tensor:
        """A gathered chunk ``[rows, blocks, block]`` in the tensor's own dims, the
        region dim holding the chunk's positions and dim 0 the chunk's rows."""
        shape = list(self.shape)
        shape[sp.dim] = -1
        if sp.dim > 0:
            shape[0] = (rows.stop - rows.start) // (sp.view[0] // self.shape[0])
        return chunk.view(shape)

    def _squared(self, t: torch.Tensor, slot: int) -> torch.Tensor:
        """``t ** 2`` in the work dtype, in a scratch ``slot`` (``t`` is left alone)."""
        s = _scratch_for(t.shape, self.work, t.device, slot)
        if t.dtype == s.dtype:
            torch.mul(t, t, out=s)
        else:  # float16 / bfloat16: square in float32
            s.copy_(t)
            s.mul_(s)
        return s

    def _ones(self, n: int) -> torch.Tensor:
        return ones_for(n, self.work, self.param.device)

    def _cells(self, src: torch.Tensor, on_chunk=None, before=None) -> torch.Tensor:
        """``src ** 2`` summed to the cells (``[*sizes of the slices' dims]``, float32;
        float64 for float64), streamed over chunks of rows of dim 0 that stay in cache.
        ``before(start, stop)`` runs on every chunk's rows before they are read (the
        deferred optimizer update); ``on_chunk(start, stop, chunk)`` sees every chunk of
        ``src`` while it is hot."""
        n0 = self.shape[0]
        row = src.numel() // n0
        # with an optimizer update per chunk, larger chunks (fewer calls; the update's
        # three tensors still stay in cache)
        per = max(1, int(STREAM_CHUNK * (FUSED_CHUNK_FACTOR if before else 1)) // max(1, row))
        keep = self.spec_dims
        along_rows = 0 in keep
        if along_rows:
            cells = torch.zeros(self.cell_shape, dtype=self.work, device=src.device)
        else:  # dim 0 is summed first, as a matrix-vector product per chunk
            acc = torch.zeros(row, dtype=self.work, device=src.device)
        # the loop runs hundreds of times per step on a large tensor: keep it lean
        per = min(per, n0)
        scratch = _scratch_for((per,) + tuple(src.shape[1:]), self.work, src.device, 1)
        flat = scratch.view(per, row)
        ones = self._ones(per)
        same = src.dtype == self.work
        # cells along dim 0 only (rows of a Linear): one norm per row, read without a
        # squared copy (about 2.7x faster than square-then-sum on a 768-wide chunk)
        rows_only = keep == (0,)
        for a in range(0, n0, per):
            c = src[a:a + per]
            n = c.shape[0]
            if before is not None:
                before(a, a + n)
            if rows_only:
                torch.linalg.vector_norm(c.reshape(n, row), dim=1, dtype=self.work,
                                         out=cells[a:a + n])
                cells[a:a + n].square_()
                if on_chunk is not None:
                    on_chunk(a, a + n, c)
                continue
            s = scratch if n == per else scratch[:n]
            if same:
                torch.mul(c, c, out=s)
            else:  # float16 / bfloat16: square in float32
                s.copy_(c)
                s.mul_(s)
            if along_rows:
                cells[a:a + n] = reduce_to_cells(s, 0, keep)
            elif n == per:
                acc.addmv_(flat.t(), ones)
            else:
                acc.addmv_(flat[:n].t(), ones[:n])
            if on_chunk is not None:
                on_chunk(a, a + n, c)
        if along_rows:
            return cells
        return reduce_to_cells(acc.view(self.shape[1:]), 0, tuple(d - 1 for d in keep))

    def _old_and_delta_hot(self, a: int, b: int, chunk: torch.Tensor, accs: dict) -> None:
        """For the snapshot's slices along a dim after 0: ``||x||²`` and ``||x~ - x||²``
        per position of the gathered blocks, from rows ``a:b`` of ``x~`` while hot."""
        for sp, acc in accs.items():
            q = sp.view[0] // self.shape[0]
            rows = (b - a) * q
            v = chunk.view(rows, sp.view[1], sp.view[2])
            nb = sp.snap_blocks.numel()
            new = _scratch_for((rows, nb, sp.view[2]), self.param.dtype, chunk.device, 2)
            torch.index_select(v, 1, sp.snap_blocks, out=new)
            snap = sp.snap[a * q: b * q]
            ones = self._ones(rows)
            acc[0].addmv_(self._squared(snap, 3).view(rows, -1).t(), ones)
            acc[1].addmv_(self._squared(snap.sub_(new), 3).view(rows, -1).t(), ones)

    def _cell_ids(self) -> list[torch.Tensor]:
        """Per slice, the global channel owning each cell, as a view broadcastable to
        the cells."""
        if self._ids is None:
            nd = len(self.spec_dims)
            ids = []
            for sp in self.specs:
                shape = [1] * nd
                shape[self.spec_dims.index(sp.dim)] = -1
                ids.append(sp.owner.view(shape))
            self._ids = ids
        return self._ids

    def _add_per_channel(self, cells: torch.Tensor, out: torch.Tensor,
                         weight: list[torch.Tensor] | None = None) -> None:
        """Add each slice's sums of ``cells`` (times ``weight[i]``, a per-position
        weight along that slice's dim, as a cell view) into ``out`` (``[C + 1]``) at its
        channels."""
        nd = len(self.spec_dims)
        sums: dict[int, torch.Tensor] = {}
        for i, sp in enumerate(self.specs):
            j = self.spec_dims.index(sp.dim)
            if j not in sums:
                other = tuple(x for x in range(nd) if x != j)
                sums[j] = (cells.sum(dim=other) if other else cells).reshape(-1)
            per_pos = sums[j]
            if weight is not None:  # constant along the summed dims: it factors out
                per_pos = per_pos * weight[i].reshape(-1)
            out[sp.offset: sp.offset + sp.m] += sp.per_channel(per_pos).float()

    def _block_sums(self, sp: _Spec, idx: torch.Tensor, q: int, fn) -> torch.Tensor:
        """``[q, n]`` per-channel sums over the gathered blocks ``idx`` (``n * kb``):
        ``fn(rows, blocks)`` gives ``[q, blocks]`` sums of a chunk."""
        acc = torch.zeros(q, idx.numel(), dtype=torch.float32, device=idx.device)
        for rows, blocks in self._chunks(sp, idx.numel()):
            acc[:, blocks] += fn(rows, blocks)
        return acc.view(q, -1, sp.kb).sum(-1)

    # ---------------------------------------------------------------- regions
    def set_regions(self, decaying: torch.Tensor, snap: torch.Tensor | None = None) -> None:
        """The channels (bool ``[C]``, global numbering) whose slices are worked on, and
        those (a subset; default: the same) whose ``x`` the snapshot keeps."""
        share = 0.0
        for sp in self.specs:
            sp.region_ch, sp.region_blocks = _select(decaying, sp)
            if snap is None:
                sp.snap_ch, sp.snap_blocks = sp.region_ch, sp.region_blocks
            else:
                sp.snap_ch, sp.snap_blocks = _select(snap, sp)
            if sp.region_blocks is not None:
                share += sp.region_blocks.numel() / sp.view[1]
        self.dense = self.streamable and share > 0 and share >= self.min_share
        self._regx = torch.cat([decaying, decaying.new_zeros(1)])
        self.cells = None

    def defer_update(self, optimizer, args: tuple, kwargs: dict) -> None:
        """Take this step's update of the tensor over from ``optimizer`` where that is
        exact (:mod:`dpm_core.fused_sgd`): on the streaming path only, where the norm pass
        reads every row anyway."""
        self.deferred = None
        if not self.dense:
            return
        hp = sgd_hyperparameters(optimizer, self.param, args, kwargs)
        if hp is not None:
            self.deferred = DeferredSGD(self.param, hp)

    def finish_update(self) -> None:
        """Finish a deferred update (if the norm pass did not run it) and give ``.grad``
        back."""
        d, self.deferred = self.deferred, None
        if d is not None:
            d.finish()

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
            return
        if self.streamable:
            self._add_per_channel(self._cells(g), out)
        else:
            for sp in self.specs:
                v = self._view(g, sp)
                pre, nb, blk = sp.view
                per = max(1, CHUNK_ELEMENTS // max(1, nb * blk))
                acc = None
                for a in range(0, pre, per):
                    part = _sq_sums(v[a:a + per], 2).sum(0)
                    acc = part if acc is None else acc + part
                out[sp.offset: sp.offset + sp.m] += acc[sp.blocks].sum(1)
        if keep:
            for sp in self.active_specs():
                sp.clean = (sp.region_blocks.clone(), sp.region_ch.clone(),
                            self._view(g, sp).index_select(1, sp.region_blocks))

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
        """Copy ``x`` of the snapshot's channels into the persistent buffers (before
        the step)."""
        for sp in self.specs:
            if sp.snap_blocks is None:
                continue
            shape = (sp.view[0], sp.snap_blocks.numel(), sp.view[2])
            if sp.snap is None or sp.snap.dtype != self.param.dtype:
                sp.snap = torch.empty(shape, dtype=self.param.dtype, device=self.param.device)
            else:
                sp.snap.resize_(shape)  # storage only grows: no allocation per step
            torch.index_select(self._view(self.param, sp), 1, sp.snap_blocks, out=sp.snap)

    # ---------------------------------------------------------------- post-hook
    @torch.no_grad()
    def measure(self, out: torch.Tensor, with_old: bool) -> None:
        """Pass 1: add ``||x~||²`` of the regions' channels into ``out[0]`` (``out``:
        ``[Q, C + 1]``) and, ``with_old``, ``||x||²`` and ``||x~ - x||²`` of the
        snapshot's channels into ``out[1]``, ``out[2]`` (it uses the snapshot up)."""
        hot = {}
        if self.dense:
            # every channel's norm, from one streaming read (channels outside the
            # region are not decaying: their values are never used); the snapshot's
            # slices along later dims are compared with x~ while its rows are hot
            if with_old:
                hot = {sp: torch.zeros(2, sp.snap.shape[1] * sp.snap.shape[2],
                                       dtype=self.work, device=self.param.device)
                       for sp in self.specs if sp.snap_ch is not None and sp.dim > 0}
            cells = self._cells(self.param, (lambda a, b, c: self._old_and_delta_hot(
                a, b, c, hot)) if hot else None,
                before=self.deferred.rows if self.deferred is not None else None)
            self._add_per_channel(cells, out[0])
            self.cells = cells if self.shared else None
            for sp, acc in hot.items():
                per_ch = acc.view(2, -1, sp.kb * sp.view[2]).sum(-1).float()
                out[1:3].index_add_(1, sp.snap_ch, per_ch)
        else:
            for sp in self.active_specs():
                def new_sq(rows, blocks, sp=sp):
                    chunk = self._gather_scratch(sp, sp.region_blocks, rows, blocks)
                    return _sq_sums(chunk, 2).sum(0)
                per_ch = self._block_sums(sp, sp.region_blocks, 1, new_sq)
                out[0].index_add_(0, sp.region_ch, per_ch[0])
        if not with_old:
            return
        for sp in self.specs:
            if sp.snap_ch is None or sp in hot:
                continue

            def old_and_delta(rows, blocks, sp=sp):
                snap = sp.snap[rows, blocks]
                new = self._gather_scratch(sp, sp.snap_blocks, rows, blocks)
                return torch.stack([_sq_sums(snap, 2).sum(0),
                                    _sq_sums(snap.sub_(new), 2).sum(0)])
            per_ch = self._block_sums(sp, sp.snap_blocks, 2, old_and_delta)
            out[1:3].index_add_(1, sp.snap_ch, per_ch)

    def _chunk_cell_ids(self, sp: _Spec, rows: slice, blocks: slice) -> list[torch.Tensor]:
        """Per slice of the tensor, the global channel owning each cell of a gathered
        region chunk (cells: the chunk reduced to the slices' dims), broadcastable."""
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
        if self.dense:
            ids = self._cell_ids()
            k = [scaled[i] for i in ids]
            mass, sq = F.shared_element_terms(k, [factor[i] for i in ids])
            self._add_per_channel(self.cells * mass, own, k)
            self._add_per_channel(self.cells * sq, shared, k)
            self.cells = None
            return
        for sp in self.active_specs():
            j = self.spec_dims.index(sp.dim)
            own_acc, shared_acc = [], []
            mine = self.specs.index(sp)
            for rows, blocks in self._chunks(sp, sp.region_blocks.numel()):
                chunk = self._gather_scratch(sp, sp.region_blocks, rows, blocks)
                cells = reduce_to_cells(self._natural(chunk.float() if chunk.dtype
                                                      != torch.float64 else chunk, sp, rows)
                                        .square(), 0, self.spec_dims)
                ids = self._chunk_cell_ids(sp, rows, blocks)
                k = [scaled[i] for i in ids]
                f = [factor[i] for i in ids]
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
        """Pass 3: scale ``x~`` per element in place (elements of no scaled channel keep
        their value exactly)."""
        if self.dense:
            ids = self._cell_ids()
            scale = F.shared_element_scale([scaled[i] for i in ids],
                                           [factor[i] for i in ids], [own[i] for i in ids])
            shape = [1] * len(self.shape)
            for j, d in enumerate(self.spec_dims):
                shape[d] = scale.shape[j]
            self.param.mul_(scale.reshape(shape))
            return
        done = []  # the slices already written back
        for sp in self.active_specs():
            for rows, blocks in self._chunks(sp, sp.region_blocks.numel()):
                chunk = self._gather_scratch(sp, sp.region_blocks, rows, blocks)
                ids = self._chunk_cell_ids(sp, rows, blocks)
                scale = F.shared_element_scale([scaled[i] for i in ids],
                                               [factor[i] for i in ids],
                                               [own[i] for i in ids])
                # an element also in an earlier slice's region was scaled by that pass
                for i in done:
                    scale = torch.where(self._regx[ids[i]], 1.0, scale)
                nat = self._natural(chunk, sp, rows)
                shape = [1] * nat.dim()
                for j, d in enumerate(self.spec_dims):
                    shape[d] = scale.shape[j]
                nat.mul_(scale.view(shape))
                self._view(self.param, sp)[rows].index_copy_(1, sp.region_blocks[blocks],
                                                             chunk)
            done.append(self.specs.index(sp))
