"""The post-pruning recovery numbers quoted in RESULTS.md, from a setting's result folder.

``python -m benchmarks.recovery_table benchmarks/results/cifar10-resnet20/depgraph-magnitude``
prints, per method and averaged over the seeds that both ``original`` and ``sp`` finished,
the lowest probe top-1 within 13 optimizer steps after each pruning step, and the mean probe
top-1 over steps 20-60 after it (the probe: a fixed 1,000-image test subset).
"""

from __future__ import annotations

import argparse

from benchmarks.experiment import load_results


def recovery(folder: str) -> dict:
    """``{method: (seeds, [min within 13 steps per event], [mean of 20-60 per event])}``."""
    runs: dict = {}
    for r in load_results(folder):
        runs.setdefault(r["method"], {})[r["seed"]] = r
    paired = sorted(set(runs.get("original", {})) & set(runs.get("sp", {})))
    out = {}
    for method in ("original", "sp", "sr", "control"):
        lows, laters, seeds = [], [], []
        for seed in paired:
            r = runs.get(method, {}).get(seed)
            if r is None or not r.get("probe"):
                continue
            acc = {p["step"]: p["acc"] for p in r["probe"]}
            events = r["prune_steps_at"]
            lows.append([min(acc[e + d] for d in range(14) if e + d in acc) for e in events])
            laters.append([_mean([v for k, v in acc.items() if e + 20 <= k <= e + 60])
                           for e in events])
            seeds.append(seed)
        if seeds:
            out[method] = (seeds, [_mean(col) for col in zip(*lows)],
                           [_mean(col) for col in zip(*laters)])
    return out


def _mean(xs) -> float:
    xs = list(xs)
    return sum(xs) / len(xs) if xs else float("nan")


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", help="a setting's folder, e.g. "
                    "benchmarks/results/cifar10-resnet20/depgraph-magnitude")
    args = ap.parse_args(argv)
    for method, (seeds, low, later) in recovery(args.folder).items():
        print(f"{method:9s} seeds {seeds}: lowest top-1 within 13 steps of each pruning step "
              f"{' / '.join(f'{x:.1f}' for x in low)}; mean over steps 20-60 after "
              f"{' / '.join(f'{x:.1f}' for x in later)}")
    return 0


if __name__ == "__main__":  # pragma: no cover
    raise SystemExit(main())
