"""Decay-then-remove pruners for Torch-Pruning (DepGraph), paper section 4.2.

``DecayXPruner(..., decay=DecayConfig(...))`` takes the base pruner's arguments and
behaves like it, except that a pruning step does not delete the selected channels:
every parameter slice ``group.prune()`` would delete (the producing layer's filters and
bias, its norm layer, the consumers' input slices, Flatten -> Linear columns included)
becomes ONE DPM channel in a :class:`dpm_core.DecayEngine`, which decays it to exactly
zero over the next ``decay.steps`` optimizer steps (Smooth Pruning) or releases it when
its gradient resists (Self-Rectifying). Channels that reached zero are removed through
DepGraph at the next ``step()`` and in ``finalize()``; the attached optimizer is
re-pointed at the new, smaller parameters with its state sliced.

Only two lines of a Torch-Pruning script change::

    pruner = DecayGroupNormPruner(model, example_inputs, importance=imp,
                                  pruning_ratio=0.5, iterative_steps=5,
                                  decay=DecayConfig(steps=5))         # 1: class + decay
    pruner.attach(optimizer)                                          # 2: new line

and ``pruner.finalize()`` after the last step removes what has decayed.
"""

from __future__ import annotations

import copy
import math
import types
import warnings
from typing import Callable

import torch
import torch.nn as nn
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.pruner.algorithms.base_pruner import BasePruner
from torch_pruning.pruner.importance import GroupMagnitudeImportance

from dpm_core import DecayConfig, DecayEngine
from dpm_core.optim_utils import unwrap_optimizer

from ._slices import GroupLayout, UnsupportedGroupError, apply_removal, group_layout

__all__ = ["DecayPrunerMixin", "decay_pruner", "DecayMetaPruner", "DecayGroupNormPruner",
           "DecayBNScalePruner", "DecayGroup", "UnsupportedGroupError"]

_STATE_VERSION = 1
_TRACE_FRAMES = {"build_dependency", "_trace", "_trace_computational_graph", "_build_dependency"}


class DecayGroup(tp.dependency.Group):
    """A DepGraph group yielded by ``step(interactive=True)``: its ``prune()`` starts the
    decay of the group's selected channels instead of deleting them."""

    _decay_pruner = None

    @classmethod
    def _wrap(cls, group, pruner) -> "DecayGroup":
        g = cls.__new__(cls)
        g.__dict__.update(group.__dict__)
        g._decay_pruner = pruner
        return g

    def prune(self, idxs=None, record_history=True):  # noqa: D401 - Torch-Pruning's name
        """Start decaying the selected channels (``idxs``: root channels; default: the
        group's own). Nothing is deleted now; see :meth:`DecayPrunerMixin.finalize`."""
        self._decay_pruner._start_decay(self, idxs)


def _from_trace(exc: BaseException) -> bool:
    tb = exc.__traceback__
    while tb is not None:
        if tb.tb_frame.f_code.co_name in _TRACE_FRAMES:
            return True
        tb = tb.tb_next
    return False


