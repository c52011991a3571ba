"""Request-level routing: which whole model answers each query, trading quality against cost.

`load_outcomes(path)` reads per-query outcome data; `create_router(name, **options)` / `list_routers()` /
`load_router(path)` are the query-router registry (apart from the token routers'); `evaluate(...)` sweeps each
router's knob into cost–quality curves and metrics; `calibrate(router, outcomes, share)` turns a target share of
strong-model calls into a knob value. Heavy dependencies (scikit-learn, torch, wordllama) load inside functions.
"""

from routelab.query.calibrate import calibrate
from routelab.query.loaders import load_outcomes
from routelab.query.outcomes import OutcomeDataError, Outcomes, concat_outcomes
from routelab.query.routers import QueryRouter, create_router, list_routers, load_router


def evaluate(*args, **kwargs):
    """See `routelab.query.evaluation.evaluate`."""
    from routelab.query.evaluation import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


__all__ = ["OutcomeDataError", "Outcomes", "QueryRouter", "calibrate", "concat_outcomes", "create_router",
           "evaluate", "list_routers", "load_outcomes", "load_router"]
