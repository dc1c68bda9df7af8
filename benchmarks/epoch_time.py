"""Training speed of the CIFAR ResNets on this machine (RESULTS.md, "epoch time").

``python -m benchmarks.epoch_time --threads 1`` times full training iterations (forward under
bfloat16 autocast, backward, SGD + Nesterov step) of ResNet-20 and ResNet-56 on a batch of
128 random 32x32 images in channels_last, and prints the median seconds per batch and the
implied seconds per epoch of the 50,000 CIFAR-10 training images (391 batches).
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn as nn

from benchmarks.models import resnet20, resnet56


def time_model(build, batch: int = 128, iters: int = 12, warmup: int = 3) -> list[float]:
    """Seconds of each of ``iters`` training iterations after ``warmup`` ones."""
    model = build().to(memory_format=torch.channels_last)
    opt = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9, nesterov=True,
                          weight_decay=5e-4)
    x = torch.randn(batch, 3, 32, 32).to(memory_format=torch.channels_last)
    y = torch.randint(0, 10, (batch,))
    times = []
    for i in range(warmup + iters):
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            loss = nn.functional.cross_entropy(model(x), y)
        loss.backward()
        opt.step()
        if i >= warmup:
            times.append(time.perf_counter() - t)
    return times


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--threads", type=int, default=1, help="torch threads")
    ap.add_argument("--iters", type=int, default=12, help="timed iterations per model")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    for name, build in (("resnet20", resnet20), ("resnet56", resnet56)):
        ts = time_model(build, iters=args.iters)
        med = statistics.median(ts)
        print(f"{name}: median {med:.3f} s per batch of 128 ({args.threads} thread(s)), "
              f"{med * 391:.0f} s per epoch of 391 batches; fastest batch {min(ts):.3f} s",
              flush=True)
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
