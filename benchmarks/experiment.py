"""Experiment plumbing shared by the ``dpm-bench`` subcommands: profiles, configuration,
pre-training (cached per seed, so original / +SP / +SR start from the same weights), one run with
its results folder, and the statistics of a comparison."""
from __future__ import annotations

import copy
import dataclasses
import functools
import hashlib
import json
import math
import os
import sys
import time
from pathlib import Path
from typing import Dict, Iterable, List, Optional, Sequence

import torch

from .data import Dataset, load_dataset, make_loaders
from .models import MODEL_NAMES, default_input_size, get_model
from .runners import FRAMEWORKS, METHOD_LABELS, METHODS, RunConfig, get_runner
from .runners.base import count_flops_params, evaluate, pretrain, set_seed, training

# ----------------------------------------------------------------------------------------------
# profiles
# ----------------------------------------------------------------------------------------------
#: Per-profile defaults; any option given on the command line wins. ``model: None`` means the
#: framework's paper model (:data:`PAPER_MODELS`).
PROFILES: Dict[str, dict] = {
    # seconds; used by the tests (tiny model, tiny data, 1+1 epochs)
    "smoke": dict(model="small_cnn", width=0.5, train_subset=256, test_subset=128, image_size=16,
                  pretrain_epochs=1, epochs=1, batch_size=64, lr=0.05, finetune_lr=0.02,
                  iterative_steps=2, prune_every=2, steps=3, ratio=0.5, seeds=[0, 1],
                  sweep=[3, 5], lmbda=1e-2),
    # 2 CPU cores: a CIFAR-10 subset and a short schedule
    "cpu": dict(model="resnet20", width=0.25, train_subset=5000, test_subset=2000, image_size=None,
                pretrain_epochs=8, epochs=3, batch_size=128, lr=0.1, finetune_lr=0.02,
                iterative_steps=3, prune_every=0, steps=5, ratio=0.5, seeds=[0, 1, 2],
                sweep=[3, 5, 8, 16, 32, 64, 128], lmbda=1e-2),
    # `dpm-bench quickstart`: a small CNN, pre-trained in-run; < 5 minutes on 2 CPU cores for all
    # three frameworks x three methods
    "quickstart": dict(model="small_cnn", width=1.0, train_subset=4000, test_subset=1000, image_size=None,
                       pretrain_epochs=8, epochs=2, batch_size=128, lr=0.1, finetune_lr=0.02,
                       iterative_steps=3, prune_every=0, steps=5, ratio=0.6, seeds=[0], sweep=[3, 5],
                       lmbda=1e-2),
    # Evidence on the full CIFAR-10 (issue 14): full-width ResNet-20 from the committed dense
    # checkpoints (benchmarks/checkpoints, `dpm-bench pretrain`), pruned to about 50% of the dense
    # FLOPs during 5 epochs of fine-tuning on all 50,000 images, evaluated on all 10,000. One run
    # takes about 5 minutes on one core of this project's CPU machine (bfloat16 autocast,
    # channels_last), so two runs go side by side on the 2 cores. Protocol: benchmarks/RESULTS.md.
    "cifar": dict(model="resnet20", width=1.0, train_subset=None, test_subset=None, image_size=None,
                  pretrain_epochs=0, dense_checkpoints=2, epochs=5, batch_size=128, lr=0.1,
                  finetune_lr=0.01, iterative_steps=5, prune_every=0, steps=5, ratio=0.28,
                  seeds=[0, 1, 2, 3, 4], sweep=[3, 5, 8, 16, 32], lmbda=1e-2, precision="bf16",
                  channels_last=True, probe_every=20, trace_every=10,
                  methods=["original", "sp", "sr", "control"]),
    # the paper's full schedules, for a GPU
    "paper": dict(model=None, width=1.0, train_subset=None, test_subset=None, image_size=None,
                  pretrain_epochs=200, epochs=100, batch_size=128, lr=0.1, finetune_lr=0.01,
                  iterative_steps=5, prune_every=0, steps=5, ratio=0.5, seeds=[0, 1, 2],
                  sweep=[3, 5, 8, 16, 32, 64, 128], lmbda=1e-3),
}

