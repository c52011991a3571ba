"""`routelab demo`: train one MoE layer on random data and print its routing statistics."""

from __future__ import annotations

import argparse

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("demo", help="train one MoE layer on random data and print its routing statistics")
    parser.add_argument("--router", default="topk", help="registered router name (see `routelab routers`)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--experts", type=int, default=8)
    parser.add_argument("--k", type=int, default=2)
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routelab.demo import print_demo, run_demo

    if args.steps < 1:
        return fail("demo", f"--steps must be >= 1, got {args.steps}")
    try:
        stats = run_demo(router=args.router, steps=args.steps, num_experts=args.experts, k=args.k)
    except ValueError as exc:  # bad router name or option: one clear line, no traceback
        return fail("demo", exc)
    print_demo(stats)
    return 0
