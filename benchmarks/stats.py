"""Paired statistics for method comparisons: mean difference, 95% confidence interval and the
smallest difference a design of that size can detect.

Every comparison here is paired: method A and method B ran from the same dense checkpoint, with
the same data order and seed, so the per-seed differences ``d_i = A_i - B_i`` are the data. The
interval is Student's t interval of their mean; the minimum detectable difference (MDD) is the
true mean difference that a two-sided paired t-test at level 0.05 would find with 80% power,
given the observed standard deviation of the differences: ``(t_0.975 + t_0.80) * sd / sqrt(n)``
with ``n - 1`` degrees of freedom (the usual normal-approximation formula with t quantiles).
"""
from __future__ import annotations

import math
from typing import Dict, Sequence

# Student's t quantiles for df = 1..30 (two-sided 95%: 0.975 quantile; power 80%: 0.80 quantile).
_T975 = (12.706, 4.303, 3.182, 2.776, 2.571, 2.447, 2.365, 2.306, 2.262, 2.228, 2.201, 2.179, 2.160,
         2.145, 2.131, 2.120, 2.110, 2.101, 2.093, 2.086, 2.080, 2.074, 2.069, 2.064, 2.060, 2.056,
         2.052, 2.048, 2.045, 2.042)
_T80 = (1.376, 1.061, 0.978, 0.941, 0.920, 0.906, 0.896, 0.889, 0.883, 0.879, 0.876, 0.873, 0.870,
        0.868, 0.866, 0.865, 0.863, 0.862, 0.861, 0.860, 0.859, 0.858, 0.858, 0.857, 0.856, 0.856,
        0.855, 0.855, 0.854, 0.854)


def t_quantile(df: int, which: str = "0.975") -> float:
    """Student's t quantile (``which`` is "0.975" or "0.80") for ``df`` degrees of freedom;
    the normal quantile beyond df = 30."""
    if df < 1:
        raise ValueError(f"degrees of freedom must be >= 1, got {df}")
    if which not in ("0.975", "0.80"):
        raise ValueError(f"which must be '0.975' or '0.80', got {which!r}")
    table, normal = (_T975, 1.960) if which == "0.975" else (_T80, 0.842)
    return table[df - 1] if df <= len(table) else normal


def paired_summary(diffs: Sequence[float]) -> Dict[str, float]:
    """``{"n", "mean", "sd", "ci_low", "ci_high", "mdd"}`` of paired differences (NaN where n < 2)."""
    d = [float(x) for x in diffs if x is not None]
    n = len(d)
    nan = float("nan")
    if n == 0:
        return {"n": 0, "mean": nan, "sd": nan, "ci_low": nan, "ci_high": nan, "mdd": nan}
    mean = sum(d) / n
    if n < 2:
        return {"n": 1, "mean": mean, "sd": nan, "ci_low": nan, "ci_high": nan, "mdd": nan}
    sd = math.sqrt(sum((x - mean) ** 2 for x in d) / (n - 1))
    se = sd / math.sqrt(n)
    half = t_quantile(n - 1, "0.975") * se
    mdd = (t_quantile(n - 1, "0.975") + t_quantile(n - 1, "0.80")) * se
    return {"n": n, "mean": mean, "sd": sd, "ci_low": mean - half, "ci_high": mean + half, "mdd": mdd}


def verdict(s: Dict[str, float]) -> str:
    """A plain reading of a paired summary: which way the interval points, if it excludes 0."""
    if s["n"] < 2 or math.isnan(s["ci_low"]):
        return "too few seeds"
    if s["ci_low"] > 0:
        return "higher (CI excludes 0)"
    if s["ci_high"] < 0:
        return "lower (CI excludes 0)"
    return "no detectable difference"
