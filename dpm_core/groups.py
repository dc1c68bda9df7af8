"""What a group is: its slices (one tensor's share of each of M parallel channels), its
per-channel DPM state, and the validation of the slices a user passes to
:meth:`dpm_core.DecayEngine.add_group`. The engine keeps the groups; the per-step kernels
(:mod:`dpm_core.stacked`, :mod:`dpm_core.sliced`) read their slices' owner maps."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from typing import Iterable

import torch

from . import functional as F

__all__ = ["ChannelState", "Slice", "Group", "parse_slices", "next_layout_version"]


@dataclass
class ChannelState:
    """A snapshot (copies) of one group's per-channel state."""

    decaying: torch.Tensor  # bool[M]
    zeroed: torch.Tensor    # bool[M]
    n_step: torch.Tensor    # int64[M]
    l_init: torch.Tensor    # float32[M]

    @property
    def live(self) -> torch.Tensor:
        """Channels that train normally (neither decaying nor zeroed)."""
        return ~(self.decaying | self.zeroed)


class Slice:
    """One tensor's share of a group: positions along ``dim`` for each of M channels.

    ``local_owner`` maps each position along ``dim`` to the channel that owns it (-1:
    none); the stacked and sliced kernels build their owner maps from it.
    """

    __slots__ = ("param", "dim", "index", "k", "reduce_dims", "local_owner")

    def __init__(self, param: torch.Tensor, dim: int, index: torch.Tensor | None, k: int):
        self.param = param
        self.dim = dim
        self.index = index  # LongTensor [M, k] or None (channel c owns position c)
        self.k = k
        self.reduce_dims = tuple(d for d in range(param.dim()) if d != dim)
        size = param.shape[dim]
        if index is None:
            self.local_owner = torch.arange(size, device=param.device)
        else:
            m = index.shape[0]
            local = torch.full((size,), -1, dtype=torch.int64, device=param.device)
            local[index.reshape(-1)] = torch.arange(m, device=param.device).repeat_interleave(k)
            self.local_owner = local

    def sq_norms(self, t: torch.Tensor) -> torch.Tensor:
        """Squared L2 norm of every channel's share of ``t`` (float32 ``[M]``)."""
        return F.channel_sq_norms(t, self.reduce_dims, self.index)

    def positions(self, channels: torch.Tensor) -> torch.Tensor:
        """The positions along ``dim`` owned by ``channels`` (LongTensor)."""
        if self.index is None:
            return channels
        return self.index[channels].reshape(-1)

    def fill_zeros(self, positions: torch.Tensor) -> None:
        """Exact zeros at ``positions`` along ``dim``: a fill of those slices only."""
        if positions.numel():
            self.param.index_fill_(self.dim, positions, 0)

    def layout(self) -> tuple:
        return (tuple(self.param.shape), self.dim, self.k)


_layout_versions = itertools.count()


def next_layout_version() -> int:
    """A new layout version: a group takes one whenever its slices change."""
    return next(_layout_versions)


class Group:
    __slots__ = ("name", "slices", "m", "decaying", "zeroed", "n_step", "l_init",
                 "n_decaying", "n_zeroed", "version", "_zero_pos")

    def __init__(self, name: str, slices: list[Slice], m: int, device: torch.device):
        self.name = name
        self.slices = slices
        self.version = next_layout_version()  # changes whenever the slices change
        self.m = m
        self.decaying = torch.zeros(m, dtype=torch.bool, device=device)
        self.zeroed = torch.zeros(m, dtype=torch.bool, device=device)
        self.n_step = torch.zeros(m, dtype=torch.int64, device=device)
        self.l_init = torch.zeros(m, dtype=torch.float32, device=device)
        self.n_decaying = 0  # python-side counts: no device sync to find active groups
        self.n_zeroed = 0
        self._zero_pos = None  # (key, positions per slice) of the zeroed channels

    @property
    def device(self) -> torch.device:
        return self.decaying.device

    def recount(self) -> None:
        self.n_decaying = int(self.decaying.sum())
        self.n_zeroed = int(self.zeroed.sum())

    def params(self) -> list[torch.Tensor]:
        return [s.param for s in self.slices]

    def sq_norms(self) -> torch.Tensor:
        """Squared norms of all M channels of the weights (for ``mark``)."""
        return sum(s.sq_norms(s.param) for s in self.slices)

    def write_zeros(self, channels: torch.Tensor | None = None) -> None:
        """Exact zeros in the slices of ``channels`` (default: the zeroed channels).

        A fill of those slices only (``index_fill_``); the positions of the zeroed
        channels are cached until the zeroed set or the slices change.
        """
        if channels is None:
            if not self.n_zeroed:
                return
            key = (self.version, self.n_zeroed, id(self.zeroed))
            if self._zero_pos is None or self._zero_pos[0] != key:
                ch = self.zeroed.nonzero().squeeze(1)
                self._zero_pos = (key, [s.positions(ch) for s in self.slices])
            positions = self._zero_pos[1]
        else:
            positions = [s.positions(channels) for s in self.slices]
        for s, pos in zip(self.slices, positions):
            s.fill_zeros(pos)



