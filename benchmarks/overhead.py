"""Per-step cost of the decay engine on a full training iteration.

Builds one of three models with random weights (``--model``):

* ``resnet56``: the CIFAR ResNet-56 of :mod:`benchmarks.models`; one engine group per conv
  layer (its filters, its BatchNorm's scale and shift, and the next conv's input slices
  where they line up);
* ``vgg11_bn``: torchvision's VGG-11 with BatchNorm (its first Linear is 25088 x 4096);
  one group per conv as above, the last conv's group owning its 49 input columns of that
  Linear each (an index slice, as after the Flatten);
* ``vit_b_16``: torchvision's ViT-B/16; per encoder layer one group for the 3072 MLP
  hidden channels (rows and bias of the first Linear, columns of the second) and one
  for the 12 attention heads (their q, k, v rows and biases of ``in_proj`` and their
  64 columns of ``out_proj``, as index slices);

marks half of every group's channels (every other channel), and times full training
iterations (forward, backward, ``optimizer.step()``) with and without the engine attached,
interleaved in one process so both see the same machine load. The decaying channels
never finish (N is huge), so the engine does the same work on every step. By default
they are never released either (T_len is huge: C_len is at most M), and the engine then
reads nothing for Self-Rectifying (no channel can pass Eq. 6): this is the cost of Smooth
Pruning (weight norms of the decaying channels and the write-back). ``--t-len 0`` shows
Self-Rectifying's worst case: every decaying channel passes T_len, so every step reads
all gradient norms of the decaying groups, keeps a snapshot of every decaying slice and
computes C_rate for all of them (T_rate is then set to 1 - 1e-6 so that nothing is
released and the work stays the same from step to step).

A third variant, the control, attaches an engine over the same groups with nothing
decaying: its ratio to the plain run shows the noise floor of the end-to-end figures.
A fourth, "torch SGD", is the engine with ``fuse_sgd = False``: by default the engine runs
SGD's update of its large streaming tensors itself, a chunk of rows at a time inside the
norm pass (``dpm_core.fused_sgd``; exactly torch's formula), and this variant shows the
cost of the decay on top of torch's own SGD step instead. Each round runs the variants
back to back, in an order rotated from round to round.

Prints median seconds per iteration and their ratio, the median (and quartiles) of the
per-round ratios (robust to slow changes of the machine's load), the control's, the
median time of ``optimizer.step()`` alone with and without the engine (the engine runs
inside it) and of the forward and backward passes (which it should leave unchanged),
the time spent inside the engine's hooks measured directly, and the extra resident
memory (RSS) after the first decaying steps. The step and hook figures are immune to the
noise of the forward and backward passes, which on a shared machine is larger than the
engine's cost.

    python -m benchmarks.overhead --model resnet56 --batch 128 --iters 15
    python -m benchmarks.overhead --model vgg11_bn --batch 16 --iters 10
    python -m benchmarks.overhead --model vit_b_16 --batch 8 --iters 10
    python -m benchmarks.overhead --model vgg11_bn --batch 16 --iters 10 --t-len 0
"""

from __future__ import annotations

import argparse
import gc
import resource
import statistics
import time

import torch
import torch.nn as nn

from dpm_core import DecayConfig, DecayEngine

from .models import resnet56

MODELS = ("resnet56", "vgg11_bn", "vit_b_16")
# input side per model (CIFAR-sized images; ViT-B/16 takes 4 x 4 patches of 16 pixels)
IMAGE_SIZE = {"resnet56": 32, "vgg11_bn": 32, "vit_b_16": 64}


def build_model(name: str, image_size: int | None = None) -> nn.Module:
    """``name`` with random weights (10 classes)."""
    size = image_size or IMAGE_SIZE[name]
    if name == "resnet56":
        return resnet56()
    import torchvision
    if name == "vgg11_bn":
        return torchvision.models.vgg11_bn(weights=None, num_classes=10)
    if name == "vit_b_16":
        return torchvision.models.vit_b_16(weights=None, num_classes=10, image_size=size)
    raise ValueError(f"unknown model {name!r}; choose one of {MODELS}")


