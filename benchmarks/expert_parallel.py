"""Expert parallelism on gloo (CPU): per-layer step time, bytes sent per rank, and max/mean rank load, with and
without least-loaded balancing (LLEP), under a Zipf-skewed router.

For each world size W in --worlds (default 1, 2, 4), W processes share a gloo group; one MoE layer (E experts, top-k
of a router whose expert popularity is Zipf(s): expert i is chosen with probability ∝ 1/(i+1)^s, so the hottest
experts all sit on rank 0 — the worst placement) runs forward + backward on a fixed global batch of T tokens split
evenly over the ranks (strong scaling). Every round times both variants (LLEP off/on) interleaved, in alternating
order; a step's time is the slowest rank's (ranks wait for each other in the all-to-all). The baseline is the
same layer with the local dispatcher in one process on all T tokens, timed in the W = 1 group's rounds.

Reported per W and variant: median step time and its ratio to the one-process local layer; bytes this rank sends to
other ranks per forward (rows there and back, plus lent expert weights under LLEP; backward sends as much again),
the mean over ranks; rank load = rows a rank's experts compute, max/mean over ranks.

This machine: 2 shared CPU cores. W = 4 oversubscribes them (4 processes on 2 cores), so its times measure the
scheduler as much as the layer; the loads and bytes are exact.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import routelab
import routelab.distributed as rd

RESULTS = Path(__file__).parent / "results" / "expert_parallel.json"


class ZipfRouter(routelab.Router):
    """Top-k experts drawn without replacement from Zipf(s) popularity (seeded per rank); weights from a linear
    gate's softmax at the drawn experts, renormalised. A stand-in for a router with skewed expert popularity."""

    def __init__(self, *, d_model: int, num_experts: int, k: int, s: float, seed: int) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        self.k, self.s, self.seed = k, s, seed
        self.gate = torch.nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD, ctx=None):
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        popularity_E = 1.0 / torch.arange(1, E + 1, dtype=torch.float64) ** self.s
        g = torch.Generator().manual_seed(self.seed)
        expert_TK = torch.multinomial(popularity_E.expand(T, E), k, replacement=False, generator=g)
        weight_TK = torch.softmax(self.gate(x_TD), dim=-1).gather(1, expert_TK)
        weight_TK = weight_TK / weight_TK.sum(-1, keepdim=True)
        return routelab.RoutingDecision(
            token_index=torch.arange(T).repeat_interleave(k), expert_index=expert_TK.reshape(-1),
            weight=weight_TK.reshape(-1), num_tokens=T, num_experts=E,
        )


def build_layer(args, rank: int) -> routelab.MoELayer:
    torch.manual_seed(0)
    router = ZipfRouter(d_model=args.d_model, num_experts=args.experts, k=args.k, s=args.zipf, seed=100 + rank)
    return routelab.MoELayer(args.d_model, args.d_ff, router)


def step(layer, x, grad) -> None:
    layer.zero_grad(set_to_none=True)
    layer(x).backward(grad)


