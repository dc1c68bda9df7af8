"""The decay engine: per-channel DPM state and the optimizer hooks that drive it.

A *group* is a set of M parallel channels (one layer's filters, say). Channel ``c`` is
the concatenation of its slices over every tensor listed for the group: a slice is
``(param, dim)`` (channel ``c`` owns ``param.select(dim, c)``) or ``(param, dim, index)``
with ``index`` a LongTensor ``[M, k]`` (channel ``c`` owns positions ``index[c]`` along
``dim``; e.g. the H*W input columns of a Linear after a Flatten).

Exact step semantics
--------------------
``mark(name, channels)`` (Algorithm 1) records ``L_init = ||x||`` and ``n_step = 0`` for
each live channel and makes it *decaying*. A channel that is already decaying or zeroed
is left alone; a channel whose norm is already 0 becomes *zeroed* at once.

Let ``x`` be a decaying channel's vector right before ``optimizer.step()`` (read by the
step pre-hook), ``x~`` the vector the optimizer produced (read by the post-hook), ``g``
its gradient as the optimizer saw it (``.grad`` at the pre-hook), ``N = steps``,
``L_s = L_init / N`` and ``n`` its step counter. After each optimizer step, for every
decaying channel (Algorithm 2):

1. If ``self_rectify``: ``C_rate = (||x~|| - ||x||) / ||x~ - x||`` (Eq. 4; 0 when the
   denominator is 0) and ``C_len = ||g_c|| / mean_j ||g_j||`` over all M channels of the
   group (Eq. 5; 0 when the mean is 0). If ``C_rate > t_rate and C_len > t_len``
   (Eq. 6) the channel is *released*: it stops decaying, ``n = 0``, it keeps ``x~`` and
   trains normally again.
2. Otherwise ``n = n + 1`` and ``L_target = (N - n) * L_s`` (Eq. 2, 3). If
   ``||x~|| > L_target`` the channel is *scaled*: it becomes ``x~ * L_target / ||x~||``
   (Eq. 1, direction kept; factor ``f = L_target / ||x~||``). If ``||x~|| <= L_target``
   it keeps ``x~`` and ``n`` is recalibrated to ``N - ceil(||x~|| / L_s)`` so the next
   target lies below its norm (section 3.1).
3. When ``n`` reaches ``N`` the channel is set to exactly 0 (it is scaled with
   ``f = 0``) and becomes *zeroed*. From then on its elements are written back to exactly
   0 after every step, before anything is measured (momentum and weight decay cannot
   revive it), until an adapter removes it (``drop_channels``).

With N = 3 and no interference the norms after three steps are 2/3, 1/3 and 0 of
``L_init`` (Figure 2).

Self-Rectifying reads only what Eq. 6 can use
---------------------------------------------
Eq. 6 releases a channel only if ``C_rate > t_rate`` *and* ``C_len > t_len``, and
``C_len`` is known at the pre-hook (it needs only gradients). So:

* ``x`` (for ``C_rate``'s ``||x||`` and ``||x~ - x||``) is kept only for the decaying
  channels whose ``C_len > t_len``; for every other decaying channel Eq. 6 fails whatever
  ``C_rate`` is, and it is computed as 0 (step 1 then goes on to step 2 as written);
* ``C_len <= M`` (one channel's gradient norm is at most the sum of all M), so in a group
  with ``t_len >= M`` (with a margin for float rounding) no channel can be released: its
  gradient is not read at all (``C_len = 0``).

Both are exact: the decisions and weights are those of the rules above. The one visible
difference is in the non-finite rule below: a non-finite gradient or ``x`` of a channel
that Eq. 6 could not release anyway is not looked at, so such a channel is left alone for
that step only if its ``x~`` is non-finite (with plain SGD, momentum or Adam a non-finite
gradient always makes ``x~`` non-finite), exactly as without Self-Rectifying.

Other rules
-----------
* A step skipped by ``torch.amp.GradScaler`` (inf/NaN gradients) never calls
  ``optimizer.step()``, so the hooks do not run and nothing advances.
* A decaying channel whose gradient, old or new vector is not finite is left exactly as
  the optimizer produced it for that step (one warning per step), takes no part in the
  mean of Eq. 5, and its decay goes on at the next finite step. (The gradient and old
  vector count only where Self-Rectifying reads them: see above.)
* ``capture_clean_grads()`` (called after ``backward()`` and before a penalty is added
  to ``.grad``) makes the next step use the penalty-free gradient for decaying channels,
  for both their update and the SR criteria (section 3.2, "Special Situations").
* Norms and criteria are computed in float32 whatever the parameters' dtype; state lives
  on the parameters' device. Per step only groups that have decaying or zeroed channels
  are touched: the small tensors of the decaying groups are stacked by shape
  (:class:`dpm_core.stacked.StackedLayout`, rebuilt only when the set of decaying
  groups or their tensors change), so the kernels run once per distinct shape, not per
  layer, and the decision math runs once over all their channels. Zeroed channels cost
  one fill of their slices per tensor (``index_fill_``).
* A group whose slices change (or that is removed) between the two hooks of one step is
  left out of that step (its channels do not advance); the other groups go on.
* Large tensors (at least ``DecayEngine.sliced_min_numel`` elements) are never stacked
  or copied whole (:mod:`dpm_core.sliced`): where their decaying slices are a small share
  of the tensor, only those slices are gathered, scaled and written back; where they
  are a large share (half of a VGG classifier's columns), one streaming read gives the
  norms and one in-place broadcast multiply (by exactly 1 outside the decaying slices)
  the scale, whichever costs less. With SR, one persistent copy of the slices of the
  channels whose ``C_len`` passes ``t_len`` holds ``x``. ``C_len`` reads every channel's
  gradient of the decaying groups (Eq. 5's mean is over all M channels), without
  copying it.
* With a plain ``torch.optim.SGD`` (and ``fuse_sgd``, the default), the optimizer's
  update of a tensor on the streaming path that is too large for the CPU's cache
  (``fuse_sgd_min_numel``, 2^23 elements) runs inside the engine's norm pass, a
  chunk of rows at a time (:mod:`dpm_core.fused_sgd`): the pre-hook takes ``.grad`` off
  the tensor so that SGD skips it, the post-hook applies torch's own formula to each
  chunk right before reading it, and ``.grad`` is given back. ``x~``, the momentum
  buffers and ``.grad`` are those of torch's step; only the memory passes are fewer.
  Tensors holding zeroed channels (which must be filled with 0 after the update and
  before any norm), other optimizers, ``step(closure)`` and a first step without momentum
  buffer keep torch's update.

Shared elements
---------------
One tensor element can belong to channels of several groups (a conv's filter row to its
own layer's group, its input column to the previous layer's; every ResNet and VGG has
this), and those channels may have different factors. The rule, applied after every
channel's decision (all measured on the same ``x~``, zeroed channels already 0):

* an element owned by two or more *scaled* channels takes the smallest of their
  factors;
* an element owned by exactly one scaled channel ``c`` takes ``c``'s *own* factor
  ``g_c = sqrt((f_c² ||x~_c||² - V_c) / (||x~_c||² - S_c))``, where ``S_c`` is the
  squared norm of ``c``'s elements shared with other scaled channels and ``V_c`` the
  same after they took the smallest factor, so that ``||x_c|| = f_c ||x~_c||`` exactly:
  every scaled channel lands exactly on its target;
* every other element (live, released or non-finite owners only) keeps ``x~``.

``g_c`` lies in ``[f_c, 1]``: the engine never enlarges a weight. Where exactness would
need ``g_c > 1`` (a channel's shared elements were shrunk much more by another channel
than its own target needs, or it has no element of its own), ``g_c = 1`` and the channel
ends below its target; the next step's recalibration realigns ``n`` (section 3.1). When
all decaying channels were marked together and nothing else moves the weights, every
factor is ``(N - n) / (N - n + 1)``, ``g_c = f_c``, and every decaying channel is at
exactly ``(N - n) / N`` of ``L_init`` after step ``n`` (Figure 2;
``tests/test_engine_overlap.py`` on a ResNet-18). The per-element math is in
:func:`dpm_core.functional.shared_element_scale` and
:func:`dpm_core.functional.compensated_factor`.
"""

