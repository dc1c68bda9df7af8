"""``dpm-bench``: reproduce the paper's comparisons (original vs +SP vs +SR) and plots.

Subcommands: ``quickstart``, ``run``, ``compare``, ``sweep-n``, ``plot`` (and ``overhead``, the
lead's, registered from ``benchmarks.overhead`` when that module exists). Run
``dpm-bench SUBCOMMAND --help`` for every option.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import List, Optional

from . import experiment as ex
from .data import DATASET_NAMES, DataNotFoundError
from .models import MODEL_NAMES
from .runners import FRAMEWORKS, METHOD_LABELS, METHODS, FrameworkUnavailable, available_frameworks

class HelpFormatter(argparse.HelpFormatter):
    """Shows an option's default only where it says something: not for None / False / empty
    defaults, and not where the help text already names its default."""

    def _get_help_string(self, action):
        text = action.help or ""
        if action.default in (None, False, argparse.SUPPRESS, []) or "default" in text.lower() \
                or not action.option_strings:
            return text
        return text + " (default: %(default)s)"


class CLIError(Exception):
    """A user error: printed as one line, exit status 2."""


def _say(msg: str = "") -> None:
    print(msg, flush=True)


# ----------------------------------------------------------------------------------------------
# argument parsing
# ----------------------------------------------------------------------------------------------
def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    if v < 1:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _int_list(s: str) -> List[int]:
    try:
        out = [int(x) for x in s.replace(" ", "").split(",") if x]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 0,1,2, got {s!r}")
    if not out:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return out


def _frameworks(s: str) -> List[str]:
    items = [x.strip().lower() for x in s.split(",") if x.strip()]
    if items == ["all"]:
        return list(FRAMEWORKS)
    bad = [x for x in items if x not in FRAMEWORKS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown framework(s) {bad or s!r}; known: {', '.join(FRAMEWORKS)} "
                                         f"(or 'all')")
    return items


def _methods(s: str) -> List[str]:
    items = [x.strip().lower() for x in s.split(",") if x.strip()]
    bad = [x for x in items if x not in METHODS]
    if bad or not items:
        raise argparse.ArgumentTypeError(f"unknown method(s) {bad or s!r}; known: {', '.join(METHODS)}")
    return items


def _add_data_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data")
    g.add_argument("--dataset", default=None,
                   help=f"data set: {', '.join(DATASET_NAMES)} (default: cifar10). An ImageFolder is "
                        f"imagefolder:/path with train/ and val/ (or test/) class sub-folders")
    g.add_argument("--data-dir", default=None,
                   help="folder with CIFAR data: train.npz/test.npz (images uint8 NxHxWx3, labels), "
                        "or a cifar10/ (cifar100/) sub-folder holding them, or torchvision's layout. "
                        "Default: $DPM_DATA, else ./data")
    g.add_argument("--train-subset", type=_positive_int, default=None,
                   help="use a class-balanced subset of this many training images (profile default)")
    g.add_argument("--test-subset", type=_positive_int, default=None,
                   help="use a class-balanced subset of this many test images (profile default)")
    g.add_argument("--image-size", type=_positive_int, default=None,
                   help="resize images to this side length (default: native; digits: 32)")
    g.add_argument("--no-download", action="store_true",
                   help="never try torchvision's download of CIFAR")
    g.add_argument("--fallback-digits", action="store_true",
                   help="if CIFAR cannot be found or downloaded, use scikit-learn's digits instead of "
                        "failing (quickstart always does)")


def _add_common(p: argparse.ArgumentParser, framework_list: bool) -> None:
    p.add_argument("--profile", choices=sorted(ex.PROFILES), default="cpu",
                   help="defaults for sizes and schedules: smoke (seconds, for tests), quickstart (a small "
                        "CNN, all frameworks in minutes), cpu (a CIFAR-10 subset and a short schedule "
                        "for 2 CPU cores), cifar (the evidence protocol: full CIFAR-10, ResNet-20 from "
                        "the committed dense checkpoints, benchmarks/RESULTS.md), paper (the paper's "
                        "full schedules, for a GPU). Options given explicitly override the profile")
    if framework_list:
        p.add_argument("--framework", type=_frameworks, default=list(FRAMEWORKS),
                       help=f"comma-separated frameworks or 'all' (default: all): {', '.join(FRAMEWORKS)}")
    else:
        p.add_argument("--framework", choices=FRAMEWORKS, required=True,
                       help="pruning framework (adapter package) to run")
    g = p.add_argument_group("model and pruning")
    g.add_argument("--model", default=None,
                   help=f"model: {', '.join(MODEL_NAMES)} (profile default; paper profile: the "
                        f"paper's model per framework)")
    g.add_argument("--width", type=float, default=None, help="channel width multiplier of the model")
    g.add_argument("--ratio", type=float, default=None,
                   help="pruning target: channel pruning ratio (depgraph, gatedecorator) or target "
                        "group sparsity (otov2), in (0, 1)")
    g.add_argument("--criterion", choices=["magnitude", "group_sl", "bn_scale"], default=None,
                   help="depgraph pruner: magnitude (MetaPruner, no sparse learning), group_sl "
                        "(GroupNormPruner with sparse learning), bn_scale (BNScalePruner)")
    g.add_argument("--iterative-steps", type=_positive_int, default=None,
                   help="number of pruning steps / rounds (depgraph, gatedecorator)")
    g.add_argument("--prune-every", type=int, default=None,
                   help="optimizer steps between pruning steps (otov2: the step where partition and "
                        "half-space projection start); 0 = spread them over the first third of fine-tuning")
    g.add_argument("--global-pruning", action="store_true", default=None,
                   help="depgraph: rank channels globally instead of per layer")
    g.add_argument("--reg", type=float, default=None,
                   help="sparse-learning strength (depgraph group_sl/bn_scale reg, gatedecorator L1 on gates)")
    g.add_argument("--lmbda", type=float, default=None, help="otov2: DHSPG group-sparsity lambda")
    g.add_argument("--epsilon", type=float, default=None,
                   help="otov2: DHSPG half-space projection threshold epsilon in [0, 1) (default 0.95)")
    g.add_argument("--min-keep-ratio", type=float, default=None,
                   help="gatedecorator: smallest fraction of each layer's filters that is kept")
    d = p.add_argument_group("decay pruning (DPM)")
    d.add_argument("--steps", "-N", dest="steps", type=_positive_int, default=None,
                   help="N, decaying steps of Smooth Pruning (paper: 3-5)")
    d.add_argument("--t-rate", type=float, default=None,
                   help="T_rate, Self-Rectifying threshold on the escaping rate (paper: 0.2-0.4; 0.1-0.2 "
                        "with sparse learning; default chosen per framework)")
    d.add_argument("--t-len", type=float, default=None,
                   help="T_len, Self-Rectifying threshold on the relative gradient length (paper: 0.8; "
                        "0.5 with sparse learning)")
    t = p.add_argument_group("training")
    t.add_argument("--pretrain-epochs", type=int, default=None,
                   help="dense pre-training epochs before pruning (cached per seed under --cache-dir)")
    t.add_argument("--epochs", type=_positive_int, default=None, help="pruning + fine-tuning epochs")
    t.add_argument("--lr", type=float, default=None, help="pre-training learning rate (SGD, cosine)")
    t.add_argument("--finetune-lr", type=float, default=None,
                   help="pruning / fine-tuning learning rate (otov2: DHSPG lr), cosine schedule")
    t.add_argument("--batch-size", type=_positive_int, default=None, help="training batch size")
    t.add_argument("--device", default="cpu", help="torch device (cpu, cuda, cuda:1, ...)")
    t.add_argument("--threads", type=_positive_int, default=None,
                   help="torch CPU threads (default: all cores)")
    t.add_argument("--precision", choices=["fp32", "bf16"], default=None,
                   help="forward pass in float32 or under bfloat16 autocast (weights, gradients and "
                        "optimizer state stay float32; profile default: bf16 for cifar, else fp32)")
    o = p.add_argument_group("output")
    o.add_argument("--out", default=None, help="results folder (default: results/<subcommand>-<time>)")
    o.add_argument("--cache-dir", default=None,
                   help="where pre-trained dense models are cached (default: $DPM_CACHE or results/cache)")
    o.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")
    _add_data_args(p)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="dpm-bench",
        description="Benchmarks of the Decay Pruning Method: the same pruning framework, model, data and "
                    "budget with the original single-step pruning, +SP (Smooth Pruning) and +SR "
                    "(Smooth Pruning + Self-Rectifying).",
        formatter_class=HelpFormatter)
    sub = parser.add_subparsers(dest="command", metavar="SUBCOMMAND")

    q = sub.add_parser("quickstart", formatter_class=HelpFormatter,
                       help="prune a small model with every framework (original/+SP/+SR), print one table",
                       description="For each framework: pre-train a small CIFAR CNN (small_cnn, width 2) in-run, prune it at "
                                   "an aggressive ratio with the original method, +SP and +SR, and print one "
                                   "table (top-1, FLOPs %, params %, wall time). Under 5 minutes on 2 CPU "
                                   "cores. Data: CIFAR-10 from --data-dir / $DPM_DATA (npz layout) or "
                                   "torchvision's download; offline, scikit-learn's digits.")
    q.add_argument("--framework", type=_frameworks, default=list(FRAMEWORKS),
                   help="comma-separated frameworks or 'all' (default: all)")
    q.add_argument("--data-dir", default=None, help="CIFAR-10 folder (train.npz/test.npz or torchvision layout); "
                                                    "default $DPM_DATA, else ./data")
    q.add_argument("--dataset", default="cifar10", help="data set (cifar10, digits, synthetic, ...)")
    q.add_argument("--no-download", action="store_true", help="never try torchvision's download")
    q.add_argument("--seed", type=int, default=0, help="random seed")
    q.add_argument("--out", default=None, help="results folder (default: results/quickstart-<time>)")
    q.add_argument("--cache-dir", default=None, help="pre-trained model cache (default: <out>/cache)")
    q.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    q.add_argument("--device", default="cpu", help="torch device")
    q.add_argument("--profile", choices=["quickstart", "smoke"], default="quickstart",
                   help="quickstart (the < 5 minute demo) or smoke (seconds, for tests)")
    q.add_argument("--no-progress", action="store_true", help="no tqdm progress bars")

    r = sub.add_parser("run", formatter_class=HelpFormatter,
                       help="one configured experiment, logged to a results folder",
                       description="Pre-train (cached), prune and fine-tune one configuration; writes "
                                   "log.jsonl (one JSON line per epoch), trace.jsonl (per-step sparsity and "
                                   "SR releases) and result.json (accuracy, FLOPs, params, wall time, DPM "
                                   "counters) to --out.")
    _add_common(r, framework_list=False)
    r.add_argument("--method", choices=METHODS, default="sr",
                   help="original (the framework's single-step pruning), sp (+Smooth Pruning), "
                        "sr (+Smooth Pruning + Self-Rectifying)")
    r.add_argument("--seed", type=int, default=0, help="random seed")

    c = sub.add_parser("compare", formatter_class=HelpFormatter,
                       help="original vs +SP vs +SR over several seeds: mean ± std and paired differences",
                       description="For each framework and seed: pre-train once (cifar profile: load the committed "
                                   "dense checkpoint instead), then run every method from "
                                   "the same weights; prints and writes (table.md, summary.json) a paper-style "
                                   "table with mean ± std over seeds and paired differences.")
    _add_common(c, framework_list=True)
    c.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (profile default)")
    c.add_argument("--methods", type=_methods, default=None,
                   help=f"comma-separated methods out of {', '.join(METHODS)}; control is +SP with N = 1 "
                        f"and Self-Rectifying off (default: the profile's; cifar: all four, others: "
                        f"original,sp,sr)")
    c.add_argument("--resume", action="store_true",
                   help="skip runs whose result.json exists under --out and runs another compare "
                        "process is running (several processes can share one --out)")
    c.add_argument("--summarize", action="store_true",
                   help="run nothing: rebuild table.md / summary.json from every result.json already under "
                        "--out (e.g. after several compare runs wrote into the same folder)")

    s = sub.add_parser("sweep-n", formatter_class=HelpFormatter,
                       help="the Figure 4 experiment: accuracy and FLOPs against N",
                       description="Runs +SP (and +SR with --with-sr) for each N, plus the original method as "
                                   "the reference, from the same pre-trained weights per seed.")
    _add_common(s, framework_list=True)
    s.add_argument("--ns", type=_int_list, default=None, help="comma-separated N values (profile default: "
                                                              "3,5,8,16,32,64,128)")
    s.add_argument("--seeds", type=_int_list, default=None, help="comma-separated seeds (default: first "
                                                                 "profile seed)")
    s.add_argument("--with-sr", action="store_true", help="also run +SR for every N")
    s.add_argument("--resume", action="store_true",
                   help="skip runs whose result.json exists under --out and runs another sweep-n "
                        "process is running (several processes can share one --out)")

    pl = sub.add_parser("plot", formatter_class=HelpFormatter,
                        help="Figure 5 / Figure 4 style PNGs from a results folder",
                        description="Reads every result.json under FOLDER: draws group sparsity over training "
                                    "for original/+SP/+SR with a histogram of SR releases (fig5_*.png) and, for "
                                    "sweep-n results, accuracy and FLOPs against N (fig4_*.png).")
    pl.add_argument("folder", help="results folder written by compare / sweep-n / run")
    pl.add_argument("--out", default=None, help="where to write the PNGs (default: FOLDER)")
    pl.add_argument("--seed", type=int, default=None, help="seed whose traces to draw (default: the lowest)")

    pt = sub.add_parser("pretrain", help="train the dense checkpoints that the cifar profile prunes",
                        description="Dense pre-training with the fixed recipe of benchmarks/pretrain.py (SGD, "
                                    "Nesterov momentum 0.9, weight decay 5e-4, batch 128, lr 0.1 with one "
                                    "warm-up epoch and cosine decay, random crop + flip; bfloat16 autocast). "
                                    "Resumable: the training state is saved after every epoch in --work-dir and "
                                    "a rerun continues. Writes <model>-<dataset>-s<seed>.pt and .json (log, "
                                    "SHA-256) to --out.")
    pt.add_argument("--model", default="resnet20", help=f"model: {', '.join(MODEL_NAMES)}")
    pt.add_argument("--seeds", type=_int_list, default=[0, 1], help="comma-separated pre-training seeds")
    pt.add_argument("--epochs", type=_positive_int, default=None, help="epochs (default: the recipe's, 50)")
    pt.add_argument("--cycle-epochs", type=_positive_int, default=None,
                    help="restart the cosine schedule every this many epochs (SGDR); default: no restart")
    pt.add_argument("--precision", choices=["fp32", "bf16"], default="bf16", help="forward-pass precision")
    pt.add_argument("--out", default=None, help="checkpoint folder (default: benchmarks/checkpoints)")
    pt.add_argument("--work-dir", default="results/pretrain-work", help="resumable training state")
    pt.add_argument("--threads", type=_positive_int, default=None, help="torch CPU threads")
    pt.add_argument("--device", default="cpu", help="torch device")
    _add_data_args(pt)

    _register_overhead(sub)
    return parser


def _register_overhead(sub) -> None:
    """The ``overhead`` subcommand belongs to ``benchmarks.overhead`` (the lead's); it is
    registered through its ``register(subparsers)`` when the module exists."""
    try:
        from . import overhead  # type: ignore
    except ImportError:
        overhead = None
    if overhead is not None and hasattr(overhead, "register"):
        overhead.register(sub)
        return
    o = sub.add_parser("overhead", help="time overhead of DPM (provided by benchmarks.overhead)",
                       description="Not available in this build: benchmarks/overhead.py is missing.")
    o.set_defaults(func=lambda args: (_ for _ in ()).throw(
        CLIError("`overhead` is not available yet: benchmarks/overhead.py (register(subparsers)) is missing")))


# ----------------------------------------------------------------------------------------------
# helpers
# ----------------------------------------------------------------------------------------------
_OVERRIDE_KEYS = ("model", "width", "ratio", "criterion", "iterative_steps", "prune_every", "global_pruning",
                  "reg", "lmbda", "epsilon", "min_keep_ratio", "steps", "t_rate", "t_len", "pretrain_epochs", "epochs",
                  "lr", "finetune_lr", "batch_size", "device", "dataset", "data_dir", "train_subset",
                  "test_subset", "image_size", "precision")


def _overrides(args) -> dict:
    o = {k: getattr(args, k, None) for k in _OVERRIDE_KEYS}
    o["download"] = not getattr(args, "no_download", False)
    o["fallback"] = bool(getattr(args, "fallback_digits", False))
    return o


def _progress(args) -> bool:
    """Progress bars only on a terminal, never into a redirected log."""
    return not getattr(args, "no_progress", False) and sys.stderr.isatty()


def _setup_threads(args) -> None:
    import torch

    n = getattr(args, "threads", None) or os.cpu_count() or 1
    torch.set_num_threads(int(n))


def _out_dir(args, name: str) -> Path:
    if getattr(args, "out", None):
        return Path(args.out)
    return Path("results") / f"{name}-{time.strftime('%Y%m%d-%H%M%S')}"


def _cache_dir(args, out: Path) -> Path:
    if getattr(args, "cache_dir", None):
        return Path(args.cache_dir)
    env = os.environ.get("DPM_CACHE")
    return Path(env) if env else Path("results") / "cache"


def _check_frameworks(frameworks: List[str], strict: bool) -> List[str]:
    avail = available_frameworks()
    usable = []
    for f in frameworks:
        if avail.get(f) is None:
            usable.append(f)
        else:
            _say(f"skipping {f}: {avail[f]}")
    if not usable:
        raise CLIError(f"none of the requested frameworks is available ({', '.join(frameworks)}); "
                       f"install/finish the adapter packages")
    return usable


def _load_data(data: dict):
    ds = ex.prepare_data(data, log=lambda m: print(m, file=sys.stderr, flush=True))
    _say(f"data: {ds.describe()}")
    return ds


def _write_json(path: Path, obj) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "w") as f:
        json.dump(ex._jsonable(obj), f, indent=1)


# ----------------------------------------------------------------------------------------------
# subcommands
# ----------------------------------------------------------------------------------------------
def cmd_run(args) -> int:
    cfg, data = ex.resolve_config(args.profile, args.framework, dict(_overrides(args), method=args.method,
                                                                     seed=args.seed))
    from .runners import get_runner

    get_runner(cfg.framework).check_available()
    out = _out_dir(args, f"run-{cfg.framework}-{cfg.method}")
    ds = _load_data(data)
    model, plog, psecs = ex.pretrained_model(cfg, ds, _cache_dir(args, out), progress=_progress(args),
                                             log=_say)
    rec = ex.run_one(cfg, ds, out, dense_model=model, pretrain_log=plog, pretrain_seconds=psecs,
                     progress=_progress(args), log=_say)
    _say(f"results: {out}/result.json")
    return 0 if rec else 1


def _seeds(args, data) -> List[int]:
    return list(args.seeds) if getattr(args, "seeds", None) else list(data.get("seeds") or [0])


def _summarize(out: Path, command: str) -> int:
    records = [r for r in ex.load_results(out) if r.get("kind") == "run" and not r.get("sweep")]
    if not records:
        raise CLIError(f"no result.json under {out}: nothing to summarize")
    table, summary = ex.compare_table(records)
    (out / "table.md").write_text(table + "\n")
    _write_json(out / "summary.json", {"command": command, "summary": summary})
    _say(table)
    _say(f"\nresults: {out} (table.md, summary.json)")
    return 0


def _claim(run_dir: Path) -> bool:
    """Claim ``run_dir`` for this process (a lock file holding our pid), so that several
    ``compare --resume`` processes can share one results folder. A lock whose process is gone
    is taken over."""
    run_dir.mkdir(parents=True, exist_ok=True)
    lock = run_dir / "running.lock"
    for _ in range(2):
        try:
            fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        except FileExistsError:
            try:
                pid = int(lock.read_text().strip() or 0)
                os.kill(pid, 0)
                return False           # another live process runs it
            except (ValueError, ProcessLookupError, PermissionError, FileNotFoundError):
                lock.unlink(missing_ok=True)   # stale: its process is gone
                continue
        with os.fdopen(fd, "w") as f:
            f.write(str(os.getpid()))
        return True
    return False


def _resumable(args, run_dir: Path, label: str, run):
    """``run()`` (which writes ``run_dir/result.json`` and returns its record), except with
    ``--resume``: a finished run's record is read back, and a run another live process has
    claimed is skipped (None)."""
    if args.resume and (run_dir / "result.json").is_file():
        _say(f"  {label}: done already ({run_dir}/result.json)")
        with open(run_dir / "result.json") as f:
            return json.load(f)
    if args.resume and not _claim(run_dir):
        _say(f"  {label}: another process is running it, skipped")
        return None
    try:
        return run()
    finally:
        if args.resume:
            (run_dir / "running.lock").unlink(missing_ok=True)


def cmd_compare(args) -> int:
    if args.summarize:
        if not args.out:
            raise CLIError("--summarize needs --out FOLDER (the results folder to summarize)")
        return _summarize(Path(args.out), " ".join(sys.argv))
    frameworks = _check_frameworks(args.framework, strict=True)
    out = _out_dir(args, "compare")
    cache = _cache_dir(args, out)
    ds = None
    records = []
    for fw in frameworks:
        cfg0, data = ex.resolve_config(args.profile, fw, _overrides(args))
        if ds is None:
            ds = _load_data(data)
        seeds = _seeds(args, data)
        methods = list(args.methods) if args.methods else data["methods"]
        setting = ex.setting_name(cfg0)
        _say(f"{setting}: {cfg0.model} (width {cfg0.width}), ratio {cfg0.ratio}, N={cfg0.steps}, "
             f"T_rate={cfg0.t_rate}, T_len={cfg0.t_len}, seeds {seeds}, methods {methods}")
        for seed in seeds:
            cfg_s = ex.dataclasses.replace(cfg0, seed=seed)
            dense = []
            for method in methods:
                run_dir = out / setting / f"{method}-s{seed}"

                def run(method=method, run_dir=run_dir):
                    if not dense:
                        dense.append(ex.pretrained_model(cfg_s, ds, cache, progress=_progress(args),
                                                         log=_say))
                    model, plog, psecs = dense[0]
                    cfg = ex.dataclasses.replace(cfg_s, method=method)
                    return ex.run_one(cfg, ds, run_dir, dense_model=model, pretrain_log=plog,
                                      pretrain_seconds=psecs, progress=_progress(args), log=_say)
                rec = _resumable(args, run_dir, f"{setting} {method} seed {seed}", run)
                if rec is not None:
                    records.append(rec)
    table, summary = ex.compare_table(records)
    (out / "table.md").write_text(table + "\n")
    _write_json(out / "summary.json", {"command": " ".join(sys.argv), "profile": args.profile,
                                       "summary": summary})
    _say("")
    _say(table)
    _say(f"\nresults: {out} (table.md, summary.json, <setting>/<method>-s<seed>/result.json)")
    return 0


def cmd_sweep(args) -> int:
    frameworks = _check_frameworks(args.framework, strict=True)
    out = _out_dir(args, "sweep-n")
    cache = _cache_dir(args, out)
    ds = None
    for fw in frameworks:
        cfg0, data = ex.resolve_config(args.profile, fw, _overrides(args))
        if ds is None:
            ds = _load_data(data)
        ns = list(args.ns) if args.ns else list(data.get("sweep") or [3, 5, 8, 16, 32, 64, 128])
        if any(n < 1 for n in ns):
            raise CLIError(f"--ns values must be >= 1, got {ns}")
        seeds = list(args.seeds) if args.seeds else _seeds(args, data)[:1]
        methods = ["sp", "sr"] if args.with_sr else ["sp"]
        _say(f"{fw}: sweep N over {ns}, methods {methods} + original, seeds {seeds}")
        from .runners.base import progress_bar

        for seed in seeds:
            cfg_s = ex.dataclasses.replace(cfg0, seed=seed)
            setting = ex.setting_name(cfg_s)
            dense = []

            def run(cfg, run_dir):
                if not dense:
                    dense.append(ex.pretrained_model(cfg_s, ds, cache, progress=_progress(args), log=_say))
                model, plog, psecs = dense[0]
                return ex.run_one(cfg, ds, run_dir, dense_model=model, pretrain_log=plog,
                                  pretrain_seconds=psecs, progress=_progress(args),
                                  extra={"sweep": True}, log=_say)
            run_dir = out / setting / f"original-s{seed}"
            _resumable(args, run_dir, f"{setting} original seed {seed}",
                       lambda: run(ex.dataclasses.replace(cfg_s, method="original"), run_dir))
            for n in progress_bar(ns, desc=f"{fw} N sweep", enabled=_progress(args), leave=True):
                for method in methods:
                    cfg = ex.dataclasses.replace(cfg_s, method=method, steps=int(n))
                    run_dir = out / setting / f"{method}-N{n}-s{seed}"
                    _resumable(args, run_dir, f"{setting} {method} N={n} seed {seed}",
                               lambda: run(cfg, run_dir))
    _say(f"results: {out}; draw Figure 4 with: dpm-bench plot {out}")
    return 0


def cmd_plot(args) -> int:
    from .plots import plot_folder

    try:
        paths = plot_folder(Path(args.folder), Path(args.out) if args.out else None, seed=args.seed)
    except FileNotFoundError as e:
        raise CLIError(str(e))
    if not paths:
        raise CLIError(f"nothing to plot in {args.folder}: it needs compare results (original/sp/sr) or "
                       f"sweep-n results")
    for p in paths:
        _say(f"wrote {p}")
    return 0


def _quickstart_batch(cfg, ds):
    """Keep at least ~30 optimizer steps per epoch on a small data set (the digits fallback
    has 1,442 training images: at batch 128 pre-training stays near 40% and the fine-tuning
    is too short for DHSPG to prune at all)."""
    n_train = len(ds.train_labels)
    if n_train // cfg.batch_size >= 30:
        return cfg
    return ex.dataclasses.replace(cfg, batch_size=max(16, n_train // 30))


def cmd_quickstart(args) -> int:
    frameworks = _check_frameworks(args.framework, strict=False)
    out = _out_dir(args, "quickstart")
    cache = Path(args.cache_dir) if args.cache_dir else out / "cache"
    base = dict(dataset=args.dataset, data_dir=args.data_dir, download=not args.no_download, fallback=True,
                device=args.device, seed=args.seed)
    t_start = time.time()
    ds = None
    records = []
    dense = {}
    for fw in frameworks:
        cfg0, data = ex.resolve_config(args.profile, fw, base)
        if ds is None:
            ds = _load_data(data)
        if args.profile == "quickstart":
            cfg0 = _quickstart_batch(cfg0, ds)
        key = (cfg0.model, cfg0.width, cfg0.seed)
        if key not in dense:
            dense[key] = ex.pretrained_model(cfg0, ds, cache, progress=_progress(args), log=_say)
        model, plog, psecs = dense[key]
        for method in ex.DEFAULT_METHODS:
            cfg = ex.dataclasses.replace(cfg0, method=method)
            try:
                records.append(ex.run_one(cfg, ds, out / fw / method, dense_model=model, pretrain_log=plog,
                                          pretrain_seconds=psecs, progress=_progress(args), log=_say))
            except FrameworkUnavailable as e:
                _say(f"skipping {fw}: {e}")
                break
    total = time.time() - t_start
    _say("")
    _say(f"quickstart: {ds.describe()}; model {records[0]['model'] if records else '-'}, "
         f"pruning ratio {cfg0.ratio}, N={cfg0.steps}; total {total:.0f}s")
    hdr = f"{'framework':14s} {'method':9s} {'top-1 %':>8s} {'FLOPs %':>8s} {'params %':>9s} {'wall s':>7s} {'released':>9s}"
    _say(hdr)
    _say("-" * len(hdr))
    for r in records:
        _say(f"{r['framework']:14s} {r['method_label']:9s} {r['top1']:8.2f} {r['flops_pct']:8.1f} "
             f"{r['params_pct']:9.1f} {r['wall_time_s']:7.1f} {r['counters'].get('released', 0):9d}")
    _say("columns: top-1 of the physically pruned model on the test set; FLOPs % and params % of the "
         "dense model; wall s: pruning + fine-tuning time; released: structures that Self-Rectifying "
         "gave back to training (always 0 for original and +SP)")
    _say(f"targets: depgraph removes {cfg0.ratio:.0%} of every layer's channels (classifier excluded); "
         f"gatedecorator {cfg0.ratio:.0%} of all gated BN channels, ranked globally by Taylor score; "
         f"otov2 drives {cfg0.ratio:.0%} of its zero-invariant groups to zero (target group sparsity), "
         f"so the three frameworks end at different FLOPs")
    dense_acc = records[0]["dense_top1"] if records else float("nan")
    _say(f"(dense model before pruning: top-1 {dense_acc:.2f}%, 100% FLOPs / params; one seed, so "
         f"differences of a point or two are noise: use `dpm-bench compare` for mean ± std over seeds)")
    table, summary = ex.compare_table(records)
    (out / "table.md").write_text(table + "\n")
    _write_json(out / "summary.json", {"command": " ".join(sys.argv), "total_time_s": total, "summary": summary})
    _say(f"results: {out}")
    return 0


def cmd_pretrain(args) -> int:
    from .pretrain import RECIPE, checkpoint_dir, pretrain_dense

    ds = _load_data({"dataset": args.dataset or "cifar10", "data_dir": args.data_dir,
                     "train_subset": args.train_subset, "test_subset": args.test_subset,
                     "image_size": args.image_size, "download": not args.no_download,
                     "fallback": bool(args.fallback_digits)})
    out = Path(args.out) if args.out else checkpoint_dir()
    for seed in args.seeds:
        pretrain_dense(args.model, ds, seed, out, Path(args.work_dir), epochs=args.epochs or RECIPE["epochs"],
                       cycle_epochs=args.cycle_epochs, precision=args.precision, device=args.device, log=_say)
    return 0


COMMANDS = {"run": cmd_run, "compare": cmd_compare, "sweep-n": cmd_sweep, "plot": cmd_plot,
            "quickstart": cmd_quickstart, "pretrain": cmd_pretrain}


def main(argv: Optional[List[str]] = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    if not args.command:
        parser.print_help()
        return 2
    func = getattr(args, "func", None) or COMMANDS[args.command]
    try:
        if args.command != "plot":
            _setup_threads(args)
        return int(func(args) or 0)
    except (CLIError, FrameworkUnavailable, DataNotFoundError, ValueError) as e:
        # user errors: one clear line, no traceback
        print(f"dpm-bench {args.command}: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
