"""OTOv2 tutorial (DHSPG) with the Decay Pruning Method: the one-line change.

This follows only-train-once's own OTOv2 tutorial (train with DHSPG, construct the subnet,
compare FLOPs / params) on scikit-learn's bundled digits data, so that it runs on a CPU in
about a minute with no download. It trains the same model twice, with the original
single-step half-space projection (``decay=None``) and with DPM
(``decay=DecayConfig(...)``), prints group sparsity, accuracy, FLOPs and parameters of
both constructed subnets, and fine-tunes each subnet with the optimizer state carried over
(``oto.subnet_optimizer(optimizer)``).

The changes against an OTO tutorial script are marked ``# <-- DPM``:

    from only_train_once import OTO    ->    from dpm_otov2 import OTO
    oto.dhspg(...)                     ->    oto.dhspg(..., decay=DecayConfig(steps=5, ...))

Run:  python examples/otov2_tutorial.py [--epochs 5] [--model small_cnn] [--target 0.4]

(The penalty settings are far more aggressive than OTOv2's CIFAR/ImageNet defaults so that
pruning finishes within one epoch of a one-minute run; for real training keep the package
defaults, ``lmbda=1e-3`` for sgd, and prune over many epochs.)
"""

from __future__ import annotations

import argparse
import contextlib
import io
import os
import tempfile
import time

import torch
import torch.nn.functional as F
from sklearn.datasets import load_digits

from dpm_core import DecayConfig  # <-- DPM
from dpm_otov2 import OTO  # <-- DPM (was: from only_train_once import OTO)
from benchmarks.models import get_model


def digits_loaders(size: int, batch_size: int, seed: int = 0):
    d = load_digits()
    x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
    x = F.interpolate(x, size=(size, size), mode="nearest")
    x = (x - x.mean()) / x.std()
    y = torch.tensor(d.target, dtype=torch.long)
    perm = torch.randperm(len(y), generator=torch.Generator().manual_seed(seed))
    n_train = int(0.8 * len(y))
    tr, te = perm[:n_train], perm[n_train:]
    train = torch.utils.data.TensorDataset(x[tr], y[tr])
    test = torch.utils.data.TensorDataset(x[te], y[te])
    g = torch.Generator().manual_seed(seed)
    return (torch.utils.data.DataLoader(train, batch_size=batch_size, shuffle=True, generator=g),
            torch.utils.data.DataLoader(test, batch_size=512))


@torch.no_grad()
def accuracy(model, loader):
    model.eval()
    correct = total = 0
    for x, y in loader:
        correct += (model(x).argmax(1) == y).sum().item()
        total += len(y)
    return correct / total


def quiet(fn, *a, **k):
    """only-train-once prints progress lines; keep the tutorial's output readable."""
    with contextlib.redirect_stdout(io.StringIO()):
        return fn(*a, **k)


