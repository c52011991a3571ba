"""Seed statistics for `compare --seeds N`: Student-t confidence intervals and paired differences.

Every variant trains once per seed s ∈ {seed, seed+1, ..., seed+N-1}; the same seed gives every variant the same
initialisation RNG state and the same batches in the same order, so the per-seed results of two variants are
*paired*. Two statistics come from them:

- the mean validation perplexity of a variant over its N seeds with a two-sided 95% **Student-t interval**
  (mean ± t_{0.975, N-1} · s/√N, s the sample standard deviation with N-1 in the denominator);
- per variant, the **paired difference** in validation loss (nats/token) to the reference variant,
  d_s = loss_variant(s) - loss_reference(s), its mean and its t-interval over the N seeds. When the interval holds 0
  the difference is not distinguishable from zero at this level.

The t quantile comes from a table for 1..30 degrees of freedom (values from the t distribution, 6 digits) and a
Cornish-Fisher expansion beyond (error < 1e-5 for df > 30), so no SciPy is needed at run time.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

CONFIDENCE = 0.95
# t_{0.975, df} for df = 1..30
_T975 = (12.706205, 4.302653, 3.182446, 2.776445, 2.570582, 2.446912, 2.364624, 2.306004, 2.262157, 2.228139,
         2.200985, 2.178813, 2.160369, 2.144787, 2.131450, 2.119905, 2.109816, 2.100922, 2.093024, 2.085963,
         2.079614, 2.073873, 2.068658, 2.063899, 2.059539, 2.055529, 2.051831, 2.048407, 2.045230, 2.042272)
_Z975 = 1.959963984540054


def t_quantile_975(df: int) -> float:
    """The 0.975 quantile of Student's t with `df` ≥ 1 degrees of freedom (two-sided 95%)."""
    if not isinstance(df, int) or isinstance(df, bool) or df < 1:
        raise ValueError(f"df must be an integer >= 1, got {df!r}")
    if df <= len(_T975):
        return _T975[df - 1]
    z = _Z975
    g1 = (z**3 + z) / 4
    g2 = (5 * z**5 + 16 * z**3 + 3 * z) / 96
    g3 = (3 * z**7 + 19 * z**5 + 17 * z**3 - 15 * z) / 384
    g4 = (79 * z**9 + 776 * z**7 + 1482 * z**5 - 1920 * z**3 - 945 * z) / 92160
    return z + g1 / df + g2 / df**2 + g3 / df**3 + g4 / df**4


def t_interval(values: Sequence[float]) -> dict[str, float]:
    """{"mean", "half_width", "low", "high", "sd", "n"} of the two-sided 95% t-interval of the mean of `values`.

    One value: the half-width is NaN (no spread to estimate). Non-finite values make every field NaN but `n`."""
    xs = [float(v) for v in values]
    n = len(xs)
    if n == 0:
        raise ValueError("t_interval needs at least one value")
    if not all(math.isfinite(x) for x in xs):
        nan = float("nan")
        return {"mean": nan, "half_width": nan, "low": nan, "high": nan, "sd": nan, "n": n}
    mean = sum(xs) / n
    if n == 1:
        nan = float("nan")
        return {"mean": mean, "half_width": nan, "low": nan, "high": nan, "sd": nan, "n": 1}
    sd = math.sqrt(sum((x - mean) ** 2 for x in xs) / (n - 1))
    half = t_quantile_975(n - 1) * sd / math.sqrt(n)
    return {"mean": mean, "half_width": half, "low": mean - half, "high": mean + half, "sd": sd, "n": n}


def paired_difference(values: Sequence[float], reference: Sequence[float]) -> dict[str, float | bool]:
    """The t-interval of the per-seed differences `values[i] - reference[i]`, plus "distinguishable": True when the
    interval excludes 0 (both ends on the same side of it), False otherwise (including when it is undefined)."""
    if len(values) != len(reference):
        raise ValueError(f"paired values need the same seeds: {len(values)} values against {len(reference)}")
    ci = t_interval([v - r for v, r in zip(values, reference)])
    distinct = math.isfinite(ci["low"]) and math.isfinite(ci["high"]) and (ci["low"] > 0 or ci["high"] < 0)
    return {**ci, "distinguishable": bool(distinct)}
