"""The routing gateway's added latency: requests through `routelab serve` against the same requests sent straight to
the upstream, under C concurrent clients (default 50), in one run.

    PYTHONPATH=src python benchmarks/gateway.py            # 7 rounds x 50 clients x 8 requests per mode
    PYTHONPATH=src python benchmarks/gateway.py --quick    # 3 rounds x 50 clients x 4 requests

Three processes on 127.0.0.1: a minimal OpenAI-compatible upstream (a bare ASGI app under uvicorn answering a fixed
chat completion after `--upstream-delay-ms`), the gateway (`routelab.query.gateway.create_app` under uvicorn, with its
JSONL routing log on), and this process as the clients (httpx, one AsyncClient, C workers each sending requests one
after another). Modes, interleaved round-robin with the order rotated every round:
- `direct`: the clients call the upstream themselves (the baseline);
- `pass-through`: through the gateway with `model` = the upstream's pool name (resolve, forward, log);
- `routed`: through the gateway with `model` = router-const-0.5, a router whose predict/route cost nothing, so the
  number is the gateway's own routing path (thread hop, scores, fallback order, log) without an encoder; the routers'
  own speed is measured in benchmarks/query.py;
- `routed-knn` (when the query routers are installed): router-knn-0.5, a knn router (tf-idf encoder, k=10) fitted on
  2,000 synthetic prompts: the routing path with a real router's encoding and neighbour search.
Each round gives every mode's p50 and p99 latency; the table shows the median over rounds, and the added latency
as the median over rounds of (mode − direct in that round), which cancels drifts in machine load. On a shared
machine latency under 50 clients is mostly queueing for a core, so the table also gives the CPU time the gateway
and upstream processes spent per request (from /proc, Linux): the gateway's cost independent of the load.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESULTS = Path(__file__).parent / "results" / "gateway.json"
ANSWER = {"id": "chatcmpl-bench", "object": "chat.completion", "created": 0, "model": "up",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "an answer of a few words"},
                       "finish_reason": "stop"}], "usage": {"prompt_tokens": 12, "completion_tokens": 6}}


# -- the two servers (each started as `python benchmarks/gateway.py --serve-...` in its own process) ----------------


def upstream_app(delay_s: float):
    body = json.dumps(ANSWER).encode()

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            while (await receive())["type"] != "lifespan.shutdown":
                await send({"type": "lifespan.startup.complete"})
            await send({"type": "lifespan.shutdown.complete"})
            return
        more = True
        while more:  # read the whole request body
            more = (await receive()).get("more_body", False)
        if delay_s:
            await asyncio.sleep(delay_s)
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
        await send({"type": "http.response.body", "body": body})

    return app


class ConstRouter:
    """A router that costs nothing: the gateway's routing path without an encoder."""

    name, knob_name, model_names = "const", "willingness_to_pay", ["up", "up-copy"]

    def predict(self, prompts):
        import numpy as np

        return np.tile([0.8, 0.5], (len(prompts), 1))

    def route(self, prompts, *, willingness_to_pay):
        import numpy as np

        return np.zeros(len(prompts), dtype=np.int64)


def gateway_app(upstream_url: str, log: str, knn_dir: str):
    from routelab.query.gateway import create_app
    from routelab.query.gateway_config import parse_pool

    routers, folders = {"const": ConstRouter()}, {"const": "."}
    if knn_dir != "-":
        from routelab.query import load_router

        routers["knn"], folders["knn"] = load_router(knn_dir), knn_dir
    pool = parse_pool({"models": {"up": {"base_url": f"{upstream_url}/v1", "timeout": 60},
                                  "up-copy": {"base_url": f"{upstream_url}/v1", "timeout": 60}},
                       "routers": folders, "log": log})
    return create_app(pool, routers)


