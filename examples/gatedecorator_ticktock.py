"""Gate Decorator tick-tock pruning, single-step vs. Decay Pruning (DPM), on a small CNN.

Runs on CPU in well under a minute with scikit-learn's bundled 8x8 digits (no download):

    python examples/gatedecorator_ticktock.py [--rounds 5] [--ratio 0.5] [--seed 0]

1. trains a small CIFAR-style CNN (3 conv+BN+ReLU layers, GAP, Linear) on the digits;
2. for each of "single-step" (Gate Decorator as published: masks set to 0 at the decision)
   and "DPM" (decay=DecayConfig(...): the chosen filters' whole structures decay to zero over
   N optimizer steps, Self-Rectifying may release some, masks close at zero):
   tick (Taylor scores over a few batches while the gates, BN shifts and classifier train, as
   the original) -> prune (the original's rule; the budget counts BatchNorm channels) -> tock
   (fine-tune one epoch with the L1 penalty on the gates), ``--rounds`` times, then melt into a
   plain smaller model;
3. prints FLOPs, parameters and test accuracy before pruning and after melt for both.
"""

from __future__ import annotations

import argparse
import copy
import time

import torch
import torch.nn.functional as F
import torch_pruning as tp

from benchmarks.models import get_model
from dpm_core import DecayConfig
from dpm_gatedecorator import GateDecorator


def load_digits(seed: int):
    from sklearn.datasets import load_digits as _load

    d = _load()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0  # N x 1 x 8 x 8
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    x, y = x[perm], y[perm]
    n_train = int(0.8 * len(y))
    return (x[:n_train], y[:n_train]), (x[n_train:], y[n_train:])


def batches(x, y, bs, seed):
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    for i in range(0, len(y), bs):
        idx = perm[i:i + bs]
        yield x[idx], y[idx]


@torch.no_grad()
def accuracy(model, x, y) -> float:
    was = model.training
    model.eval()
    acc = float((model(x).argmax(1) == y).float().mean())
    model.train(was)
    return acc


def cost(model, example) -> tuple:
    model = copy.deepcopy(model).eval()
    flops, params = tp.utils.count_ops_and_params(model, example)
    return flops, params


def train(model, data, epochs, lr, seed, extra_loss=None):
    x, y = data
    opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)
    model.train()
    for ep in range(epochs):
        for xb, yb in batches(x, y, 64, seed + ep):
            opt.zero_grad(set_to_none=True)
            F.cross_entropy(model(xb), yb).backward()
            opt.step()