def run(args, decay, out_dir):
    torch.manual_seed(0)
    trainloader, testloader = digits_loaders(args.size, args.batch_size)
    model = get_model(args.model, num_classes=10, in_channels=1, width=args.width)
    dummy_input = torch.zeros(1, 1, args.size, args.size)
    oto = quiet(OTO, model=model, dummy_input=dummy_input)

    steps_per_epoch = len(trainloader)
    optimizer = oto.dhspg(
        variant="sgd",
        lr=args.lr,
        momentum=0.9,
        weight_decay=1e-4,
        target_group_sparsity=args.target,
        tolerance_group_sparsity=0.2,  # penalise more ZIGs than needed: reach the target sooner
        start_pruning_steps=steps_per_epoch,  # one epoch of plain training first
        lmbda=args.lmbda,
        epsilon=args.epsilon,
        decay=decay,  # <-- DPM: None = original single-step projection
    )

    for epoch in range(args.epochs):
        model.train()
        f_avg = 0.0
        for x, y in trainloader:
            loss = F.cross_entropy(model(x), y)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            f_avg += loss.item() / steps_per_epoch
        extra = ""
        if optimizer.engine is not None:
            c = optimizer.engine.counters
            extra = f", marked {c['marked']}, released {c['released']}, zeroed {c['zeroed']}"
        print(f"  epoch {epoch}: loss {f_avg:.3f}, acc {accuracy(model, testloader):.3f}, "
              f"group sparsity {optimizer.curr_group_sparsity:.3f}{extra}")

    full_acc = accuracy(model, testloader)
    full_flops = oto.compute_flops(in_million=True)["total"]
    full_params = oto.compute_num_params(in_million=True)
    probe = torch.randn(8, 1, args.size, args.size)
    with torch.no_grad():
        y_full = model.eval()(probe)
    # note: construct_subnet prunes `model` in place and also saves both models
    quiet(oto.construct_subnet, out_dir=out_dir)
    subnet = oto.compressed_model()
    sub_oto = quiet(OTO, model=subnet, dummy_input=dummy_input)
    sub_flops = sub_oto.compute_flops(in_million=True)["total"]
    sub_params = sub_oto.compute_num_params(in_million=True)
    with torch.no_grad():
        max_diff = (subnet.eval()(probe) - y_full).abs().max().item()
    print(f"  subnet vs full group-sparse model: max |diff| = {max_diff:.2e}")

    # keep training the compressed model: construct_subnet pruned `model` in place; the
    # optimizer's state (momentum buffers) is sliced to the kept channels
    ft_optimizer = oto.subnet_optimizer(optimizer)  # DHSPG hands over to torch.optim.SGD
    for epoch in range(args.finetune_epochs):
        model.train()
        for x, y in trainloader:
            loss = F.cross_entropy(model(x), y)
            ft_optimizer.zero_grad()
            loss.backward()
            ft_optimizer.step()
    acc_ft = accuracy(model, testloader)
    if args.finetune_epochs:
        print(f"  fine-tuned the subnet {args.finetune_epochs} epoch(s): acc {acc_ft:.3f}")
    return {
        "group_sparsity": optimizer.compute_group_sparsity(),
        "acc_full": full_acc,
        "acc_subnet": accuracy(subnet, testloader),
        "acc_finetuned": acc_ft,
        "flops_full": full_flops, "flops_subnet": sub_flops,
        "params_full": full_params, "params_subnet": sub_params,
        "released": 0 if optimizer.engine is None else optimizer.engine.counters["released"],
        "size_mb": os.path.getsize(oto.compressed_model_path) / 2 ** 20,
    }


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model", default="small_cnn", help="a benchmarks.models name")
    ap.add_argument("--width", type=float, default=1.0)
    ap.add_argument("--size", type=int, default=16, help="digits are upsampled to this size")
    ap.add_argument("--epochs", type=int, default=5)
    ap.add_argument("--batch-size", type=int, default=64)
    ap.add_argument("--lr", type=float, default=0.05)
    ap.add_argument("--lmbda", type=float, default=2.0)
    ap.add_argument("--epsilon", type=float, default=0.95)
    ap.add_argument("--target", type=float, default=0.4)
    ap.add_argument("--steps", type=int, default=5, help="DPM: decaying steps N")
    ap.add_argument("--t-rate", type=float, default=0.3)
    ap.add_argument("--t-len", type=float, default=0.8)
    ap.add_argument("--finetune-epochs", type=int, default=1,
                    help="epochs of training the subnet after construct_subnet")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch CPU threads (1 is fastest for models this small)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    results = {}
    with tempfile.TemporaryDirectory() as tmp:
        for label, decay in [("OTOv2 (decay=None)", None),
                             ("OTOv2 + DPM", DecayConfig(steps=args.steps, t_rate=args.t_rate,
                                                         t_len=args.t_len))]:
            print(f"{label}:")
            t0 = time.time()
            results[label] = run(args, decay, os.path.join(tmp, label.split()[-1]))
            results[label]["seconds"] = time.time() - t0

    print()
    print(f"{'':22s} {'group sp.':>9s} {'acc':>6s} {'ft acc':>6s} {'FLOPs (M)':>17s} "
          f"{'params (M)':>17s} {'released':>8s} {'time':>6s}")
    for label, r in results.items():
        print(f"{label:22s} {r['group_sparsity']:9.3f} {r['acc_subnet']:6.3f} "
              f"{r['acc_finetuned']:6.3f} "
              f"{r['flops_full']:7.2f} -> {r['flops_subnet']:6.2f} "
              f"{r['params_full']:7.3f} -> {r['params_subnet']:6.3f} "
              f"{r['released']:8d} {r['seconds']:5.1f}s")


if __name__ == "__main__":
    main()
