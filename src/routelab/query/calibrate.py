"""`calibrate(router, outcomes, target_share)`: the knob value that sends a given share of queries to the strongest
model — what "threshold 0.116" means, answered the way RouteLLM's users ask for it."""

from __future__ import annotations

import numpy as np

from routelab._checks import check_number
from routelab.query.outcomes import Outcomes


def calibrate(router, outcomes: Outcomes | list[str], target_share: float) -> float:
    """Return the value of `router.knob_name` under which about `target_share` of these prompts go to the strongest
    model (the model with the highest mean training score, `router.strong`).

    threshold: the (1 − target_share) quantile of the predicted strong win rates (RouteLLM's calibration);
    willingness_to_pay: bisection on λ (the strong model's share falls as λ grows); cascade thresholds: bisection
    on τ (the share that reaches the strongest model in the chain rises with τ). A share the router cannot reach
    gives the knob value that comes closest (λ = 0, τ = 1 for cascades).
    """
    check_number("target_share", target_share, low=0.0, high=1.0)
    prompts = outcomes.prompts if isinstance(outcomes, Outcomes) else list(outcomes)
    if not prompts:
        raise ValueError("calibrate needs at least one prompt")
    scores_NM = router.predict(prompts)
    strong = router.strong
    knob = router.knob_name
    if knob == "threshold" and router.name != "cascade":
        win_N = router.strong_win_rate(prompts, scores_NM=scores_NM)
        return float(np.clip(np.quantile(win_N, 1.0 - target_share, method="higher"), 0.0, 1.0))

    def share(value: float) -> float:
        return float((router.route(prompts, **{knob: value}, scores_NM=scores_NM) == strong).mean())

    if knob == "threshold":  # cascade: share increasing in τ
        if share(1.0) <= target_share:
            return 1.0  # the most the router can send there
        lo, hi = 0.0, 1.0
        for _ in range(40):
            mid = (lo + hi) / 2
            lo, hi = (mid, hi) if share(mid) < target_share else (lo, mid)
        return float(hi)
    if share(0.0) <= target_share:
        return 0.0  # even at λ = 0 the router sends no more than this: the closest it gets
    lo, hi = 0.0, 1.0 / max(float(np.ptp(router.cost_M)), 1e-12)
    while share(hi) > target_share and hi < 1e18:
        hi *= 10
    for _ in range(60):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if share(mid) > target_share else (lo, mid)
    return float(hi)
