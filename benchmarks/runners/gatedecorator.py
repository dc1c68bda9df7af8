"""Gate Decorator runner (``dpm_gatedecorator.GateDecorator``), on the original's tick rules.

Schedule (the same for original / +SP / +SR): install the gates on the pre-trained model, build
SGD over all parameters, ``gd.attach(optimizer)``; then fine-tune for ``epochs`` epochs with the
L1 gate penalty (``gd.gate_l1()``, weight ``reg``, over every gate as the original; the DPM
methods leave decaying gates out) added to the loss (tock). Pruning rounds (tick + prune) happen
every ``prune_every`` optimizer steps, starting before the first step.

The tick is the original's: ``gd.tick`` scores ``score_batches`` batches while an SGD step after
each trains everything but the convolutions (the gates, the BN shifts and the classifier; the
conv weights frozen) at the original's tick learning rate, the schedule's minimum (here
``finetune_lr / 10``, the original's lr_min / lr_max; ``extra["tick_lr"]`` overrides it), with
the run's momentum and weight decay (0.9 and 5e-4 by default, the original's).

The decision is the original's rule (``gd.prune``): the budget counts BatchNorm channels (a
residual channel shared by k BNs costs k units) and ``prune(num)`` prunes every channel scoring
at most the num-th lowest entry, ties included, plus zero-score channels. The target is in the
same units, the original's "pruned ratio": round r prunes up to ``ratio * (r + 1) /
iterative_steps`` of all BN channels (masked and decaying ones count as pruned), by asking for
``num = need - 1`` (at least ``need`` units go; ties and zero-score channels can add a few).
``extra["flops_eta"]`` sets the original's FLOPs term (0 by default, as its configs). Filters
released by Self-Rectifying are live again, so after the ``iterative_steps`` rounds further
top-up rounds, every ``prune_every`` steps during the first two thirds of fine-tuning, prune the
deficit: all methods reach the same target. At the end, channels still decaying are zeroed
(``engine.zero_now``) and ``gd.melt()`` gives the physically smaller model that is evaluated and
measured.
"""
from __future__ import annotations

import time

import torch
import torch.nn.functional as F

from .base import (BaseRunner, RunConfig, RunResult, SparsityTracer, decay_config, engine_summary,
                   evaluate, make_sgd, train_loop)


class GateDecoratorRunner(BaseRunner):
    name = "gatedecorator"
    package = "dpm_gatedecorator"
    description = "Gate Decorator (Taylor scores on BN gates, tick-tock), dpm_gatedecorator"
    requires = ("GateDecorator",)

    def run(self, model, loaders, method, config: RunConfig, *, example_inputs, on_epoch=None,
            progress=True) -> RunResult:
        from dpm_gatedecorator import GateDecorator

        from ..data import TensorLoader

        cfg = config
        train, test = loaders
        decay = decay_config(method, cfg)
        t0 = time.time()
        flops_eta = float(cfg.extra.get("flops_eta", 0.0))
        tick_lr = float(cfg.extra.get("tick_lr", cfg.finetune_lr / 10))
        gd = GateDecorator(model, example_inputs, min_keep_ratio=cfg.min_keep_ratio, decay=decay,
                           sparse_lambda=cfg.reg, flops_eta=flops_eta)
        opt = make_sgd(model, cfg.finetune_lr, cfg.momentum, cfg.weight_decay)
        gd.attach(opt)
        total_channels = sum(g.m for g in gd.groups)
        total_units = gd.summary()["units"]
        target_units = int(round(cfg.ratio * total_units))
        score_loader = TensorLoader(train.images, train.labels, train.batch_size, shuffle=True,
                                    augment=False, mean=train.mean.flatten().tolist(),
                                    std=train.std.flatten().tolist(), seed=cfg.seed + 1)
        steps_per_epoch = len(train)
        total_steps = cfg.epochs * steps_per_epoch
        k = max(1, int(cfg.iterative_steps))
        n_score = max(1, cfg.score_batches)
        topup_until = (2 * total_steps) // 3
        state = {"round": 0, "pruned_calls": 0, "capped": 0, "rounds": []}

        def pruned_now() -> int:
            s = gd.summary()
            return int(s["units_masked"]) + int(s["units_decaying"])

        def score_batches():
            it, n = iter(score_loader), 0
            while n < n_score:
                try:
                    yield next(it)
                except StopIteration:
                    it = iter(score_loader)
                    continue
                n += 1

        def do_round(step: int) -> None:
            r = state["round"]
            goal = int(round(target_units * min(r + 1, k) / k))
            need = goal - pruned_now()
            state["round"] += 1
            if need <= 0:
                return
            gd.tick(score_batches(), F.cross_entropy, num_batches=n_score, lr=tick_lr,
                    momentum=cfg.momentum, weight_decay=cfg.weight_decay)
            avail = gd.max_prunable()  # the candidate pool, in BN-channel units
            if need > avail:
                state["capped"] += 1   # min_keep_ratio caps what can go
            if min(need, avail) > 0:
                num = min(need, avail) - 1  # the threshold entry: >= min(need, avail) units go
                gd.prune(num)
                state["pruned_calls"] += 1
                state["rounds"].append({"step": step, "goal": goal, "need": need, "num": num,
                                        "units": gd.history[-1]["units"]})

        tracer = SparsityTracer(lambda: model, every=cfg.trace_every,
                                engine_getter=lambda: gd.engine,
                                sparsity_fn=lambda: gd.summary()["units_masked"] / max(1, total_units))
        do_round(0)
        tracer(0, force=True)

        def after_step(step: int) -> None:
            if step % max(1, cfg.prune_every) == 0:
                if state["round"] < k:
                    do_round(step)
                elif step <= topup_until and pruned_now() < target_units:
                    do_round(step)
            tracer(step)

        def epoch_info():
            s = gd.summary()
            return {"sparsity": s["units_masked"] / max(1, total_units),
                    "decaying": s["decaying"],
                    "released_total": int(s.get("engine", {}).get("released", 0))}

        log = train_loop(model, train, lambda: opt, epochs=cfg.epochs, base_lr=cfg.finetune_lr,
                         test_loader=test, after_step=after_step, loss_extra=lambda m: gd.gate_l1(),
                         on_epoch=on_epoch, epoch_info=epoch_info, progress=progress,
                         desc=f"gatedecorator {method}", phase="prune+finetune")
        forced = 0
        if gd.engine is not None:
            for g in gd.groups:
                forced += int(gd.engine.zero_now(g.name).numel())
        tracer(total_steps, force=True)
        summary = gd.summary()
        gd.detach()
        small = gd.melt()
        small.eval()
        counters, events = engine_summary(gd.engine)
        acc_masked, _ = evaluate(model, test)
        info = {"prune_rounds": state["pruned_calls"], "capped_rounds": state["capped"],
                "rounds": state["rounds"],
                "forced_zero_at_end": forced, "gate_channels": total_channels,
                "gate_units": total_units, "target_units": target_units,
                "pruned_units": int(summary["units_masked"]), "tick_lr": tick_lr,
                "flops_eta": flops_eta, "final_summary": summary,
                "masked_model_acc": acc_masked, "train_time_s": time.time() - t0}
        return RunResult(model=small, log=log, trace=tracer.trace, counters=counters,
                         events=events, info=info)
