"""Zero-invariant groups (ZIGs) of only-train-once param groups, as row matrices.

``oto._graph.get_param_groups()`` returns one dict per node group: ``params``, their
``p_transform`` (a ``TensorTransform``), ``num_groups`` = M and ``auxiliary_ngs``. OTO 3.0.1
(see ``only_train_once.transform.tensor_transform`` and HESSO) views every param of the group
as an ``[M, -1]`` matrix whose row ``c`` is ZIG ``c``'s share:

==========================  ================================================================
``BASIC`` / ``ACCESSORY``   ``p.view(M, -1)``: rows along dim 0 (conv filters, BN entries)
``TRANSPOSE``               dim 1 for 2-D / 4-D tensors (``p.permute(1, 0, ...)``), dim 0
                            for 1-D ones
``MULTIHEAD_NUMHEAD``       dim 0, ``k = size / M`` consecutive positions per ZIG (a head)
``MULTIHEAD_HEADDIM``       dim 0, positions ``h * M + c`` for every head ``h``
``NO_PRUNE`` / ``NO_UPDATE`` not part of the ZIG (trained normally / not at all)
auxiliary groups            rows ``offset + c`` (dim 0) of the auxiliary group's params
==========================  ================================================================

:class:`Zig` stores that as ``(param, dim, index)`` slices, exactly the form
``dpm_core.DecayEngine.add_group`` takes, so the engine's channels *are* OTO's ZIGs, and
gathers / scatters all M rows with a few tensor ops per slice (no loop over channels).
"""

from __future__ import annotations

import torch

__all__ = ["Zig", "build_zigs", "zig_slices"]


def _transform_enum():
    from only_train_once.transform import TensorTransform

    return TensorTransform


