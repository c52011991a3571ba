"""`routelab routers`: list the registered token routers."""

from __future__ import annotations

import argparse


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser("routers", help="list the registered routers")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routelab.routing.registry import list_routers

    print("\n".join(list_routers()))
    return 0
