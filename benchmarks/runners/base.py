"""The runner interface shared by the three frameworks, and the training helpers they use.

A runner takes ``(model, loaders, method, config)``: a dense (usually pre-trained) model, the
``(train, test)`` loaders, ``method`` in ``{"original", "sp", "sr"}`` and a :class:`RunConfig`,
prunes and fine-tunes the model with its framework and returns a :class:`RunResult` holding the
physically pruned model, the per-epoch log, a per-step trace (group sparsity, SR releases) and the
DPM counters. ``original`` runs the framework's own single-step pruning (``decay=None``), ``sp``
uses ``DecayConfig(self_rectify=False)`` (Smooth Pruning) and ``sr`` uses
``DecayConfig(self_rectify=True)`` (Smooth Pruning + Self-Rectifying). ``control`` is +SP with
N = 1 and Self-Rectifying off: the decay machinery with a one-step decay, which must reproduce
``original`` within the noise (if it does not, the harness differs between methods). Everything
else (model, data, schedule, seed) is identical across the methods.

:func:`training` sets, for every training loop run inside it, the arithmetic precision of the
forward pass (``bf16`` autocast or ``fp32``) and an optional ``probe(step, model)`` called after
every optimizer step (the benchmarks' test-set trace around pruning events), without each runner
having to pass them through.
"""
from __future__ import annotations

import math
import random
import time
from contextlib import contextmanager, nullcontext
from contextvars import ContextVar
from dataclasses import asdict, dataclass, field
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F

METHODS = ("original", "sp", "sr", "control")
METHOD_LABELS = {"original": "original", "sp": "+SP", "sr": "+SR", "control": "+SP N=1"}


class FrameworkUnavailable(RuntimeError):
    """The adapter package a runner needs is missing or incomplete."""


@dataclass
class RunConfig:
    """Everything that defines one pruning run (the same for original / +SP / +SR)."""

    framework: str = "depgraph"
    model: str = "resnet20"
    dataset: str = "cifar10"
    method: str = "sr"
    width: float = 1.0
    ratio: float = 0.5            # channel pruning ratio (depgraph, gatedecorator) / group sparsity (otov2)
    steps: int = 5                # DPM N
    t_rate: float = 0.3           # DPM T_rate
    t_len: float = 0.8            # DPM T_len
    pretrain_epochs: int = 5
    epochs: int = 5               # pruning + fine-tuning epochs
    lr: float = 0.1               # pre-training learning rate
    finetune_lr: float = 0.01     # pruning / fine-tuning learning rate (otov2: DHSPG lr)
    momentum: float = 0.9
    weight_decay: float = 5e-4
    batch_size: int = 128
    iterative_steps: int = 5      # number of pruning steps (depgraph, gatedecorator prune rounds)
    prune_every: int = 10         # optimizer steps between two pruning steps
    criterion: str = "magnitude"  # depgraph: magnitude | group_sl | bn_scale
    reg: float = 5e-4             # sparse-learning strength (depgraph group_sl/bn_scale, gatedecorator L1)
    global_pruning: bool = False
    min_keep_ratio: float = 0.1   # gatedecorator: per-layer minimum kept ratio
    score_batches: int = 5        # gatedecorator: batches per Taylor "tick"
    lmbda: float = 1e-3           # otov2: DHSPG lambda
    epsilon: float = 0.95         # otov2: DHSPG half-space projection threshold
    seed: int = 0
    device: str = "cpu"
    trace_every: int = 1
    precision: str = "fp32"       # forward pass: fp32, or bf16 autocast (weights stay float32)
    channels_last: bool = False   # NHWC memory format for conv models and batches (faster on CPU)
    dense_checkpoints: int = 0    # > 0: start from the committed dense checkpoint of seed % this
    probe_every: int = 0          # > 0: test-subset accuracy / loss around pruning events (see experiment)
    extra: Dict = field(default_factory=dict)

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class RunResult:
    model: nn.Module
    log: List[dict] = field(default_factory=list)
    trace: List[dict] = field(default_factory=list)
    counters: Dict[str, int] = field(default_factory=dict)
    events: List[dict] = field(default_factory=list)
    info: Dict = field(default_factory=dict)


