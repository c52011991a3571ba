"""Fair comparison of query routers: the same splits, the same test prompts, each router's knob swept into a
cost–quality curve beside every single model, random and the oracle (an upper bound), with RouterBench's and
RouteLLM's metrics (definitions in `routelab.query.metrics` and in every report).

Splits: a given train/test pair, or k-fold cross-validation with a fixed seed, optionally grouped (every prompt of a
category in one fold, so that e.g. MMLU subjects do not leak across folds). With k folds, each test prompt is routed
by routers trained without its fold, and the curves pool the k test folds point by point (point i of the sweep is
the same knob value, or for threshold routers the same target share of strong calls, in every fold).

Costs: each query is charged the true (or price-table estimated) cost of every model it called; two-model data
without costs charges 1 per call to the strong model, so the cost axis is the share of strong calls.
"""

from __future__ import annotations

import sys
import time
from dataclasses import dataclass

import numpy as np

from routelab.query import metrics
from routelab.query.encoders import create_encoder
from routelab.query.outcomes import Outcomes
from routelab.query.routers.base import create_router, unit_costs

DEFAULT_ROUTERS = ("random", "oracle", "knn", "mlp", "mf", "sw_ranking", "cluster", "cascade", "linucb")
SWEEP_POINTS = 41  # knob values per curve


@dataclass
class RouterSpec:
    label: str
    name: str
    options: dict


def parse_router_specs(items: list[str] | tuple[str, ...]) -> list[RouterSpec]:
    """'knn', 'knn:k=50', 'cascade:judge_error=0.1' -> specs; option values parsed as numbers where they are."""
    specs = []
    for item in items:
        name, _, rest = item.partition(":")
        options: dict = {}
        for pair in filter(None, rest.split(";") if ";" in rest else rest.split("+")):
            key, eq, value = pair.partition("=")
            if not eq:
                raise ValueError(f"router option {pair!r} of {item!r} must be key=value")
            options[key.strip()] = _parse_value(value.strip())
        specs.append(RouterSpec(item, name.strip(), options))
    labels = [s.label for s in specs]
    if len(set(labels)) != len(labels):
        raise ValueError(f"routers listed twice: {labels}")
    return specs


def _parse_value(value: str):
    for cast in (int, float):
        try:
            return cast(value)
        except ValueError:
            pass
    return {"none": None, "true": True, "false": False}.get(value.lower(), value)


def align(test: Outcomes, model_names: list[str]) -> Outcomes:
    """`test` with its model columns in the order of `model_names` (same pool required)."""
    if sorted(test.model_names) != sorted(model_names):
        raise ValueError(f"train and test cover different models: {sorted(model_names)} vs {sorted(test.model_names)}")
    order = [test.model_names.index(m) for m in model_names]
    return Outcomes(test.prompts, list(model_names), test.scores_NM[:, order],
                    None if test.costs_NM is None else test.costs_NM[:, order], test.categories, test.sources,
                    test.costs_estimated, test.notes)


def kfold_splits(n: int, folds: int, seed: int, groups: list[str] | None = None) -> list[np.ndarray]:
    """Fold index per prompt -> list of test-index arrays. Grouped: whole groups go to folds, largest first, each to
    the currently smallest fold (balanced sizes); ungrouped: a seeded permutation cut into k parts."""
    rng = np.random.default_rng(seed)
    if groups is None:
        return [np.sort(part) for part in np.array_split(rng.permutation(n), folds)]
    names = sorted(set(groups))
    if len(names) < folds:
        raise ValueError(f"--group-by needs at least as many groups as folds: {len(names)} groups, {folds} folds")
    members: dict[str, list[int]] = {}
    for i, g in enumerate(groups):
        members.setdefault(g, []).append(i)
    names = [names[i] for i in rng.permutation(len(names))]
    names.sort(key=lambda g: -len(members[g]))  # stable: ties keep the seeded order
    parts: list[list[int]] = [[] for _ in range(folds)]
    for g in names:
        min(parts, key=len).extend(members[g])
    return [np.array(sorted(p), dtype=np.int64) for p in parts]


