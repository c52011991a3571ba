"""The `routelab` command."""

from __future__ import annotations

import argparse
import sys

from routelab.routing.registry import list_routers


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routelab", description="Dynamic routing for Mixture-of-Experts models.")
    commands = parser.add_subparsers(dest="command", required=True)

    demo = commands.add_parser("demo", help="train one MoE layer on random data and print its routing statistics")
    demo.add_argument("--router", default="topk", help="registered router name (see `routelab routers`)")
    demo.add_argument("--steps", type=int, default=50)
    demo.add_argument("--experts", type=int, default=8)
    demo.add_argument("--k", type=int, default=2)

    commands.add_parser("routers", help="list the registered routers")

    args = parser.parse_args(argv)
    if args.command == "routers":
        print("\n".join(list_routers()))
        return 0
    if args.command == "demo":
        from routelab.demo import print_demo, run_demo

        if args.steps < 1:
            parser.error(f"--steps must be >= 1, got {args.steps}")
        print_demo(run_demo(router=args.router, steps=args.steps, num_experts=args.experts, k=args.k))
        return 0
    return 2


if __name__ == "__main__":
    sys.exit(main())