from __future__ import annotations

import warnings
from typing import Callable, Iterable, Sequence

import torch

from . import functional as F
from .config import DecayConfig
from .groups import ChannelState, Group, Slice, next_layout_version, parse_slices
from .sliced import SLICED_MIN_NUMEL
from .optim_utils import unwrap_optimizer
from .stacked import StackedLayout

__all__ = ["DecayEngine", "ChannelState", "EngineHandle"]

_STATE_VERSION = 1


def _max_c_len(m: int) -> float:
    """An upper bound of a computed ``C_len`` (Eq. 5) in a group of ``m`` channels: ``m``
    (one channel's norm is at most the sum of all), plus float32 rounding of the sum."""
    return m * (1.0 + (m + 4) * 2.0 ** -23)


class EngineHandle:
    """Returned by :meth:`DecayEngine.attach`; ``remove()`` detaches the engine."""

    def __init__(self, engine: "DecayEngine", handles: Sequence):
        self._engine = engine
        self._handles = list(handles)

    def remove(self) -> None:
        for h in self._handles:
            h.remove()
        self._handles = []
        if self._engine._handle is self:
            self._engine._handle = None
            self._engine._optimizer = None


class DecayEngine:
    """Smooth Pruning and Self-Rectifying over groups of parallel channels.

    Adapters decide *what* to prune and call :meth:`mark`; the engine decays the marked
    channels on every optimizer step (once :meth:`attach` ed) and reports which were
    released or zeroed; adapters then remove zeroed channels physically. See the module
    docstring for the exact per-step rules.
    """

    #: tensors with at least this many elements take the sliced path (only the decaying
    #: channels' slices are gathered and written back); smaller ones are stacked by shape
    sliced_min_numel: int = SLICED_MIN_NUMEL
    # (DENSE_MIN_FRACTION, MAX_CELL_SHARE) of dpm_core.sliced; None: those defaults.
    # Tests set it to force the gather or the streaming path on tiny tensors.
    _streaming: tuple[float, float] | None = None
    #: run ``torch.optim.SGD``'s update of large streaming tensors inside the decay's norm
    #: pass (exactly torch's formula, a chunk of rows at a time: :mod:`dpm_core.fused_sgd`);
    #: False leaves every update to the optimizer
    fuse_sgd: bool = True
    #: ... for tensors of at least this many elements: smaller ones stay in the CPU's last
    #: level cache through torch's own step, so running it in chunks gains nothing (measured,
    #: one thread: ViT-B/16's 2.4M-element MLP and attention matrices, fused 412 ms per step
    #: against 382 ms unfused; VGG-11's 103M-element Linear, 360 ms against 490 ms)
    fuse_sgd_min_numel: int = 1 << 23

    def __init__(self, config: DecayConfig | None = None):
        if config is None:
            config = DecayConfig()
        if not isinstance(config, DecayConfig):
            raise TypeError(f"DecayEngine expects a dpm_core.DecayConfig, got "
                            f"{type(config).__name__}; build one with DecayConfig(steps=..., "
                            f"t_rate=..., t_len=..., self_rectify=...)")
        self.config = config
        self._groups: dict[str, Group] = {}
        self._optimizer: torch.optim.Optimizer | None = None
        self._handle: EngineHandle | None = None
        self._pending: dict[str, tuple] = {}
        self._step_layouts: list[StackedLayout] = []
        self._snapped: dict[int, torch.Tensor | None] = {}
        self._layout_cache: dict[torch.device, StackedLayout] = {}
        # group name -> (layout, decaying mask, clean gradient norms) of the last capture
        self._clean: dict[str, tuple] = {}
        self._clean_hooks: list = []
        self._zeroed_cbs: list[Callable] = []
        self._released_cbs: list[Callable] = []
        self._marked_since_step = 0
        self.step_count = 0
        self.counters = {"steps": 0, "marked": 0, "released": 0, "zeroed": 0}
        self.events: list[dict] = []

    # ------------------------------------------------------------------ groups
    def add_group(self, name: str, slices: Iterable) -> None:
        """Register M parallel channels under ``name``; see the module docstring."""
        if not isinstance(name, str) or not name:
            raise ValueError(f"group name must be a non-empty string, got {name!r}")
        if name in self._groups:
            raise ValueError(f"group {name!r} already exists; use a unique name per group "
                             f"(or remove_group({name!r}) first)")
        parsed, m = parse_slices(name, slices)
        group = Group(name, parsed, m, parsed[0].param.device)
        if self._optimizer is not None:
            self._check_held(self._optimizer, [group])
        self._groups[name] = group

    def remove_group(self, name: str) -> None:
        """Forget a group entirely (e.g. its layer was removed)."""
        self._group(name)
        del self._groups[name]
        self._pending.pop(name, None)
        self._clean.pop(name, None)

    def groups(self) -> list[str]:
        return list(self._groups)

    def num_channels(self, name: str) -> int:
        return self._group(name).m

    def group_params(self, name: str) -> list[torch.Tensor]:
        return self._group(name).params()

    def set_slices(self, name: str, slices: Iterable) -> None:
        """Re-point a group at new tensors with the same number of channels."""
        g = self._group(name)
        parsed, _ = parse_slices(name, slices, expect_m=g.m)
        self._replace_slices(g, parsed)

    def replace_param(self, old: torch.Tensor, new: torch.Tensor) -> list[str]:
        """Make every slice that refers to ``old`` refer to ``new`` instead.

        For adapters that replaced a parameter by a physically smaller one: slices along
        a dimension that did not change are re-pointed. A slice along a dimension whose
        size changed cannot be re-pointed here (its channels changed): use
        :meth:`drop_channels` for that group first. Returns the groups touched.
        """
        touched = []
        for g in self._groups.values():
            hit = [s for s in g.slices if s.param is old]
            if not hit:
                continue
            for s in hit:
                if new.dim() != old.dim() or new.shape[s.dim] != old.shape[s.dim]:
                    raise ValueError(
                        f"group {g.name!r}: cannot re-point its slice along dim {s.dim} from "
                        f"a tensor of shape {tuple(old.shape)} to one of shape "
                        f"{tuple(new.shape)}; call drop_channels({g.name!r}, ..., slices=...) "
                        f"for the group whose channels were removed")
            new_slices = [Slice(new, s.dim, s.index, s.k) if s.param is old else s
                          for s in g.slices]
            self._replace_slices(g, new_slices)
            touched.append(g.name)
        if self._optimizer is not None and touched:
            self._check_held(self._optimizer, [self._groups[n] for n in touched])
        return touched

    def _replace_slices(self, g: Group, parsed: list[Slice]) -> None:
        if self._optimizer is not None:
            tmp = Group(g.name, parsed, g.m, g.device)
            self._check_held(self._optimizer, [tmp])
        g.slices = parsed
        g.version = next_layout_version()
        self._pending.pop(g.name, None)
        self._clean.pop(g.name, None)

    def drop_channels(self, name: str, channels, slices: Iterable | None = None) -> None:
        """Forget ``channels`` of a group after an adapter removed them physically.

        ``slices`` (the group's tensors after the removal, with M minus the dropped
        channels) replaces the group's slices; it may be omitted only when every channel
        is dropped, which removes the group.
        """
        g = self._group(name)
        drop = self._channel_index(g, channels)
        keep = torch.ones(g.m, dtype=torch.bool, device=g.device)
        keep[drop] = False
        new_m = int(keep.sum())
        if new_m == 0:
            self.remove_group(name)
            return
        if slices is None:
            raise ValueError(f"drop_channels({name!r}): pass slices= for the {new_m} channels "
                             f"that remain (the group's tensors after the removal)")
        parsed, _ = parse_slices(name, slices, expect_m=new_m)
        self._replace_slices(g, parsed)
        g.m = new_m
        g.decaying = g.decaying[keep]
        g.zeroed = g.zeroed[keep]
        g.n_step = g.n_step[keep]
        g.l_init = g.l_init[keep]
        g.recount()

    def _group(self, name: str) -> Group:
        try:
            return self._groups[name]
        except KeyError:
            raise KeyError(f"no group named {name!r}; known groups: "
                           f"{list(self._groups)[:10]}{'...' if len(self._groups) > 10 else ''}"
                           ) from None

    def _channel_index(self, g: Group, channels) -> torch.Tensor:
        if isinstance(channels, torch.Tensor):
            ch = channels.to(g.device)
        else:
            ch = torch.as_tensor(list(channels), device=g.device)
        if ch.dtype == torch.bool:
            if ch.shape != (g.m,):
                raise ValueError(f"group {g.name!r}: a bool channel mask must have shape "
                                 f"[{g.m}], got {tuple(ch.shape)}")
            return ch.nonzero().squeeze(1)
        if ch.numel() == 0:
            return torch.zeros(0, dtype=torch.int64, device=g.device)
        if ch.is_floating_point() or ch.dim() > 1:
            raise ValueError(f"group {g.name!r}: channels must be integer indices or a bool "
                             f"mask, got {ch.dtype} of shape {tuple(ch.shape)}")
        ch = ch.long().reshape(-1)
        if int(ch.min()) < 0 or int(ch.max()) >= g.m:
            raise ValueError(f"group {g.name!r}: channel indices must lie in [0, {g.m}), got "
                             f"range [{int(ch.min())}, {int(ch.max())}]")
        return torch.unique(ch)

    # ------------------------------------------------------------------ decisions
    @torch.no_grad()
    def mark(self, name: str, channels) -> torch.Tensor:
        """Start decaying ``channels`` of group ``name`` (Algorithm 1).

        Returns the channels that started decaying now (already decaying or zeroed
        channels are skipped; channels with norm 0 are zeroed at once).
        """
        g = self._group(name)
        ch = self._channel_index(g, channels)
        ch = ch[~(g.decaying[ch] | g.zeroed[ch])]
        if ch.numel() == 0:
            return ch
        norms = g.sq_norms()[ch].sqrt()
        if not bool(torch.isfinite(norms).all()):
            bad = ch[~torch.isfinite(norms)].tolist()
            raise ValueError(f"group {name!r}: channels {bad[:10]} have non-finite weights; "
                             f"the model is already corrupted, fix the training before pruning")
        empty = norms == 0
        zero_now = ch[empty]
        start = ch[~empty]
        g.decaying[start] = True
        g.n_step[start] = 0
        g.l_init[start] = norms[~empty]
        if zero_now.numel():
            g.zeroed[zero_now] = True
            g.n_step[zero_now] = self.config.steps
        g.recount()
        # a pending snapshot (mark() between the step hooks) stays valid: the post-hook
        # only acts on channels that were decaying at the pre-hook
        self._marked_since_step += int(ch.numel())
        self.counters["marked"] += int(ch.numel())
        if zero_now.numel():
            self.counters["zeroed"] += int(zero_now.numel())
            for cb in self._zeroed_cbs:
                cb(name, zero_now)
        return start

    def state(self, name: str) -> ChannelState:
        g = self._group(name)
        return ChannelState(g.decaying.clone(), g.zeroed.clone(), g.n_step.clone(),
                            g.l_init.clone())

    def is_decaying(self, name: str) -> torch.Tensor:
        return self._group(name).decaying.clone()

    def zeroed_channels(self, name: str) -> torch.Tensor:
        return self._group(name).zeroed.nonzero().squeeze(1)

    def decaying_channels(self, name: str) -> torch.Tensor:
        return self._group(name).decaying.nonzero().squeeze(1)

    def any_decaying(self) -> bool:
        return any(g.n_decaying for g in self._groups.values())

    def on_zeroed(self, callback: Callable[[str, torch.Tensor], None]) -> None:
        """Call ``callback(group_name, channels)`` whenever channels become zeroed."""
        self._zeroed_cbs.append(callback)

    def on_released(self, callback: Callable[[str, torch.Tensor], None]) -> None:
        """Call ``callback(group_name, channels)`` whenever channels are released by SR."""
        self._released_cbs.append(callback)

    @torch.no_grad()
    def zero_now(self, name: str, channels=None) -> torch.Tensor:
        """Zero decaying channels at once (e.g. ``finalize(force=True)``); all if None."""
        g = self._group(name)
        ch = g.decaying.nonzero().squeeze(1) if channels is None else \
            self._channel_index(g, channels)
        ch = ch[g.decaying[ch]]
        if ch.numel() == 0:
            return ch
        g.decaying[ch] = False
        g.zeroed[ch] = True
        g.n_step[ch] = self.config.steps
        g.recount()
        g.write_zeros()
        self.counters["zeroed"] += int(ch.numel())
        for cb in self._zeroed_cbs:
            cb(name, ch)
        return ch

    # ------------------------------------------------------------------ optimizer
    def attach(self, optimizer: torch.optim.Optimizer) -> EngineHandle:
        """Drive the engine from ``optimizer``'s own step hooks; returns a handle."""
        optimizer = unwrap_optimizer(optimizer)   # accelerate / Trainer wrappers
        if self._optimizer is not None:
            if self._optimizer is optimizer:
                return self._handle
            raise RuntimeError("this engine is already attached to another optimizer; call "
                               "remove() on the handle attach() returned before attaching again")
        self._check_held(optimizer, self._groups.values())
        h1 = optimizer.register_step_pre_hook(self._pre_step)
        h2 = optimizer.register_step_post_hook(self._post_step)
        self._optimizer = optimizer
        self._handle = EngineHandle(self, [h1, h2])
        return self._handle

    @property
    def optimizer(self) -> torch.optim.Optimizer | None:
        return self._optimizer

    def check_optimizer(self, optimizer: torch.optim.Optimizer | None = None) -> None:
        """Raise if a group's tensors are not held by ``optimizer`` (default: attached)."""
        opt = optimizer or self._optimizer
        if opt is not None:
            self._check_held(opt, self._groups.values())

    @staticmethod
    def _check_held(optimizer, groups) -> None:
        held = {id(p) for pg in optimizer.param_groups for p in pg["params"]}
        for g in groups:
            for s in g.slices:
                if id(s.param) not in held:
                    raise ValueError(
                        f"group {g.name!r}: a tensor of shape {tuple(s.param.shape)} is not "
                        f"among the attached optimizer's parameters, so its decay would never "
                        f"run; build the optimizer from model.parameters() (after any pruning "
                        f"that replaced parameters) or re-point the group with set_slices()")

    @torch.no_grad()
    def capture_clean_grads(self) -> None:
        """Record the current, penalty-free gradients of decaying channels.

        Call after ``loss.backward()`` and before adding a sparsity penalty to ``.grad``.
        At the next optimizer step the engine writes these gradients back for the
        decaying channels (so their update and the SR criteria ignore the penalty) and
        computes C_len from them.

        A capture is valid for the step of the iteration that made it only: if another
        backward pass accumulates into one of its tensors first (e.g. the scaler skipped
        that step and training went on), it is discarded rather than replayed.
        """
        self._discard_clean()
        groups = list(self._active(decaying_only=True))
        if not groups:
            return
        hooks, hooked = [], set()
        for layout in self._layouts_for(groups):
            layout.set_regions(torch.cat([g.decaying for g in layout.groups]))
            gnorms = layout.grad_sq_norms(keep=True).sqrt().split(layout.sizes)
            for g, gn in zip(layout.groups, gnorms):
                self._clean[g.name] = (layout, g.decaying.clone(), gn)
            for p in layout.params():
                if p.requires_grad and id(p) not in hooked:
                    hooked.add(id(p))
                    hooks.append(p.register_post_accumulate_grad_hook(self._on_new_backward))
        self._clean_hooks = hooks

    def _on_new_backward(self, param) -> None:
        self._discard_clean()

    def _discard_clean(self) -> None:
        for h in getattr(self, "_clean_hooks", ()):
            h.remove()
        self._clean_hooks = []
        self._clean = {}

    def _active(self, decaying_only: bool = False):
        for g in self._groups.values():
            if g.n_decaying or (not decaying_only and g.n_zeroed):
                yield g

    def _restore_clean(self, clean: dict) -> dict[str, torch.Tensor]:
        """Write captured gradients back for the channels that were decaying at capture.

        Groups whose slices changed since the capture were dropped from ``clean`` and are
        not restored. Returns the captured gradient norms by group name.
        """
        gnorms: dict[str, torch.Tensor] = {}
        layouts: dict[int, tuple] = {}
        for name, (layout, mask, gn) in clean.items():
            gnorms[name] = gn
            layouts.setdefault(id(layout), (layout, {}))[1][name] = mask
        for layout, masks in layouts.values():
            if not layout.shapes_unchanged():
                continue
            sel = torch.cat([masks[g.name] if g.name in masks else
                             torch.zeros(g.m, dtype=torch.bool, device=layout.device)
                             for g in layout.groups])
            layout.restore_grads(sel)
        return gnorms

    def _layouts_for(self, groups: list[Group]) -> list[StackedLayout]:
        """The stacked layouts (one per device) of ``groups``, rebuilt only on change."""
        by_device: dict[torch.device, list[Group]] = {}
        for g in groups:
            by_device.setdefault(g.device, []).append(g)
        layouts = []
        for dev, gs in by_device.items():
            layout = self._layout_cache.get(dev)
            if layout is None or not layout.valid_for(StackedLayout.key_of(gs)):
                layout = StackedLayout(gs, self.sliced_min_numel, self._streaming)
                self._layout_cache[dev] = layout
            layouts.append(layout)
        return layouts

    @torch.no_grad()
    def _pre_step(self, optimizer, args, kwargs) -> None:
        # a step that raised after the last pre-hook never reached the post-hook: give
        # back the gradients it deferred (its update did not happen, as with torch alone)
        for layout in self._step_layouts:
            for t in layout.sliced:
                if t.deferred is not None:
                    if t.param.grad is None:
                        t.param.grad = t.deferred.grad
                    t.deferred = None
        self._pending = {}
        self._step_layouts = []
        clean = self._clean
        self._discard_clean()
        groups = list(self._active(decaying_only=True))
        if not groups:
            self._layout_cache.clear()  # free the stacked buffers while nothing decays
            return
        sr = self.config.self_rectify
        gnorms = self._restore_clean(clean)
        self._step_layouts = self._layouts_for(groups)
        self._snapped = {}
        t_len = self.config.t_len
        for layout in self._step_layouts:
            decaying = torch.cat([g.decaying for g in layout.groups])
            need = None
            if sr:
                # C_len <= M (one channel's gradient norm is at most the sum of all M):
                # in a group with T_len >= M no channel can pass Eq. 6, so its gradient
                # is not read (see "Self-Rectifying reads only what Eq. 6 can use")
                hopeless = [t_len >= _max_c_len(g.m) for g in layout.groups]
                if not all(hopeless) and any(g.name not in gnorms for g, h in
                                             zip(layout.groups, hopeless) if not h):
                    per_group = layout.grad_sq_norms().sqrt().split(layout.sizes)
                    for g, gn in zip(layout.groups, per_group):
                        gnorms.setdefault(g.name, gn)
                for g, h in zip(layout.groups, hopeless):
                    if h:
                        gnorms[g.name] = torch.zeros(g.m, device=g.device)
                gn = torch.cat([gnorms[g.name] for g in layout.groups])
                c_len = F.relative_grad_length(gn, layout.segments, len(layout.groups))
                # only a channel whose C_len passes T_len can be released (Eq. 6): only
                # those need x for C_rate
                need = decaying & (c_len > t_len)
                if not bool(need.any()):
                    need = None
            # the sliced tensors work on the slices of the channels decaying now
            layout.set_regions(decaying, need if need is not None else
                               torch.zeros_like(decaying))
            if need is not None:
                layout.snapshot()
            self._snapped[id(layout)] = need
            for g in layout.groups:
                self._pending[g.name] = (g.decaying.clone(), gnorms.get(g.name))
        if self.fuse_sgd:
            # last, once nothing else reads .grad: the fused updates take it off
            blocked = {id(s.param) for g in self._groups.values() if g.n_zeroed
                       for s in g.slices}
            for layout in self._step_layouts:
                layout.defer_updates(optimizer, args, kwargs, blocked, self.fuse_sgd_min_numel)

    @torch.no_grad()
    def _post_step(self, optimizer, args, kwargs) -> None:
        sr = self.config.self_rectify
        released_total = zeroed_total = 0
        # zeroed channels first: their elements are exact zeros before anything is
        # measured, so a decaying channel sharing elements with them sees them as 0
        for g in self._active():
            g.write_zeros()  # (tensors with zeroed channels never defer their update)
        try:
            for layout in self._step_layouts:
                # groups whose slices changed (or that were removed) between the hooks are
                # left out of this step: their snapshot no longer matches their tensors
                pend = [self._pending.get(g.name) if self._groups.get(g.name) is g else None
                        for g in layout.groups]
                if not any(p is not None for p in pend):
                    continue
                # every group is measured before any is scaled, so groups sharing a tensor
                # all see x~ (measure also runs the deferred optimizer updates)
                need = self._snapped.get(id(layout))
                norms = layout.measure(with_old=need is not None)
                r, z = self._decay(layout, pend, norms, need)
                released_total += r
                zeroed_total += z
        finally:
            # every deferred update happens and every .grad comes back, whatever happened
            for layout in self._step_layouts:
                layout.finish_updates()
        self._pending = {}
        self._step_layouts = []
        self._snapped = {}
        self.step_count += 1
        self.counters["steps"] += 1
        decaying = sum(g.n_decaying for g in self._groups.values())
        if decaying or released_total or zeroed_total or self._marked_since_step:
            self.events.append({"step": self.step_count, "decaying": decaying,
                                "released": released_total, "zeroed": zeroed_total,
                                "marked": self._marked_since_step})
        self._marked_since_step = 0

    def _decay(self, layout: StackedLayout, pend: list, norms: torch.Tensor,
               need: torch.Tensor | None = None) -> tuple[int, int]:
        """Algorithm 2 for every channel of every group of ``layout`` in one pass.

        ``pend`` holds each group's pre-hook snapshot (decaying mask, gradient norms), or
        None for a group left out of this step; ``norms`` is ``[3, C]`` (``||x~||``,
        ``||x||``, ``||x~ - x||``; the last two valid where ``need``, the channels whose
        ``x`` was kept) or ``[1, C]`` (``||x~||``; no channel could pass Eq. 6, or no
        SR). Per-channel quantities of all groups are concatenated; decisions are masked
        to the channels that were decaying at the pre-hook (and still are: ``zero_now``
        between the hooks wins).
        """
        cfg = self.config
        groups = layout.groups
        sizes = layout.sizes
        seg = layout.segments
        dev = layout.device
        live = [p is not None for p in pend]

        def per_group(get, fill, dtype):  # placeholders for groups left out
            return torch.cat([get(g, p) if p is not None else
                              torch.full((n,), fill, dtype=dtype, device=dev)
                              for g, p, n in zip(groups, pend, sizes)])

        dec_all = per_group(lambda g, p: p[0] & g.decaying, False, torch.bool)
        norm_new = norms[0]
        l_init = per_group(lambda g, p: g.l_init, 0.0, torch.float32)
        n_step = per_group(lambda g, p: g.n_step, 0, torch.int64)
        finite = torch.isfinite(norm_new)
        if cfg.self_rectify:
            if need is None:  # C_len <= T_len everywhere: C_rate cannot matter
                norm_old, norm_delta = norm_new, torch.zeros_like(norm_new)
            else:
                norm_old = torch.where(need, norms[1], norm_new)
                norm_delta = torch.where(need, norms[2], torch.zeros_like(norm_new))
            gnorm = per_group(lambda g, p: p[1], 0.0, torch.float32)
            finite &= torch.isfinite(norm_old) & torch.isfinite(gnorm)
            c_len = F.relative_grad_length(gnorm, seg, len(groups))
            c_rate = F.escaping_rate(norm_new, norm_old, norm_delta)
            release = dec_all & finite & F.release_condition(c_rate, c_len, cfg.t_rate,
                                                             cfg.t_len)
        else:
            release = torch.zeros_like(dec_all)
        go = dec_all & finite & ~release
        factor, n_next, zero = F.decay_step(norm_new, l_init, n_step, cfg.steps)
        zero &= go
        n_step = torch.where(go, n_next, torch.where(release, torch.zeros_like(n_next), n_step))
        bad = dec_all & ~finite
        # x <- x~ * factor (Eq. 1) for the channels brought down to a target this step;
        # elements shared by several of them: see "Shared elements" in the docstring
        scaled = go & (factor < 1)
        factor = torch.where(scaled, factor, torch.ones_like(factor))
        layout.apply(factor, scaled)
        counts = torch.zeros(3, len(groups), dtype=torch.int64, device=dev)
        counts.index_add_(1, seg, torch.stack([release, zero, bad]).long())
        n_rel, n_zero, n_bad = counts.tolist()
        for g, ok, nn in zip(groups, live, n_step.split(sizes)):
            if ok:
                g.n_step = nn
        for i, g in enumerate(groups):
            if not (n_rel[i] or n_zero[i]):
                continue
            r, z = release[seg == i], zero[seg == i]
            g.decaying = g.decaying & ~(r | z)
            g.zeroed = g.zeroed | z
            g.n_decaying -= n_rel[i] + n_zero[i]
            g.n_zeroed += n_zero[i]
            if n_zero[i]:
                self.counters["zeroed"] += n_zero[i]
                idx = z.nonzero().squeeze(1)
                g.write_zeros(idx)  # exact zeros even where x~ was not finite
                for cb in self._zeroed_cbs:
                    cb(g.name, idx)
            if n_rel[i]:
                self.counters["released"] += n_rel[i]
                idx = r.nonzero().squeeze(1)
                for cb in self._released_cbs:
                    cb(g.name, idx)
        if sum(n_bad):
            desc = ", ".join(f"{g.name} ({b})" for g, b in zip(groups, n_bad) if b)
            warnings.warn(f"DPM step {self.step_count + 1}: non-finite gradient or weights in "
                          f"decaying channels of {desc}; left as the optimizer produced them "
                          f"for this step, decay continues at the next finite step",
                          RuntimeWarning, stacklevel=4)
        return sum(n_rel), sum(n_zero)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Everything needed to resume mid-decay exactly (tensors are copied, on CPU)."""
        return {
            "version": _STATE_VERSION,
            "config": self.config.to_dict(),
            "step_count": self.step_count,
            "counters": dict(self.counters),
            "events": [dict(e) for e in self.events],
            "marked_since_step": self._marked_since_step,
            "groups": {
                name: {
                    "m": g.m,
                    "layout": [s.layout() for s in g.slices],
                    "decaying": g.decaying.cpu().clone(),
                    "zeroed": g.zeroed.cpu().clone(),
                    "n_step": g.n_step.cpu().clone(),
                    "l_init": g.l_init.cpu().clone(),
                }
                for name, g in self._groups.items()
            },
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` into an engine holding the same groups."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a DecayEngine state_dict of version {_STATE_VERSION} "
                             f"(got {type(state).__name__} with version "
                             f"{state.get('version') if isinstance(state, dict) else None})")
        saved_steps = state["config"]["steps"]
        if saved_steps != self.config.steps:
            raise ValueError(f"the checkpoint was made with steps={saved_steps} but this "
                             f"engine has steps={self.config.steps}; step counters would be "
                             f"wrong. Build the engine with the checkpoint's DecayConfig")
        groups = state["groups"]
        if list(groups) != list(self._groups):
            missing = [n for n in groups if n not in self._groups]
            extra = [n for n in self._groups if n not in groups]
            raise ValueError(f"group layout mismatch: checkpoint groups missing here "
                             f"{missing[:5]}, groups here not in checkpoint {extra[:5]}; "
                             f"register the same groups (same model shape) before loading")
        for name, gs in groups.items():
            g = self._groups[name]
            layout = [tuple(x) if not isinstance(x, tuple) else x for x in gs["layout"]]
            mine = [s.layout() for s in g.slices]
            if gs["m"] != g.m or [_norm_layout(x) for x in layout] != \
                    [_norm_layout(x) for x in mine]:
                raise ValueError(f"group {name!r}: checkpoint layout (M={gs['m']}, "
                                 f"{layout}) does not match this model's (M={g.m}, {mine}); "
                                 f"load into a model of the same shape")
        for name, gs in groups.items():
            g = self._groups[name]
            g.decaying = gs["decaying"].to(g.device, torch.bool).clone()
            g.zeroed = gs["zeroed"].to(g.device, torch.bool).clone()
            g.n_step = gs["n_step"].to(g.device, torch.int64).clone()
            g.l_init = gs["l_init"].to(g.device, torch.float32).clone()
            g._zero_pos = None
            g.recount()
            self.step_count = int(state["step_count"])
        self.counters = dict(state["counters"])
        self.events = [dict(e) for e in state["events"]]
        self._marked_since_step = int(state.get("marked_since_step", 0))
        self._pending = {}
        self._step_layouts = []
        self._discard_clean()


def _norm_layout(x) -> tuple:
    shape, dim, k = x
    return (tuple(shape), int(dim), int(k))