#: Pruning targets of the ``cifar`` profile that put the original method at about 50% of the dense
#: FLOPs. depgraph: 0.28 of every layer's channels gives 50.4%, computed. The others come from
#: one calibration run of the original method each (seed 0, before any DPM run; only its FLOPs
#: were looked at; benchmarks/results/cifar10-resnet20-calibration): gatedecorator at 0.28
#: kept 37.4% of the FLOPs, otov2 at 0.3 kept 56.9%; the new target r solves
#: (1 - r) ** a = 0.5 for the a with (1 - r0) ** a = FLOPs(r0), rounded to 0.01.
CIFAR_RATIOS = {"depgraph": 0.28, "gatedecorator": 0.21, "otov2": 0.35}

#: Methods a comparison runs when --methods is not given.
DEFAULT_METHODS = ["original", "sp", "sr"]

#: Per-profile, per-framework defaults (applied after the profile's, before explicit options).
#: OTOv2 prunes by driving groups to zero with its penalty; in a short CPU schedule that needs a
#: much larger lambda and learning rate than the paper's 300-epoch runs.
FRAMEWORK_PROFILE = {
    "smoke": {"otov2": dict(lmbda=1.0, finetune_lr=0.05)},
    "quickstart": {"otov2": dict(lmbda=1.0, finetune_lr=0.05)},
    "cpu": {"otov2": dict(lmbda=1.0, finetune_lr=0.05)},
    "cifar": {"gatedecorator": dict(ratio=CIFAR_RATIOS["gatedecorator"]),
              "otov2": dict(ratio=CIFAR_RATIOS["otov2"], lmbda=1.0, finetune_lr=0.05)},
    "paper": {},
}

#: The paper's model per framework (Tables 1, 4, 6), used by the ``paper`` profile.
PAPER_MODELS = {"depgraph": "resnet56", "otov2": "vgg16_bn", "gatedecorator": "resnet56"}

#: Self-Rectifying thresholds (T_rate, T_len). The paper uses 0.2-0.4 / 0.8, and lowers them to
#: 0.1-0.2 / 0.5 only when a sparsity penalty pollutes the gradient SR reads. All three adapters
#: keep the penalty out of the decaying structures' gradients (dpm_depgraph: capture_clean_grads;
#: dpm_otov2: decaying ZIGs leave the penalty; dpm_gatedecorator: decaying gates leave the L1), so
#: the plain thresholds are the default everywhere; pass --t-rate/--t-len to change them.
SR_DEFAULTS = {"plain": (0.3, 0.8), "sparse": (0.15, 0.5)}

_CONFIG_KEYS = {f for f in RunConfig.__dataclass_fields__}


