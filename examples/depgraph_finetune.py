"""Iterative Torch-Pruning fine-tuning, with and without the Decay Pruning Method (DPM).

A normal Torch-Pruning script (prune a step, fine-tune, repeat); the lines marked
``# DPM`` are the whole change (see docs/depgraph.md for the diff). Runs on CPU in about
a minute on scikit-learn's bundled 8x8 digits (upsampled to 16x16, no download):

    python examples/depgraph_finetune.py                 # DecayGroupNormPruner (+SR)
    python examples/depgraph_finetune.py --base          # tp.pruner.GroupNormPruner
    python examples/depgraph_finetune.py --decay-steps 1 --no-sr   # same channels as --base

It prints, for the pruned model: channel counts per layer, MACs/parameters
(``tp.utils.count_ops_and_params``), test accuracy, and for DPM the decay counters
(marked / released / zeroed) and a norm curve of one decaying channel.
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F

t0 = time.time()
import torch_pruning as tp

from benchmarks.data import load_dataset, make_loaders
from benchmarks.models import get_model
from dpm_core import DecayConfig                 # DPM
from dpm_depgraph import DecayGroupNormPruner    # DPM


def evaluate(model, loader):
    model.eval()
    correct = total = 0
    with torch.no_grad():
        for x, y in loader:
            correct += int((model(x).argmax(1) == y).sum())
            total += len(y)
    return correct / total


def train_epoch(model, optimizer, loader, pruner=None, on_step=None):
    model.train()
    for x, y in loader:
        optimizer.zero_grad()
        F.cross_entropy(model(x), y).backward()
        if pruner is not None:
            pruner.regularize(model)          # GroupNormPruner's sparse learning
        optimizer.step()
        if on_step is not None:
            on_step()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--base", action="store_true", help="plain Torch-Pruning (no DPM)")
    ap.add_argument("--model", default="resnet20")
    ap.add_argument("--width", type=float, default=0.5)
    ap.add_argument("--ratio", type=float, default=0.5, help="final channel pruning ratio")
    ap.add_argument("--iterative-steps", type=int, default=4)
    ap.add_argument("--pretrain-epochs", type=int, default=4)
    ap.add_argument("--finetune-epochs", type=int, default=1, help="per pruning step")
    ap.add_argument("--decay-steps", type=int, default=3, help="N of Smooth Pruning")
    ap.add_argument("--t-rate", type=float, default=0.1, help="T_rate (0.1-0.2 with sparse learning)")
    ap.add_argument("--t-len", type=float, default=0.5, help="T_len (0.5 with sparse learning)")
    ap.add_argument("--no-sr", action="store_true", help="Smooth Pruning only (+SP)")
    ap.add_argument("--global-pruning", action="store_true")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args(argv)

    torch.manual_seed(args.seed)
    print(f"imports done ({time.time() - t0:.0f}s)")
    ds = load_dataset("digits", image_size=8)   # native 8x8 digits, 3 channels
    train_loader, test_loader = make_loaders(ds, batch_size=64, seed=args.seed)
    model = get_model(args.model, num_classes=ds.num_classes, width=args.width)
    example_inputs = torch.randn(1, 3, 8, 8)

    def make_optimizer(lr):
        return torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=5e-4)

    optimizer = make_optimizer(0.05)
    for _ in range(args.pretrain_epochs):
        train_epoch(model, optimizer, train_loader)
    macs0, params0 = tp.utils.count_ops_and_params(model, example_inputs)
    print(f"pre-trained: acc {evaluate(model, test_loader):.3f}  MACs {macs0 / 1e6:.2f}M  "
          f"params {params0 / 1e3:.1f}K  ({time.time() - t0:.0f}s)")

    kwargs = dict(importance=tp.importance.GroupMagnitudeImportance(p=2),
                  pruning_ratio=args.ratio, iterative_steps=args.iterative_steps,
                  global_pruning=args.global_pruning, ignored_layers=[model.fc], reg=1e-4)
    if args.base:
        pruner = tp.pruner.GroupNormPruner(model, example_inputs, **kwargs)
    else:
        pruner = DecayGroupNormPruner(model, example_inputs, **kwargs,                    # DPM
                                      decay=DecayConfig(steps=args.decay_steps,            # DPM
                                                        t_rate=args.t_rate, t_len=args.t_len,
                                                        self_rectify=not args.no_sr))
    optimizer = make_optimizer(0.01)
    if not args.base:
        pruner.attach(optimizer)                                                          # DPM

    watch, curve = {}, []

    def record():
        if "name" in watch and len(curve) < 8:
            g = pruner.engine
            st = g.state(watch["name"])
            c = watch["channel"]
            curve.append("zeroed" if bool(st.zeroed[c]) else
                         f"{float(watch['norm']()):.3f}" if bool(st.decaying[c]) else "released")

    for it in range(args.iterative_steps):
        pruner.step()
        pruner.update_regularizer()            # the groups changed
        if args.base:
            optimizer = make_optimizer(0.01)   # Torch-Pruning replaced the parameters
        elif not watch:
            name = "layer3.0.conv1" if "layer3.0.conv1" in pruner.engine.groups() \
                else pruner.engine.groups()[-1]
            dec = pruner.engine.state(name).decaying.nonzero().squeeze(1)
            if dec.numel():
                conv = dict(model.named_modules())[name]
                watch.update(name=name, channel=int(dec[0]),
                             norm=lambda: conv.weight.detach()[int(dec[0])].norm())
                curve.append(f"{float(watch['norm']()):.3f}")
        for _ in range(args.finetune_epochs):
            train_epoch(model, optimizer, train_loader, pruner,
                        on_step=record)
        print(f"pruning step {it + 1}/{args.iterative_steps}: acc {evaluate(model, test_loader):.3f}"
              f"  ({time.time() - t0:.0f}s)")
    if not args.base:
        print("finalize:", pruner.finalize(force=True))                                   # DPM

    macs, params = tp.utils.count_ops_and_params(model, example_inputs)
    convs = [m.out_channels for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    print(f"pruned ({'base' if args.base else 'DPM'}): acc {evaluate(model, test_loader):.3f}  "
          f"MACs {macs / 1e6:.2f}M ({100 * macs / macs0:.1f}%)  params {params / 1e3:.1f}K "
          f"({100 * params / params0:.1f}%)")
    print("conv out-channels:", convs)
    if not args.base:
        print("decay counters:", pruner.engine.counters)
        if watch:
            print(f"filter norm of {watch['name']}[{watch['channel']}] (one value per optimizer "
                  f"step): {' -> '.join(curve)}")
    print(f"done in {time.time() - t0:.0f}s")


if __name__ == "__main__":
    main()
