"""Cost–quality metrics of routers, each defined on a curve of operating points (cost, quality) swept over a knob.

Definitions (also written into every report):

- Non-decreasing convex hull (RouterBench, Hu et al. 2024, §3): the upper concave envelope of a router's points,
  kept flat after its highest-quality point. Any point on it is reachable by randomly mixing two operating points.
- AIQ, average improvement in quality (RouterBench): the area under the non-decreasing convex hull over the cost
  range [c_min, c_max], divided by (c_max − c_min). routelab uses the single models' cost range for every router so
  that AIQs compare, and extends a hull flat to the left of its cheapest point and to the right of its dearest
  (a single point's AIQ is its quality).
- Quality at the best single model's cost: the best quality among a router's operating points whose mean cost is no
  more than the best single model's (no mixing).
- Cost to reach the best single model's quality: the lowest mean cost among the operating points whose quality is at
  least the best single model's (None if no point reaches it).
- Gap closed: (quality − q_best_single) / (q_oracle − q_best_single) at the router's best point.
- PGR, APGR (RouteLLM, Ong et al. 2024, §5.1), two models: PGR(x) = (q(x) − q_weak) / (q_strong − q_weak), where x
  is the share of calls to the strong model; APGR is the area under PGR over x in [0, 1] (trapezoid rule on the
  curve interpolated linearly between operating points; the end points are all-weak and all-strong).
  A random router has APGR 0.5 in expectation.
- CPT(p) (RouteLLM): the smallest share of calls to the strong model at which PGR reaches p (interpolated linearly
  between operating points). Random: CPT(50%) = 50%.
"""

from __future__ import annotations

import numpy as np


def convex_hull(cost: np.ndarray, quality: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Vertices (cost, quality) of the non-decreasing upper convex hull, cheapest first."""
    cost, quality = np.asarray(cost, dtype=np.float64), np.asarray(quality, dtype=np.float64)
    if cost.shape != quality.shape or cost.ndim != 1 or len(cost) == 0:
        raise ValueError("cost and quality must be 1-D arrays of the same non-zero length")
    order = np.lexsort((-quality, cost))
    pts: list[tuple[float, float]] = []
    for c, q in zip(cost[order], quality[order]):
        if pts and c == pts[-1][0]:
            continue  # same cost: the first (highest quality) was kept
        if pts and q <= pts[-1][1]:
            continue  # dearer and no better: never on a non-decreasing hull
        while len(pts) >= 2:
            (c1, q1), (c2, q2) = pts[-2], pts[-1]
            if (q2 - q1) * (c - c1) <= (q - q1) * (c2 - c1):  # pts[-1] lies on or under the chord: drop it
                pts.pop()
            else:
                break
        pts.append((c, q))
    hull = np.array(pts)
    return hull[:, 0], hull[:, 1]


def hull_quality(cost: np.ndarray, quality: np.ndarray, at: np.ndarray) -> np.ndarray:
    """The hull's quality at costs `at`, flat outside the hull's cost range."""
    hc, hq = convex_hull(cost, quality)
    return np.interp(np.asarray(at, dtype=np.float64), hc, hq)


def aiq(cost: np.ndarray, quality: np.ndarray, c_min: float, c_max: float) -> float:
    """RouterBench's AIQ over [c_min, c_max] (see the module docstring)."""
    if not c_max > c_min:
        return float(hull_quality(cost, quality, [c_min])[0])
    hc, hq = convex_hull(cost, quality)
    grid = np.union1d(np.clip(hc, c_min, c_max), [c_min, c_max])  # the hull is linear between these
    return float(np.trapezoid(np.interp(grid, hc, hq), grid) / (c_max - c_min))


def quality_at_cost(cost, quality, budget: float, rtol: float = 1e-9) -> float | None:
    """Best quality among points with cost <= budget (None if none)."""
    cost, quality = np.asarray(cost), np.asarray(quality)
    ok = cost <= budget * (1 + rtol) + 1e-15
    return float(quality[ok].max()) if ok.any() else None


def cost_to_reach(cost, quality, target: float, atol: float = 1e-12) -> float | None:
    """Lowest cost among points with quality >= target (None if none)."""
    cost, quality = np.asarray(cost), np.asarray(quality)
    ok = quality >= target - atol
    return float(cost[ok].min()) if ok.any() else None


def gap_closed(quality: float, q_best_single: float, q_oracle: float) -> float:
    """Share of the best-single → oracle quality gap closed by `quality`."""
    gap = q_oracle - q_best_single
    return float((quality - q_best_single) / gap) if gap > 0 else float("nan")


def _pgr_curve(share, quality, q_weak: float, q_strong: float) -> tuple[np.ndarray, np.ndarray]:
    """PGR over shares, with the all-weak and all-strong end points, sorted by share (duplicates averaged)."""
    share = np.concatenate([[0.0], np.asarray(share, dtype=np.float64), [1.0]])
    quality = np.concatenate([[q_weak], np.asarray(quality, dtype=np.float64), [q_strong]])
    gap = q_strong - q_weak
    if gap <= 0:
        raise ValueError(f"PGR needs a strong model better than the weak one (q_strong {q_strong}, q_weak {q_weak})")
    xs = np.unique(share)
    ys = np.array([quality[share == x].mean() for x in xs])
    return xs, (ys - q_weak) / gap


def apgr(share, quality, q_weak: float, q_strong: float) -> float:
    """RouteLLM's APGR of a curve of (share of strong calls, quality) points."""
    xs, pgr = _pgr_curve(share, quality, q_weak, q_strong)
    return float(np.trapezoid(pgr, xs))


def cpt(share, quality, q_weak: float, q_strong: float, target: float) -> float:
    """RouteLLM's CPT(target): smallest share of strong calls with PGR >= target (linear between points)."""
    xs, pgr = _pgr_curve(share, quality, q_weak, q_strong)
    for i in range(len(xs)):
        if pgr[i] >= target:
            if i == 0:
                return float(xs[0])
            x0, x1, y0, y1 = xs[i - 1], xs[i], pgr[i - 1], pgr[i]
            return float(x0 + (target - y0) * (x1 - x0) / (y1 - y0))
    return 1.0
