"""Per-step cost of the decay engine on a full training iteration.

Builds a CIFAR ResNet-56, registers one engine group per conv layer (its filters, its
BatchNorm's scale and shift, and the next conv's input slices where they line up),
marks half of every group's channels, and times full training iterations (forward,
backward, ``optimizer.step()``) with and without the engine attached, interleaved in
one process so both see the same machine load. The decaying channels never finish
(N is huge) and never get released (T_rate > 1), so the engine does the same work on
every step: gradient and weight norms of all channels of the decaying groups, the
criteria, and the write-back.

A third variant, the control, attaches an engine over the same groups with nothing
decaying: its ratio to the plain run shows the noise floor of the end-to-end figures.
Each round runs the variants back to back, in an order rotated from round to round.

Prints median seconds per iteration and their ratio, the median (and quartiles) of the
per-round ratios (robust to slow changes of the machine's load), the control's, the
median time of ``optimizer.step()`` alone with and without the engine (the engine runs
inside it) and of the forward and backward passes (which it should leave unchanged),
and the time spent inside the engine's hooks measured directly. The step and hook
figures are immune to the noise of the forward and backward passes, which on a shared
machine is larger than the engine's cost.

    python -m benchmarks.overhead --batch 128 --iters 15
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from dpm_core import DecayConfig, DecayEngine

from .models import resnet56


def build_groups(model: nn.Module, engine: DecayEngine) -> int:
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d))]
    count = 0
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        slices = [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) \
                and mods[i + 1].num_features == m.out_channels:
            bn = mods[i + 1]
            slices += [(bn.weight, 0), (bn.bias, 0)]
        nxt = next((c for c in mods[i + 1:] if isinstance(c, nn.Conv2d)), None)
        if nxt is not None and nxt.in_channels == m.out_channels and nxt.groups == 1:
            slices.append((nxt.weight, 1))
        engine.add_group(f"conv{i}", slices)
        count += 1
    return count


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def run(batch: int = 128, iters: int = 15, warmup: int = 2, threads: int | None = None,
        seed: int = 0, control: bool = True, capture: bool = False) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = resnet56()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    cfg = DecayConfig(steps=10 ** 9, t_rate=0.3, t_len=1e9, self_rectify=True)
    engine = DecayEngine(cfg)
    groups = build_groups(model, engine)
    total = decaying = 0
    for name in engine.groups():
        m = engine.num_channels(name)
        engine.mark(name, list(range(0, m, 2)))
        total += m
        decaying += len(range(0, m, 2))
    # the control: the same groups, attached, nothing decaying (hooks run, do no work)
    idle = DecayEngine(cfg)
    build_groups(model, idle)
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    hook_time = [0.0]

    def timed(hook):
        def wrapper(*a):
            t = time.perf_counter()
            hook(*a)
            hook_time[0] += time.perf_counter() - t
        return wrapper

    def iteration(eng: DecayEngine | None = None) -> tuple[float, float]:
        """Seconds for the whole iteration and for its ``optimizer.step()`` alone.

        With ``capture``, the engine's ``capture_clean_grads()`` (what a penalty-adding
        ``regularize()`` calls) runs before the step and counts as part of it.
        """
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        t_step = time.perf_counter()
        if capture and eng is not None:
            eng.capture_clean_grads()
        opt.step()
        end = time.perf_counter()
        return end - t, end - t_step

    for _ in range(warmup):
        iteration()
    variants = ["without", "with"] + (["control"] if control else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    steps: dict[str, list[float]] = {v: [] for v in variants}
    hooks: list[float] = []
    for i in range(iters):
        # rotate the order every round so no variant always runs first or last
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            eng = {"with": engine, "control": idle}.get(v)
            handles = []
            if eng is not None:
                handles = [opt.register_step_pre_hook(timed(eng._pre_step)),
                           opt.register_step_post_hook(timed(eng._post_step))]
            hook_time[0] = 0.0
            whole, step = iteration(eng)
            times[v].append(whole)
            steps[v].append(step)
            if v == "with":
                hooks.append(hook_time[0])
            for h in handles:
                h.remove()
    t0, t1, th = (statistics.median(times["without"]), statistics.median(times["with"]),
                  statistics.median(hooks))
    # the variants of one round ran back to back, so their ratio cancels slow drifts of
    # the machine's load
    paired = [w / wo for w, wo in zip(times["with"], times["without"])]
    # the engine runs inside optimizer.step(); the forward and backward passes should be
    # unchanged (nothing the engine does leaks into them): both are reported
    s0, s1 = statistics.median(steps["without"]), statistics.median(steps["with"])
    fb0 = statistics.median(a - b for a, b in zip(times["without"], steps["without"]))
    fb1 = statistics.median(a - b for a, b in zip(times["with"], steps["with"]))
    r = {"batch": batch, "iters": iters, "groups": groups, "channels": total,
         "decaying": decaying, "threads": torch.get_num_threads(),
         "step_sec_without": s0, "step_sec_with": s1, "step_share": (s1 - s0) / t0,
         "fwdbwd_sec_without": fb0, "fwdbwd_sec_with": fb1, "fwdbwd_ratio": fb1 / fb0,
         "sec_without": t0, "sec_with": t1, "ratio": t1 / t0,
         "paired_ratio": statistics.median(paired), "paired_iqr": _quartiles(paired),
         "hook_sec": th, "hook_share": th / t0}
    if control:
        pc = [c / wo for c, wo in zip(times["control"], times["without"])]
        r.update(sec_control=statistics.median(times["control"]),
                 control_paired_ratio=statistics.median(pc), control_paired_iqr=_quartiles(pc))
    return r


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--iters", type=int, default=15,
                    help="timed rounds; each round runs every variant once (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own setting)")
    ap.add_argument("--no-control", dest="control", action="store_false",
                    help="skip the control variant (engine attached, nothing decaying)")
    ap.add_argument("--capture-clean-grads", dest="capture", action="store_true",
                    help="call engine.capture_clean_grads() before every step (as the decay "
                         "pruners' regularize() does); its time counts in the step's")


def _report(args) -> dict:
    for name in ("batch", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    r = run(args.batch, args.iters, args.warmup, args.threads, control=args.control,
            capture=args.capture)
    print(f"ResNet-56, batch {r['batch']}, {r['threads']} threads, {r['groups']} groups, "
          f"{r['decaying']}/{r['channels']} channels decaying, {r['iters']} rounds"
          + (", capture_clean_grads() every step" if args.capture else ""))
    print(f"median s/iter without engine: {r['sec_without']:.4f}")
    print(f"median s/iter with engine:    {r['sec_with']:.4f}")
    print(f"ratio of medians (with/without): {r['ratio']:.4f}  "
          f"({(r['ratio'] - 1) * 100:+.2f}%)")
    lo, hi = r["paired_iqr"]
    print(f"median of paired ratios:         {r['paired_ratio']:.4f}  "
          f"({(r['paired_ratio'] - 1) * 100:+.2f}%)  quartiles {lo:.4f}-{hi:.4f}")
    if "control_paired_ratio" in r:
        lo, hi = r["control_paired_iqr"]
        print(f"control (attached, nothing decaying), paired: "
              f"{r['control_paired_ratio']:.4f}  "
              f"({(r['control_paired_ratio'] - 1) * 100:+.2f}%)  quartiles {lo:.4f}-{hi:.4f}"
              f"  <- the noise floor of the end-to-end figures")
    print(f"optimizer.step() alone, median: {r['step_sec_without'] * 1000:.2f} ms without, "
          f"{r['step_sec_with'] * 1000:.2f} ms with: the engine adds "
          f"{r['step_share'] * 100:.2f}% of an iteration")
    print(f"forward + backward, median: {r['fwdbwd_sec_without']:.4f} s without, "
          f"{r['fwdbwd_sec_with']:.4f} s with (ratio {r['fwdbwd_ratio']:.4f})")
    print(f"engine hooks alone: {r['hook_sec'] * 1000:.2f} ms/step = "
          f"{r['hook_share'] * 100:.2f}% of an iteration")
    return r


def register(subparsers) -> None:
    """Add the ``overhead`` subcommand to ``dpm-bench``."""
    ap = subparsers.add_parser("overhead", help="time overhead of the DPM engine per "
                               "training iteration (ResNet-56, half the channels decaying)",
                               description=__doc__,
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    ap.set_defaults(func=lambda args: (_report(args), 0)[1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    return _report(ap.parse_args(argv))


if __name__ == "__main__":
    main()