def decay_config(method: str, cfg: RunConfig):
    """``None`` for the original method, else the ``dpm_core.DecayConfig`` for +SP / +SR /
    the control (+SP with N = 1, Self-Rectifying off)."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; known: {', '.join(METHODS)}")
    if method == "original":
        return None
    from dpm_core import DecayConfig

    if method == "control":
        return DecayConfig(steps=1, t_rate=float(cfg.t_rate), t_len=float(cfg.t_len),
                           self_rectify=False)
    return DecayConfig(steps=int(cfg.steps), t_rate=float(cfg.t_rate), t_len=float(cfg.t_len),
                       self_rectify=(method == "sr"))


_TRAINING: ContextVar[dict] = ContextVar("dpm_bench_training", default={})


@contextmanager
def training(precision: str = "fp32", probe: Optional[Callable] = None):
    """Within this block every :func:`train_loop` runs its forward pass in ``precision``
    (``"bf16"``: bfloat16 autocast, weights / gradients / optimizer state stay float32) and
    calls ``probe(step, model)`` after each optimizer step."""
    if precision not in ("fp32", "bf16"):
        raise ValueError(f"precision must be 'fp32' or 'bf16', got {precision!r}")
    token = _TRAINING.set({"precision": precision, "probe": probe})
    try:
        yield
    finally:
        _TRAINING.reset(token)


def forward_precision(model: nn.Module):
    """The autocast context of the current :func:`training` block for ``model``'s device."""
    if _TRAINING.get().get("precision") != "bf16":
        return nullcontext()
    p = next(model.parameters(), None)
    return torch.autocast(p.device.type if p is not None else "cpu", dtype=torch.bfloat16)


