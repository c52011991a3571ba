"""`routelab sweep`: perplexity against active expert FLOPs over inference-time routing settings."""

from __future__ import annotations

import argparse

from routelab.commands import fail
from routelab.commands.analyze import add_window_options, claim, load_inputs, parse_list

DEFAULT_TOP_P = [0.3, 0.5, 0.7, 0.9]
DEFAULT_MIN_WEIGHT_RATIO = [0.2, 0.5]
DEFAULT_SKIP = [0.2, 0.4]


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "sweep",
        help="perplexity per domain and active expert FLOPs for each k, top-p, NAEE ratio and MoDES skip setting",
        description="Evaluate a model folder under inference-time routing settings and write report.md (a table), "
        "sweep.json and sweep.png (perplexity against active expert FLOPs, one line per kind of setting). With no "
        "setting flags: k = 1..min(E, 4), top-p 0.3,0.5,0.7,0.9, min-weight-ratio 0.2,0.5, skip 0.2,0.4.",
    )
    parser.add_argument("model", help="a model folder (routelab train / save_model)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one domain each (default: "
                        "the held-out validation part of the built-in corpus, domains prose and code)")
    parser.add_argument("--out", required=True, help="report folder: new, empty, or an earlier `routelab sweep` "
                        "report (its files are replaced); another non-empty folder is refused (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not a routelab sweep run (files of the same names "
                        "are replaced; nothing else is deleted)")
    parser.add_argument("--k", help="top-k values, e.g. 1,2,4")
    parser.add_argument("--top-p", help="top-p values in (0, 1], e.g. 0.3,0.5,0.7")
    parser.add_argument("--min-weight-ratio", help="NAEE ratios β in [0, 1], e.g. 0.2,0.5")
    parser.add_argument("--skip", help="MoDES skip fractions in [0, 1), calibrated on other windows, e.g. 0.2,0.4")
    add_window_options(parser)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    try:
        ks = parse_list("--k", args.k, int)
        top_p = parse_list("--top-p", args.top_p, float)
        ratios = parse_list("--min-weight-ratio", args.min_weight_ratio, float)
        skips = parse_list("--skip", args.skip, float)
    except ValueError as exc:
        return fail("sweep", exc)
    import torch

    from routelab.inference.sweep import OUTPUTS, sweep, write_sweep

    loaded = load_inputs("sweep", args, OUTPUTS)
    if isinstance(loaded, int):
        return loaded
    model, _, domains, layout = loaded

    if not (ks or top_p or ratios or skips):
        ks = list(range(1, min(model.config.num_experts, 4) + 1))
        top_p, ratios, skips = DEFAULT_TOP_P, DEFAULT_MIN_WEIGHT_RATIO, DEFAULT_SKIP
    for flag, values in (("--k", ks), ("--top-p", top_p), ("--min-weight-ratio", ratios), ("--skip", skips)):
        for v in values:  # the same checks sweep() makes, reported with the flag's name
            if flag == "--k" and not 1 <= v <= model.config.num_experts:
                return fail("sweep", f"--k values must be in [1, num_experts={model.config.num_experts}], got {v}")
            if flag == "--top-p" and not 0 < v <= 1:
                return fail("sweep", f"--top-p values must be in (0, 1], got {v}")
            if flag == "--min-weight-ratio" and not 0 <= v <= 1:
                return fail("sweep", f"--min-weight-ratio values must be in [0, 1], got {v}")
            if flag == "--skip" and not 0 <= v < 1:
                return fail("sweep", f"--skip values must be in [0, 1), got {v}")
    try:
        result = sweep(model, {d: w[0] for d, w in domains.items()}, k=ks, top_p=top_p, min_weight_ratio=ratios,
                       skip=skips, calibration=torch.cat([w[1] for w in domains.values()]),
                       batch_size=args.batch_size, log=print)
    except ValueError as exc:  # a router that overrides do not support
        return fail("sweep", exc)
    result["model"] = str(args.model)
    out = claim("sweep", args, layout)
    if isinstance(out, int):
        return out
    write_sweep(result, out, title=f"routelab sweep {args.model}")
    rows = result["rows"]
    print(f"{'setting':<24} {'experts/tok':>11} {'FLOPs':>7} {'ppl':>9}")
    for r in rows:
        label = "trained" if r["kind"] == "trained" else f"{r['kind']}={r['value']}"
        print(f"{label:<24} {r['experts_per_token']:>11.3f} {r['active_flops']:>7.3f} {r['ppl']:>9.3f}")
    print(f"report: {out}/report.md")
    return 0