def zig_slices(group: dict, aux_groups: dict | None = None) -> list[tuple]:
    """``(param, dim, index_or_None)`` slices of the ZIGs of one OTO param group.

    A parameter OTO lists more than once with the same transform (a module applied twice,
    e.g. a shared conv: only-train-once 3.0.1 lists its weight once per call site) is
    taken once: it is one tensor, its ZIG rows are the same rows, and the decay engine
    refuses a tensor listed twice in one group.

    Raises:
        ValueError: when a param's shape does not split into ``num_groups`` rows the way its
            transform says (a model OTO's graph builder got wrong, or an unknown transform).
    """
    TT = _transform_enum()
    m = int(group["num_groups"])
    gid = group.get("id", "?")
    out: list[tuple] = []
    names = group.get("p_names") or [f"param{i}" for i in range(len(group["params"]))]
    transforms = group.get("p_transform") or [TT.BASIC] * len(group["params"])
    seen: set[tuple[int, int]] = set()
    for name, p, tr in zip(names, group["params"], transforms):
        tr = int(tr)
        if tr in (TT.NO_PRUNE, TT.NO_UPDATE) or (id(p), tr) in seen:
            continue
        seen.add((id(p), tr))
        if p.dim() == 0:
            raise ValueError(f"OTO group {gid!r}: param {name!r} is a scalar; cannot split it "
                             f"into {m} zero-invariant groups")
        dev = p.device
        if tr in (TT.BASIC, TT.ACCESSORY) or (tr == TT.TRANSPOSE and p.dim() == 1):
            dim, index = 0, None
            if p.shape[0] != m:
                if p.shape[0] % m:
                    raise ValueError(f"OTO group {gid!r}: param {name!r} of shape "
                                     f"{tuple(p.shape)} has {p.shape[0]} rows, not a multiple "
                                     f"of num_groups={m}")
                k = p.shape[0] // m
                index = torch.arange(m * k, device=dev).view(m, k)
        elif tr == TT.TRANSPOSE:
            dim, index = 1, None
            if p.shape[1] != m:
                raise ValueError(f"OTO group {gid!r}: param {name!r} of shape "
                                 f"{tuple(p.shape)} (TRANSPOSE) has {p.shape[1]} columns, "
                                 f"expected num_groups={m}")
        elif tr == TT.MULTIHEAD_NUMHEAD:
            if p.shape[0] % m:
                raise ValueError(f"OTO group {gid!r}: param {name!r} of shape "
                                 f"{tuple(p.shape)} does not split into {m} heads")
            k = p.shape[0] // m
            dim, index = 0, torch.arange(m * k, device=dev).view(m, k)
        elif tr == TT.MULTIHEAD_HEADDIM:
            heads = int(group.get("num_heads", p.shape[0] // m))
            if heads * m != p.shape[0]:
                raise ValueError(f"OTO group {gid!r}: param {name!r} of shape "
                                 f"{tuple(p.shape)} is not num_heads x num_groups = "
                                 f"{heads} x {m} rows")
            dim = 0
            index = (torch.arange(heads, device=dev).view(1, heads) * m
                     + torch.arange(m, device=dev).view(m, 1))
        else:
            raise ValueError(f"OTO group {gid!r}: param {name!r} has transform "
                             f"{tr!r}, which dpm_otov2 does not know how to split into "
                             f"zero-invariant groups")
        out.append((p, dim, index))
    for ng_id, offset in group.get("auxiliary_ngs", []) or []:
        if aux_groups is None or ng_id not in aux_groups:
            raise ValueError(f"OTO group {gid!r} depends on auxiliary group {ng_id!r}, which "
                             f"is not among the optimizer's param groups; pass all of "
                             f"oto._graph.get_param_groups()")
        for p in aux_groups[ng_id]["params"]:
            if p.dim() == 0 or p.shape[0] < offset + m:
                raise ValueError(f"OTO auxiliary group {ng_id!r}: param of shape "
                                 f"{tuple(p.shape)} has no rows {offset}..{offset + m - 1}")
            index = (offset + torch.arange(m, device=p.device)).view(m, 1)
            out.append((p, 0, index))
    return out


class Zig:
    """All M zero-invariant groups of one OTO param group, handled as an ``[M, D]`` matrix."""

    __slots__ = ("name", "m", "slices", "_flat", "widths", "group_index")

    def __init__(self, name: str, m: int, slices: list[tuple], group_index: int):
        self.name = name
        self.m = m
        self.slices = slices
        self.group_index = group_index
        self._flat = [None if idx is None else idx.reshape(-1) for _, _, idx in slices]
        self.widths = [p.numel() // p.shape[d] * (1 if idx is None else idx.shape[1])
                       for p, d, idx in slices]

    @property
    def width(self) -> int:
        return sum(self.widths)

    def params(self) -> list[torch.Tensor]:
        return [p for p, _, _ in self.slices]

    def rows(self, tensors) -> torch.Tensor:
        """``[M, D]`` rows of ``tensors`` (one per slice, shaped like its param; None = 0)."""
        parts = []
        for (p, d, _), flat, t in zip(self.slices, self._flat, tensors):
            if t is None:
                parts.append(torch.zeros(self.m, p.numel() // p.shape[d]
                                         * (1 if flat is None else flat.numel() // self.m),
                                         dtype=p.dtype, device=p.device))
                continue
            t = t.movedim(d, 0)
            if flat is not None:
                t = t.index_select(0, flat)
            parts.append(t.reshape(self.m, -1))
        return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0].clone()

    def param_rows(self) -> torch.Tensor:
        return self.rows([p.detach() for p, _, _ in self.slices])

    def write(self, rows: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Write ``rows`` back into the params (only rows where ``mask`` is True, if given)."""
        start = 0
        for (p, d, _), flat, w in zip(self.slices, self._flat, self.widths):
            chunk = rows[:, start:start + w]
            start += w
            view = p.detach().movedim(d, 0)
            if mask is not None:
                old = view if flat is None else view.index_select(0, flat)
                old = old.reshape(self.m, -1)
                chunk = torch.where(mask.view(-1, 1), chunk, old)
            if flat is None:
                view.copy_(chunk.reshape(view.shape))
            else:
                view.index_copy_(0, flat, chunk.reshape((flat.numel(),) + view.shape[1:]))

    def engine_slices(self) -> list[tuple]:
        return [(p, d) if idx is None else (p, d, idx) for p, d, idx in self.slices]


def build_zigs(param_groups) -> list[Zig]:
    """One :class:`Zig` per prunable, non-auxiliary OTO param group (in order)."""
    groups = list(param_groups)
    aux = {g["id"]: g for g in groups if g.get("is_auxiliary")}
    zigs = []
    for i, g in enumerate(groups):
        if not g.get("is_prunable", False) or g.get("is_auxiliary", False):
            continue
        slices = zig_slices(g, aux)
        if not slices:
            continue
        zigs.append(Zig(str(g["id"]), int(g["num_groups"]), slices, i))
    return zigs