def resolve_config(profile: str, framework: str, overrides: dict) -> tuple[RunConfig, dict]:
    """(RunConfig, data options) from a profile's defaults plus explicit ``overrides``
    (keys whose value is None are ignored)."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; known: {', '.join(PROFILES)}")
    merged = dict(PROFILES[profile])
    merged.update(FRAMEWORK_PROFILE.get(profile, {}).get(framework, {}))
    merged.update({k: v for k, v in overrides.items() if v is not None})
    if merged.get("model") is None:
        merged["model"] = PAPER_MODELS.get(framework, "resnet56")
    t_rate, t_len = SR_DEFAULTS["plain"]
    merged.setdefault("t_rate", t_rate)
    merged.setdefault("t_len", t_len)
    if merged.get("t_rate") is None:
        merged["t_rate"] = t_rate
    if merged.get("t_len") is None:
        merged["t_len"] = t_len
    merged["framework"] = framework
    cfg = RunConfig(**{k: v for k, v in merged.items() if k in _CONFIG_KEYS})
    data = {k: merged.get(k) for k in ("dataset", "data_dir", "train_subset", "test_subset",
                                       "image_size", "seeds", "sweep", "fallback", "download")}
    data["methods"] = list(merged.get("methods") or DEFAULT_METHODS)
    validate_config(cfg)
    return cfg, data


def validate_config(cfg: RunConfig) -> None:
    def bad(msg):
        raise ValueError(msg)

    if cfg.framework not in FRAMEWORKS:
        bad(f"unknown framework {cfg.framework!r}; known: {', '.join(FRAMEWORKS)}")
    if cfg.method not in METHODS:
        bad(f"unknown method {cfg.method!r}; known: {', '.join(METHODS)}")
    get_model(cfg.model, width=0.25) if cfg.model not in MODEL_NAMES else None
    if not 0 < cfg.ratio < 1:
        bad(f"--ratio must be in (0, 1) (fraction of channels / groups to prune), got {cfg.ratio}")
    if cfg.steps < 1:
        bad(f"--steps (N) must be >= 1, got {cfg.steps}")
    if cfg.epochs < 1:
        bad(f"--epochs must be >= 1, got {cfg.epochs}")
    if cfg.pretrain_epochs < 0:
        bad(f"--pretrain-epochs must be >= 0, got {cfg.pretrain_epochs}")
    if cfg.iterative_steps < 1:
        bad(f"--iterative-steps must be >= 1, got {cfg.iterative_steps}")
    if cfg.batch_size < 1:
        bad(f"--batch-size must be >= 1, got {cfg.batch_size}")
    if cfg.width <= 0:
        bad(f"--width must be > 0, got {cfg.width}")
    if cfg.framework == "gatedecorator" and cfg.model == "vgg16":
        bad("gatedecorator needs BatchNorm layers: use --model vgg16_bn (vgg16 has no BN)")
    if cfg.precision not in ("fp32", "bf16"):
        bad(f"--precision must be fp32 or bf16, got {cfg.precision!r}")
    if cfg.device.startswith("cuda") and not torch.cuda.is_available():
        bad(f"--device {cfg.device}: CUDA is not available on this machine; use --device cpu")


# ----------------------------------------------------------------------------------------------
# data + models
# ----------------------------------------------------------------------------------------------
def prepare_data(data: dict, log=None) -> Dataset:
    return load_dataset(data.get("dataset") or "cifar10", data.get("data_dir"),
                        train_subset=data.get("train_subset"), test_subset=data.get("test_subset"),
                        download=bool(data.get("download", True)), fallback=bool(data.get("fallback")),
                        image_size=data.get("image_size"), log=log)


def build_model(cfg: RunConfig, ds: Dataset) -> torch.nn.Module:
    return get_model(cfg.model, num_classes=ds.num_classes, in_channels=ds.in_channels, width=cfg.width)


def example_batch(ds: Dataset, device: str = "cpu") -> torch.Tensor:
    return torch.randn(1, ds.in_channels, ds.image_size, ds.image_size, device=device)


def resolve_prune_every(cfg: RunConfig, steps_per_epoch: int) -> RunConfig:
    """``prune_every = 0`` means auto: the pruning steps are spread over the first third of
    fine-tuning, so that every pruned structure has time to decay and the network to recover."""
    if cfg.prune_every and cfg.prune_every > 0:
        return cfg
    total = cfg.epochs * steps_per_epoch
    return dataclasses.replace(cfg, prune_every=max(1, total // (3 * max(1, cfg.iterative_steps))))


def _pretrain_key(cfg: RunConfig, ds: Dataset) -> str:
    h = hashlib.sha256()
    key = dict(model=cfg.model, width=cfg.width, data=ds.describe(), n=len(ds.train_labels),
               first=int(ds.train_labels[:64].sum()), ep=cfg.pretrain_epochs, lr=cfg.lr,
               bs=cfg.batch_size, wd=cfg.weight_decay, mom=cfg.momentum, seed=cfg.seed,
               device=cfg.device.split(":")[0])
    h.update(json.dumps(key, sort_keys=True).encode())
    return h.hexdigest()[:16]


def pretrained_model(cfg: RunConfig, ds: Dataset, cache_dir: Optional[Path], *, progress=True,
                     log=print) -> tuple[torch.nn.Module, List[dict], float]:
    """The dense model after ``pretrain_epochs`` epochs (seeded), from the cache when present.
    Returns (model, pretrain log, pretrain seconds).

    With ``cfg.dense_checkpoints = k > 0`` the model is the committed dense checkpoint of
    pre-training seed ``cfg.seed % k`` (``dpm-bench pretrain``), never trained here."""
    if cfg.dense_checkpoints:
        from .pretrain import load_checkpoint

        seed = cfg.seed % cfg.dense_checkpoints
        model, meta = load_checkpoint(cfg.model, ds.name, seed, num_classes=ds.num_classes)
        log(f"  dense {cfg.model} checkpoint seed {seed}: top-1 {meta['top1']:.2f}% "
            f"(sha256 {meta['sha256'][:12]}...)")
        return model.to(cfg.device), [dict(r, phase="pretrain") for r in meta["log"]], \
            float(meta.get("train_seconds", 0.0))
    set_seed(cfg.seed)
    model = build_model(cfg, ds).to(cfg.device)
    if cfg.pretrain_epochs == 0:
        return model, [], 0.0
    path = None
    if cache_dir is not None:
        path = Path(cache_dir) / f"pretrained-{cfg.model}-s{cfg.seed}-{_pretrain_key(cfg, ds)}.pt"
        if path.is_file():
            blob = torch.load(path, map_location=cfg.device, weights_only=False)
            model.load_state_dict(blob["state_dict"])
            log(f"  pre-trained {cfg.model} (seed {cfg.seed}) loaded from cache {path}")
            return model, blob["log"], float(blob.get("seconds", 0.0))
    train, test = make_loaders(ds, cfg.batch_size, seed=cfg.seed, device=cfg.device)
    t0 = time.time()
    plog = pretrain(model, (train, test), cfg, progress=progress)
    secs = time.time() - t0
    log(f"  pre-trained {cfg.model} (seed {cfg.seed}) for {cfg.pretrain_epochs} epochs in {secs:.0f}s: "
        f"top-1 {plog[-1]['test_acc']:.2f}%")
    if path is not None:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".tmp")
        torch.save({"state_dict": model.state_dict(), "log": plog, "seconds": secs}, tmp)
        os.replace(tmp, path)
    return model, plog, secs


# ----------------------------------------------------------------------------------------------
# one run
# ----------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=1)
def git_commit() -> Optional[str]:
    """The commit of the code that runs (with ``+dirty`` when the work tree has changes), or None
    outside a git checkout. Read once per process, at the first run: the code a process runs is
    the code it imported then, whatever the checkout holds later."""
    import subprocess

    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=root, capture_output=True, text=True,
                              timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=root,
                               capture_output=True, text=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return None
    return (head + ("+dirty" if dirty else "")) or None


def setting_name(cfg: RunConfig) -> str:
    """The framework setting a run belongs to: ``depgraph-<criterion>`` or the framework."""
    return f"depgraph-{cfg.criterion}" if cfg.framework == "depgraph" else cfg.framework


#: Steps after each pruning event at which the probe always evaluates (plus every probe_every).
PROBE_OFFSETS = (0, 1, 2, 3, 5, 8, 13)
#: Probe window: up to this many steps after the last pruning step; the probe's test subset size.
PROBE_TAIL, PROBE_IMAGES = 300, 1000


def recovery_probe(cfg: RunConfig, ds: Dataset, steps_per_epoch: int):
    """``(probe, points)``: with ``cfg.probe_every > 0`` a ``probe(step, model)`` that evaluates
    the model on a fixed, class-balanced subset of ``PROBE_IMAGES`` test images right after each
    pruning event (``PROBE_OFFSETS`` steps later) and every ``probe_every`` steps, from the first
    pruning step until ``PROBE_TAIL`` steps after the last one, appending ``{"step", "acc",
    "loss"}`` to ``points``: the accuracy drop and recovery that Smooth Pruning is meant to soften.
    Without it, ``(None, [])``."""
    points: List[dict] = []
    if cfg.probe_every <= 0:
        return None, points
    from .data import TensorLoader, balanced_subset

    idx = balanced_subset(ds.test_labels, min(PROBE_IMAGES, len(ds.test_labels)), seed=99)
    loader = TensorLoader(ds.test_images[idx], ds.test_labels[idx], 500, mean=ds.mean, std=ds.std,
                          device=cfg.device, channels_last=cfg.channels_last)
    every = max(1, cfg.prune_every)
    end = (cfg.iterative_steps - 1) * every + PROBE_TAIL

    def probe(step: int, model: torch.nn.Module) -> None:
        if step > end or not (step % every in PROBE_OFFSETS or step % cfg.probe_every == 0):
            return
        acc, loss = evaluate(model, loader)
        points.append({"step": int(step), "acc": acc, "loss": loss})

    return probe, points

def _jsonable(x):
    if isinstance(x, dict):
        return {str(k): _jsonable(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_jsonable(v) for v in x]
    if isinstance(x, torch.Tensor):
        return x.tolist()
    if isinstance(x, float) and not math.isfinite(x):
        return None
    if isinstance(x, (str, int, float, bool)) or x is None:
        return x
    return str(x)


def run_one(cfg: RunConfig, ds: Dataset, out_dir: Path, *, dense_model: torch.nn.Module,
            pretrain_log: Sequence[dict] = (), pretrain_seconds: float = 0.0, progress=True,
            extra: Optional[dict] = None, log=print) -> dict:
    """Prune ``dense_model`` (a copy) with ``cfg`` and write ``out_dir``/{log.jsonl, trace.jsonl,
    result.json}. Returns the final record."""
    runner = get_runner(cfg.framework)
    runner.check_available()
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    train, test = make_loaders(ds, cfg.batch_size, seed=cfg.seed + 1000, device=cfg.device,
                               channels_last=cfg.channels_last)
    cfg = resolve_prune_every(cfg, len(train))
    ex = example_batch(ds, cfg.device)
    model = copy.deepcopy(dense_model).to(cfg.device)
    if cfg.channels_last:
        model = model.to(memory_format=torch.channels_last)
    dense_flops, dense_params = count_flops_params(model, ex)
    dense_acc, _ = evaluate(model, test)
    log_path = out_dir / "log.jsonl"
    with open(log_path, "w") as f:
        for rec in pretrain_log:
            f.write(json.dumps(_jsonable(rec)) + "\n")

    def on_epoch(rec):
        with open(log_path, "a") as f:
            f.write(json.dumps(_jsonable(dict(rec, method=cfg.method, seed=cfg.seed))) + "\n")

    commit = git_commit()
    probe, probe_points = recovery_probe(cfg, ds, len(train))
    set_seed(cfg.seed + 1)
    t0 = time.time()
    with training(cfg.precision, probe):
        res = runner.run(model, (train, test), cfg.method, cfg, example_inputs=ex, on_epoch=on_epoch,
                         progress=progress)
    wall = time.time() - t0
    pruned = res.model.to(cfg.device).eval()
    acc, loss = evaluate(pruned, test)
    flops, params = count_flops_params(pruned, ex)
    with open(out_dir / "trace.jsonl", "w") as f:
        for rec in res.trace:
            f.write(json.dumps(_jsonable(rec)) + "\n")
    record = {
        "kind": "run", "setting": setting_name(cfg),
        "framework": cfg.framework, "method": cfg.method, "method_label": METHOD_LABELS[cfg.method],
        "model": cfg.model, "dataset": ds.name, "data_source": ds.source, "data_notes": ds.notes,
        "train_size": len(ds.train_labels), "test_size": len(ds.test_labels),
        "seed": cfg.seed, "steps": cfg.steps, "t_rate": cfg.t_rate, "t_len": cfg.t_len,
        "ratio": cfg.ratio,
        "top1": acc, "test_loss": loss, "dense_top1": dense_acc,
        "flops": flops, "params": params, "dense_flops": dense_flops, "dense_params": dense_params,
        "flops_pct": 100.0 * flops / dense_flops, "params_pct": 100.0 * params / dense_params,
        "wall_time_s": wall, "pretrain_time_s": pretrain_seconds,
        "final_sparsity": res.trace[-1]["sparsity"] if res.trace else None,
        "counters": res.counters, "events": res.events, "info": res.info,
        "config": cfg.to_dict(), "torch": torch.__version__, "threads": torch.get_num_threads(),
        "probe": probe_points, "git_commit": commit,
        "prune_steps_at": [i * cfg.prune_every for i in range(cfg.iterative_steps)],
    }
    if extra:
        record.update(extra)
    record = _jsonable(record)
    with open(out_dir / "result.json", "w") as f:
        json.dump(record, f, indent=1)
    log(f"  {cfg.framework:13s} {METHOD_LABELS[cfg.method]:8s} seed {cfg.seed}: top-1 {acc:6.2f}%  "
        f"FLOPs {record['flops_pct']:5.1f}%  params {record['params_pct']:5.1f}%  "
        f"{wall:6.1f}s  released {res.counters.get('released', 0)}")
    return record


# ----------------------------------------------------------------------------------------------
# statistics and tables
# ----------------------------------------------------------------------------------------------
def mean_std(xs: Sequence[float]) -> tuple[float, float]:
    xs = [float(x) for x in xs if x is not None]
    if not xs:
        return float("nan"), float("nan")
    m = sum(xs) / len(xs)
    if len(xs) < 2:
        return m, 0.0
    return m, math.sqrt(sum((x - m) ** 2 for x in xs) / (len(xs) - 1))


def fmt_ms(xs: Sequence[float], digits: int = 2) -> str:
    m, s = mean_std(xs)
    if math.isnan(m):
        return "-"
    return f"{m:.{digits}f} ± {s:.{digits}f}" if len(xs) > 1 else f"{m:.{digits}f}"


def load_results(folder: Path) -> List[dict]:
    out = []
    for p in sorted(Path(folder).rglob("result.json")):
        try:
            with open(p) as f:
                rec = json.load(f)
        except (OSError, json.JSONDecodeError):
            continue
        rec["_path"] = str(p.parent)
        out.append(rec)
    return out


PAIRS = (("sp", "original"), ("sr", "original"), ("control", "original"), ("sr", "sp"))


def compare_table(records: List[dict]) -> tuple[str, dict]:
    """Markdown tables: mean ± std over seeds per setting / method, and the paired differences
    (same seed, same dense weights and data order) with 95% t confidence intervals and the
    minimum detectable difference (:mod:`benchmarks.stats`)."""
    from .stats import paired_summary, verdict

    by = {}
    for r in records:
        if r.get("kind") != "run":
            continue
        setting = r.get("setting") or r["framework"]
        by.setdefault((setting, r["model"], r["dataset"]), {}).setdefault(r["method"], {})[r["seed"]] = r
    lines = ["| setting | model | method | seeds | top-1 (%) | FLOPs (%) | params (%) | wall (s) | released |",
             "|---|---|---|---|---|---|---|---|---|"]
    diffs_lines = ["| setting | model | difference | seeds | Δ top-1 (points) | 95% CI | MDD | Δ FLOPs (%) | reading |",
                   "|---|---|---|---|---|---|---|---|---|"]
    summary = {}
    for (setting, model, dsname), methods in sorted(by.items()):
        key = f"{setting}/{model}/{dsname}"
        for m in METHODS:
            runs = methods.get(m)
            if not runs:
                continue
            rs = [runs[s] for s in sorted(runs)]
            lines.append(f"| {setting} | {model} | {METHOD_LABELS[m]} | {len(rs)} | {fmt_ms([r['top1'] for r in rs])} | "
                         f"{fmt_ms([r['flops_pct'] for r in rs], 1)} | {fmt_ms([r['params_pct'] for r in rs], 1)} | "
                         f"{fmt_ms([r['wall_time_s'] for r in rs], 0)} | "
                         f"{fmt_ms([r.get('counters', {}).get('released', 0) for r in rs], 0)} |")
            summary.setdefault(key, {})[m] = {
                "seeds": sorted(runs), "top1": mean_std([r["top1"] for r in rs]),
                "flops_pct": mean_std([r["flops_pct"] for r in rs]),
                "params_pct": mean_std([r["params_pct"] for r in rs]),
                "wall_time_s": mean_std([r["wall_time_s"] for r in rs])}
        for a, b in PAIRS:
            if a not in methods or b not in methods:
                continue
            seeds = sorted(set(methods[a]) & set(methods[b]))
            if not seeds:
                continue
            d_acc = [methods[a][s]["top1"] - methods[b][s]["top1"] for s in seeds]
            d_fl = [methods[a][s]["flops_pct"] - methods[b][s]["flops_pct"] for s in seeds]
            d_pa = [methods[a][s]["params_pct"] - methods[b][s]["params_pct"] for s in seeds]
            st = paired_summary(d_acc)
            ci = "-" if st["n"] < 2 else f"[{st['ci_low']:+.2f}, {st['ci_high']:+.2f}]"
            mdd = "-" if st["n"] < 2 else f"{st['mdd']:.2f}"
            equal_cost = max(abs(x) for x in d_fl) <= 1.0
            reading = verdict(st) if equal_cost else "FLOPs differ > 1 point: accuracy-vs-FLOPs point only"
            label = f"{METHOD_LABELS[a]} − {METHOD_LABELS[b]}"
            diffs_lines.append(f"| {setting} | {model} | {label} | {len(seeds)} | {st['mean']:+.2f} | {ci} | {mdd} | "
                               f"{fmt_ms(d_fl, 1)} | {reading} |")
            summary[key][f"{a}-{b}"] = {
                "seeds": seeds, "top1": mean_std(d_acc), "top1_paired": st, "equal_flops": equal_cost,
                "flops_pct": mean_std(d_fl), "params_pct": mean_std(d_pa), "per_seed_top1": d_acc}
    text = "\n".join(lines)
    if len(diffs_lines) > 2:
        text += ("\n\nPaired differences (same seed, same dense weights and data order): mean, 95% t "
                 "confidence interval, minimum detectable difference (80% power), Δ FLOPs mean ± std; "
                 "a difference counts as like-for-like only when every seed's FLOPs are within 1 point:\n\n"
                 + "\n".join(diffs_lines))
    pooled_lines, pooled = pooled_differences(summary)
    if pooled:
        summary["_pooled"] = pooled
        text += ("\n\nPooled over settings (the question \"does DPM help\", across frameworks and "
                 "criteria): per seed, the mean of that seed's paired differences over every "
                 "setting where the difference is like-for-like and the seed ran; then the same "
                 "t interval and MDD over seeds:\n\n" + "\n".join(pooled_lines))
    return text, summary


def pooled_differences(summary: dict) -> tuple[List[str], dict]:
    """Each paired difference pooled over the settings of one model and data set.

    Per seed ``s``: ``D_s`` = the mean over settings of that seed's difference, using every
    setting where the difference is like-for-like (FLOPs within 1 point for every seed) and
    seed ``s`` ran; the seeds kept are those present in every such setting. Then
    :func:`benchmarks.stats.paired_summary` over the ``D_s``. Averaging within a seed first
    keeps the pairing: the runs of one seed share the dense checkpoint and the data order
    across settings, so their differences are not independent samples. Needs at least two
    settings and two common seeds. Returns the markdown rows and ``{"model/dataset/a-b": {...}}``.
    """
    from .stats import paired_summary, verdict

    groups: Dict[tuple, List[tuple]] = {}
    for key, entry in summary.items():
        if key.startswith("_"):
            continue
        setting, model, dsname = key.split("/")
        for a, b in PAIRS:
            d = entry.get(f"{a}-{b}")
            if d is None or not d["equal_flops"]:
                continue
            groups.setdefault((model, dsname, a, b), []).append(
                (setting, dict(zip(d["seeds"], d["per_seed_top1"]))))
    rows = ["| model | difference | settings | seeds | Δ top-1 (points) | 95% CI | MDD | reading |",
            "|---|---|---|---|---|---|---|---|"]
    out = {}
    for (model, dsname, a, b), per_setting in sorted(
            groups.items(), key=lambda kv: (kv[0][:2], PAIRS.index(kv[0][2:]))):
        if len(per_setting) < 2:
            continue
        seeds = sorted(set.intersection(*(set(d) for _, d in per_setting)))
        if len(seeds) < 2:
            continue
        pooled = [sum(d[s] for _, d in per_setting) / len(per_setting) for s in seeds]
        st = paired_summary(pooled)
        ci = "-" if st["n"] < 2 else f"[{st['ci_low']:+.2f}, {st['ci_high']:+.2f}]"
        mdd = "-" if st["n"] < 2 else f"{st['mdd']:.2f}"
        label = f"{METHOD_LABELS[a]} − {METHOD_LABELS[b]}"
        names = sorted(name for name, _ in per_setting)
        rows.append(f"| {model} | {label} | {len(names)} ({', '.join(names)}) | {len(seeds)} | "
                    f"{st['mean']:+.2f} | {ci} | {mdd} | {verdict(st)} |")
        out[f"{model}/{dsname}/{a}-{b}"] = {"settings": names, "seeds": seeds,
                                             "per_seed_top1": pooled, "top1_paired": st}
    return (rows if out else []), out