def parse_slices(name: str, slices: Iterable, expect_m: int | None = None) -> tuple[list[Slice], int]:
    """Validate a group's ``slices`` (see :meth:`DecayEngine.add_group`) and return them as
    :class:`Slice` objects with the group's channel count M; bad input is a ``ValueError``
    that says what is wrong."""
    try:
        items = list(slices)
    except TypeError:
        raise ValueError(f"group {name!r}: slices must be a list of (param, dim) or "
                         f"(param, dim, index) tuples, got {type(slices).__name__}") from None
    if not items:
        raise ValueError(f"group {name!r}: slices is empty; give at least one "
                         f"(param, dim) tuple")
    parsed: list[Slice] = []
    m = expect_m
    seen = set()
    for i, item in enumerate(items):
        if not isinstance(item, (tuple, list)) or len(item) not in (2, 3):
            raise ValueError(f"group {name!r}, slice {i}: expected (param, dim) or "
                             f"(param, dim, index), got {item!r:.80}")
        param, dim = item[0], item[1]
        index = item[2] if len(item) == 3 else None
        if not isinstance(param, torch.Tensor):
            raise ValueError(f"group {name!r}, slice {i}: param must be a tensor, got "
                             f"{type(param).__name__}")
        if not param.is_leaf:
            raise ValueError(f"group {name!r}, slice {i}: tensor of shape "
                             f"{tuple(param.shape)} is not a leaf tensor (it was computed "
                             f"from others); pass the nn.Parameter itself")
        if not param.is_floating_point():
            raise ValueError(f"group {name!r}, slice {i}: param must be floating point, "
                             f"got {param.dtype}")
        if param.dim() == 0:
            raise ValueError(f"group {name!r}, slice {i}: param is a 0-dim tensor; a "
                             f"slice needs a dimension to hold the channels")
        if isinstance(dim, bool) or not isinstance(dim, int) \
                or not -param.dim() <= dim < max(param.dim(), 1):
            raise ValueError(f"group {name!r}, slice {i}: dim {dim!r} is out of range for "
                             f"a tensor of shape {tuple(param.shape)}")
        dim = dim % param.dim()
        size = param.shape[dim]
        if index is None:
            k, mi = 1, size
        else:
            if not isinstance(index, torch.Tensor) or index.dtype != torch.int64 \
                    or index.dim() != 2:
                raise ValueError(f"group {name!r}, slice {i}: index must be a LongTensor "
                                 f"of shape [M, k], got "
                                 f"{getattr(index, 'dtype', type(index).__name__)} "
                                 f"{tuple(getattr(index, 'shape', ()))}")
            if index.numel() and (int(index.min()) < 0 or int(index.max()) >= size):
                raise ValueError(f"group {name!r}, slice {i}: index values must lie in "
                                 f"[0, {size}) (size of dim {dim} of a tensor of shape "
                                 f"{tuple(param.shape)}), got range "
                                 f"[{int(index.min())}, {int(index.max())}]")
            if torch.unique(index).numel() != index.numel():
                raise ValueError(f"group {name!r}, slice {i}: index lists a position "
                                 f"twice; each position may belong to one channel only")
            mi, k = index.shape
            index = index.to(param.device)
        if m is None:
            m = mi
        elif mi != m:
            raise ValueError(f"group {name!r}, slice {i}: has {mi} channels along dim "
                             f"{dim} of a tensor of shape {tuple(param.shape)} but the "
                             f"group has {m}; all slices must agree on M")
        key = (id(param), dim)
        if key in seen:
            raise ValueError(f"group {name!r}, slice {i}: the same tensor and dim are "
                             f"listed twice")
        seen.add(key)
        if param.device != items[0][0].device:
            raise ValueError(f"group {name!r}: slices live on different devices "
                             f"({items[0][0].device} and {param.device})")
        parsed.append(Slice(param, dim, index, k))
    if m == 0:
        raise ValueError(f"group {name!r} has no channels (M = 0)")
    return parsed, m