def fit_knn(folder: Path) -> bool:
    """A knn router (tf-idf) fitted on 2,000 synthetic prompts, saved to `folder`; False without the query routers."""
    try:
        import numpy as np

        from routelab.query import Outcomes, create_router
    except ImportError:
        return False
    rng = np.random.default_rng(0)
    words = [f"w{i}" for i in range(500)]
    prompts = [" ".join(rng.choice(words, 12)) for _ in range(2000)]
    scores = rng.integers(0, 2, (2000, 2)).astype(float)
    costs = np.tile([1.0, 0.1], (2000, 1))
    create_router("knn", k=10, encoder="tfidf").fit(
        Outcomes(prompts=prompts, model_names=["up", "up-copy"], scores_NM=scores, costs_NM=costs)).save(folder)
    return True


def serve(app, port: int) -> None:
    import uvicorn

    # Idle keep-alive connections stay open between rounds (uvicorn closes them after 5 s by default).
    uvicorn.run(app, host="127.0.0.1", port=port, log_level="warning", backlog=2048, timeout_keep_alive=600)


# -- the clients -----------------------------------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(args: list[str], url: str) -> subprocess.Popen:
    import httpx

    import routelab

    here = str(Path(routelab.__file__).resolve().parents[1])  # the servers import the routelab this process imports
    proc = subprocess.Popen([sys.executable, __file__, *args], env={**os.environ, "PYTHONPATH": os.pathsep.join(
        [here, os.environ.get("PYTHONPATH", "")])})
    deadline = time.monotonic() + 120
    while True:
        try:
            httpx.get(url, timeout=1)
            return proc
        except httpx.TransportError:
            if proc.poll() is not None or time.monotonic() > deadline:
                proc.kill()
                raise RuntimeError(f"server {' '.join(args)} did not start") from None
            time.sleep(0.1)


async def run_mode(client, url: str, model: str, clients: int, per_client: int) -> list[float]:
    payload = {"model": model, "messages": [{"role": "user", "content": "How far is the moon? " * 4}]}
    latencies: list[float] = []

    async def worker() -> None:
        for _ in range(per_client):
            t0 = time.perf_counter()
            r = await client.post(url, json=payload)
            latencies.append(time.perf_counter() - t0)
            if r.status_code != 200:
                raise RuntimeError(f"{url} answered {r.status_code}: {r.text[:200]}")

    await asyncio.gather(*(worker() for _ in range(clients)))
    return latencies


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(round(q * (len(ordered) - 1))))]


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of a process so far (Linux /proc), a load-independent cost per request."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


