"""`routelab query-eval`: train and compare request routers (which model answers each query) on outcome data."""

from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "query-eval",
        help="train and compare request routers (query -> model) on per-query outcome data; cost-quality report",
        description="Fit request routers on per-query outcome data (RouterBench CSV, RouteLLM CSVs / MT-Bench, "
        "JSON/JSONL records), sweep each router's cost knob, and write report.md, results.json and PNG plots.",
    )
    parser.add_argument("--data", nargs="+", required=True, metavar="PATH",
                        help="outcome files or folders (training data; all data for cross-validation)")
    parser.add_argument("--test", nargs="+", metavar="PATH", help="test files (else k-fold cross-validation)")
    parser.add_argument("--routers", nargs="+", metavar="NAME",
                        help="routers, comma- or space-separated, with options as name:key=value+key=value "
                        "(default: random, oracle, knn, mlp, mf, sw_ranking, cluster, cascade, linucb)")
    parser.add_argument("--encoder", default="tfidf", help="prompt encoder: tfidf or wordllama (default: %(default)s)")
    parser.add_argument("--folds", type=int, default=5, help="cross-validation folds without --test (default: 5)")
    parser.add_argument("--group-by", choices=("category", "source"),
                        help="keep each category (or source file) in one fold")
    parser.add_argument("--prices", metavar="JSON", help="price table ($ per million input/output tokens per model) "
                        "for files without costs (default: a models.json beside the data, if it prices every model)")
    parser.add_argument("--output-tokens", type=int, default=256,
                        help="answer length assumed for price estimates when responses are unknown (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of folds and routers (default: 0)")
    parser.add_argument("--sweep-points", type=int, default=41, help="knob values per curve (default: 41)")
    parser.add_argument("--out", default="runs/query-eval", help="report folder (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routelab.query import evaluate, list_routers, load_outcomes
    from routelab.query.encoders import ENCODERS
    from routelab.query.evaluation import DEFAULT_ROUTERS, parse_router_specs
    from routelab.query.outcomes import OutcomeDataError
    from routelab.query.report import write_report

    routers = [n.strip() for item in args.routers or [] for n in item.split(",") if n.strip()] or list(DEFAULT_ROUTERS)
    if args.encoder not in ENCODERS:
        return fail("query-eval", f"--encoder must be one of {', '.join(ENCODERS)}; got {args.encoder!r}")
    if args.folds < 2:
        return fail("query-eval", f"--folds must be >= 2, got {args.folds}")
    if not 3 <= args.sweep_points <= 1000:
        return fail("query-eval", f"--sweep-points must be in [3, 1000], got {args.sweep_points}")
    if args.threads < 1:
        return fail("query-eval", f"--threads must be >= 1, got {args.threads}")
    try:
        specs = parse_router_specs(routers)
    except ValueError as exc:
        return fail("query-eval", exc)
    unknown = [s.name for s in specs if s.name not in list_routers()]
    if unknown:
        return fail("query-eval", f"unknown router {unknown[0]!r}; valid names: {', '.join(list_routers())}")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not (out / "results.json").is_file())):
        return fail("query-eval", f"--out {out} exists and is not a query-eval report folder; choose another")
    kw = {"prices": args.prices, "output_tokens": args.output_tokens}
    try:
        data = load_outcomes(args.data, **kw)
        test = load_outcomes(args.test, **kw) if args.test else None
    except (OutcomeDataError, ValueError, OSError) as exc:
        return fail("query-eval", exc)
    import torch
    from threadpoolctl import threadpool_limits

    torch.set_num_threads(args.threads)
    # BLAS threads too: on a shared CPU, spinning BLAS threads make the SVDs and k-means many times slower
    threadpool_limits(args.threads)
    start = time.perf_counter()
    print(f"routelab query-eval: {data.num_prompts} prompts, {data.num_models} models, routers "
          f"{', '.join(s.label for s in specs)} -> {out}", file=sys.stderr)
    try:
        if test is not None:
            results = evaluate(data, test, routers=routers, encoder=args.encoder, seed=args.seed,
                               sweep_points=args.sweep_points)
        else:
            results = evaluate(data=data, folds=args.folds, group_by=args.group_by, routers=routers,
                               encoder=args.encoder, seed=args.seed, sweep_points=args.sweep_points)
    except (OutcomeDataError, ValueError) as exc:
        return fail("query-eval", exc)
    command = "routelab query-eval " + " ".join(sys.argv[2:]) if sys.argv[1:2] == ["query-eval"] else ""
    write_report(results, out, command=command)
    best = max((r for r in results["routers"].values() if not r["upper_bound"]), key=lambda r: r["aiq"])
    print(f"report: {out}/report.md ({time.perf_counter() - start:.0f} s); best AIQ {best['aiq']:.3f} "
          f"({best['router']}); best single {results['best_single']['model']} "
          f"{results['best_single']['quality']:.3f}; oracle {results['oracle_quality']:.3f}")
    return 0
