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

import types
import warnings
from typing import Callable

import torch
import torch_pruning as tp
from torch_pruning import ops
from torch_pruning.pruner.algorithms.base_pruner import BasePruner

from dpm_core import DecayConfig, DecayEngine
from dpm_core.optim_utils import unwrap_optimizer

from ._slices import (GroupLayout, TorchPruningError, UnsupportedGroupError, apply_removal,
                      drop_items,
                      group_layout, root_size)
from .selection import (dead_channel_counts, dead_weights_hidden, live_head_ratio,
                        live_importance)
from .checkpoint import load_pruner_state, pruner_state
from .live_view import attention_views, live_layers, live_views, physical_group
from .heads_dims import finish_heads_and_dims, register_head_dims, start_heads_and_dims_decay
from .checks import check_decay, check_model, check_ratios, trace_error, warn_output_pruned
from .attention import (attention_modules, group_units, head_dim_units, head_layers,
                        heads_and_dims, kv_layers_to_skip, sync_attention_attributes,
                        sync_model_attributes, whole_units)
from .checks import check_gqa_group
from .tp_compat import keep_training_modes, torch_pruning_fixes
from .attention import equal_heads_per_kv_head
from .hf_config import sync_hf_config

__all__ = ["DecayPrunerMixin", "decay_pruner", "DecayMetaPruner", "DecayGroupNormPruner",
           "DecayBNScalePruner", "DecayGroup", "UnsupportedGroupError"]



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
        owner = type(self).__name__
        decay = check_decay(owner, decay)
        check_model(owner, args, kwargs)
        check_ratios(owner, super().__init__, args, kwargs)
        model = kwargs.get("model", args[0] if args else None)
        try:
            # HF LLaMA's rotary embedding; Torch-Pruning's model.eval() (tp_compat.py)
            with torch_pruning_fixes(), keep_training_modes(model):
                super().__init__(*args, **kwargs)
        except Exception as e:  # noqa: BLE001
            err = trace_error(owner, e)
            if err is not None:
                raise err from e
            raise
        self.decay = decay
        self.engine = DecayEngine(decay)
        self.optimizer = None
        self._engine_handle = None
        self._in_selection = False
        self._last_step_at: int | None = None
        self._dead_counts: dict | None = None
        self._probe_cache: dict = {}
        self._roots: dict[str, tuple] = {}      # engine name -> (root module, root fn)
        self._root_names: dict[tuple, str] = {} # (id(root module), is_out) -> engine name
        self._coverage: dict[str, list] = {}
        self._units: dict[str, torch.Tensor] = {}   # engine name -> root indices [M, u]
        self._slices: dict[str, list] = {}          # engine name -> its engine slices
        self._head_groups: dict = {}                # qkv layer -> engine name (heads)
        self._dims_of: dict[str, str] = {}          # heads group -> its head-dims group
        self._views: dict = {}                      # live views during a selection
        self._pair_of: dict[str, str] = {}          # head-dims group -> its heads group
        self._tensor_sets: dict[frozenset, str] = {}
        self._heads: dict = dict(self.num_heads)     # physical head counts per qkv layer
        self._attention = attention_modules(self.model, self.num_heads)
        self._removed_cbs: list[Callable] = []
        self.removed: dict[str, int] = {}
        self.removals = 0
        self._config_warned: set = set()   # model.config fields already warned about
        self._register_groups()
        warn_output_pruned(self)
        if not self._roots:
            raise ValueError(f"{type(self).__name__}: found no prunable group in the model (no "
                             f"Conv/Linear layer outside ignored_layers whose output channels "
                             f"Torch-Pruning can prune); check root_module_types and "
                             f"ignored_layers")

    # ------------------------------------------------------------------ arguments
    # ------------------------------------------------------------------ groups
    def _root_name(self, module, is_out: bool = True) -> str:
        name = self.DG._module2name.get(module) or f"<{type(module).__name__}@{id(module):x}>"
        return name if is_out else f"{name}:in"

    def _key(self, group) -> tuple:
        dep = group[0].dep
        return id(dep.target.module), bool(self.DG.is_out_channel_pruning_fn(dep.handler))

    def _full_group(self, module, fn):
        is_out = self.DG.is_out_channel_pruning_fn(fn)
        n = self.DG.get_out_channels(module) if is_out else self.DG.get_in_channels(module)
        return self.DG.get_pruning_group(module, fn, list(range(n)))

    def _layout_of(self, group, name: str) -> tuple:
        """``(layout, units, skipped layers)`` of a full group as DPM channels."""
        skip = kv_layers_to_skip(self, group)
        unit_fn = head_dim_units if name in self._pair_of else group_units
        units = unit_fn(self, group, root_size(self.DG, group))
        drop_items(group, skip)
        return group_layout(self.DG, group, name, self._probe_cache, units), units, skip

    def _layout(self, name: str) -> GroupLayout:
        module, fn = self._roots[name]
        layout, units, _ = self._layout_of(self._full_group(module, fn), name)
        self._units[name] = units
        self._slices[name] = layout.slices
        return layout

    def _register_groups(self) -> None:
        skipped = []
        for group in list(self.DG.get_all_groups(ignored_layers=self.ignored_layers,
                                                 root_module_types=self.root_module_types)):
            root = group[0].dep.target.module
            check_gqa_group(self, group)
            if self._is_atten_group(group)[0]:
                # Torch-Pruning selects attention groups re-rooted at the output projection
                # (its input channels); register that group, so selections map to it.
                group = self._downstream_node_as_root_if_attention(group)
                if group is None:
                    continue
            try:
                self._register(group)
            except TorchPruningError as e:
                layer = self._root_name(root)
                raise ValueError(
                    f"{type(self).__name__}: Torch-Pruning cannot prune the group of {layer!r} "
                    f"({type(root).__name__}): its pruning function fails ({e}); plain "
                    f"Torch-Pruning fails on this model too. Put the layer in ignored_layers "
                    f"(e.g. ignored_layers=[model.get_submodule({layer!r})]); the model was "
                    f"not changed") from e
            except UnsupportedGroupError as e:
                # Not expressible as DPM channels: leave the whole group unpruned (as if its
                # root were in ignored_layers) rather than remove it abruptly.
                self.ignored_layers.append(root)
                skipped.append(f"{self._root_name(root)} ({e})")
        if skipped:
            warnings.warn(
                f"{type(self).__name__}: {len(skipped)} group(s) cannot be decayed and will not be "
                f"pruned: {'; '.join(skipped[:3])}{' ...' if len(skipped) > 3 else ''}. Put their "
                f"root layers in ignored_layers to silence this warning", UserWarning, stacklevel=3)

    def _register(self, group) -> str | None:
        module, fn = group[0].dep.target.module, group[0].dep.handler
        key = self._key(group)
        if key in self._root_names:
            return self._root_names[key]
        name = self._root_name(module, key[1])
        group = self._full_group(module, fn)
        layout, units, _ = self._layout_of(group, name)
        if not layout.slices:
            return None   # nothing parameterised to decay (Torch-Pruning skips it as well)
        tensors = frozenset((id(sl[0]), sl[1]) for sl in layout.slices)
        if tensors in self._tensor_sets:
            # the same tensors seen from another root: one engine group per set of tensors
            other = self._tensor_sets[tensors]
            self._root_names[key] = other
            return other
        self.engine.add_group(name, layout.slices)
        self._roots[name] = (module, fn)
        self._root_names[key] = name
        self._coverage[name] = layout.coverage
        self._units[name] = units
        self._slices[name] = layout.slices
        self._tensor_sets[tensors] = name
        for layer in head_layers(self, group):
            self._head_groups[layer] = name
        if heads_and_dims(self, group):
            register_head_dims(self, name, group)
        return name

    def _name_of(self, group) -> str | None:
        return self._root_names.get(self._key(group))

    def _roots_of_units(self, name: str, dead: torch.Tensor) -> torch.Tensor:
        """Bool mask over the group's root indices that belong to the ``dead`` units."""
        units = self._units[name]
        out = torch.zeros(units.numel(), dtype=torch.bool)
        out[units[dead.cpu()].reshape(-1)] = True
        return out

    def _sync_heads(self) -> None:
        """Torch-Pruning's ``num_heads`` / ``out_channel_groups`` count the heads still in
        the model (its ``_prune`` lowers them at selection; here heads leave at removal)."""
        for layer, heads in self._heads.items():
            self.num_heads[layer] = heads
            if layer in self.out_channel_groups:
                self.out_channel_groups[layer] = heads

    def _sync_model_attributes(self) -> None:
        """After physical removals: the attention modules' head attributes, the model's
        own attributes and a Hugging Face ``model.config`` follow the pruned layers."""
        sync_attention_attributes(self._attention, self._heads)
        sync_model_attributes(self.model)
        sync_hf_config(self.model, warned=self._config_warned)

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
        return dead_channel_counts(self)

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
        return live_importance(self, group, imp, super().estimate_importance)

    def get_target_head_pruning_ratio(self, module) -> float:
        ratio = super().get_target_head_pruning_ratio(module)
        if not self._in_selection:
            return ratio
        return live_head_ratio(self, module, ratio)

    def _is_atten_group(self, group):
        is_attn, layers = super()._is_atten_group(group)
        if getattr(self, "_views", None):    # (also called by the base constructor)
            layers = live_layers(self, layers)   # live widths for head_dim arithmetic
        return is_attn, layers

    def _prune(self):
        self._sync_heads()
        self._dead_counts = self._live_dead_counts()
        views = attention_views(self)
        # Torch-Pruning's selection runs to its end before any group is marked (marking
        # changes nothing it reads): the dead channels' weights read 0 and attention
        # groups with dead heads are seen as Torch-Pruning would hold them
        self._in_selection = True
        try:
            with dead_weights_hidden(self), live_views(self, views):
                groups = list(super()._prune())
        finally:
            self._in_selection = False
            self._sync_heads()   # Torch-Pruning lowered them at selection
        for group in groups:
            yield physical_group(self, group, views)

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
        if name in self._dims_of:
            return start_heads_and_dims_decay(self, name, chans)
        units = self._units[name]
        picked = torch.zeros(units.numel(), dtype=torch.bool)
        picked[torch.as_tensor(chans, dtype=torch.int64)] = True
        per_unit = picked[units]                  # [M, u]
        whole = per_unit.all(1)
        if bool((per_unit.any(1) & ~whole).any()):
            raise RuntimeError(
                f"group {name!r}: the selection splits a unit that Torch-Pruning removes "
                f"together (a head or a channel group); please report this model")
        return self.engine.mark(name, whole.nonzero().squeeze(1))   # skips decaying / zeroed

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
        finish_heads_and_dims(self)
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

    def _removable(self, name: str, zeroed: torch.Tensor) -> torch.Tensor:
        """The zeroed units to remove now. With ``round_to``, only as many as leave a
        multiple of ``round_to`` root channels (as Torch-Pruning's selection does); the
        rest stay in the model at exactly zero until more of the group is zeroed
        (Self-Rectifying may have released part of a selection)."""
        if zeroed.numel() == 0 or name in self._dims_of or name in self._pair_of:
            return zeroed   # heads with head dims: nothing zeroed may stay (see step())
        if self.prune_num_heads and self.num_heads:
            zeroed = equal_heads_per_kv_head(self, self._full_group(*self._roots[name]), zeroed)
        if not self.round_to or zeroed.numel() == 0:
            return zeroed
        units = self._units[name]
        m, u = units.shape
        keep_roots = -(-((m - zeroed.numel()) * u) // self.round_to) * self.round_to
        n = (m * u - keep_roots) // u
        if n * u != m * u - keep_roots:
            return zeroed   # round_to does not fit this group's unit size: as the selection
        return zeroed[:max(n, 0)]

    def _after_removal(self, name: str, group_before, n_units: int) -> None:
        """Head bookkeeping when ``n_units`` whole heads of group ``name`` were removed
        (a head-dims removal removes no head)."""
        qkv = head_layers(self, group_before)
        if not (qkv and self.prune_num_heads):
            return
        top = max(self._heads[m] for m in qkv)
        for m in qkv:
            if self._heads[m] == top:
                self._heads[m] -= n_units

    def _remove(self, force: bool) -> dict:
        plan = {}
        for name in self.engine.groups():
            z = self._removable(name, self.engine.zeroed_channels(name).cpu())
            if z.numel():
                plan[name] = z
        if not plan:
            return {}
        replaced = []
        removal: dict = {}   # root group -> its root indices to remove
        for name, chans in plan.items():
            units = self._units[name]
            if chans.numel() >= units.shape[0]:
                raise RuntimeError(f"group {name!r}: every channel is zeroed; refusing to remove "
                                   f"the whole layer (use ignored_layers or a lower pruning "
                                   f"ratio)")
            # a head-dims group's positions go in one removal with its heads group's
            removal.setdefault(self._pair_of.get(name, name), []).append(units[chans].reshape(-1))
            self.removed[name] = self.removed.get(name, 0) + int(chans.numel())
        for name, parts in removal.items():
            module, fn = self._roots[name]
            full = self._full_group(module, fn)
            skip = kv_layers_to_skip(self, full)
            roots = torch.cat(parts).unique().tolist()
            heads = int(whole_units(self._units[name], roots).sum())
            replaced += apply_removal(self.DG, self.model, module, fn, roots,
                                      self.optimizer, self._probe_cache, skip=skip)
            self._after_removal(name, full, heads)
        self._sync_heads()
        self._sync_model_attributes()
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
        return pruner_state(self)

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict`. On a freshly built (unpruned) model the recorded
        physical removals are replayed first, through the attached optimizer, so call it
        after ``attach(optimizer)`` and before ``model.load_state_dict`` /
        ``optimizer.load_state_dict``."""
        load_pruner_state(self, state)


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
