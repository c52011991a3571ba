"""`routelab cache-sim`: replay a routing trace through expert caches, every policy at every capacity."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from routelab.commands import fail

OUT_FILES = ("cache_sim.json", "cache_sim.md", "hit_rate.png")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "cache-sim",
        help="simulate expert caches (LRU, LFU, ARC, pre-gated prefetch, Belady bound) on a routing trace",
        description="Replay a trace from `routelab trace` through an expert cache per policy and capacity; print "
        "hit rate, experts loaded and bytes moved per token and stall time, and write cache_sim.json, cache_sim.md "
        "and hit_rate.png (hit rate against capacity, Belady as the bound) into --out.",
    )
    parser.add_argument("trace", metavar="TRACE", help="a trace file written by `routelab trace`")
    parser.add_argument("--capacity", default=None, help="comma-separated capacities, in experts per MoE layer "
                        "(--scope layer) or in all (--scope global) (default: 1/8, 1/4, 1/2, 3/4 and all of E per "
                        "layer, times the layers for global)")
    parser.add_argument("--policy", default=None, help="comma-separated: lru, lfu, arc, belady, pregated (default: "
                        "all; pregated when the trace holds predictions)")
    parser.add_argument("--scope", default="layer", help="layer: one cache per MoE layer (default); global: one pool")
    parser.add_argument("--granularity", default="step", help="step: a forward at a time, as recorded (default); "
                        "token: every token its own step (one-token decoding)")
    parser.add_argument("--bandwidth", type=float, default=16e9, help="bytes/s of expert loads (default: 16e9, PCIe "
                        "4.0 x16)")
    parser.add_argument("--compute-us", type=float, default=50.0, help="compute per token and MoE layer in "
                        "microseconds, which prefetching overlaps (default: %(default)s)")
    parser.add_argument("--segment", type=int, default=16, metavar="M", help="segment length of the local routing "
                        "consistency metrics SRP(M) and SCH(M, capacity) reported beside the policies (default: "
                        "%(default)s; 0 skips them)")
    parser.add_argument("--out", default=None, help="folder for the results (default: TRACE without its suffix + "
                        "'-cache-sim')")
    parser.set_defaults(run=run)


def _ints(text: str, option: str) -> list[int]:
    try:
        values = [int(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ValueError(f"{option} must be comma-separated integers, got {text!r}") from None
    if not values:
        raise ValueError(f"{option} needs at least one value")
    return values


def run(args: argparse.Namespace) -> int:
    from routelab.inference.cache import (
        GRANULARITIES, POLICIES, SCOPES, demand, local_consistency, plot_hit_rates, sweep_cache,
    )
    from routelab.inference.trace import TraceError, load_trace

    if args.scope not in SCOPES:
        return fail("cache-sim", f"--scope must be one of {', '.join(SCOPES)}; got {args.scope!r}")
    if args.granularity not in GRANULARITIES:
        return fail("cache-sim", f"--granularity must be one of {', '.join(GRANULARITIES)}; got {args.granularity!r}")
    if args.segment < 0:
        return fail("cache-sim", f"--segment must be >= 0, got {args.segment}")
    if not (args.bandwidth > 0 and args.compute_us >= 0):
        return fail("cache-sim", "--bandwidth must be > 0 and --compute-us >= 0")
    try:
        trace = load_trace(args.trace)
    except TraceError as exc:
        return fail("cache-sim", exc)
    has_pred = any(p is not None for p in trace.predicted)
    policies = [p.strip() for p in args.policy.split(",")] if args.policy else [
        p for p in POLICIES if p != "pregated" or has_pred
    ]
    for p in policies:
        if p not in POLICIES:
            return fail("cache-sim", f"--policy must be among {', '.join(POLICIES)}; got {p!r}")
    E, L = max(trace.num_experts), trace.num_layers
    d = demand(trace, args.granularity)
    need = max((int(u.sum(1).max()) for u in d.used if u.size), default=1)
    if args.capacity:
        try:
            capacities = _ints(args.capacity, "--capacity")
        except ValueError as exc:
            return fail("cache-sim", exc)
    else:
        scale = L if args.scope == "global" else 1
        capacities = sorted({max(need, round(E * f) * scale) for f in (1 / 8, 1 / 4, 1 / 2, 3 / 4, 1)})
    trace_path = Path(args.trace)
    out = Path(args.out) if args.out else trace_path.with_name(trace_path.stem + "-cache-sim")
    problem = _check_out(out)
    if problem:
        return fail("cache-sim", problem)
    try:
        results = sweep_cache(trace, capacities, policies, scope=args.scope, granularity=args.granularity,
                        bandwidth=args.bandwidth, compute_s=args.compute_us * 1e-6)
    except ValueError as exc:  # a capacity below one step's need, a policy without predictions
        return fail("cache-sim", exc)
    from routelab._atomic import atomic_write_text

    table = render_table(results)
    consistency = []
    if args.segment:
        consistency = local_consistency(trace, capacities, m=args.segment)
        table += "\n\n" + render_consistency(consistency)
    print(table)
    out.mkdir(parents=True, exist_ok=True)
    payload = {"format": "routelab-cache-sim", "trace": str(args.trace), "scope": args.scope,
               "granularity": args.granularity, "bandwidth": args.bandwidth, "compute_us": args.compute_us,
               "num_tokens": trace.num_tokens, "num_layers": L, "num_experts": trace.num_experts,
               "results": [r.to_dict() for r in results], "local_consistency": consistency}
    atomic_write_text(out / "cache_sim.json", json.dumps(payload, indent=1) + "\n")
    atomic_write_text(out / "cache_sim.md", table + "\n")
    plot_hit_rates(results, out / "hit_rate.png", title=f"{Path(args.trace).name}: hit rate vs capacity")
    print(f"→ {out}/hit_rate.png, cache_sim.md, cache_sim.json")
    return 0


def render_table(results) -> str:
    lines = ["| policy | capacity | hit rate | experts loaded / token | MB / token | stall µs / token | prediction "
             "recall |", "|---|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        rec = "" if r.prediction_recall is None else f"{r.prediction_recall:.3f}"
        lines.append(f"| {r.policy} | {r.capacity} | {r.hit_rate:.3f} | {r.loads_per_token:.3f} | "
                     f"{r.bytes_per_token / 1e6:.4f} | {r.stall_s_per_token * 1e6:.2f} | {rec} |")
    return "\n".join(lines)


def render_consistency(rows: list[dict]) -> str:
    caps = sorted(rows[0]["sch"]) if rows else []
    m = rows[0]["m"] if rows else 0
    head = f"| MoE layer | SRP({m}) | " + " | ".join(f"SCH({m}, {c})" for c in caps) + " |"
    lines = [f"Local routing consistency (Not All Models Suit Expert Offloading; SCH is an oracle cache over the next "
             f"{m} tokens, per token):", "", head, "|---|" + "---:|" * (len(caps) + 1)]
    for r in rows:
        lines.append(f"| {r['layer']} | {r['srp']:.3f} | " + " | ".join(f"{r['sch'][c]:.3f}" for c in caps) + " |")
    return "\n".join(lines)


def _check_out(out: Path) -> str | None:
    if out.exists() and not out.is_dir():
        return f"--out {out} is a file; give a folder"
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUT_FILES)
        if foreign:
            return f"--out {out} holds files routelab cache-sim did not write ({', '.join(foreign[:3])}); choose " \
                   "an empty or new folder"
        mine = out / "cache_sim.json"
        if mine.exists():
            try:
                ok = json.loads(mine.read_text(encoding="utf-8")).get("format") == "routelab-cache-sim"
            except (OSError, ValueError, AttributeError):
                ok = False
            if not ok:
                return f"--out {out}: cache_sim.json was not written by routelab cache-sim; refusing to overwrite it"
    return None