async def bench(args, up_url: str, gw_url: str, pids: dict[str, int], knn: bool) -> dict:
    import httpx

    modes = {"direct": (f"{up_url}/v1/chat/completions", "up"),
             "pass-through": (f"{gw_url}/v1/chat/completions", "up"),
             "routed": (f"{gw_url}/v1/chat/completions", "router-const-0.5")}
    if knn:
        modes["routed-knn"] = (f"{gw_url}/v1/chat/completions", "router-knn-0.5")
    limits = httpx.Limits(max_connections=args.clients * 2, max_keepalive_connections=args.clients * 2)
    per_round: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}
    cpu: dict[str, list[tuple[float, float]]] = {m: [] for m in modes}  # (gateway, upstream) CPU ms per request
    async with httpx.AsyncClient(timeout=60, limits=limits) as client:
        for name, (url, model) in modes.items():  # warm-up: connections, imports, first-call paths
            await run_mode(client, url, model, args.clients, 2)
        names = list(modes)
        for rnd in range(args.rounds):
            order = names[rnd % len(names):] + names[:rnd % len(names)]
            for name in order:
                url, model = modes[name]
                before = {k: cpu_seconds(pid) for k, pid in pids.items()}
                lat = await run_mode(client, url, model, args.clients, args.requests)
                n = len(lat)
                cpu[name].append(tuple((cpu_seconds(pids[k]) - before[k]) * 1e3 / n for k in ("gateway", "upstream")))
                per_round[name].append((pct(lat, 0.5), pct(lat, 0.99)))
            print(f"round {rnd + 1}/{args.rounds}: " + ", ".join(
                f"{n} p50 {per_round[n][-1][0] * 1e3:.1f} ms" for n in names), flush=True)
    table = {}
    for name in modes:
        p50 = statistics.median(p[0] for p in per_round[name])
        p99 = statistics.median(p[1] for p in per_round[name])
        added50 = statistics.median(a[0] - d[0] for a, d in zip(per_round[name], per_round["direct"]))
        added99 = statistics.median(a[1] - d[1] for a, d in zip(per_round[name], per_round["direct"]))
        ratio50 = statistics.median(a[0] / d[0] for a, d in zip(per_round[name], per_round["direct"]))
        table[name] = {"p50_ms": p50 * 1e3, "p99_ms": p99 * 1e3, "added_p50_ms": added50 * 1e3,
                       "added_p99_ms": added99 * 1e3, "p50_ratio_to_direct": ratio50,
                       "gateway_cpu_ms_per_request": statistics.median(c[0] for c in cpu[name]),
                       "upstream_cpu_ms_per_request": statistics.median(c[1] for c in cpu[name])}
    return table


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--requests", type=int, default=8, help="requests per client per round")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--upstream-delay-ms", type=float, default=0.0)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--serve-upstream", type=int, metavar="PORT", help=argparse.SUPPRESS)
    parser.add_argument("--serve-gateway", nargs=4, metavar=("PORT", "UPSTREAM", "LOG", "KNN"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.serve_upstream is not None:
        return serve(upstream_app(args.upstream_delay_ms / 1e3), args.serve_upstream)
    if args.serve_gateway is not None:
        port, upstream, log, knn = args.serve_gateway
        return serve(gateway_app(upstream, log, knn), int(port))
    if args.quick:
        args.rounds, args.requests = 3, 4

    up_port, gw_port = free_port(), free_port()
    up_url, gw_url = f"http://127.0.0.1:{up_port}", f"http://127.0.0.1:{gw_port}"
    with tempfile.TemporaryDirectory() as tmp:
        log = Path(tmp) / "routing.jsonl"
        up = start(["--serve-upstream", str(up_port), "--upstream-delay-ms", str(args.upstream_delay_ms)], up_url)
        try:
            knn = fit_knn(Path(tmp) / "knn")
            gw = start(["--serve-gateway", str(gw_port), up_url, str(log), str(Path(tmp) / "knn") if knn else "-"],
                       f"{gw_url}/health")
            try:
                table = asyncio.run(bench(args, up_url, gw_url, {"gateway": gw.pid, "upstream": up.pid}, knn))
            finally:
                gw.terminate()
                gw.wait(timeout=30)
        finally:
            up.terminate()
            up.wait(timeout=30)
        logged = sum(1 for _ in log.open())
    expected = (len(table) - 1) * args.clients * (2 + args.rounds * args.requests)  # gateway modes, with warm-up
    print(f"\n{args.clients} concurrent clients, {args.rounds} rounds x {args.requests} requests per client per mode, "
          f"upstream delay {args.upstream_delay_ms:g} ms; {os.cpu_count()} CPUs (shared with other work: noisy)")
    print(f"routing log: {logged} lines for {expected} gateway requests")
    print("\n| mode | p50 ms | p99 ms | added p50 ms | added p99 ms | p50 / direct | gateway CPU ms/req | "
          "upstream CPU ms/req |\n|---|---|---|---|---|---|---|---|")
    for name, row in table.items():
        print(f"| {name} | {row['p50_ms']:.1f} | {row['p99_ms']:.1f} | {row['added_p50_ms']:+.1f} | "
              f"{row['added_p99_ms']:+.1f} | {row['p50_ratio_to_direct']:.2f} | "
              f"{row['gateway_cpu_ms_per_request']:.2f} | {row['upstream_cpu_ms_per_request']:.2f} |")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"clients": args.clients, "rounds": args.rounds, "requests": args.requests,
                                   "upstream_delay_ms": args.upstream_delay_ms, "log_lines": logged,
                                   "expected_log_lines": expected, "modes": table}, indent=1))


if __name__ == "__main__":
    main()
