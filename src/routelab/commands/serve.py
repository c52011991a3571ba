"""`routelab serve`: an OpenAI-compatible routing gateway in front of a pool of models (see routelab.query.gateway)."""

from __future__ import annotations

import argparse

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "serve",
        help="serve an OpenAI-compatible gateway that routes each request to a model of a pool",
        description="Serve /v1/chat/completions, /v1/completions, /v1/models and /health in front of the models of "
        "a pool file. A request's model is a pool model (pass-through), router-<name>-<knob> (a saved router picks "
        "the model, knob = willingness to pay or threshold) or auto (the pool's default).",
    )
    parser.add_argument("--config", required=True, metavar="YAML", help="the pool file (models, routers, default, "
                        "log, auth; see the README)")
    parser.add_argument("--host", default="127.0.0.1", help="address to listen on (default: %(default)s)")
    parser.add_argument("--port", type=int, default=8000, help="port (default: %(default)s; 0 picks a free one)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default: %(default)s)")
    parser.add_argument("--check", action="store_true", help="validate the pool file and load every router and "
                        "model, then exit without serving")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    if not 0 <= args.port <= 65535:
        return fail("serve", f"--port must be an integer in [0, 65535], got {args.port}")
    try:
        import uvicorn

        from routelab.query.gateway import build_app
    except ImportError as exc:
        return fail("serve", f"{exc.name} is not installed; install routelab[query] (pip install 'routelab[query]')")
    try:
        app = build_app(args.config)
    except ValueError as exc:  # GatewayConfigError and router/model loading errors: one line each
        return fail("serve", exc)
    gateway = app.state.gateway
    pool = gateway.pool
    print(f"routelab serve: models {', '.join(pool.models)}; routers {', '.join(pool.routers) or 'none'}; "
          f"default {pool.default or 'none'}" + (f"; log {pool.log}" if pool.log else "")
          + ("; bearer auth on" if pool.api_keys else ""), flush=True)  # before uvicorn's own lines, even in a pipe
    if args.check:
        return 0
    uvicorn.run(app, host=args.host, port=args.port, log_level=args.log_level)
    return 0