class DecayPrunerMixin:
    """Turns a Torch-Pruning pruner into a decay pruner; see the module docstring.

    Put it first in the bases (``class X(DecayPrunerMixin, tp.pruner.SomePruner)``) or use
    :func:`decay_pruner`.

    Attributes:
        engine: the :class:`dpm_core.DecayEngine` holding one group per DepGraph group,
            named after the group's root layer (``model.named_modules()`` name).
        optimizer: the attached optimizer (``None`` before :meth:`attach`).
        removed: ``{group name: number of channels removed physically so far}``.
        removals: how many physical removals happened (increases by one per ``step()`` or
            ``finalize()`` that removed anything; a DistributedDataParallel wrapper must be
            rebuilt when it changes, see :meth:`on_removed`).
    """

    def __init__(self, *args, decay: DecayConfig | None = None, **kwargs):
        if decay is None:
            decay = DecayConfig()
        if not isinstance(decay, DecayConfig):
            hint = " (use decay=DecayConfig(**your_dict))" if isinstance(decay, dict) else ""
            raise TypeError(f"{type(self).__name__}: decay must be a dpm_core.DecayConfig, got "
                            f"{type(decay).__name__}{hint}; e.g. decay=DecayConfig(steps=5, "
                            f"t_rate=0.3, t_len=0.8)")
        model = kwargs.get("model", args[0] if args else None)
        if not isinstance(model, nn.Module):
            raise TypeError(f"{type(self).__name__}: the first argument must be the nn.Module to "
                            f"prune, got {type(model).__name__}")
        if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
            raise TypeError(f"{type(self).__name__}: pass the wrapped model (ddp.module), not the "
                            f"{type(model).__name__} wrapper; re-wrap it after physical removals "
                            f"(see on_removed)")
        try:
            super().__init__(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            if _from_trace(e):
                raise RuntimeError(
                    f"{type(self).__name__}: Torch-Pruning could not trace the model with the "
                    f"given example_inputs ({type(e).__name__}: {e}). Check that "
                    f"example_inputs run through model(example_inputs) (right shape, dtype and "
                    f"device, and grad enabled), pass forward_fn= for models that need other "
                    f"calling conventions or output_transform= for non-tensor outputs") from e
            raise
        self.decay = decay
        self.engine = DecayEngine(decay)
        self.optimizer = None
        self._engine_handle = None
        self._in_selection = False
        self._last_step_at: int | None = None
        self._dead_counts: dict | None = None
        self._probe_cache: dict = {}
        self._roots: dict[str, tuple] = {}      # engine name -> (root module, root out-fn)
        self._root_names: dict[int, str] = {}   # id(root module) -> engine name
        self._coverage: dict[str, list] = {}
        self._removed_cbs: list[Callable] = []
        self.removed: dict[str, int] = {}
        self.removals = 0
        self._register_groups()
        if not self._roots:
            raise ValueError(f"{type(self).__name__}: found no prunable group in the model (no "
                             f"Conv/Linear layer outside ignored_layers whose output channels "
                             f"Torch-Pruning can prune); check root_module_types and "
                             f"ignored_layers")

    # ------------------------------------------------------------------ groups
    def _root_name(self, module) -> str:
        return self.DG._module2name.get(module) or f"<{type(module).__name__}@{id(module):x}>"

    def _full_group(self, module, fn):
        return self.DG.get_pruning_group(module, fn, list(range(self.DG.get_out_channels(module))))

    def _layout(self, name: str) -> GroupLayout:
        module, fn = self._roots[name]
        return group_layout(self.DG, self._full_group(module, fn), name, self._probe_cache)

    def _register_groups(self) -> None:
        skipped = []
        for group in list(self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                 root_module_types=self.root_module_types)):
            try:
                self._register(group)
            except UnsupportedGroupError as e:
                # Not expressible as DPM channels: leave the whole group unpruned (as if its
                # root were in ignored_layers) rather than remove it abruptly.
                root = group[0].dep.target.module
                self.ignored_layers.append(root)
                skipped.append(f"{self._root_name(root)} ({e})")
        if skipped:
            warnings.warn(
                f"{type(self).__name__}: {len(skipped)} group(s) cannot be decayed and will not be "
                f"pruned: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}. Put their "
                f"root layers in ignored_layers to silence this warning", UserWarning, stacklevel=3)

    def _register(self, group) -> str:
        module, fn = group[0].dep.target.module, group[0].dep.handler
        name = self._root_name(module)
        if name in self._roots:
            return name
        layout = group_layout(self.DG, group, name, self._probe_cache)
        if not layout.slices:
            return name   # nothing parameterised to decay (Torch-Pruning skips it as well)
        self.engine.add_group(name, layout.slices)
        self._roots[name] = (module, fn)
        self._root_names[id(module)] = name
        self._coverage[name] = layout.coverage
        return name

    def _name_of(self, group) -> str | None:
        return self._root_names.get(id(group[0].dep.target.module))

    def _dead(self, name: str) -> torch.Tensor:
        st = self.engine.state(name)
        return st.decaying | st.zeroed

    # ------------------------------------------------------------------ optimizer
    def attach(self, optimizer: torch.optim.Optimizer):
        """Tie the pruner to the optimizer used for fine-tuning (its step hooks drive the
        decay; physical removals re-point it at the new parameters). Returns ``self``."""
        optimizer = unwrap_optimizer(optimizer)   # accelerate / Trainer wrappers
        if self.optimizer is optimizer:
            return self
        held = {id(p) for pg in optimizer.param_groups for p in pg["params"]}
        names = {id(p): n for n, p in self.model.named_parameters()}
        missing = []
        for gname in self.engine.groups():
            for p in self.engine.group_params(gname):
                if id(p) not in held and names.get(id(p), "?") not in missing:
                    missing.append(names.get(id(p), f"<tensor {tuple(p.shape)}>"))
        if missing:
            if not any(id(p) in held for p in self.model.parameters()):
                raise ValueError(
                    "attach(): the optimizer holds none of the model's parameters. Build it "
                    "from the model given to the pruner, after creating the pruner, e.g. "
                    "torch.optim.SGD(model.parameters(), lr=...), then call "
                    "pruner.attach(optimizer)")
            raise ValueError(
                f"attach(): the optimizer does not hold {len(missing)} parameter(s) the pruner "
                f"may decay: {missing[:8]}{'...' if len(missing) > 8 else ''}. Give the optimizer "
                f"all of model.parameters(), or put the layers you freeze in ignored_layers")
        if self._engine_handle is not None:
            self._engine_handle.remove()
        self._engine_handle = self.engine.attach(optimizer)
        self.optimizer = optimizer
        return self

    def detach(self) -> None:
        """Stop driving the decay from the optimizer (decay state is kept)."""
        if self._engine_handle is not None:
            self._engine_handle.remove()
        self._engine_handle = None
        self.optimizer = None

    def _require_attached(self, what: str) -> None:
        if self.optimizer is None:
            raise RuntimeError(
                f"{what} before attach(): call pruner.attach(optimizer) with the optimizer you "
                f"fine-tune with first; the decay runs inside its step() and physical removal "
                f"must re-point it at the new parameters")

    def on_removed(self, callback: Callable) -> None:
        """Call ``callback(pruner, removed)`` after each physical removal (``removed``:
        ``{group name: LongTensor of removed channels}``); e.g. to rebuild a
        DistributedDataParallel wrapper, which does not follow replaced parameters."""
        self._removed_cbs.append(callback)

    # ------------------------------------------------------------------ selection
    def _live_dead_counts(self) -> dict:
        """``{(id(module), 'out'|'in'): number of channels owned by decaying/zeroed
        channels}`` over all groups (a consumer may be fed by several groups)."""
        counts: dict = {}
        for name in self.engine.groups():
            dead = self._dead(name)
            if not bool(dead.any()):
                continue
            d = dead.long()
            for module, is_out, is_in, per_root in self._coverage.get(name, []):
                n = int((per_root.to(d.device) * d).sum())
                if is_out:
                    counts[(id(module), "out")] = counts.get((id(module), "out"), 0) + n
                if is_in:
                    counts[(id(module), "in")] = counts.get((id(module), "in"), 0) + n
        return counts

    def _check_pruning_ratio(self, group) -> bool:
        # Torch-Pruning's rule (stop at max_pruning_ratio or one channel) on LIVE channels:
        # decaying and zeroed channels count as pruned already.
        if not self._in_selection or not self._dead_counts:
            return super()._check_pruning_ratio(group)
        for dep, _ in group:
            module, fn = dep.target.module, dep.handler
            if dep.target.type == ops.OPTYPE.PARAMETER:
                continue
            if self.DG.is_out_channel_pruning_fn(fn):
                ch, init, kind = self.DG.get_out_channels(module), self.layer_init_out_ch, "out"
            elif self.DG.is_in_channel_pruning_fn(fn):
                ch, init, kind = self.DG.get_in_channels(module), self.layer_init_in_ch, "in"
            else:
                continue
            if ch is None:
                continue
            live = ch - self._dead_counts.get((id(module), kind), 0)
            if live < init[module] * (1 - self.max_pruning_ratio) or live <= 1:
                return False
        return True

    def estimate_importance(self, group) -> torch.Tensor:
        imp = super().estimate_importance(group)
        if not self._in_selection or imp is None:
            return imp
        name = self._name_of(group)
        if name is None:
            return imp
        dead = self._dead(name)
        if not bool(dead.any()) or dead.numel() != imp.numel():
            return imp
        dead = dead.to(imp.device)
        scorer = self.importance
        norm = getattr(scorer, "normalizer", None)
        if isinstance(scorer, GroupMagnitudeImportance) and norm is not None:
            # Normalise over the live channels only, as if the decaying/zeroed ones were
            # already removed (they are, as far as the pruning target is concerned).
            scorer.normalizer = None
            try:
                raw = super().estimate_importance(group)
            finally:
                scorer.normalizer = norm
            live_imp = scorer._normalize(raw[~dead].float(), norm)
            imp = torch.empty_like(raw, dtype=torch.float32)
            imp[~dead] = live_imp
        else:
            imp = imp.clone().float()
        # -inf: the base pruner's top-k takes them first, so they fill their share of the
        # step's target; _start_decay skips them (they are decaying or zeroed already).
        imp[dead] = -math.inf
        return imp

    def _prune(self):
        self._dead_counts = self._live_dead_counts()
        gen = super()._prune()
        while True:
            self._in_selection = True
            try:
                group = next(gen)
            except StopIteration:
                return
            finally:
                self._in_selection = False
            yield group

    def _start_decay(self, group, idxs=None) -> torch.Tensor:
        name = self._name_of(group)
        if name is None:
            name = self._register(self._full_group(group[0].dep.target.module,
                                                   group[0].dep.handler))
            if name not in self._roots:
                return torch.zeros(0, dtype=torch.long)
        chans = list(group[0].idxs) if idxs is None else list(idxs)
        if not chans:
            return torch.zeros(0, dtype=torch.long)
        return self.engine.mark(name, chans)   # skips decaying / zeroed channels

    # ------------------------------------------------------------------ step
    def step(self, interactive: bool = False):
        """One iterative pruning step: physically remove channels that reached zero, then
        select channels like the base pruner and start their decay. With
        ``interactive=True`` returns a generator of :class:`DecayGroup` whose ``prune()``
        starts the decay."""
        self._require_attached("step()")
        if self._last_step_at is not None and self.engine.step_count == self._last_step_at \
                and self.engine.any_decaying():
            warnings.warn(
                "pruner.step(): the attached optimizer has not stepped since the last pruning "
                "step, so nothing has decayed. If you built a new optimizer, call "
                "pruner.attach(new_optimizer) (the decay runs in the attached optimizer's step; "
                "with the decay pruners there is no need to rebuild it after pruning)",
                RuntimeWarning, stacklevel=2)
        self._remove(force=False)
        self._last_step_at = self.engine.step_count
        self.current_step += 1
        if interactive:
            return (DecayGroup._wrap(g, self) for g in self._prune())
        for group in self._prune():
            self._start_decay(group)
        return None

    def finalize(self, force: bool = False) -> dict:
        """Remove every zeroed channel physically. ``force=True`` first zeroes the channels
        still decaying (their decay ends now), so the model reaches its final size.

        Returns ``{"removed": {group: n}, "still_decaying": n}``.
        """
        self._require_attached("finalize()")
        if force:
            for name in self.engine.groups():
                self.engine.zero_now(name)
        removed = self._remove(force=force)
        still = sum(int(self.engine.is_decaying(n).sum()) for n in self.engine.groups())
        if still:
            warnings.warn(f"finalize(): {still} channel(s) are still decaying and were kept; run "
                          f"more optimizer steps first or call finalize(force=True)",
                          RuntimeWarning, stacklevel=2)
        return {"removed": {k: int(v.numel()) for k, v in removed.items()},
                "still_decaying": still}

    def _remove(self, force: bool) -> dict:
        plan = {}
        for name in self.engine.groups():
            z = self.engine.zeroed_channels(name)
            if z.numel():
                plan[name] = z.cpu()
        if not plan:
            return {}
        replaced = []
        for name, chans in plan.items():
            module, fn = self._roots[name]
            if chans.numel() >= self.DG.get_out_channels(module):
                raise RuntimeError(f"group {name!r}: every channel is zeroed; refusing to remove "
                                   f"the whole layer (use ignored_layers or a lower pruning "
                                   f"ratio)")
            replaced += apply_removal(self.DG, self.model, module, fn, chans.tolist(),
                                      self.optimizer, self._probe_cache)
            self.removed[name] = self.removed.get(name, 0) + int(chans.numel())
        changed = {id(old) for old, _ in replaced}
        for name in list(self.engine.groups()):
            if name in plan:
                layout = self._layout(name)
                self.engine.drop_channels(name, plan[name], slices=layout.slices)
                self._coverage[name] = layout.coverage
            elif any(id(p) in changed for p in self.engine.group_params(name)):
                layout = self._layout(name)
                self.engine.set_slices(name, layout.slices)
                self._coverage[name] = layout.coverage
        self.update_regularizer()   # regularizers cache groups with the old indices
        self.removals += 1
        for cb in self._removed_cbs:
            cb(self, plan)
        return plan

    # ------------------------------------------------------------------ sparse learning
    def regularize(self, model, *args, **kwargs):
        """The base pruner's penalty, with the decaying channels' clean gradients kept
        first: the engine restores them at the next step, so Self-Rectifying judges (and
        the decay updates) the penalty-free gradient (paper 3.2, "Special Situations").
        Call it after ``loss.backward()`` (and ``scaler.unscale_(optimizer)`` with AMP)."""
        self.engine.capture_clean_grads()
        return super().regularize(model, *args, **kwargs)

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Pruner state for exact resume: schedule position, scopes, removal history and
        the engine's decay state. Save it with the model's and optimizer's state_dicts."""
        return {
            "version": _STATE_VERSION,
            "current_step": self.current_step,
            "scope_initial_channels": dict(self._scope_initial_channels),
            "pruning_history": copy.deepcopy(self.DG.pruning_history()),
            "removed": dict(self.removed),
            "removals": self.removals,
            "last_step_at": self._last_step_at,
            "num_channels": {n: self.engine.num_channels(n) for n in self.engine.groups()},
            "decay": self.decay.to_dict(),
            "engine": self.engine.state_dict(),
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. On a freshly built (unpruned) model the recorded
        physical removals are replayed first, through the attached optimizer, so call it
        after ``attach(optimizer)`` and before ``model.load_state_dict`` /
        ``optimizer.load_state_dict``."""
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError(f"not a decay pruner state_dict (version {_STATE_VERSION})")
        self._require_attached("load_state_dict()")
        if state["decay"] != self.decay.to_dict():
            raise ValueError(f"checkpoint was made with decay={state['decay']}, this pruner has "
                             f"{self.decay.to_dict()}; build the pruner with the same DecayConfig")
        history = state["pruning_history"]
        mine = self.DG.pruning_history()
        if len(mine) == 0 and history:
            mod_by_name = dict(self.model.named_modules())
            for module_name, is_out, idxs in history:
                module = mod_by_name.get(module_name)
                if module is None or module not in self.DG.module2node:
                    raise ValueError(f"checkpoint removes channels of {module_name!r}, which this "
                                     f"model does not have; load into the same architecture")
                layer_pruner = self.DG.get_pruner_of_module(module)
                fn = layer_pruner.prune_out_channels if is_out else layer_pruner.prune_in_channels
                apply_removal(self.DG, self.model, module, fn, list(idxs), self.optimizer,
                              self._probe_cache)
            for name in list(self.engine.groups()):
                self.engine.remove_group(name)
            names = list(state["num_channels"])
            for name in names:
                module, fn = self._roots[name]
                layout = self._layout(name)
                self.engine.add_group(name, layout.slices)
                self._coverage[name] = layout.coverage
            self.update_regularizer()
        elif mine != history:
            raise ValueError("this model was already pruned differently from the checkpoint; "
                             "load into a freshly built model")
        counts = {n: self.engine.num_channels(n) for n in self.engine.groups()}
        if counts != state["num_channels"]:
            bad = [n for n in state["num_channels"] if counts.get(n) != state["num_channels"][n]]
            raise ValueError(f"checkpoint does not fit this model: channel counts differ for "
                             f"{bad[:5]}; load into a model of the architecture it was saved from")
        self.engine.load_state_dict(state["engine"])
        self.current_step = int(state["current_step"])
        self._scope_initial_channels = dict(state["scope_initial_channels"])
        self.removed = dict(state["removed"])
        self.removals = int(state["removals"])
        self._last_step_at = state.get("last_step_at")


_CLASS_CACHE: dict = {}


def decay_pruner(base: type, name: str | None = None) -> type:
    """Make the decay version of any ``torch_pruning.pruner.BasePruner`` subclass.

    ``decay_pruner(tp.pruner.GrowingRegPruner)(model, example_inputs, importance=...,
    decay=DecayConfig(...))`` takes the base class's arguments plus ``decay``.
    """
    if not isinstance(base, type) or not issubclass(base, BasePruner):
        raise TypeError(f"decay_pruner() expects a torch_pruning pruner class (a subclass of "
                        f"tp.pruner.BasePruner), got {base!r}")
    if issubclass(base, DecayPrunerMixin):
        return base
    key = (base, name)
    if key not in _CLASS_CACHE:
        cls_name = name or f"Decay{base.__name__}"
        cls = types.new_class(cls_name, (DecayPrunerMixin, base))
        cls.__module__ = __name__
        cls.__qualname__ = cls_name
        cls.__doc__ = (f"Decay version of :class:`{base.__module__}.{base.__qualname__}`: the "
                       f"same arguments plus ``decay=DecayConfig(...)``; see "
                       f":class:`DecayPrunerMixin`.")
        _CLASS_CACHE[key] = cls
    return _CLASS_CACHE[key]


class DecayMetaPruner(DecayPrunerMixin, tp.pruner.MetaPruner):
    """``tp.pruner.MetaPruner`` (magnitude / any importance, no sparse learning: the
    paper's "Group pruner w/o SL") with decay instead of removal."""


class DecayGroupNormPruner(DecayPrunerMixin, tp.pruner.GroupNormPruner):
    """``tp.pruner.GroupNormPruner`` (DepGraph's group-norm sparse learning) with decay
    instead of removal; ``regularize`` keeps the penalty out of the decaying channels'
    gradients (paper 3.2). The paper lowers T_rate to 0.1-0.2 and T_len to 0.5 here.

    Groups left with a single channel are not regularized: Torch-Pruning's scaling
    ``alpha ** ((max - imp) / (max - min))`` is 0/0 there and would write NaN into the
    gradients (and the model)."""

    def update_regularizer(self):
        super().update_regularizer()
        self._groups = [g for g in self._groups
                        if (self.DG.get_out_channels(g[0].dep.target.module) or 2) > 1]

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.update_regularizer()


class DecayBNScalePruner(DecayPrunerMixin, tp.pruner.BNScalePruner):
    """``tp.pruner.BNScalePruner`` (network-slimming BN scale penalty, group level) with
    decay instead of removal."""


for _cls in (DecayMetaPruner, DecayGroupNormPruner, DecayBNScalePruner):
    _CLASS_CACHE[(_cls.__mro__[2], None)] = _cls
