"""Cost–quality metrics against hand-computed curves."""

import numpy as np
import pytest

from routelab.query import metrics


def test_hull_drops_dominated_and_under_chord_points():
    cost = np.array([0.0, 1.0, 2.0, 3.0, 1.5, 0.5])
    quality = np.array([0.0, 0.5, 0.6, 0.55, 0.4, 0.2])
    hc, hq = metrics.convex_hull(cost, quality)
    # (0.5, 0.2) lies under the chord (0,0)-(1,0.5); (1.5, 0.4) under (1,.5)-(2,.6); (3, .55) is dearer and worse
    assert hc.tolist() == [0.0, 1.0, 2.0] and hq.tolist() == [0.0, 0.5, 0.6]


def test_aiq_hand_computed():
    cost, quality = [0.0, 1.0, 2.0, 3.0], [0.0, 0.5, 0.6, 0.55]
    # area over [0, 2]: 0.25 (0->1) + 0.55 (1->2) = 0.8; normalised by 2
    assert metrics.aiq(cost, quality, 0.0, 2.0) == pytest.approx(0.4)
    # over [0, 4] the hull stays flat at 0.6 after its best point: (0.8 + 1.2) / 4
    assert metrics.aiq(cost, quality, 0.0, 4.0) == pytest.approx(0.5)


def test_aiq_of_a_single_point_is_its_quality():
    assert metrics.aiq([0.3], [0.71], 0.0, 1.0) == pytest.approx(0.71)


def test_aiq_of_a_dominated_curve_is_lower():
    cost = np.linspace(0, 1, 11)
    good = np.sqrt(cost)
    worse = good - 0.05
    assert metrics.aiq(cost, worse, 0, 1) == pytest.approx(metrics.aiq(cost, good, 0, 1) - 0.05, abs=1e-9)
    assert metrics.aiq(cost, worse, 0, 1) < metrics.aiq(cost, good, 0, 1)


def test_apgr_and_cpt_hand_computed():
    # PGR reaches 1 at half the strong calls: curve (0,0), (0.5,1), (1,1): area 0.25 + 0.5
    assert metrics.apgr([0.5], [1.0], q_weak=0.5, q_strong=1.0) == pytest.approx(0.75)
    assert metrics.cpt([0.5], [1.0], 0.5, 1.0, 0.5) == pytest.approx(0.25)
    assert metrics.cpt([0.5], [1.0], 0.5, 1.0, 0.8) == pytest.approx(0.4)
    # on the random line: APGR 0.5, CPT(50%) = 50%
    shares = np.linspace(0, 1, 11)
    assert metrics.apgr(shares, 0.5 + 0.5 * shares, 0.5, 1.0) == pytest.approx(0.5)
    assert metrics.cpt(shares, 0.5 + 0.5 * shares, 0.5, 1.0, 0.5) == pytest.approx(0.5)


def test_apgr_of_random_routing_is_half_in_expectation():
    rng = np.random.default_rng(0)
    n = 4000
    weak = (rng.random(n) < 0.6).astype(float)
    strong = (rng.random(n) < 0.9).astype(float)
    values = []
    for seed in range(20):
        u = np.random.default_rng(1000 + seed).random(n)  # independent of the outcome draws
        shares, quality = [], []
        for x in np.linspace(0, 1, 21):
            to_strong = u < x
            shares.append(to_strong.mean())
            quality.append(np.where(to_strong, strong, weak).mean())
        values.append(metrics.apgr(shares, quality, weak.mean(), strong.mean()))
    assert np.mean(values) == pytest.approx(0.5, abs=0.01)


def test_quality_at_cost_and_cost_to_reach():
    cost, quality = [1.0, 2.0, 3.0], [0.5, 0.7, 0.8]
    assert metrics.quality_at_cost(cost, quality, 2.5) == 0.7
    assert metrics.quality_at_cost(cost, quality, 0.5) is None
    assert metrics.cost_to_reach(cost, quality, 0.7) == 2.0
    assert metrics.cost_to_reach(cost, quality, 0.9) is None
    assert metrics.gap_closed(0.6, 0.5, 0.9) == pytest.approx(0.25)