def worker(rank: int, world: int, args, store: str, out: str) -> None:
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=300))
    T = args.tokens // world
    g = torch.Generator().manual_seed(rank)
    x = torch.randn(T, args.d_model, generator=g)
    grad = torch.randn(T, args.d_model, generator=g)
    variants = {}
    for ll in (False, True):
        variants["llep" if ll else "ep"] = rd.expert_parallel(build_layer(args, rank), least_loaded=ll)
    baseline = None
    if world == 1:  # the one-process local layer on the whole batch
        baseline = build_layer(args, 0)
    names = list(variants) + (["local"] if baseline is not None else [])
    times = {n: [] for n in names}
    for r in range(args.rounds + 1):  # round 0 warms up
        order = names if r % 2 == 0 else names[::-1]
        for n in order:
            dist.barrier()
            t0 = time.perf_counter()
            step(baseline if n == "local" else variants[n], x, grad)
            elapsed = torch.tensor([time.perf_counter() - t0])
            dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)  # the step takes as long as its slowest rank
            if r:
                times[n].append(float(elapsed))
    report = {"world": world, "tokens_per_rank": T, "variants": {}}
    elem = x.element_size()
    for n, layer in variants.items():
        disp = layer.dispatcher
        with torch.no_grad():
            decision = layer.router(x)
            plan = disp.make_plan(decision)
        rows_out = sum(c for d, c in enumerate(plan.send_splits) if d != rank)
        bytes_rows = 2 * rows_out * args.d_model * elem  # dispatch there + combine back
        per_expert = sum(p[0].numel() for p in layer.experts.parameters()) * elem
        lent = sum(m.count > 0 for m in plan.moves if m.expert // disp.per_rank == rank)
        stats = torch.tensor([float(plan.counts_J.sum()), float(bytes_rows + lent * per_expert)])
        gathered = [torch.zeros_like(stats) for _ in range(world)]
        dist.all_gather(gathered, stats)
        loads = [float(t[0]) for t in gathered]
        report["variants"][n] = {
            "step_ms": 1e3 * statistics.median(times[n]),
            "rank_loads": loads,
            "max_over_mean_load": max(loads) / (sum(loads) / world),
            "bytes_sent_per_rank": statistics.mean(float(t[1]) for t in gathered),
            "moves": len(plan.moves),
        }
    if baseline is not None:
        report["variants"]["local"] = {"step_ms": 1e3 * statistics.median(times["local"])}
    if rank == 0:
        Path(out).write_text(json.dumps(report))
    dist.barrier()
    dist.destroy_process_group()


def run_world(world: int, args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        out = os.path.join(tmp, "report.json")
        mp.start_processes(worker, args=(world, args, os.path.join(tmp, "store"), out), nprocs=world,
                           start_method="spawn")
        return json.loads(Path(out).read_text())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--worlds", type=int, nargs="+", default=[1, 2, 4])
    parser.add_argument("--tokens", type=int, default=4096, help="global tokens per step (split over the ranks)")
    parser.add_argument("--d-model", type=int, default=256)
    parser.add_argument("--d-ff", type=int, default=256)
    parser.add_argument("--experts", type=int, default=16)
    parser.add_argument("--k", type=int, default=2)
    parser.add_argument("--zipf", type=float, default=1.2, help="Zipf exponent s of expert popularity")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="T=1024, 3 rounds")
    parser.add_argument("--output", type=Path, default=RESULTS)
    args = parser.parse_args()
    if args.quick:
        args.tokens, args.rounds = 1024, 3
    reports = [run_world(w, args) for w in args.worlds]
    local_ms = next((r["variants"]["local"]["step_ms"] for r in reports if "local" in r["variants"]), None)
    print(f"gloo on CPU, 1 thread per rank, fp32; E={args.experts}, k={args.k}, d_model={args.d_model}, "
          f"d_ff={args.d_ff}, {args.tokens} tokens per step split over the ranks, Zipf s={args.zipf}; "
          f"median of {args.rounds} rounds; {os.cpu_count()} CPU cores (shared)")
    print("\n| W | LLEP | step ms (slowest rank) | vs 1-process local | max/mean rank load | MB sent per rank (fwd) "
          "| moves |")
    print("|---|---|---|---|---|---|---|")
    for r in reports:
        for n in ("ep", "llep"):
            v = r["variants"][n]
            ratio = f"{v['step_ms'] / local_ms:.2f}×" if local_ms else "—"
            print(f"| {r['world']} | {'on' if n == 'llep' else 'off'} | {v['step_ms']:.0f} | {ratio} | "
                  f"{v['max_over_mean_load']:.2f} | {v['bytes_sent_per_rank'] / 2**20:.2f} | {v['moves']} |")
    if local_ms:
        print(f"\none-process local layer (LocalDispatcher, fused kernel): {local_ms:.0f} ms per step")
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"args": {k: str(v) for k, v in vars(args).items()}, "reports": reports},
                                      indent=2))
    print(f"wrote {args.output}")


if __name__ == "__main__":
    main()