# ----------------------------------------------------------------------------------------------
# training helpers
# ----------------------------------------------------------------------------------------------
def set_seed(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def cosine_lr(base: float, step: int, total: int, warmup: int = 0) -> float:
    if warmup and step < warmup:
        return base * (step + 1) / warmup
    total = max(1, total)
    return 0.5 * base * (1 + math.cos(math.pi * min(step, total) / total))


def set_lr(opt: torch.optim.Optimizer, lr: float) -> None:
    for g in opt.param_groups:
        g["lr"] = lr


@torch.no_grad()
def evaluate(model: nn.Module, loader) -> Tuple[float, float]:
    """(top-1 accuracy in %, mean loss)."""
    was = model.training
    model.eval()
    correct, total, loss = 0, 0, 0.0
    for x, y in loader:
        out = model(x)
        loss += F.cross_entropy(out, y, reduction="sum").item()
        correct += (out.argmax(1) == y).sum().item()
        total += len(y)
    model.train(was)
    return 100.0 * correct / max(1, total), loss / max(1, total)


def count_flops_params(model: nn.Module, example_inputs: torch.Tensor) -> Tuple[float, float]:
    """MACs and parameters, via ``torch_pruning.utils.count_ops_and_params`` (the one counter used
    for all frameworks)."""
    import torch_pruning as tp

    was = model.training
    model.eval()
    with torch.no_grad():
        ops, params = tp.utils.count_ops_and_params(model, example_inputs)
    model.train(was)
    return float(ops), float(params)


def progress_bar(iterable=None, total=None, desc="", enabled=True, leave=False):
    from tqdm import tqdm
    import sys

    return tqdm(iterable, total=total, desc=desc, disable=not enabled, leave=leave, file=sys.stderr,
                dynamic_ncols=True)


def train_loop(model: nn.Module, train_loader, opt_getter: Callable[[], torch.optim.Optimizer], *,
               epochs: int, base_lr: float, test_loader=None, before_step: Optional[Callable] = None,
               after_step: Optional[Callable] = None, loss_extra: Optional[Callable] = None,
               on_epoch: Optional[Callable] = None, epoch_info: Optional[Callable] = None,
               progress: bool = True, desc: str = "train", phase: str = "train",
               warmup: int = 0) -> List[dict]:
    """SGD-style loop with a per-step cosine learning rate.

    ``opt_getter()`` returns the optimizer to step (it may change when a framework rebuilds it).
    ``before_step(step)`` runs after ``backward()`` and before ``optimizer.step()`` (e.g. a
    pruner's ``regularize``); ``after_step(step)`` after it (pruning schedules, traces).
    ``loss_extra(model)`` is added to the loss (e.g. Gate Decorator's L1 on gates).
    Returns the per-epoch log; ``on_epoch(record)`` is called with each record as it is made.
    """
    log = []
    steps_per_epoch = len(train_loader)
    total = max(1, epochs * steps_per_epoch)
    step = 0
    probe = _TRAINING.get().get("probe")
    model.train()
    for epoch in range(epochs):
        t0 = time.time()
        seen, correct, loss_sum = 0, 0, 0.0
        bar = progress_bar(train_loader, total=steps_per_epoch, desc=f"{desc} {epoch + 1}/{epochs}",
                           enabled=progress)
        for x, y in bar:
            opt = opt_getter()
            set_lr(opt, cosine_lr(base_lr, step, total, warmup))
            with forward_precision(model):
                out = model(x)
            out = out.float()
            loss = F.cross_entropy(out, y)
            full = loss + loss_extra(model) if loss_extra is not None else loss
            opt.zero_grad(set_to_none=True)
            full.backward()
            if before_step is not None:
                before_step(step)
            opt_getter().step()
            step += 1
            if after_step is not None:
                after_step(step)
            if probe is not None:
                probe(step, model)
            n = len(y)
            seen += n
            loss_sum += loss.item() * n
            correct += (out.argmax(1) == y).sum().item()
            if progress and step % 10 == 0:
                bar.set_postfix(loss=f"{loss_sum / seen:.3f}", acc=f"{100 * correct / seen:.1f}")
        bar.close()
        rec = {"phase": phase, "epoch": epoch + 1, "train_loss": loss_sum / max(1, seen),
               "train_acc": 100.0 * correct / max(1, seen), "lr": opt_getter().param_groups[0]["lr"],
               "epoch_time_s": time.time() - t0, "steps": step}
        if test_loader is not None:
            rec["test_acc"], rec["test_loss"] = evaluate(model, test_loader)
        if epoch_info is not None:
            rec.update(epoch_info())
        log.append(rec)
        if on_epoch is not None:
            on_epoch(rec)
    return log


def make_sgd(model: nn.Module, lr: float, momentum: float, weight_decay: float) -> torch.optim.SGD:
    return torch.optim.SGD(model.parameters(), lr=lr, momentum=momentum, weight_decay=weight_decay,
                           nesterov=momentum > 0)


def pretrain(model: nn.Module, loaders, cfg: RunConfig, *, on_epoch=None, progress=True) -> List[dict]:
    """Dense training of the model before pruning (the same for all three methods)."""
    train, test = loaders
    opt = make_sgd(model, cfg.lr, cfg.momentum, cfg.weight_decay)
    return train_loop(model, train, lambda: opt, epochs=cfg.pretrain_epochs, base_lr=cfg.lr,
                      test_loader=test, on_epoch=on_epoch, progress=progress, desc="pretrain",
                      phase="pretrain", warmup=min(len(train), 20))


# ----------------------------------------------------------------------------------------------
# sparsity measurement (framework independent)
# ----------------------------------------------------------------------------------------------
def prunable_layers(model: nn.Module) -> Dict[str, nn.Module]:
    """Conv2d layers and hidden Linear layers (the last Linear, the classifier, is excluded)."""
    layers = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    linears = [n for n, m in layers.items() if isinstance(m, nn.Linear)]
    if linears:
        layers.pop(linears[-1])
    return layers


@torch.no_grad()
def live_channels(model: nn.Module, masked: Optional[Dict[str, int]] = None) -> Dict[str, int]:
    """Per prunable layer: output channels that exist and are not exactly zero."""
    out = {}
    for n, m in prunable_layers(model).items():
        w = m.weight.detach().flatten(1)
        nz = w.abs().sum(1) > 0
        if m.bias is not None:
            nz = nz | (m.bias.detach() != 0)
        out[n] = int(nz.sum())
    if masked:
        for n, k in masked.items():
            if n in out:
                out[n] = max(0, out[n] - k)
    return out


class SparsityTracer:
    """Records, every ``every`` optimizer steps, the channel sparsity of the model relative to the
    dense one (removed or exactly-zero output channels / dense channels) and the DPM engine's
    decaying / released / zeroed counts."""

    def __init__(self, model_getter: Callable[[], nn.Module], every: int = 1,
                 masked_getter: Optional[Callable[[], Dict[str, int]]] = None,
                 engine_getter: Optional[Callable] = None, sparsity_fn: Optional[Callable] = None):
        self.model_getter = model_getter
        self.every = max(1, int(every))
        self.masked_getter = masked_getter
        self.engine_getter = engine_getter
        self.sparsity_fn = sparsity_fn
        model = model_getter()
        self.dense = {n: m.weight.shape[0] for n, m in prunable_layers(model).items()}
        self.dense_total = sum(self.dense.values())
        self.trace: List[dict] = []
        self._last_released = 0

    def sparsity(self) -> float:
        if self.sparsity_fn is not None:
            return float(self.sparsity_fn())
        live = live_channels(self.model_getter(), self.masked_getter() if self.masked_getter else None)
        alive = sum(live.get(n, 0) for n in self.dense)
        return 1.0 - alive / max(1, self.dense_total)

    def __call__(self, step: int, force: bool = False) -> None:
        if not force and step % self.every != 0:
            return
        rec = {"step": int(step), "sparsity": self.sparsity()}
        eng = self.engine_getter() if self.engine_getter else None
        if eng is not None:
            c = dict(getattr(eng, "counters", {}) or {})
            rel = int(c.get("released", 0))
            rec.update({"released_total": rel, "released": rel - self._last_released,
                        "zeroed_total": int(c.get("zeroed", 0)), "marked_total": int(c.get("marked", 0))})
            self._last_released = rel
            try:
                rec["decaying"] = int(sum(int(eng.state(g).decaying.sum()) for g in eng.groups()))
            except Exception:
                pass
        self.trace.append(rec)


def engine_summary(engine) -> Tuple[Dict[str, int], List[dict]]:
    if engine is None:
        return {}, []
    counters = {k: int(v) for k, v in dict(getattr(engine, "counters", {}) or {}).items()}
    events = [dict(e) for e in getattr(engine, "events", []) or []]
    return counters, events


class BaseRunner:
    """Subclasses set ``name``, ``package``, the public names ``requires`` they use from it,
    and implement :meth:`run`."""

    name = "base"
    package = ""
    requires: Tuple[str, ...] = ()
    description = ""

    def check_available(self) -> None:
        """Raise :class:`FrameworkUnavailable` (with what to do) if the adapter cannot be used."""
        import importlib

        try:
            module = importlib.import_module(self.package)
        except Exception as e:  # ImportError or a broken package
            raise FrameworkUnavailable(
                f"framework {self.name!r} not available yet: cannot import {self.package} "
                f"({type(e).__name__}: {e})") from e
        missing = [n for n in self.requires if not hasattr(module, n)]
        if missing:
            raise FrameworkUnavailable(f"framework {self.name!r} not available yet: "
                                       f"{self.package} lacks {missing}")

    def run(self, model: nn.Module, loaders, method: str, config: RunConfig, *,
            example_inputs: torch.Tensor, on_epoch=None, progress: bool = True) -> RunResult:
        raise NotImplementedError