def _sweep(router, test: Outcomes, scores_NM: np.ndarray, lam_grid: np.ndarray, k_points: int):
    """Per sweep index: (choice [N], calls [N, M]) on the test prompts, and the knob values used."""
    prompts = test.prompts
    out = []
    if router.name == "cascade":
        values = np.linspace(0.0, 1.0, k_points)
        for tau in values:
            calls = router.calls(prompts, threshold=float(tau), scores_NM=scores_NM)
            out.append((router.route(prompts, threshold=float(tau), scores_NM=scores_NM), calls))
        return out, ("threshold", values)
    if router.knob_name == "threshold":
        win_N = router.strong_win_rate(prompts, scores_NM=scores_NM)
        shares = np.linspace(0.0, 1.0, k_points)
        # RouteLLM's calibration: the threshold that sends share x of these prompts to the strong model
        values = np.array([1.0 + 1e-9 if x == 0 else float(np.quantile(win_N, 1 - x, method="higher"))
                           for x in shares])
        for tau in values:
            choice = np.where(win_N >= tau, router.strong, 1 - router.strong).astype(np.int64)
            out.append((choice, None))
        return out, ("threshold", values)
    for lam in lam_grid:
        out.append((router.route(prompts, willingness_to_pay=float(lam), scores_NM=scores_NM), None))
    return out, ("willingness_to_pay", lam_grid)