def build_groups(model: nn.Module, engine: DecayEngine) -> int:
    """One group per conv layer; a Linear after the last conv gets index slices."""
    mods = [m for m in model.modules() if isinstance(m, (nn.Conv2d, nn.BatchNorm2d, nn.Linear))]
    count = 0
    for i, m in enumerate(mods):
        if not isinstance(m, nn.Conv2d):
            continue
        slices = [(m.weight, 0)] + ([(m.bias, 0)] if m.bias is not None else [])
        if i + 1 < len(mods) and isinstance(mods[i + 1], nn.BatchNorm2d) \
                and mods[i + 1].num_features == m.out_channels:
            bn = mods[i + 1]
            slices += [(bn.weight, 0), (bn.bias, 0)]
        nxt = next((c for c in mods[i + 1:] if isinstance(c, (nn.Conv2d, nn.Linear))), None)
        if isinstance(nxt, nn.Conv2d) and nxt.in_channels == m.out_channels \
                and nxt.groups == 1:
            slices.append((nxt.weight, 1))
        elif isinstance(nxt, nn.Linear) and nxt.in_features % m.out_channels == 0 \
                and nxt.in_features > m.out_channels:
            # after a Flatten: channel c owns k consecutive input columns
            k = nxt.in_features // m.out_channels
            slices.append((nxt.weight, 1, torch.arange(nxt.in_features).view(-1, k)))
        engine.add_group(f"conv{i}", slices)
        count += 1
    return count


def build_vit_groups(model: nn.Module, engine: DecayEngine) -> int:
    """Per encoder layer: the MLP hidden channels and the attention heads."""
    count = 0
    for i, layer in enumerate(model.encoder.layers):
        fc1, fc2 = layer.mlp[0], layer.mlp[3]
        engine.add_group(f"layer{i}.mlp", [(fc1.weight, 0), (fc1.bias, 0), (fc2.weight, 1)])
        attn = layer.self_attention
        e, h = attn.embed_dim, attn.num_heads
        d = e // h
        per_head = torch.arange(e).view(h, d)
        qkv = torch.cat([per_head, per_head + e, per_head + 2 * e], dim=1)  # [h, 3d]
        engine.add_group(f"layer{i}.heads", [(attn.in_proj_weight, 0, qkv),
                                             (attn.in_proj_bias, 0, qkv),
                                             (attn.out_proj.weight, 1, per_head.clone())])
        count += 2
    return count