def prune_ticktock(base, train_data, test_data, decay, rounds, ratio, seed):
    torch.manual_seed(seed)
    model = copy.deepcopy(base)
    x, y = train_data
    gd = GateDecorator(model, x[:1], min_keep_ratio=0.1, decay=decay, sparse_lambda=1e-4)
    # the optimizer is built AFTER GateDecorator: the gates are new parameters
    opt = torch.optim.SGD(model.parameters(), lr=0.02, momentum=0.9, weight_decay=5e-4)
    gd.attach(opt)
    total = gd.summary()["units"]  # BatchNorm channels: the unit of gd.prune's budget
    target = int(round(ratio * total))
    model.train()
    step = 0
    for r in range(rounds):
        # tick: Taylor scores |g * dL/dg| over a few batches while the gates, the BN shifts and
        # the classifier train (SGD lr 1e-3, momentum 0.9, wd 5e-4; convs frozen), as the
        # original (your own loop inside `with gd.scoring():` works too)
        gd.tick(batches(x, y, 64, seed + 100 + r), F.cross_entropy, num_batches=4)
        s = gd.summary()
        gone = s["units_masked"] + s["units_decaying"]  # released filters are live again
        need = int(round(target * (r + 1) / rounds)) - gone
        if need > 0:
            gd.prune(min(need, gd.max_prunable()) - 1)  # prunes >= that many BN channels
        # tock: fine-tune one epoch with the L1 penalty on the gates
        for xb, yb in batches(x, y, 64, seed + 200 + r):
            opt.zero_grad(set_to_none=True)
            (F.cross_entropy(model(xb), yb) + gd.gate_l1()).backward()
            opt.step()
            step += 1
    # final tock epoch (both methods). With DPM, Self-Rectifying may have released filters:
    # during the first half of this epoch the decisions are topped up to the target.
    n_batches = (len(y) + 63) // 64
    for i, (xb, yb) in enumerate(batches(x, y, 64, seed + 999)):
        s = gd.summary()
        if gd.engine is not None and i < n_batches // 2 and not s["decaying"] \
                and s["units_masked"] < target:
            gd.tick([(xb, yb)], F.cross_entropy)
            if gd.max_prunable():
                gd.prune(min(target - s["units_masked"], gd.max_prunable()) - 1)
        opt.zero_grad(set_to_none=True)
        (F.cross_entropy(model(xb), yb) + gd.gate_l1()).backward()
        opt.step()
    if gd.engine is not None:
        for g in gd.groups:  # anything still decaying is zeroed now (and its mask closed)
            gd.engine.zero_now(g.name)
    summary = gd.summary()
    masked_acc = accuracy(model, *test_data)
    small = gd.melt()
    return small, summary, masked_acc


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--ratio", type=float, default=0.5, help="fraction of filters to prune")
    ap.add_argument("--steps", type=int, default=5, help="DPM decaying steps N")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--threads", type=int, default=1,
                    help="torch intra-op threads (1 is fastest for this tiny model)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    t0 = time.time()
    torch.manual_seed(args.seed)
    train_data, test_data = load_digits(args.seed)
    example = train_data[0][:1]
    base = get_model("small_cnn", num_classes=10, in_channels=1, width=1.0)
    train(base, train_data, 3, 0.05, args.seed)
    f0, p0 = cost(base, example)
    a0 = accuracy(base, *test_data)
    print(f"pretrained small_cnn on digits: FLOPs {f0 / 1e6:.3f}M  params {p0 / 1e3:.1f}K  "
          f"test acc {a0:.4f}  ({time.time() - t0:.1f}s)")
    rows = []
    for label, decay in (("single-step", None),
                         ("DPM (SP+SR)", DecayConfig(steps=args.steps, t_rate=0.3, t_len=0.8))):
        t1 = time.time()
        small, summary, masked_acc = prune_ticktock(base, train_data, test_data, decay,
                                                   args.rounds, args.ratio, args.seed)
        f1, p1 = cost(small, example)
        a1 = accuracy(small, *test_data)
        eng = summary.get("engine", {})
        rows.append((label, f1, p1, masked_acc, a1, eng.get("released", 0), time.time() - t1,
                     f"{summary['units_masked']}/{summary['units']}"))
    print(f"\n{'method':<13} {'FLOPs before':>12} {'FLOPs after':>11} {'params before':>13} "
          f"{'params after':>12} {'acc pretrained':>14} {'acc before melt':>15} "
          f"{'acc after melt':>14} {'pruned':>7} {'released':>8} {'time':>6}")
    for label, f1, p1, am, a1, rel, dt, pr in rows:
        print(f"{label:<13} {f0 / 1e6:>11.3f}M {f1 / 1e6:>10.3f}M {p0 / 1e3:>12.1f}K "
              f"{p1 / 1e3:>11.1f}K {a0:>14.4f} {am:>15.4f} {a1:>14.4f} {pr:>7} {rel:>8} {dt:>5.1f}s")
    print(f"\n'FLOPs/params before' are the unpruned model's (the decorated model before melt has "
          f"the same shapes, with masks); 'acc before melt' is the masked model after tick-tock. "
          f"Total {time.time() - t0:.1f}s.")


if __name__ == "__main__":
    main()