def evaluate(
    train: Outcomes | None = None,
    test: Outcomes | None = None,
    *,
    data: Outcomes | None = None,
    folds: int | None = None,
    group_by: str | None = None,
    routers: list[str] | tuple[str, ...] = DEFAULT_ROUTERS,
    encoder: str = "tfidf",
    seed: int = 0,
    sweep_points: int = SWEEP_POINTS,
    log=None,
) -> dict:
    """Evaluate routers on (train, test) or k-fold CV over `data`; returns the results dictionary (JSON-ready
    except for the numpy arrays under `_curves`, which `write_report` plots)."""
    log = log or (lambda msg: print(msg, file=sys.stderr, flush=True))
    specs = parse_router_specs(list(routers))
    for s in specs:
        create_router(s.name, **({"encoder": encoder} if _takes_encoder(s.name) and "encoder" not in s.options
                                 else {}), **s.options)  # unknown names and bad options fail before any work
    if data is not None:
        if train is not None or test is not None:
            raise ValueError("give data (cross-validation) or train and test, not both")
        if folds is None or folds < 2:
            raise ValueError(f"folds must be an integer >= 2 for cross-validation, got {folds!r}")
        if group_by not in (None, "category", "source"):
            raise ValueError(f"group_by must be one of None, 'category', 'source'; got {group_by!r}")
        data = unit_costs(data)
        groups = None if group_by is None else list(getattr(data, "categories" if group_by == "category" else "sources"))
        test_parts = kfold_splits(data.num_prompts, folds, seed, groups)
        splits = []
        for part in test_parts:
            mask = np.ones(data.num_prompts, dtype=bool)
            mask[part] = False
            splits.append((data.subset(np.flatnonzero(mask)), data.subset(part)))
        pooled = data.subset(np.concatenate(test_parts))
        protocol = f"{folds}-fold cross-validation (seed {seed}" + (f", grouped by {group_by})" if group_by else ")")
    else:
        if train is None or test is None:
            raise ValueError("give train and test outcomes, or data with folds")
        train, test = unit_costs(train), unit_costs(align(test, train.model_names))
        splits, pooled = [(train, test)], test
        protocol = "given train/test split"
    models = pooled.model_names
    m = len(models)
    two = m == 2
    cost_scale = float(np.ptp(pooled.costs_NM.mean(axis=0))) or 1.0
    lam_grid = np.concatenate([[0.0], np.geomspace(1e-3, 1e2, sweep_points - 1) / cost_scale])
    pooled_S, pooled_C = pooled.scores_NM, pooled.costs_NM
    n = pooled.num_prompts

    curves: dict[str, dict] = {}
    fold_curves: dict[str, list] = {s.label: [] for s in specs}
    regret: dict[str, list] = {}
    timings: dict[str, float] = {}
    offset = 0
    for fold, (tr, te) in enumerate(splits):
        enc_cache: dict = {}
        for spec in specs:
            opts = dict(spec.options)
            if _takes_encoder(spec.name):
                opts.setdefault("encoder", encoder)
            router = create_router(spec.name, **opts)
            t0 = time.perf_counter()
            shared = None
            if router.uses_encoder:
                if router.encoder_name not in enc_cache:
                    t_enc = time.perf_counter()
                    enc = create_encoder(router.encoder_name, seed=seed).fit(tr.prompts)
                    enc.encode(tr.prompts + te.prompts)  # fills the encoder's cache: timed apart from the routers
                    enc_cache[router.encoder_name] = enc
                    key = f"encoder {router.encoder_name}"
                    timings[key] = timings.get(key, 0.0) + time.perf_counter() - t_enc
                    t0 = time.perf_counter()
                shared = enc_cache[router.encoder_name]
            router.fit(tr, encoder=shared)
            if router.needs_test_labels:
                router.observe(te)
            scores_NM = router.predict(te.prompts)
            sweep, (knob, values) = _sweep(router, te, scores_NM, lam_grid, sweep_points)
            timings[spec.label] = timings.get(spec.label, 0.0) + time.perf_counter() - t0
            rows = np.arange(te.num_prompts)
            per_fold = []
            for k, (choice, calls) in enumerate(sweep):
                if calls is None:
                    calls = np.zeros((te.num_prompts, m), dtype=bool)
                    calls[rows, choice] = True
                q_N = te.scores_NM[rows, choice]
                c_N = (te.costs_NM * calls).sum(axis=1)
                entry = curves.setdefault(spec.label, {"q": np.zeros((len(sweep), n)), "c": np.zeros((len(sweep), n)),
                                                       "choice": np.zeros((len(sweep), n), dtype=np.int64),
                                                       "strong_call": np.zeros((len(sweep), n), dtype=bool),
                                                       "knob": knob, "values": [], "router": router})
                entry["q"][k, offset:offset + len(rows)] = q_N
                entry["c"][k, offset:offset + len(rows)] = c_N
                entry["choice"][k, offset:offset + len(rows)] = choice
                entry["strong_call"][k, offset:offset + len(rows)] = calls[:, pooled.strongest_model()]
                per_fold.append((c_N.mean(), q_N.mean(), calls[:, pooled.strongest_model()].mean()))
            entry["values"].append([float(v) for v in values])
            fold_curves[spec.label].append(per_fold)
            if spec.name == "linucb":
                x_ND = router.embed(te.prompts)
                rep = router.replay(x_ND, te.scores_NM, te.costs_NM, willingness_to_pay=0.0)
                rand = np.random.default_rng(seed).integers(0, m, te.num_prompts)
                best = te.scores_NM.max(axis=1)
                regret.setdefault(spec.label, []).append(
                    {"linucb": rep["cumulative_regret"], "random": np.cumsum(best - te.scores_NM[rows, rand])})
            log(f"  fold {fold + 1}/{len(splits)}  {spec.label:<14} {time.perf_counter() - t0:6.1f} s")
        offset += te.num_prompts

    # singles and the reference numbers
    single_q, single_c = pooled_S.mean(axis=0), pooled_C.mean(axis=0)
    best = int(np.argmax(single_q))
    q_best, c_best = float(single_q[best]), float(single_c[best])
    q_oracle = float(pooled_S.max(axis=1).mean())
    strong, weak = pooled.strongest_model(), 1 - pooled.strongest_model()
    c_lo, c_hi = float(single_c.min()), float(single_c.max())
    results: dict = {
        "protocol": protocol, "models": models, "num_test_prompts": n, "costs_estimated": pooled.costs_estimated,
        "cost_unit": "dollars per query" if not _unit_cost(pooled) else "share of calls to the strong model",
        "notes": list(pooled.notes), "encoder": encoder,
        "single_models": {mname: {"quality": float(single_q[j]), "cost": float(single_c[j])}
                          for j, mname in enumerate(models)},
        "best_single": {"model": models[best], "quality": q_best, "cost": c_best},
        "oracle_quality": q_oracle, "routers": {}, "timings_s": timings,
    }
    for label, entry in curves.items():
        cost = entry["c"].mean(axis=1)
        quality = entry["q"].mean(axis=1)
        share_strong = entry["strong_call"].mean(axis=1)
        shares = np.stack([(entry["choice"] == j).mean(axis=1) for j in range(m)], axis=1)
        q_at = metrics.quality_at_cost(cost, quality, c_best)
        r = {
            "router": entry["router"].name, "knob": entry["knob"], "knob_values": entry["values"],
            "upper_bound": bool(entry["router"].needs_test_labels),
            "curve": {"cost": cost.tolist(), "quality": quality.tolist(), "share_strong": share_strong.tolist(),
                      "model_share": shares.tolist()},
            "aiq": metrics.aiq(cost, quality, c_lo, c_hi),
            "max_quality": float(quality.max()),
            "quality_at_best_single_cost": q_at,
            "cost_to_reach_best_single_quality": metrics.cost_to_reach(cost, quality, q_best),
            "gap_closed_max": metrics.gap_closed(float(quality.max()), q_best, q_oracle),
            "gap_closed_at_best_single_cost": None if q_at is None else metrics.gap_closed(q_at, q_best, q_oracle),
            "meets_best_single": q_at is not None and q_at >= q_best - 1e-12,
        }
        if two:
            q_w, q_s = float(single_q[weak]), float(single_q[strong])
            r["apgr"] = metrics.apgr(share_strong, quality, q_w, q_s)
            r["cpt50"] = metrics.cpt(share_strong, quality, q_w, q_s, 0.5)
            r["cpt80"] = metrics.cpt(share_strong, quality, q_w, q_s, 0.8)
            if len(splits) > 1:
                per = []
                for fold_pts, (_, te) in zip(fold_curves[label], splits):
                    fq = te.scores_NM.mean(axis=0)
                    if fq[strong] > fq[weak]:
                        per.append(metrics.apgr([p[2] for p in fold_pts], [p[1] for p in fold_pts], fq[weak], fq[strong]))
                r["apgr_per_fold"] = per
        # per category at one operating point: the share of strong calls nearest 50% (two models), else the most
        # expensive point within the best single model's cost
        if two:
            k_op = int(np.argmin(np.abs(share_strong - 0.5)))
        else:
            ok = np.flatnonzero(cost <= c_best * (1 + 1e-9))
            k_op = int(ok[np.argmax(quality[ok])]) if len(ok) else int(np.argmin(cost))
        cats = {}
        for cat in sorted(set(pooled.categories)):
            idx = np.array([c == cat for c in pooled.categories])
            cats[cat] = {"n": int(idx.sum()), "quality": float(entry["q"][k_op, idx].mean()),
                         "cost": float(entry["c"][k_op, idx].mean())}
        r["operating_point"] = {"index": k_op, "cost": float(cost[k_op]), "quality": float(quality[k_op]),
                                "share_strong": float(share_strong[k_op]), "per_category": cats}
        results["routers"][label] = r
    results["per_category_single"] = {
        cat: {models[j]: float(pooled_S[[c == cat for c in pooled.categories], j].mean()) for j in range(m)}
        for cat in sorted(set(pooled.categories))}
    if two:
        results["random_reference"] = {"apgr": 0.5, "cpt50": 0.5, "cpt80": 0.8}
    for label, reps in regret.items():
        lin = np.concatenate([np.diff(np.concatenate([[0.0], x["linucb"]])) for x in reps]).cumsum()
        rnd = np.concatenate([np.diff(np.concatenate([[0.0], x["random"]])) for x in reps]).cumsum()
        results["routers"][label]["replay"] = {
            "willingness_to_pay": 0.0, "cumulative_regret": lin[:: max(1, len(lin) // 200)].tolist(),
            "random_cumulative_regret": rnd[:: max(1, len(rnd) // 200)].tolist(),
            "final_regret_per_query": float(lin[-1] / len(lin)), "random_regret_per_query": float(rnd[-1] / len(rnd)),
        }
    return results


def _unit_cost(outcomes: Outcomes) -> bool:
    c = outcomes.costs_NM
    return outcomes.num_models == 2 and set(np.unique(c)).issubset({0.0, 1.0})


def _takes_encoder(name: str) -> bool:
    import inspect

    from routelab.query.routers.base import _ROUTERS

    cls = _ROUTERS.get(name)
    return cls is not None and "encoder" in inspect.signature(cls.__init__).parameters
