"""Per-step cost of the decay engine on a full training iteration.

Builds a CIFAR ResNet-56, registers one engine group per conv layer (its filters, its
BatchNorm's scale and shift, and the next conv's input slices where they line up),
marks half of every group's channels, and times full training iterations (forward,
backward, ``optimizer.step()``) with and without the engine attached, interleaved in
one process so both see the same machine load. The decaying channels never finish
(N is huge) and never get released (T_rate > 1), so the engine does the same work on
every step: per group, gather, norms, criteria and write-back for half the channels.

Prints median seconds per iteration for both and their ratio, the median of the ratios
of back-to-back pairs (robust to slow changes of the machine's load), and the time spent
inside the engine's hooks measured directly (the engine's own cost, immune to noise in
the forward and backward passes).

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


def run(batch: int = 128, iters: int = 15, warmup: int = 2, threads: int | None = None,
        seed: int = 0) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model = resnet56()
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    engine = DecayEngine(DecayConfig(steps=10 ** 9, t_rate=2.0, t_len=0.8, self_rectify=True))
    groups = build_groups(model, engine)
    total = decaying = 0
    for name in engine.groups():
        m = engine.num_channels(name)
        engine.mark(name, list(range(0, m, 2)))
        total += m
        decaying += len(range(0, m, 2))
    x = torch.randn(batch, 3, 32, 32)
    y = torch.randint(0, 10, (batch,))
    loss_fn = nn.CrossEntropyLoss()

    hook_time = [0.0]
    pre, post = engine._pre_step, engine._post_step

    def timed_pre(*a):
        t = time.perf_counter()
        pre(*a)
        hook_time[0] += time.perf_counter() - t

    def timed_post(*a):
        t = time.perf_counter()
        post(*a)
        hook_time[0] += time.perf_counter() - t

    def iteration() -> float:
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        opt.step()
        return time.perf_counter() - t

    for _ in range(warmup):
        iteration()
    without, with_, hooks = [], [], []
    for i in range(iters):
        order = (False, True) if i % 2 == 0 else (True, False)
        for attached in order:
            if attached:
                h1 = opt.register_step_pre_hook(timed_pre)
                h2 = opt.register_step_post_hook(timed_post)
                hook_time[0] = 0.0
                with_.append(iteration())
                hooks.append(hook_time[0])
                h1.remove()
                h2.remove()
            else:
                without.append(iteration())
    t0, t1, th = statistics.median(without), statistics.median(with_), statistics.median(hooks)
    # each pair ran back to back, so its ratio cancels slow drifts of the machine's load
    paired = statistics.median(w / wo for w, wo in zip(with_, without))
    return {"batch": batch, "iters": iters, "groups": groups, "channels": total,
            "decaying": decaying, "threads": torch.get_num_threads(),
            "sec_without": t0, "sec_with": t1, "ratio": t1 / t0, "paired_ratio": paired,
            "hook_sec": th, "hook_share": th / t0}


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--batch", type=int, default=128, help="batch size (default 128)")
    ap.add_argument("--iters", type=int, default=15,
                    help="timed iterations per variant, interleaved (default 15)")
    ap.add_argument("--warmup", type=int, default=2, help="untimed warm-up iterations")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch CPU threads (default: torch's own setting)")


def _report(args) -> dict:
    for name in ("batch", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    r = run(args.batch, args.iters, args.warmup, args.threads)
    print(f"ResNet-56, batch {r['batch']}, {r['threads']} threads, {r['groups']} groups, "
          f"{r['decaying']}/{r['channels']} channels decaying")
    print(f"median s/iter without engine: {r['sec_without']:.4f}")
    print(f"median s/iter with engine:    {r['sec_with']:.4f}")
    print(f"ratio of medians (with/without): {r['ratio']:.4f}  "
          f"({(r['ratio'] - 1) * 100:+.2f}%)")
    print(f"median of paired ratios:         {r['paired_ratio']:.4f}  "
          f"({(r['paired_ratio'] - 1) * 100:+.2f}%)")
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
