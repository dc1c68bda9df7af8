"""Torch-Pruning (DepGraph) runner (``dpm_depgraph``).

Schedule (the same for original / +SP / +SR): SGD fine-tuning of the pre-trained model for
``epochs`` epochs with a cosine learning rate from ``finetune_lr``; ``iterative_steps`` pruning
steps, one before optimizer step 0 and then every ``prune_every`` optimizer steps, each raising
the channel pruning ratio linearly towards ``ratio`` (Torch-Pruning's iterative schedule).
``criterion``:

* ``magnitude``: ``MetaPruner`` + ``GroupMagnitudeImportance(p=2)`` (the paper's "Group pruner
  w/o SL");
* ``group_sl``: ``GroupNormPruner`` with its group-norm sparse learning (``regularize`` after
  every backward, strength ``reg``) (the paper's "Group pruner w/ SL");
* ``bn_scale``: ``BNScalePruner`` (network slimming: BN-scale importance and L1 on BN scales).

``original`` uses the Torch-Pruning class itself; each selected group is removed at once. Its
removal goes through ``dpm_depgraph.prune_group`` so that the optimizer's momentum is
sliced and kept exactly as the decay pruners do (so the only difference between the methods is
the decay). ``sp`` / ``sr`` use ``DecayMetaPruner`` / ``DecayGroupNormPruner`` /
``DecayBNScalePruner`` with ``decay=DecayConfig(...)`` and ``pruner.attach(optimizer)``; at the
end ``pruner.finalize(force=True)`` removes what is still decaying. The final classifier is
never pruned.

Equal cost for +SR: channels that Self-Rectifying releases are live again, and the decay pruner
counts only live channels against its target. After the ``iterative_steps`` pruning steps, every
``prune_every`` optimizer steps during the first two thirds of fine-tuning, a top-up step repeats
the final pruning step (Torch-Pruning's last ratio) whenever channels were released since the
previous one, so the pruner selects as many channels again (the lowest-importance live ones).
+SR therefore ends at the original's architecture unless a release happens in the last third.
"""
from __future__ import annotations

import time

import torch
import torch.nn as nn

from .base import (BaseRunner, RunConfig, RunResult, SparsityTracer,
                   decay_config, engine_summary, make_sgd, train_loop)

CRITERIA = ("magnitude", "group_sl", "bn_scale")


def _classifier(model: nn.Module):
    linears = [m for m in model.modules() if isinstance(m, nn.Linear)]
    return linears[-1:] if linears else []


class DepGraphRunner(BaseRunner):
    name = "depgraph"
    package = "dpm_depgraph"
    description = "Torch-Pruning / DepGraph pruners (MetaPruner, GroupNormPruner, BNScalePruner), dpm_depgraph"
    requires = ("DecayMetaPruner", "DecayGroupNormPruner", "DecayBNScalePruner")

    def _classes(self, criterion: str):
        import torch_pruning as tp
        import dpm_depgraph as dd

        if criterion == "magnitude":
            return tp.pruner.MetaPruner, dd.DecayMetaPruner, tp.importance.GroupMagnitudeImportance(p=2), False
        if criterion == "group_sl":
            return tp.pruner.GroupNormPruner, dd.DecayGroupNormPruner, tp.importance.GroupMagnitudeImportance(p=2), True
        if criterion == "bn_scale":
            return tp.pruner.BNScalePruner, dd.DecayBNScalePruner, tp.importance.BNScaleImportance(), True
        raise ValueError(f"unknown depgraph criterion {criterion!r}; known: {', '.join(CRITERIA)}")

    def run(self, model, loaders, method, config: RunConfig, *, example_inputs, on_epoch=None,
            progress=True) -> RunResult:
        cfg = config
        train, test = loaders
        decay = decay_config(method, cfg)
        base_cls, decay_cls, importance, sparse_learning = self._classes(cfg.criterion)
        kwargs = dict(importance=importance, pruning_ratio=cfg.ratio, iterative_steps=cfg.iterative_steps,
                      global_pruning=cfg.global_pruning, ignored_layers=_classifier(model))
        if sparse_learning:
            kwargs["reg"] = cfg.reg
        t0 = time.time()
        holder = {"opt": make_sgd(model, cfg.finetune_lr, cfg.momentum, cfg.weight_decay)}
        if decay is None:
            pruner = base_cls(model, example_inputs, **kwargs)
        else:
            pruner = decay_cls(model, example_inputs, decay=decay, **kwargs)
            pruner.attach(holder["opt"])
        engine = getattr(pruner, "engine", None)
        state = {"done": 0, "removal": "n/a"}

        def original_step() -> None:
            from dpm_depgraph import prune_group

            for g in list(pruner.step(interactive=True)):
                # Torch-Pruning's removal, with the optimizer's state sliced (as the decay
                # pruners do) rather than rebuilt, so the methods differ only in the decay
                prune_group(pruner.DG, g, holder["opt"])
                state["removal"] = "sliced optimizer state"
            if hasattr(pruner, "update_regularizer"):
                pruner.update_regularizer()

        def prune_step() -> None:
            if state["done"] >= cfg.iterative_steps:
                return
            if decay is None:
                original_step()
            else:
                pruner.step()
            state["done"] += 1

        total_steps = cfg.epochs * len(train)
        topup_until = (2 * total_steps) // 3
        state["topups"], state["released_seen"] = 0, 0

        def topup_step() -> None:
            released = int(engine.counters.get("released", 0))
            if released == state["released_seen"]:
                return
            state["released_seen"] = released
            pruner.current_step = cfg.iterative_steps - 1   # step() repeats the final ratio
            pruner.step()
            state["topups"] += 1

        tracer = SparsityTracer(lambda: model, every=cfg.trace_every, engine_getter=lambda: engine)
        prune_step()
        tracer(0, force=True)

        def before_step(step: int) -> None:
            if sparse_learning:
                pruner.regularize(model)

        def after_step(step: int) -> None:
            if step % max(1, cfg.prune_every) == 0:
                if state["done"] < cfg.iterative_steps:
                    prune_step()
                elif engine is not None and step <= topup_until:
                    topup_step()
            tracer(step)

        def epoch_info():
            rec = {"sparsity": tracer.sparsity(), "prune_steps_done": state["done"]}
            if engine is not None:
                rec["released_total"] = int(engine.counters.get("released", 0))
                rec["zeroed_total"] = int(engine.counters.get("zeroed", 0))
            return rec

        log = train_loop(model, train, lambda: holder["opt"], epochs=cfg.epochs, base_lr=cfg.finetune_lr,
                         test_loader=test, before_step=before_step, after_step=after_step,
                         on_epoch=on_epoch, epoch_info=epoch_info, progress=progress,
                         desc=f"depgraph {method}", phase="prune+finetune")
        while state["done"] < cfg.iterative_steps:  # very short schedules: finish the pruning steps
            prune_step()
        final = {}
        if decay is not None:
            final = pruner.finalize(force=True)
            pruner.detach()
        tracer(len(train) * cfg.epochs, force=True)
        counters, events = engine_summary(engine)
        info = {"criterion": cfg.criterion, "prune_steps": state["done"], "finalize": final,
                "topup_steps": state["topups"],
                "original_removal": state["removal"] if decay is None else None,
                "train_time_s": time.time() - t0}
        return RunResult(model=model, log=log, trace=tracer.trace, counters=counters, events=events,
                         info=info)
