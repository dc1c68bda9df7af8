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

With ``decay=DecayConfig(...)`` a prune decision does not zero the masks; the selected
filters' whole structures decay to zero over N optimizer steps (Smooth Pruning) and may be
released (Self-Rectifying); a mask is closed only once its structure is exactly zero.
"""

from __future__ import annotations

import contextlib
import copy
import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable, Dict, Iterable, List, Optional

import torch
import torch.nn as nn
import torch_pruning as tp

from dpm_core import DecayConfig, DecayEngine

from .gates import SUPPORTED_BN, GatedBatchNorm
from .structure import GroupSpec, build_groups, run_traced, trace_spatial

__all__ = ["GateDecorator", "GateGroup"]

_STATE_FORMAT = "dpm_gatedecorator/1"
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)


@dataclass
class GateGroup:
    """One pruning decision unit: M channels shared by ``members`` (gate module names)."""

    name: str
    m: int
    keep_min: int
    members: List[tuple]  # (gate name, GatedBatchNorm, LongTensor [M] channel map, identity?)
    spec: GroupSpec

    def channel_mask(self) -> torch.Tensor:
        """bool[M]: channels whose mask is still open (the root member's mask)."""
        _, gbn, idx, ident = self.members[0]
        mask = gbn.mask if ident else gbn.mask.index_select(0, idx.to(gbn.mask.device))
        return mask > 0


def _set_submodule(root: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, attr = name.rpartition(".")
    parent = root.get_submodule(parent_name) if parent_name else root
    setattr(parent, attr, new)


class GateDecorator:
    """Gate Decorator pruning of a model with BatchNorm layers.

    Args:
        model: the network (not wrapped in DataParallel/DDP; wrap it after this call). Every
            BatchNorm1d/2d/3d is replaced in place by a :class:`GatedBatchNorm` wrapping it.
        example_inputs: an input batch (tensor, tuple of args, or dict of kwargs) used to
            trace the model with Torch-Pruning's DependencyGraph and to measure feature-map
            sizes. The model is traced in eval mode, so BN running statistics are untouched.
        min_keep_ratio: every gate group keeps at least ``max(1, ceil(M * ratio))`` of its M
            channels (masked and decaying channels count as removed).
        decay: ``None`` for Gate Decorator's single-step pruning (masks set to 0 at once), or a
            :class:`dpm_core.DecayConfig` to prune with DPM (Smooth Pruning, optionally
            Self-Rectifying); then call :meth:`attach` before :meth:`prune`.
        flops_eta: weight of the FLOPs-aware penalty (0 = pure Taylor ranking, the default).
            The ranking uses ``score / mean_score - flops_eta * flops / mean_flops`` where
            ``flops`` is the estimated cost of one channel of the group at the current
            (unmasked) widths; both terms are normalized over the candidate channels so that
            ``flops_eta`` is unit-free (the original scales a raw FLOPs term by hand).
        sparse_lambda: default weight of :meth:`gate_l1` (1e-3, the value of the original
            VGG-16/CIFAR-10 configuration).

    Raises:
        ValueError: the model has no BatchNorm, or an argument is out of range.
    """

    def __init__(self, model: nn.Module, example_inputs, min_keep_ratio: float = 0.1,
                 decay: Optional[DecayConfig] = None, *, flops_eta: float = 0.0,
                 sparse_lambda: float = 1e-3):
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
            keep_min = max(1, math.ceil(spec.m * self.min_keep_ratio - 1e-9))
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
                if penalty == "mask":
                    gbn.penalty_mask[pos] = gbn.mask[pos]
                elif penalty is not None:
                    gbn.penalty_mask[pos] = penalty

    def _on_zeroed(self, name: str, channels: torch.Tensor) -> None:
        g = self._by_name.get(name)
        if g is not None:
            self._set_members(g, channels, mask=0.0, penalty=0.0)

    def _on_released(self, name: str, channels: torch.Tensor) -> None:
        g = self._by_name.get(name)
        if g is not None:
            self._set_members(g, channels, penalty="mask")

    def _refresh_penalty_masks(self) -> None:
        with torch.no_grad():
            for gbn in self.gates.values():
                gbn.penalty_mask.copy_(gbn.mask)
            if self.engine is not None:
                for g in self.groups:
                    dec = self.engine.decaying_channels(g.name)
                    if dec.numel():
                        self._set_members(g, dec, penalty=0.0)

    # ------------------------------------------------------------------ tick: scores
    @contextlib.contextmanager
    def scoring(self, reset: bool = True, grad_scaler=None):
        """Accumulate Taylor scores ``|g * dL/dg|`` over every backward pass in the block.

        Run your own forward/backward passes (and optimizer steps, if you like) inside.
        ``reset=True`` starts from zero (each tick of the original starts afresh);
        ``reset=False`` keeps adding to the scores of the previous block. A pass with a
        non-finite gate gradient (AMP overflow) is skipped. With mixed precision pass the
        ``torch.amp.GradScaler`` whose ``scale(loss).backward()`` you call, so that every
        pass is divided by the scale it was computed with.

        Each pass's ``dL/dg`` is read from ``g.grad`` once the backward pass has finished
        (its increase over the pass), so under DistributedDataParallel it is the gradient
        averaged over all ranks, exactly as the original's ``DataParallel`` saw the whole
        batch: every rank gets the same scores without any communication of its own.
        """
        if self._scoring:
            raise RuntimeError("gd.scoring() blocks cannot be nested")
        if reset:
            self.reset_scores()
        self._grad_scaler = grad_scaler if grad_scaler is not None and \
            grad_scaler.is_enabled() else None
        self._scoring = True
        self._pass = None
        handles = [gbn.g.register_hook(functools.partial(self._gate_hook, name))
                   for name, gbn in self.gates.items()]
        try:
            yield self
        finally:
            for h in handles:
                h.remove()
            self._scoring = False
            self._pass = None
            self._grad_scaler = None

    def _gate_hook(self, name: str, grad: torch.Tensor) -> None:
        # Runs inside the autograd engine when gate `name` receives its gradient.
        if self._pass is not None and name in self._pass["seen"]:
            self._pass = None  # a previous backward failed before its end: start afresh
        if self._pass is None:
            # first gate of this backward pass: remember every gate's .grad before the pass,
            # and run _end_pass once the whole backward (and DDP's averaging) is done.
            self._pass = {"before": {n: (None if gbn.g.grad is None else gbn.g.grad.detach().clone())
                                     for n, gbn in self.gates.items()},
                          "seen": {}}
            torch.autograd.Variable._execution_engine.queue_callback(self._queue_end_pass)
        self._pass["seen"][name] = grad.detach().clone()

    def _queue_end_pass(self) -> None:
        # DistributedDataParallel queues its own end-of-backward callback (which writes the
        # averaged gradients into .grad) after ours; queueing once more runs _end_pass after it.
        torch.autograd.Variable._execution_engine.queue_callback(self._end_pass)

    @torch.no_grad()
    def _end_pass(self) -> None:
        state, self._pass = self._pass, None
        if state is None:
            return
        inv = 1.0
        if self._grad_scaler is not None:
            inv = 1.0 / float(self._grad_scaler.get_scale())
        for name, hook_grad in state["seen"].items():
            gbn = self.gates[name]
            if gbn.g.grad is not None:
                before = state["before"][name]
                grad = gbn.g.grad if before is None else gbn.g.grad - before
            else:  # e.g. torch.autograd.grad(): nothing accumulated, use what flowed to g
                grad = hook_grad
            gbn.add_score(grad, inv)

    def reset_scores(self) -> None:
        for gbn in self.gates.values():
            gbn.reset_scores()

    @property
    def scored_batches(self) -> int:
        """Backward passes that contributed to the current scores."""
        return max((gbn.scored_batches for gbn in self.gates.values()), default=0)

    def tick(self, loader: Iterable, loss_fn: Callable, num_batches: Optional[int] = None,
             optimizer: Optional[torch.optim.Optimizer] = None, device=None,
             reset: bool = True) -> dict:
        """Convenience tick: forward/backward over ``loader`` inside :meth:`scoring`.

        Each batch is ``(inputs, targets, ...)``; the loss is ``loss_fn(model(inputs),
        targets)``. With ``optimizer`` each pass is followed by ``optimizer.step()`` (the
        original ticks train only the gates and BN shifts: pass e.g.
        ``torch.optim.SGD(gd.gate_parameters(), lr=...)``). Gradients are cleared before
        each pass and at the end. Returns ``{"batches": n, "loss": mean loss}``.
        """
        if num_batches is not None and (isinstance(num_batches, bool) or
                                        not isinstance(num_batches, int) or num_batches < 1):
            raise ValueError(f"num_batches must be a positive int or None, got {num_batches!r}")
        total, n = 0.0, 0
        with self.scoring(reset=reset):
            for batch in loader:
                if num_batches is not None and n >= num_batches:
                    break
                x, y = batch[0], batch[1]
                if device is not None:
                    x, y = x.to(device), y.to(device)
                self.model.zero_grad(set_to_none=True)
                loss = loss_fn(self.model(x), y)
                loss.backward()
                if optimizer is not None:
                    optimizer.step()
                total += float(loss.detach())
                n += 1
        self.model.zero_grad(set_to_none=True)
        if n == 0:
            raise ValueError("tick() got an empty loader; give it at least one batch")
        return {"batches": n, "loss": total / n}

    def gate_parameters(self) -> List[nn.Parameter]:
        """Gates and BN shifts (what the original tick trains)."""
        ps = []
        for gbn in self.gates.values():
            ps.append(gbn.g)
            if gbn.bn.affine and gbn.bn.bias.requires_grad:
                ps.append(gbn.bn.bias)
        return ps

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
    def max_prunable(self) -> int:
        """How many filters :meth:`prune` can take now under the minimum kept ratios."""
        return sum(max(0, int(self.remaining(g.name).sum()) - g.keep_min) for g in self.groups)

    def prune(self, num_filters: int) -> Dict[str, torch.Tensor]:
        """Prune the ``num_filters`` globally lowest-ranked filters.

        A filter is one channel of a gate group (a residual group's channel counts once; it
        is removed from every member). Candidates are the channels neither masked nor
        decaying; the ``keep_min`` highest-ranked channels of every group are never
        candidates. Without ``decay`` the masks of the chosen channels are set to 0 now; with
        ``decay`` they start decaying (their masks close when they reach zero).

        Returns ``{group name: LongTensor of chosen channels}``.

        Raises:
            RuntimeError: no scores were gathered (use :meth:`scoring` or :meth:`tick`), or
                ``decay`` is set and :meth:`attach` was not called.
            ValueError: more filters than the minimum kept ratios allow.
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
        remaining = [self.remaining(g.name) for g in self.groups]
        removable = [max(0, int(r.sum()) - g.keep_min) for g, r in zip(self.groups, remaining)]
        available = sum(removable)
        if num_filters > available:
            active = sum(int(r.sum()) for r in remaining)
            raise ValueError(
                f"cannot prune {num_filters} filters: {active} filters remain (not masked or "
                f"decaying) and min_keep_ratio={self.min_keep_ratio} keeps at least "
                f"{active - available} of them (max(1, ceil(M * ratio)) per group), so at most "
                f"{available} can be pruned now. Ask for fewer filters or build the "
                f"GateDecorator with a smaller min_keep_ratio")
        if num_filters == 0:
            return {}

        scores = [self.group_scores(g.name).double() for g in self.groups]
        act_scores = torch.cat([s[r.to(s.device)].cpu() for s, r in zip(scores, remaining)])
        s_norm = float(act_scores.mean()) if act_scores.numel() else 1.0
        s_norm = s_norm if s_norm > 0 else 1.0
        costs = None
        if self.flops_eta > 0:
            costs = [self.channel_flops(g.name) for g in self.groups]
            w = torch.tensor([c * float(r.sum()) for c, r in zip(costs, remaining)])
            f_norm = float(w.sum()) / max(1.0, float(sum(float(r.sum()) for r in remaining)))
            f_norm = f_norm if f_norm > 0 else 1.0

        cand_score, cand_group, cand_chan = [], [], []
        for gi, (g, s, r, nrem) in enumerate(zip(self.groups, scores, remaining, removable)):
            if nrem == 0:
                continue
            adj = s.cpu() / s_norm
            if costs is not None:
                adj = adj - self.flops_eta * costs[gi] / f_norm
            ch = r.cpu().nonzero().squeeze(1)
            order = torch.sort(adj[ch], stable=True).indices[:nrem]
            ch = ch[order]
            cand_score.append(adj[ch])
            cand_chan.append(ch)
            cand_group.append(torch.full((ch.numel(),), gi, dtype=torch.long))
        cs, cg, cc = torch.cat(cand_score), torch.cat(cand_group), torch.cat(cand_chan)
        pick = torch.sort(cs, stable=True).indices[:num_filters]
        chosen: Dict[str, torch.Tensor] = {}
        for gi in torch.unique(cg[pick]).tolist():
            g = self.groups[gi]
            ch = torch.sort(cc[pick][cg[pick] == gi]).values
            chosen[g.name] = ch
            self._apply(g, ch)
        self.history.append({
            "num_filters": num_filters,
            "groups": {k: v.tolist() for k, v in chosen.items()},
            "mode": "decay" if self.engine is not None else "mask",
        })
        return chosen

    def _apply(self, g: GateGroup, channels: torch.Tensor) -> None:
        if self.engine is None:
            self._set_members(g, channels, mask=0.0, penalty=0.0)
        else:
            # decaying channels leave the L1 penalty: their gradient (hence the SR criteria)
            # is then free of it (paper 3.2, "Special Situations"); see gate_l1().
            self._set_members(g, channels, penalty=0.0)
            self.engine.mark(g.name, channels)

    # ------------------------------------------------------------------ tock
    def gate_l1(self, weight: Optional[float] = None) -> torch.Tensor:
        """``weight * sum |g|`` over the gates of open, non-decaying channels.

        Add it to the loss during the tock (fine-tuning) phase. ``weight`` defaults to
        ``sparse_lambda``. Masked channels are left out (they are gone) and so are decaying
        channels: the penalty would pull their gate towards zero and mask the gradient
        that Self-Rectifying reads, so SR's criteria are computed without it.
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
        """Counts of channels: total, open masks, decaying, masked; plus engine counters."""
        total = sum(g.m for g in self.groups)
        open_ = sum(int(g.channel_mask().sum()) for g in self.groups)
        dec = sum(int(self._decaying(g).sum()) for g in self.groups)
        out = {"groups": len(self.groups), "channels": total, "open": open_,
               "decaying": dec, "masked": total - open_}
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