def _rss_mb() -> float:
    """Resident memory of this process now, MB (Linux; 0 where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize() / 2 ** 20
    except OSError:  # pragma: no cover - not Linux
        return 0.0


def _peak_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _quartiles(xs: list[float]) -> tuple[float, float]:
    if len(xs) < 2:
        return xs[0], xs[0]
    q = statistics.quantiles(xs, n=4)
    return q[0], q[2]


def run(batch: int = 128, iters: int = 15, warmup: int = 2, threads: int | None = None,
        seed: int = 0, control: bool = True, capture: bool = False, model: str = "resnet56",
        image_size: int | None = None, device: str = "cpu", t_len: float = 1e9,
        unfused: bool = True) -> dict:
    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(seed)
    model_name = model
    size = image_size or IMAGE_SIZE[model_name]
    dev = torch.device(device)
    model = build_model(model_name, size).to(dev)
    opt = torch.optim.SGD(model.parameters(), lr=0.01, momentum=0.9, weight_decay=5e-4)
    # nothing is ever released: with a huge T_len no channel can pass Eq. 6; with a
    # small one every channel passes T_len and T_rate just below 1 stops the releases
    cfg = DecayConfig(steps=10 ** 9, t_rate=0.3 if t_len >= 1e9 else 1 - 1e-6, t_len=t_len,
                      self_rectify=True)
    engine = DecayEngine(cfg)
    grouper = build_vit_groups if model_name == "vit_b_16" else build_groups
    groups = grouper(model, engine)
    total = decaying = 0
    for name in engine.groups():
        m = engine.num_channels(name)
        engine.mark(name, list(range(0, m, 2)))
        total += m
        decaying += len(range(0, m, 2))
    # the control: the same groups, attached, nothing decaying (hooks run, do no work)
    idle = DecayEngine(cfg)
    grouper(model, idle)
    # the same decay with every update left to torch's SGD step
    plain_sgd = DecayEngine(cfg)
    plain_sgd.fuse_sgd = False
    grouper(model, plain_sgd)
    for name in plain_sgd.groups():
        plain_sgd.mark(name, list(range(0, plain_sgd.num_channels(name), 2)))
    x = torch.randn(batch, 3, size, size, device=dev)
    y = torch.randint(0, 10, (batch,), device=dev)

    def sync():
        if dev.type == "cuda":
            torch.cuda.synchronize(dev)
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
        sync()
        t = time.perf_counter()
        opt.zero_grad(set_to_none=True)
        loss_fn(model(x), y).backward()
        sync()
        t_step = time.perf_counter()
        if capture and eng is not None:
            eng.capture_clean_grads()
        opt.step()
        sync()
        end = time.perf_counter()
        return end - t, end - t_step

    def attached(eng):
        if eng is None:
            return []
        return [opt.register_step_pre_hook(timed(eng._pre_step)),
                opt.register_step_post_hook(timed(eng._post_step))]

    for _ in range(warmup):
        iteration()
    # memory: resident set after plain iterations, then after the first decaying steps
    # (the engine's buffers are built at its first step); the plain-again figure shows
    # how much RSS moves without the engine
    mem_steps = 3
    gc.collect()
    rss0 = _rss_mb()
    for _ in range(mem_steps):
        iteration()
    gc.collect()
    rss_plain = _rss_mb()
    peak0 = _peak_mb()
    handles = attached(engine)
    for _ in range(mem_steps):
        iteration(engine)
    for h in handles:
        h.remove()
    gc.collect()
    rss_engine = _rss_mb()
    peak1 = _peak_mb()
    if unfused:  # its first steps outside the timing, like the fused engine's above
        handles = attached(plain_sgd)
        for _ in range(mem_steps):
            iteration(plain_sgd)
        for h in handles:
            h.remove()
    variants = ["without", "with"] + (["control"] if control else []) + \
        (["unfused"] if unfused else [])
    times: dict[str, list[float]] = {v: [] for v in variants}
    steps: dict[str, list[float]] = {v: [] for v in variants}
    hooks: list[float] = []
    hooks_unfused: list[float] = []
    for i in range(iters):
        # rotate the order every round so no variant always runs first or last
        k = i % len(variants)
        for v in variants[k:] + variants[:k]:
            eng = {"with": engine, "control": idle, "unfused": plain_sgd}.get(v)
            handles = attached(eng)
            hook_time[0] = 0.0
            whole, step = iteration(eng)
            times[v].append(whole)
            steps[v].append(step)
            if v == "with":
                hooks.append(hook_time[0])
            elif v == "unfused":
                hooks_unfused.append(hook_time[0])
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
    r = {"model": model_name, "image_size": size, "device": str(dev), "t_len": t_len,
         "rss_mb_before": rss_plain, "rss_plain_drift_mb": rss_plain - rss0,
         "extra_rss_mb": rss_engine - rss_plain, "peak_growth_mb": peak1 - peak0,
         "batch": batch, "iters": iters, "groups": groups, "channels": total,
         "decaying": decaying, "threads": torch.get_num_threads(),
         "step_sec_without": s0, "step_sec_with": s1, "step_share": (s1 - s0) / t0,
         "fwdbwd_sec_without": fb0, "fwdbwd_sec_with": fb1, "fwdbwd_ratio": fb1 / fb0,
         "sec_without": t0, "sec_with": t1, "ratio": t1 / t0,
         "paired_ratio": statistics.median(paired), "paired_iqr": _quartiles(paired),
         "hook_sec": th, "hook_share": th / t0,
         # tensors whose SGD update the engine runs itself (dpm_core.fused_sgd)
         "fused_tensors": sum(t.dense and t.param.numel() >= engine.fuse_sgd_min_numel
                              for lay in engine._layout_cache.values() for t in lay.sliced)}
    if control:
        pc = [c / wo for c, wo in zip(times["control"], times["without"])]
        r.update(sec_control=statistics.median(times["control"]),
                 control_paired_ratio=statistics.median(pc), control_paired_iqr=_quartiles(pc))
    if unfused:
        pu = [u / wo for u, wo in zip(times["unfused"], times["without"])]
        su = statistics.median(steps["unfused"])
        hu = statistics.median(hooks_unfused)
        r.update(sec_unfused=statistics.median(times["unfused"]),
                 unfused_paired_ratio=statistics.median(pu), unfused_paired_iqr=_quartiles(pu),
                 step_sec_unfused=su, step_share_unfused=(su - s0) / t0,
                 hook_sec_unfused=hu, hook_share_unfused=hu / t0)
    return r


def _add_arguments(ap: argparse.ArgumentParser) -> None:
    ap.add_argument("--model", choices=MODELS, default="resnet56",
                    help="model with random weights (default resnet56)")
    ap.add_argument("--image-size", type=int, default=None,
                    help="input side in pixels (default: 32; 64 for vit_b_16)")
    ap.add_argument("--device", default="cpu", help="torch device (default cpu)")
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
    ap.add_argument("--no-unfused", dest="unfused", action="store_false",
                    help="skip the variant with every update left to torch's SGD "
                         "(engine.fuse_sgd = False)")
    ap.add_argument("--t-len", type=float, default=1e9,
                    help="T_len of the engine (default 1e9: no channel can be released, so "
                         "Self-Rectifying reads nothing; 0: every decaying channel passes "
                         "T_len, Self-Rectifying's worst case)")


def _report(args) -> dict:
    for name in ("batch", "iters"):
        if getattr(args, name) < 1:
            raise SystemExit(f"--{name} must be >= 1, got {getattr(args, name)}")
    r = run(args.batch, args.iters, args.warmup, args.threads, control=args.control,
            capture=args.capture, model=args.model, image_size=args.image_size,
            device=args.device, t_len=args.t_len, unfused=args.unfused)
    print(f"{r['model']} ({r['image_size']}x{r['image_size']}, {r['device']}), "
          f"batch {r['batch']}, {r['threads']} threads, {r['groups']} groups, "
          f"{r['decaying']}/{r['channels']} channels decaying, {r['iters']} rounds"
          + (", capture_clean_grads() every step" if args.capture else "")
          + f", T_len {r['t_len']:g}")
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
          f"{r['hook_share'] * 100:.2f}% of an iteration"
          + (" (they include SGD's update of the large tensors the engine took over)"
             if r["fused_tensors"] else ""))
    if "unfused_paired_ratio" in r:
        lo, hi = r["unfused_paired_iqr"]
        print(f"with every update left to torch's SGD (fuse_sgd=False), paired: "
              f"{r['unfused_paired_ratio']:.4f}  ({(r['unfused_paired_ratio'] - 1) * 100:+.2f}%)"
              f"  quartiles {lo:.4f}-{hi:.4f}; step {r['step_sec_unfused'] * 1000:.2f} ms "
              f"(+{r['step_share_unfused'] * 100:.2f}% of an iteration), hooks "
              f"{r['hook_sec_unfused'] * 1000:.2f} ms")
    print(f"extra resident memory after the first decaying steps: "
          f"{r['extra_rss_mb']:.0f} MB (peak RSS grew by {r['peak_growth_mb']:.0f} MB; "
          f"plain steps moved RSS by {r['rss_plain_drift_mb']:+.0f} MB; "
          f"RSS before: {r['rss_mb_before']:.0f} MB)")
    return r


def plain_text(doc: str) -> str:
    """``doc`` without reStructuredText markup, for ``--help``: ``x`` and :role:`x` become x."""
    import re

    doc = re.sub(r":[a-z]+:`~?([^`]+)`", r"\1", doc)
    return doc.replace("``", "")


def register(subparsers) -> None:
    """Add the ``overhead`` subcommand to ``dpm-bench``."""
    ap = subparsers.add_parser("overhead", help="time overhead of the DPM engine per "
                               "training iteration (ResNet-56, VGG-11-BN or ViT-B/16, half "
                               "the channels decaying)",
                               description=plain_text(__doc__),
                               formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    ap.set_defaults(func=lambda args: (_report(args), 0)[1])


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(prog="python -m benchmarks.overhead", description=plain_text(__doc__),
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    _add_arguments(ap)
    return _report(ap.parse_args(argv))


if __name__ == "__main__":
    main()
