"""Figure 4 / Figure 5 style plots from a results folder (matplotlib, Agg backend, PNG files).

* Figure 5 style (``fig5_<framework>_<model>.png``): group sparsity over fine-tuning steps for
  the original method, +SP and +SR (one seed), with a histogram of Self-Rectifying releases per
  bin of steps on a second axis.
* Figure 4 style (``fig4_<framework>_<model>.png``): top-1 accuracy and FLOPs (% of dense) of
  +SP against the number of decaying steps N (log scale), from ``sweep-n`` results, with the
  original method as a dashed reference line.
* Recovery (``recovery_<setting>_<model>.png``): test-subset accuracy and loss right after each
  pruning event and over the next few hundred steps (the runs' ``probe`` points), averaged over
  seeds, original vs +SP (and the control): the mechanism the paper claims for Smooth Pruning.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Dict, List

from .experiment import load_results, mean_std
from .runners import METHOD_LABELS

COLORS = {"original": "tab:blue", "sp": "tab:red", "sr": "tab:green", "control": "tab:gray"}


def _plt():
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    return plt


def _read_trace(folder: str) -> List[dict]:
    p = Path(folder) / "trace.jsonl"
    if not p.is_file():
        return []
    with open(p) as f:
        return [json.loads(line) for line in f if line.strip()]


def _slug(*parts) -> str:
    return "_".join(str(p).replace("/", "-").replace(":", "-") for p in parts)


def figure5(records: List[dict], out_dir: Path, seed=None, bins: int = 20) -> List[Path]:
    plt = _plt()
    groups: Dict[tuple, Dict[str, dict]] = {}
    for r in records:
        if r.get("kind") != "run" or r.get("sweep"):
            continue
        key = (r.get("setting") or r["framework"], r["model"], r["dataset"])
        groups.setdefault(key, {}).setdefault(r["method"], []).append(r)
    written = []
    for (fw, model, dsname), by_method in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(7, 4.2))
        ax2 = None
        max_step = 1
        for method in ("original", "sp", "sr"):
            runs = by_method.get(method)
            if not runs:
                continue
            runs = sorted(runs, key=lambda r: r["seed"])
            run = next((r for r in runs if seed is None or r["seed"] == seed), runs[0])
            trace = _read_trace(run["_path"])
            if not trace:
                continue
            steps = [t["step"] for t in trace]
            sp = [100.0 * t["sparsity"] for t in trace]
            max_step = max(max_step, max(steps))
            ax.plot(steps, sp, color=COLORS[method], lw=1.6,
                    label=f"{METHOD_LABELS[method]} (seed {run['seed']}, top-1 {run['top1']:.2f}%)")
            if method == "sr":
                rel_steps = [t["step"] for t in trace for _ in range(int(t.get("released", 0) or 0))]
                if rel_steps:
                    ax2 = ax.twinx()
                    ax2.hist(rel_steps, bins=bins, range=(0, max(steps)), color="tab:green", alpha=0.25,
                             label="SR releases")
                    ax2.set_ylabel("SR releases per bin")
                    ax2.legend(loc="lower right", fontsize=8)
        ax.set_xlabel("optimizer step (pruning + fine-tuning)")
        ax.set_ylabel("group sparsity (%)")
        ax.set_title(f"Group sparsity during pruning: {fw}, {model}, {dsname}")
        ax.grid(alpha=0.3)
        ax.legend(loc="upper left", fontsize=8)
        if ax2 is not None:
            ax.set_zorder(ax2.get_zorder() + 1)
            ax.patch.set_visible(False)
        written.append(_save(plt, fig, out_dir, f"fig5_{_slug(fw, model, dsname)}.png"))
    return written


def _save(plt, fig, out_dir, name: str) -> Path:
    fig.tight_layout()
    path = Path(out_dir) / name
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def figure4(records: List[dict], out_dir: Path) -> List[Path]:
    plt = _plt()
    groups: Dict[tuple, dict] = {}
    for r in records:
        if r.get("kind") != "run" or not r.get("sweep"):
            continue
        key = (r.get("setting") or r["framework"], r["model"], r["dataset"])
        g = groups.setdefault(key, {"sp": {}, "sr": {}, "original": []})
        if r["method"] == "original":
            g["original"].append(r)
        else:
            g[r["method"]].setdefault(int(r["steps"]), []).append(r)
    written = []
    for (fw, model, dsname), g in sorted(groups.items()):
        fig, ax = plt.subplots(figsize=(6.5, 4))
        ax2 = ax.twinx()
        for method, ls in (("sp", "-"), ("sr", ":")):
            by_n = g[method]
            if not by_n:
                continue
            ns = sorted(by_n)
            acc = [mean_std([r["top1"] for r in by_n[n]]) for n in ns]
            fl = [mean_std([r["flops_pct"] for r in by_n[n]]) for n in ns]
            ax.errorbar(ns, [a[0] for a in acc], yerr=[a[1] for a in acc], color="tab:red", ls=ls, marker="o",
                        capsize=3, label=f"{METHOD_LABELS[method]} top-1")
            ax2.plot(ns, [f[0] for f in fl], color="tab:blue", ls=ls, marker="s", label=f"{METHOD_LABELS[method]} FLOPs")
        if g["original"]:
            m, _ = mean_std([r["top1"] for r in g["original"]])
            ax.axhline(m, color="tab:red", ls="--", alpha=0.6, label="original top-1")
            mf, _ = mean_std([r["flops_pct"] for r in g["original"]])
            ax2.axhline(mf, color="tab:blue", ls="--", alpha=0.6, label="original FLOPs")
        ax.set_xscale("log", base=2)
        ax.set_xlabel("decaying steps N")
        ax.set_ylabel("top-1 accuracy (%)", color="tab:red")
        ax2.set_ylabel("FLOPs (% of dense)", color="tab:blue")
        ax.set_title(f"Effect of N: {fw}, {model}, {dsname}")
        ax.grid(alpha=0.3)
        h1, l1 = ax.get_legend_handles_labels()
        h2, l2 = ax2.get_legend_handles_labels()
        ax.legend(h1 + h2, l1 + l2, fontsize=7, loc="best")
        written.append(_save(plt, fig, out_dir, f"fig4_{_slug(fw, model, dsname)}.png"))
    return written


def recovery_curves(runs: List[dict]) -> Dict[int, tuple]:
    """``{step: (mean acc, mean loss, seeds)}`` over the runs' probe points, at the steps that
    every run probed (the probe schedule is the same for every method and seed of a setting)."""
    per_step: Dict[int, list] = {}
    for r in runs:
        for p in r.get("probe") or []:
            per_step.setdefault(int(p["step"]), []).append((p["acc"], p["loss"]))
    n = len(runs)
    return {s: (sum(a for a, _ in v) / n, sum(b for _, b in v) / n, n)
            for s, v in sorted(per_step.items()) if len(v) == n}


def figure_recovery(records: List[dict], out_dir: Path) -> List[Path]:
    plt = _plt()
    groups: Dict[tuple, Dict[str, list]] = {}
    for r in records:
        if r.get("kind") != "run" or r.get("sweep") or not r.get("probe"):
            continue
        key = (r.get("setting") or r["framework"], r["model"], r["dataset"])
        groups.setdefault(key, {}).setdefault(r["method"], []).append(r)
    written = []
    for (setting, model, dsname), by_method in sorted(groups.items()):
        fig, (ax, axl) = plt.subplots(2, 1, figsize=(7.5, 6), sharex=True)
        events = []
        for method in ("original", "sp", "control"):
            runs = by_method.get(method)
            if not runs:
                continue
            events = runs[0].get("prune_steps_at") or events
            curve = recovery_curves(runs)
            steps = list(curve)
            ax.plot(steps, [curve[s][0] for s in steps], color=COLORS[method], lw=1.4, marker=".", ms=3,
                    label=f"{METHOD_LABELS[method]} ({len(runs)} seeds)")
            axl.plot(steps, [curve[s][1] for s in steps], color=COLORS[method], lw=1.4, marker=".", ms=3)
        for e in events:
            for a in (ax, axl):
                a.axvline(e, color="k", ls=":", alpha=0.4)
        ax.set_ylabel("test-subset top-1 (%)")
        axl.set_ylabel("test-subset loss")
        axl.set_xlabel("optimizer step (dotted: pruning steps)")
        ax.set_title(f"{setting}, {model}, {dsname}: around pruning, mean over seeds", fontsize=10)
        ax.grid(alpha=0.3)
        axl.grid(alpha=0.3)
        ax.legend(fontsize=8)
        written.append(_save(plt, fig, out_dir, f"recovery_{_slug(setting, model, dsname)}.png"))
    return written


def plot_folder(folder: Path, out_dir: Path = None, seed=None) -> List[Path]:
    folder = Path(folder)
    if not folder.is_dir():
        raise FileNotFoundError(f"results folder {folder} does not exist")
    records = load_results(folder)
    if not records:
        raise FileNotFoundError(f"no result.json under {folder}: run `dpm-bench compare` / `sweep-n` / `run` "
                                f"with --out {folder} first")
    out_dir = Path(out_dir) if out_dir else folder
    out_dir.mkdir(parents=True, exist_ok=True)
    return figure5(records, out_dir, seed=seed) + figure4(records, out_dir) + \
        figure_recovery(records, out_dir)
