"""Gate Decorator runner (``dpm_gatedecorator.GateDecorator``).

Schedule (the same for original / +SP / +SR): install the gates on the pre-trained model, build
SGD over all parameters, ``gd.attach(optimizer)``; then fine-tune for ``epochs`` epochs with the
L1 gate penalty (``gd.gate_l1()``, weight ``reg``) added to the loss (tock). Pruning rounds
(tick + prune) happen every ``prune_every`` optimizer steps, starting before the first step:
round r first gathers Taylor scores over ``score_batches`` batches and then prunes enough filters
to reach ``ratio * (r + 1) / iterative_steps`` of all gate-group channels (masked and decaying
channels count as pruned). Filters released by Self-Rectifying are live again, so after the
``iterative_steps`` rounds further top-up rounds, every ``prune_every`` steps during the first
two thirds of fine-tuning, prune the deficit: all three methods reach the same target. At the end,
channels still decaying are zeroed (``engine.zero_now``) and ``gd.melt()`` gives the physically
smaller model that is evaluated and measured.
"""
from __future__ import annotations

import math
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
        gd = GateDecorator(model, example_inputs, min_keep_ratio=cfg.min_keep_ratio, decay=decay,
                           sparse_lambda=cfg.reg)
        opt = make_sgd(model, cfg.finetune_lr, cfg.momentum, cfg.weight_decay)
        gd.attach(opt)
        total_channels = sum(g.m for g in gd.groups)
        target_total = int(round(cfg.ratio * total_channels))
        score_loader = TensorLoader(train.images, train.labels, train.batch_size, shuffle=True,
                                    augment=False, mean=train.mean.flatten().tolist(),
                                    std=train.std.flatten().tolist(), seed=cfg.seed + 1)
        steps_per_epoch = len(train)
        total_steps = cfg.epochs * steps_per_epoch
        k = max(1, int(cfg.iterative_steps))
        topup_until = (2 * total_steps) // 3
        state = {"round": 0, "pruned_calls": 0, "capped": 0}

        def pruned_now() -> int:
            s = gd.summary()
            return int(s["masked"]) + int(s["decaying"])

        def do_round(step: int) -> None:
            r = state["round"]
            goal = int(round(target_total * min(r + 1, k) / k))
            need = goal - pruned_now()
            state["round"] += 1
            if need <= 0:
                return
            it = iter(score_loader)
            with gd.scoring():
                for _ in range(max(1, cfg.score_batches)):
                    try:
                        x, y = next(it)
                    except StopIteration:
                        it = iter(score_loader)
                        x, y = next(it)
                    model.zero_grad(set_to_none=True)
                    F.cross_entropy(model(x), y).backward()
            model.zero_grad(set_to_none=True)
            try:
                gd.prune(need)
            except ValueError:
                # min_keep_ratio caps what can go; prune what is allowed and note it
                avail = sum(max(0, int(gd.remaining(g.name).sum()) - g.keep_min) for g in gd.groups)
                if avail > 0:
                    gd.prune(min(need, avail))
                state["capped"] += 1
            state["pruned_calls"] += 1

        tracer = SparsityTracer(lambda: model, every=cfg.trace_every,
                                engine_getter=lambda: gd.engine,
                                sparsity_fn=lambda: gd.summary()["masked"] / max(1, total_channels))
        do_round(0)
        tracer(0, force=True)

        def after_step(step: int) -> None:
            if step % max(1, cfg.prune_every) == 0:
                if state["round"] < k:
                    do_round(step)
                elif step <= topup_until and pruned_now() < target_total:
                    do_round(step)
            tracer(step)

        def epoch_info():
            s = gd.summary()
            return {"sparsity": s["masked"] / max(1, total_channels),
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
                "forced_zero_at_end": forced, "gate_channels": total_channels,
                "target_channels": target_total, "final_summary": summary,
                "masked_model_acc": acc_masked, "train_time_s": time.time() - t0}
        return RunResult(model=small, log=log, trace=tracer.trace, counters=counters,
                         events=events, info=info)
