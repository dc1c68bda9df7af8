"""Only-Train-Once v2 runner (``dpm_otov2``: DHSPG).

Schedule (the same for original / +SP / +SR): ``oto = dpm_otov2.OTO(model, example_inputs)``,
``optimizer = dpm_otov2.dhspg(oto, variant="sgd", lr=finetune_lr, momentum, weight_decay,
lmbda, target_group_sparsity=ratio, start_pruning_step=S, decay=...)`` where ``S`` is
``prune_every`` optimizer steps (the partition into redundant / important zero-invariant groups
and the half-space projection start there), then train ``epochs`` epochs with a cosine learning
rate. ``original`` is ``decay=None`` (DHSPG's single-step half-space projection); ``sp`` / ``sr``
decay the projected groups with the DPM engine. At the end ``oto.construct_subnet`` builds the
physically smaller model that is evaluated and measured. Unlike the paper (OTOv2 trains from
scratch), the runner starts from the pre-trained dense model to fit a CPU budget.
"""
from __future__ import annotations

import tempfile
import time

from .base import (BaseRunner, RunConfig, RunResult, SparsityTracer,
                   decay_config, engine_summary, train_loop)


class OTOv2Runner(BaseRunner):
    name = "otov2"
    package = "dpm_otov2"
    description = "Only-Train-Once v2 (DHSPG, zero-invariant groups), dpm_otov2"
    requires = ("OTO", "dhspg")

    def run(self, model, loaders, method, config: RunConfig, *, example_inputs, on_epoch=None,
            progress=True) -> RunResult:
        import dpm_otov2

        cfg = config
        train, test = loaders
        decay = decay_config(method, cfg)
        t0 = time.time()
        oto = dpm_otov2.OTO(model, example_inputs)
        start = int(cfg.extra.get("start_pruning_step", max(1, cfg.prune_every)))
        opt = dpm_otov2.dhspg(oto, lr=cfg.finetune_lr, variant="sgd", momentum=cfg.momentum,
                              weight_decay=cfg.weight_decay, lmbda=cfg.lmbda,
                              target_group_sparsity=cfg.ratio, start_pruning_step=start,
                              epsilon=cfg.epsilon,
                              decay=decay)
        engine = getattr(opt, "engine", None)
        tracer = SparsityTracer(lambda: model, every=cfg.trace_every, engine_getter=lambda: engine,
                                sparsity_fn=opt.compute_group_sparsity)
        tracer(0, force=True)

        def epoch_info():
            rec = {"sparsity": float(opt.compute_group_sparsity())}
            if engine is not None:
                rec["released_total"] = int(engine.counters.get("released", 0))
                rec["zeroed_total"] = int(engine.counters.get("zeroed", 0))
            return rec

        log = train_loop(model, train, lambda: opt, epochs=cfg.epochs, base_lr=cfg.finetune_lr,
                         test_loader=test, after_step=tracer, on_epoch=on_epoch,
                         epoch_info=epoch_info, progress=progress, desc=f"otov2 {method}",
                         phase="prune+train")
        forced = 0
        if engine is not None:
            for name in engine.groups():
                forced += int(engine.zero_now(name).numel())
        tracer(len(train) * cfg.epochs, force=True)
        sparsity = float(opt.compute_group_sparsity())
        model.eval()
        with tempfile.TemporaryDirectory(prefix="dpm-oto-") as d:
            oto.construct_subnet(out_dir=d)
            small = oto.compressed_model() if hasattr(oto, "compressed_model") \
                else dpm_otov2.load_subnet(oto.compressed_model_path)
        small.eval()
        counters, events = engine_summary(engine)
        info = {"group_sparsity": sparsity, "target_group_sparsity": cfg.ratio,
                "start_pruning_step": start, "forced_zero_at_end": forced,
                "num_zigs": int(getattr(opt, "total_num_groups", 0)),
                "train_time_s": time.time() - t0}
        return RunResult(model=small, log=log, trace=tracer.trace, counters=counters, events=events,
                         info=info)
