"""The `routelab` subcommands, one module each.

Each module offers `register(commands)`, which adds its parser to the `argparse` subparsers and sets
`run=<function(args) -> exit code>` as the parser's default. Modules import their heavy dependencies inside `run`, so
that `routelab --help` and `import routelab` stay light.
"""

from __future__ import annotations

import sys


def fail(command: str, message: object) -> int:
    """Print one clear error line for `routelab COMMAND` and return the exit code for bad input (2)."""
    text = " ".join(str(message).split())  # one line, and bounded: a message may quote a user's value
    if len(text) > 2000:
        text = f"{text[:1960]}... ({len(text):,} characters)"
    print(f"routelab {command}: error: {text}", file=sys.stderr)
    return 2
