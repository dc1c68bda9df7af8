"""Gate Decorator (You et al., NeurIPS 2019) as a library, with the Decay Pruning hook.

See ``docs/gatedecorator.md`` for the user guide. In short::

    gd = GateDecorator(model, example_inputs, min_keep_ratio=0.1)   # installs the gates
    optimizer = torch.optim.SGD(model.parameters(), ...)            # AFTER: gates are new params
    gd.attach(optimizer)
    with gd.scoring():                                             # tick: Taylor scores
        for x, y in few_batches: loss_fn(model(x), y).backward()
    gd.prune(num_filters)                                          # global ranking
    for x, y in loader:                                            # tock: fine-tune + L1 on gates
        loss = loss_fn(model(x), y) + gd.gate_l1()
        ...
    small = gd.melt()                                              # plain, physically smaller

The pruning decision follows the original research code's rules to the letter (budget in
BatchNorm-channel units, threshold with ties, zero-score channels pruned for free, rounded-down
per-layer minimum, the original's FLOPs term); they live in :mod:`.selection`.

With ``decay=DecayConfig(...)`` a prune decision does not zero the masks; the selected
filters' whole structures decay to zero over N optimizer steps (Smooth Pruning) and may be
released (Self-Rectifying); a mask is closed only once its structure is exactly zero.
"""

from __future__ import annotations

import copy
import math
import warnings
from dataclasses import dataclass
from typing import Dict, List, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from dpm_core import DecayConfig, DecayEngine

from . import selection
from .gates import SUPPORTED_BN, GatedBatchNorm
from .tick import TickMixin
from .structure import GroupSpec, build_groups, run_traced, trace_spatial

__all__ = ["GateDecorator", "GateGroup"]

