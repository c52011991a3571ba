"""The `routelab` command: one subcommand per module in `routelab.commands`."""

from __future__ import annotations

import argparse
import importlib
import sys

# Subcommands in the order `routelab --help` lists them; each names a module of routelab.commands.
COMMANDS = (
    "compare",
    "diffusion-demo",
    "train",
    "eval",
    "generate",
    "finetune",
    "analyze",
    "sweep",
    "trace",
    "cache-sim",
    "retrofit",
    "query-eval",
    "serve",
    "routers",
    "demo",
)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="routelab", description="Dynamic routing for Mixture-of-Experts models.")
    commands = parser.add_subparsers(dest="command", required=True)
    for name in COMMANDS:
        importlib.import_module(f"routelab.commands.{name.replace('-', '_')}").register(commands)
    args = parser.parse_args(argv)
    return args.run(args)


if __name__ == "__main__":
    sys.exit(main())