_STATE_FORMAT = "dpm_gatedecorator/1"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class GateGroup:
    """One pruning decision unit: M channels shared by ``members`` (gate module names).

    ``units`` = ``len(members)``: what one channel of the group costs of the budget of
    :meth:`GateDecorator.prune` (the original counts BatchNorm channels)."""

    name: str
    m: int
    keep_min: int
    members: List[tuple]  # (gate name, GatedBatchNorm, LongTensor [M] channel map, identity?)
    spec: GroupSpec

    @property
    def units(self) -> int:
        return len(self.members)

    def channel_mask(self) -> torch.Tensor:
        """bool[M]: channels whose mask is still open (the root member's mask)."""
        _, gbn, idx, ident = self.members[0]
        mask = gbn.mask if ident else gbn.mask.index_select(0, idx.to(gbn.mask.device))
        return mask > 0


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class GateDecorator(TickMixin):
    """Gate Decorator pruning of a model with BatchNorm layers.

    Args:
        model: the network (not wrapped in DataParallel/DDP; wrap it after this call). Every
            BatchNorm1d/2d/3d is replaced in place by a :class:`GatedBatchNorm` wrapping it.
        example_inputs: an input batch (tensor, tuple of args, or dict of kwargs) used to
            trace the model with Torch-Pruning's DependencyGraph and to measure feature-map
            sizes. The model is traced in eval mode, so BN running statistics are untouched.
        min_keep_ratio: every gate group keeps at least ``max(1, int(M * ratio))`` of its M
            channels (rounded down, as the original; masked and decaying channels count as
            removed).
        decay: ``None`` for Gate Decorator's single-step pruning (masks set to 0 at once), or a
            :class:`dpm_core.DecayConfig` to prune with DPM (Smooth Pruning, optionally
            Self-Rectifying); then call :meth:`attach` before :meth:`prune`.
        flops_eta: the original's ``flops_eta`` (0 = pure Taylor ranking, the default, as in
            the original's configs). Each BN's channels score ``taylor - flops_eta /
            smallest_area * area * remaining`` (``area``: H*W of that BN's output,
            ``smallest_area``: the smallest over all BNs, ``remaining``: that BN's channels
            not yet removed), summed over the group's BNs. Its scale is that of the raw
            Taylor scores, so it depends on the model, the loss and the scoring batches.
        sparse_lambda: default weight of :meth:`gate_l1`: 1e-3, the value of both of the
            original's configurations (ResNet-56 and VGG-16 on CIFAR-10); the original class
            ``IterRecoverFramework`` defaults to 1e-5.
        strict_minimum: ``True`` (default): every group always keeps its ``keep_min``
            highest-scoring open channels. ``False``: the original's rule to the letter, whose
            minimum is taken over all M scores with removed channels scoring 0, so that with
            the FLOPs term a layer can fall below its minimum, down to no channel (see
            :mod:`dpm_gatedecorator.selection`). Without the FLOPs term both are the same.

    Raises:
        ValueError: the model has no BatchNorm, or an argument is out of range.
    """

    def __init__(self, model: nn.Module, example_inputs, min_keep_ratio: float = 0.1,
                 decay: Optional[DecayConfig] = None, *, flops_eta: float = 0.0,
                 sparse_lambda: float = 1e-3, strict_minimum: bool = True):
        if not isinstance(model, nn.Module):
            raise TypeError(f"GateDecorator expects an nn.Module, got {type(model).__name__}")
        if isinstance(model, (nn.DataParallel, nn.parallel.DistributedDataParallel)):
            raise TypeError("pass the bare model (model.module) to GateDecorator and wrap it in "
                            "DataParallel/DistributedDataParallel afterwards")
        if isinstance(min_keep_ratio, bool) or not isinstance(min_keep_ratio, (int, float)) \
                or not 0 < float(min_keep_ratio) <= 1:
            raise ValueError(f"min_keep_ratio must be a number in (0, 1] (the smallest fraction "
                             f"of each layer's filters that is kept), got {min_keep_ratio!r}")
        if decay is not None and not isinstance(decay, DecayConfig):
            raise TypeError(f"decay must be None (single-step pruning) or a "
                            f"dpm_core.DecayConfig, got {type(decay).__name__}")
        for nm, v in (("flops_eta", flops_eta), ("sparse_lambda", sparse_lambda)):
            if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) \
                    or v < 0:
                raise ValueError(f"{nm} must be a finite number >= 0, got {v!r}")
        if any(isinstance(m, GatedBatchNorm) for m in model.modules()):
            raise ValueError("this model already has gates (a GateDecorator was built on it); "
                             "reuse that GateDecorator, or melt() it into a plain model first")
        bn_names = [n for n, m in model.named_modules() if isinstance(m, SUPPORTED_BN)]
        if not bn_names:
            raise ValueError(
                f"GateDecorator found no BatchNorm1d/2d/3d layer in {type(model).__name__}: Gate "
                f"Decorator prunes filters through gates on BatchNorm outputs. Add BatchNorm "
                f"after the convolutions (e.g. use vgg16_bn instead of vgg16), or prune this "
                f"model with the dpm_depgraph adapter, which needs no BatchNorm")

        self.model = model
        self.example_inputs = example_inputs
        self.min_keep_ratio = float(min_keep_ratio)
        self.decay = decay
        self.flops_eta = float(flops_eta)
        self.sparse_lambda = float(sparse_lambda)
        self.strict_minimum = bool(strict_minimum)
        self.history: List[dict] = []
        self._scoring = False
        self._pass = None
        self._grad_scaler = None

        specs, _ = build_groups(model, example_inputs)
        self._area = trace_spatial(model, example_inputs)
        self._module_names = {m: n for n, m in model.named_modules()}

        # install the gates (the GatedBatchNorm wraps the very same BN object)
        self.gates: Dict[str, GatedBatchNorm] = {}
        for name in bn_names:
            bn = model.get_submodule(name)
            gbn = GatedBatchNorm(bn)
            gbn.out_area = self._area.get(bn, 1)
            gbn.train(bn.training)
            _set_submodule(model, name, gbn)
            self.gates[name] = gbn

        self.groups: List[GateGroup] = []
        for spec in specs:
            members = []
            for bn_name, idx in spec.members:
                gbn = self.gates[bn_name]
                ident = idx.numel() == gbn.num_features and \
                    torch.equal(idx, torch.arange(idx.numel()))
                members.append((bn_name, gbn, idx.to(gbn.mask.device), ident))
            keep_min = selection.keep_min(spec.m, self.min_keep_ratio)
            self.groups.append(GateGroup(spec.name, spec.m, keep_min, members, spec))
        self._by_name = {g.name: g for g in self.groups}
        # which group owns a conv/linear's input / output channel dimension (FLOPs estimate)
        self._owner: Dict[tuple, GateGroup] = {}
        for g in self.groups:
            for it in g.spec.items:
                self._owner.setdefault((it.module, it.role), g)

        self.engine: Optional[DecayEngine] = None
        self._handle = None
        self._optimizer = None
        if decay is not None:
            self.engine = DecayEngine(decay)
            for g in self.groups:
                self.engine.add_group(g.name, self._slices(g))
            self.engine.on_zeroed(self._on_zeroed)
            self.engine.on_released(self._on_released)

    # ------------------------------------------------------------------ structure
    def _slices(self, g: GateGroup) -> list:
        """The engine slices of one group: each channel's whole structure."""
        out, seen = [], set()

        def add(param, dim, index):
            if param is None or not param.requires_grad:
                return
            key = (id(param), dim)
            if key in seen:
                return
            seen.add(key)
            if index.shape[1] == 1 and param.shape[dim] == g.m and \
                    torch.equal(index[:, 0], torch.arange(g.m, device=index.device)):
                out.append((param, dim))
            else:
                out.append((param, dim, index.to(param.device)))

        for _, gbn, idx, _ in g.members:
            col = idx.view(-1, 1)
            add(gbn.g, 0, col)
            if gbn.bn.affine:
                add(gbn.bn.weight, 0, col)   # frozen at 1 when absorbed -> skipped by add()
                add(gbn.bn.bias, 0, col)
        for it in g.spec.items:
            mod, index = it.module, it.index
            if isinstance(mod, _CONV):
                if it.role == "out":
                    add(mod.weight, 0, index)
                    add(mod.bias, 0, index)
                elif mod.groups == 1:
                    add(mod.weight, 1, index)
                elif mod.groups == mod.in_channels == mod.out_channels:
                    add(mod.weight, 0, index)
                    add(mod.bias, 0, index)
                else:
                    warnings.warn(f"dpm_gatedecorator: grouped conv {it.module_name!r} is left "
                                  f"out of group {g.name!r}'s decayed structure")
            elif isinstance(mod, nn.Linear):
                if it.role == "out":
                    add(mod.weight, 0, index)
                    add(mod.bias, 0, index)
                else:
                    add(mod.weight, 1, index)
            elif isinstance(mod, SUPPORTED_BN):
                pass
            elif any(True for _ in mod.parameters(recurse=False)):
                warnings.warn(f"dpm_gatedecorator: {type(mod).__name__} {it.module_name!r} is "
                              f"left out of group {g.name!r}'s decayed structure")
        return out

    def structure_params(self, name: str) -> list:
        """The (param, dim[, index]) slices that make up group ``name``'s channels."""
        return self._slices(self._group(name))

    def _group(self, name: str) -> GateGroup:
        try:
            return self._by_name[name]
        except KeyError:
            raise KeyError(f"no gate group {name!r}; groups are {[g.name for g in self.groups]}") \
                from None

    def _decaying(self, g: GateGroup) -> torch.Tensor:
        if self.engine is None:
            return torch.zeros(g.m, dtype=torch.bool, device=g.members[0][1].mask.device)
        return self.engine.is_decaying(g.name).to(g.members[0][1].mask.device)

    def remaining(self, name: str) -> torch.Tensor:
        """bool[M]: channels of group ``name`` neither masked nor decaying."""
        g = self._group(name)
        return g.channel_mask() & ~self._decaying(g)

    # ------------------------------------------------------------------ masks
    def _set_members(self, g: GateGroup, channels: torch.Tensor, mask=None, penalty=None) -> None:
        with torch.no_grad():
            for _, gbn, idx, _ in g.members:
                pos = idx.index_select(0, channels.to(idx.device))
                if mask is not None:
                    gbn.mask[pos] = mask
                if penalty is not None:
                    gbn.penalty_mask[pos] = penalty

    # The L1 penalty covers every gate, masked ones included (as the original); only the DPM
    # path takes decaying gates out (penalty_mask 0) while they decay.
    def _on_zeroed(self, name: str, channels: torch.Tensor) -> None:
        g = self._by_name.get(name)
        if g is not None:
            self._set_members(g, channels, mask=0.0, penalty=1.0)

    def _on_released(self, name: str, channels: torch.Tensor) -> None:
        g = self._by_name.get(name)
        if g is not None:
            self._set_members(g, channels, penalty=1.0)

    def _refresh_penalty_masks(self) -> None:
        with torch.no_grad():
            for gbn in self.gates.values():
                gbn.penalty_mask.fill_(1.0)
            if self.engine is not None:
                for g in self.groups:
                    dec = self.engine.decaying_channels(g.name)
                    if dec.numel():
                        self._set_members(g, dec, penalty=0.0)

    def group_scores(self, name: str) -> torch.Tensor:
        """float[M]: Taylor scores of group ``name``, summed over its member gates."""
        g = self._group(name)
        s = torch.zeros(g.m, dtype=torch.float32, device=g.members[0][1].score.device)
        for _, gbn, idx, _ in g.members:
            s += gbn.score.index_select(0, idx)
        return s

    # ------------------------------------------------------------------ FLOPs estimate
    def _frac(self, mod: nn.Module, role: str) -> float:
        g = self._owner.get((mod, role))
        if g is None:
            return 1.0
        return float(self.remaining(g.name).sum()) / g.m

    def channel_flops(self, name: str) -> float:
        """Estimated multiply-accumulates of one channel of group ``name`` (per sample) at the
        current widths: its filters, plus its input slices in the consuming layers."""
        g = self._group(name)
        total = 0.0
        for it in g.spec.items:
            mod, k = it.module, it.index.shape[1]
            area = self._area.get(mod, 1)
            if isinstance(mod, _CONV):
                kprod = math.prod(mod.kernel_size)
                if it.role == "out":
                    other = mod.in_channels / mod.groups * self._frac(mod, "in")
                else:
                    other = (mod.out_channels / mod.groups) * self._frac(mod, "out") \
                        if mod.groups == 1 else 1.0
                total += area * kprod * other * k
            elif isinstance(mod, nn.Linear):
                if it.role == "out":
                    total += area * mod.in_features * self._frac(mod, "in")
                else:
                    total += area * k * mod.out_features * self._frac(mod, "out")
        return total

    # ------------------------------------------------------------------ prune
    def _gate_remaining(self) -> Dict[str, int]:
        """Per gate: its channels neither masked nor decaying (the original's
        ``bn_mask.sum()``; with decay, decaying channels count as removed)."""
        open_ = {n: gbn.mask > 0 for n, gbn in self.gates.items()}
        if self.engine is not None:
            for g in self.groups:
                dec = self._decaying(g)
                if bool(dec.any()):
                    for bn_name, _, idx, _ in g.members:
                        open_[bn_name] = open_[bn_name].clone()
                        open_[bn_name][idx[dec.to(idx.device)]] = False
        return {n: int(o.sum()) for n, o in open_.items()}

    def ranking_scores(self, name: Optional[str] = None):
        """The scores :meth:`prune` ranks by (float64), the original's ``get_score`` summed
        over the group's BNs: per member BN, its Taylor score minus ``flops_eta /
        smallest_area * area * remaining``; 0 for channels masked or decaying.

        Returns the ``float64[M]`` of group ``name``, or ``{name: float64[M]}`` for all."""
        eta_area = 0.0
        if self.flops_eta > 0:
            eta_area = min(gbn.out_area for gbn in self.gates.values())
        rem = self._gate_remaining() if self.flops_eta > 0 else {}
        out = {}
        for g in (self.groups if name is None else [self._group(name)]):
            open_ = self.remaining(g.name)
            s = torch.zeros(g.m, dtype=torch.float64, device=open_.device)
            for bn_name, gbn, idx, _ in g.members:
                raw = gbn.score.double().index_select(0, idx.to(gbn.score.device))
                pen = selection.flops_penalty(self.flops_eta, eta_area, gbn.out_area,
                                              rem.get(bn_name, 0))
                s += (raw - pen).to(s.device)
            out[g.name] = torch.where(open_, s, torch.zeros_like(s))
        return out if name is None else out[name]

    def _rule_inputs(self):
        scores = self.ranking_scores()
        return [(scores[g.name], self.remaining(g.name).to(scores[g.name].device), g.keep_min,
                 g.units) for g in self.groups]

    def max_prunable(self) -> int:
        """The candidate pool's size in BatchNorm-channel units for the current scores:
        ``prune(num)`` needs ``num < max_prunable()`` and then prunes at least ``num + 1``
        units. (0 before any scores are gathered: zero-score channels are not candidates.)"""
        return sum(int(selection.candidate_pool(s, k, u).numel())
                   for s, _, k, u in self._rule_inputs())

    def prune(self, num_filters: int) -> Dict[str, torch.Tensor]:
        """The original's tick decision: prune every channel scoring at most the
        ``num_filters``-th (0-based) lowest entry of the candidate pool.

        The budget counts BatchNorm channels, as the original: a residual group's channel
        shared by k BNs is k entries of the pool and costs k units. Ties at the threshold
        are pruned too, so at least ``num_filters + 1`` units go (pass ``K - 1`` to prune at
        least K units), and open channels whose score is exactly 0 are pruned besides, without
        spending budget. The candidates of a group are its channels neither masked nor
        decaying, minus its ``keep_min = max(1, int(M * min_keep_ratio))`` highest-scoring
        ones. The scores are :meth:`ranking_scores` (Taylor, minus the original's FLOPs term
        when ``flops_eta > 0``). The rules are spelled out in :mod:`dpm_gatedecorator.selection`.

        Without ``decay`` the chosen channels' masks are set to 0 now; with ``decay`` they
        start decaying (their masks close when they reach zero).

        Returns ``{group name: LongTensor of chosen channels}``.

        Raises:
            RuntimeError: no scores were gathered (use :meth:`scoring` or :meth:`tick`), or
                ``decay`` is set and :meth:`attach` was not called.
            ValueError: ``num_filters`` is not below the candidate pool's size.
        """
        if isinstance(num_filters, bool) or not isinstance(num_filters, int) or num_filters < 0:
            raise ValueError(f"num_filters must be an int >= 0, got {num_filters!r}")
        if self.scored_batches == 0:
            raise RuntimeError(
                "prune() needs Taylor scores, but none were gathered: run forward and backward "
                "passes inside `with gd.scoring(): ...` (or call gd.tick(loader, loss_fn)) "
                "before gd.prune()")
        if self.engine is not None and self._handle is None:
            raise RuntimeError("decay is set: call gd.attach(optimizer) before gd.prune(), so "
                               "that the chosen filters decay during the optimizer's steps")
        inputs = self._rule_inputs()
        picked, thr, pool = selection.decide(inputs, num_filters, self.strict_minimum)
        if num_filters >= pool:
            raise ValueError(
                f"cannot prune {num_filters} filters: the candidate pool holds {pool} "
                f"BatchNorm-channel units (channels neither masked nor decaying, with a non-zero "
                f"score, outside each layer's minimum max(1, int(C * min_keep_ratio)) with "
                f"min_keep_ratio={self.min_keep_ratio}; a residual channel counts once per BN), "
                f"and prune(num) prunes every unit scoring at most the num-th (0-based) lowest, "
                f"so at most {pool} can be pruned now, with num = {pool - 1}. Ask for fewer "
                f"filters or build the GateDecorator with a smaller min_keep_ratio")
        chosen: Dict[str, torch.Tensor] = {}
        units = 0
        for g, sel in zip(self.groups, picked):
            ch = sel.nonzero().squeeze(1).cpu()
            if ch.numel():
                chosen[g.name] = ch
                units += int(ch.numel()) * g.units
                self._apply(g, ch)
        self.history.append({
            "num_filters": num_filters,
            "threshold": thr,
            "units": units,
            "groups": {k: v.tolist() for k, v in chosen.items()},
            "mode": "decay" if self.engine is not None else "mask",
        })
        return chosen

    def _apply(self, g: GateGroup, channels: torch.Tensor) -> None:
        if self.engine is None:
            self._set_members(g, channels, mask=0.0)
        else:
            # decaying channels leave the L1 penalty: their gradient (hence the SR criteria)
            # is then free of it (paper 3.2, "Special Situations"); see gate_l1().
            self._set_members(g, channels, penalty=0.0)
            self.engine.mark(g.name, channels)

    # ------------------------------------------------------------------ tock
    def gate_l1(self, weight: Optional[float] = None) -> torch.Tensor:
        """``weight * sum |g|`` over every gate, masked ones included (the original's
        ``get_gate_sparse_loss``); with ``decay``, decaying gates are left out.

        Add it to the loss during the tock (fine-tuning) phase. ``weight`` defaults to
        ``sparse_lambda``. The DPM path leaves decaying channels out: the penalty would pull
        their gate towards zero and mask the gradient that Self-Rectifying reads, so SR's
        criteria are computed without it. (Zeroed channels are back in: their gate is exactly
        0, so they add nothing.)
        """
        lam = self.sparse_lambda if weight is None else float(weight)
        terms = [(gbn.g.abs() * gbn.penalty_mask).sum() for gbn in self.gates.values()]
        return lam * torch.stack(terms).sum()

    def attach(self, optimizer: torch.optim.Optimizer):
        """Check that ``optimizer`` trains the gates and (with ``decay``) hook the decay engine
        to its steps. Returns the engine handle (``None`` without decay)."""
        if not isinstance(optimizer, torch.optim.Optimizer):
            raise TypeError(f"attach() expects a torch.optim.Optimizer, got "
                            f"{type(optimizer).__name__}")
        held = {id(p) for pg in optimizer.param_groups for p in pg["params"]}
        missing = [n for n, gbn in self.gates.items() if id(gbn.g) not in held]
        if missing:
            raise ValueError(f"the optimizer does not hold the gates of {missing[:3]} "
                             f"({len(missing)} gate(s)): gates are new parameters, so build the "
                             f"optimizer from model.parameters() AFTER GateDecorator(...)")
        if self._handle is not None:
            if self._optimizer is optimizer:
                return self._handle
            self._handle.remove()
        self._optimizer = optimizer
        if self.engine is not None:
            self._handle = self.engine.attach(optimizer)
        else:
            self._handle = None
        return self._handle

    def detach(self) -> None:
        """Remove the decay engine's optimizer hooks."""
        if self._handle is not None:
            self._handle.remove()
        self._handle = None
        self._optimizer = None

    # ------------------------------------------------------------------ reporting
    def summary(self) -> dict:
        """Counts of group channels (``channels``, ``open`` masks, ``decaying``, ``masked``),
        the same in BatchNorm-channel units, the unit of :meth:`prune`'s budget (``units``,
        ``units_open``, ``units_decaying``, ``units_masked``), plus the engine counters."""
        total = sum(g.m for g in self.groups)
        open_g = [int(g.channel_mask().sum()) for g in self.groups]
        dec_g = [int(self._decaying(g).sum()) for g in self.groups]
        units = sum(g.m * g.units for g in self.groups)
        u_open = sum(o * g.units for o, g in zip(open_g, self.groups))
        u_dec = sum(d * g.units for d, g in zip(dec_g, self.groups))
        out = {"groups": len(self.groups), "channels": total, "open": sum(open_g),
               "decaying": sum(dec_g), "masked": total - sum(open_g),
               "units": units, "units_open": u_open, "units_decaying": u_dec,
               "units_masked": units - u_open}
        if self.engine is not None:
            out["engine"] = dict(self.engine.counters)
        return out

    # ------------------------------------------------------------------ melt
    def melt(self) -> nn.Module:
        """A plain copy of the model, physically smaller.

        Gates and masks are folded into their BatchNorms, then every masked channel is
        removed through Torch-Pruning's DependencyGraph, so the producing convs, the
        coupled BNs (residual groups) and the consuming layers' inputs shrink together.
        The decorated model is left as it is. Channels still decaying are kept (with a
        warning): finish the decay first (``engine.zero_now`` forces it).
        """
        dec = sum(int(self._decaying(g).sum()) for g in self.groups)
        if dec:
            warnings.warn(f"melt(): {dec} channel(s) are still decaying and are kept; train until "
                          f"they reach zero (or call gd.engine.zero_now(name)) to remove them")
        removed = {g.name: (~g.channel_mask()).nonzero().squeeze(1).cpu() for g in self.groups}
        new = copy.deepcopy(self.model)
        for name in self.gates:
            _set_submodule(new, name, new.get_submodule(name).folded())
        for p in new.parameters():
            p.requires_grad_(True)
        todo = [(g.name, ch) for g in self.groups for ch in [removed[g.name]] if ch.numel()]
        if todo:
            DG = run_traced(new, lambda: tp.DependencyGraph().build_dependency(
                new, example_inputs=self.example_inputs, verbose=False))
            for name, ch in todo:
                root = new.get_submodule(name)
                group = DG.get_pruning_group(root, tp.prune_batchnorm_out_channels, ch.tolist())
                if not DG.check_pruning_group(group):
                    warnings.warn(f"melt(): Torch-Pruning refused to remove {ch.numel()} channels "
                                  f"of group {name!r}; they stay (as zeros)")
                    continue
                group.prune()
        return new

    # ------------------------------------------------------------------ checkpoint
    def state_dict(self) -> dict:
        """Scores, masks, decisions history and the decay engine's state (CPU copies).

        Save it together with ``model.state_dict()`` and ``optimizer.state_dict()``.
        """
        return {
            "format": _STATE_FORMAT,
            "groups": [(g.name, g.m, [mn for mn, *_ in g.members]) for g in self.groups],
            "gates": {n: gbn.num_features for n, gbn in self.gates.items()},
            "masks": {n: gbn.mask.detach().cpu().clone() for n, gbn in self.gates.items()},
            "scores": {n: gbn.score.detach().cpu().clone() for n, gbn in self.gates.items()},
            "scored_batches": {n: (gbn.scored_batches, gbn.skipped_batches)
                               for n, gbn in self.gates.items()},
            "config": {"min_keep_ratio": self.min_keep_ratio, "flops_eta": self.flops_eta,
                       "sparse_lambda": self.sparse_lambda,
                       "strict_minimum": self.strict_minimum,
                       "decay": self.decay.to_dict() if self.decay is not None else None},
            "history": copy.deepcopy(self.history),
            "engine": self.engine.state_dict() if self.engine is not None else None,
        }

    def load_state_dict(self, state: dict) -> None:
        """Restore :meth:`state_dict` (into a GateDecorator built on a model of the same shape).

        Raises:
            ValueError: not a GateDecorator state, another model shape, or decay on/off
                differs.
        """
        if not isinstance(state, dict) or state.get("format") != _STATE_FORMAT:
            raise ValueError(f"not a GateDecorator state_dict (format {_STATE_FORMAT!r}); got "
                             f"{type(state).__name__}")
        mine = {n: gbn.num_features for n, gbn in self.gates.items()}
        if dict(state["gates"]) != mine:
            diff = [(n, state["gates"].get(n), mine.get(n))
                    for n in sorted(set(mine) | set(state["gates"]))
                    if state["gates"].get(n) != mine.get(n)]
            raise ValueError(f"the checkpoint was saved for a model of another shape: gate "
                             f"(name, channels in checkpoint, channels here) {diff[:5]}; build "
                             f"the same architecture before loading")
        groups = [(g.name, g.m, [mn for mn, *_ in g.members]) for g in self.groups]
        if [tuple(x[:2]) for x in state["groups"]] != [tuple(x[:2]) for x in groups]:
            raise ValueError("the checkpoint's gate groups differ from this model's; build the "
                             "same architecture before loading")
        if (state["engine"] is None) != (self.engine is None):
            raise ValueError(f"the checkpoint was saved with decay="
                             f"{'None' if state['engine'] is None else 'DecayConfig'} but this "
                             f"GateDecorator has decay={'None' if self.engine is None else 'set'};"
                             f" build it with the checkpoint's config['decay']")
        with torch.no_grad():
            for n, gbn in self.gates.items():
                gbn.mask.copy_(state["masks"][n].to(gbn.mask.device))
                gbn.score.copy_(state["scores"][n].to(gbn.score.device))
                gbn.scored_batches, gbn.skipped_batches = state["scored_batches"][n]
        self.history = copy.deepcopy(state["history"])
        if self.engine is not None:
            self.engine.load_state_dict(state["engine"])
        self._refresh_penalty_masks()
