"""MoELayer (top-k) against the dense SwiGLU MLP with the same active FLOPs, and against Hugging Face transformers'
Qwen3-MoE sparse block (experts implementations `eager` and `grouped_mm`) loaded with the same weights.

    ./dev.sh python benchmarks/layer.py            # full table (several minutes), JSON to benchmarks/results/layer.json
    ./dev.sh python benchmarks/layer.py --quick    # fewer repetitions and shapes

Everything is fp32 on the CPU with `--threads` (default 2) intra-op threads. Every number is a ratio to the dense
baseline measured in the same process: the variants run interleaved (round-robin, rotating the order each round),
and each ratio is the median over rounds of (variant time / dense time in that round), which cancels slow drifts in
machine load. The dense baseline is `silu(x W_gate) * (x W_up) W_down` of width k·d_ff, plain autograd.

Memory: each variant runs fwd+bwd once in a fresh subprocess (with glibc's mmap threshold lowered so freed memory
goes back to the OS and the resident set tracks live tensors). Peak activation memory = peak RSS of the pass (the
peak is reset through /proc/self/clear_refs just before it) − RSS just before the pass (parameters, input and
upstream gradient already resident) − the bytes of the parameter gradients. Linux only.

Decode shapes (forward only, no_grad): T ∈ DECODE_TOKENS tokens, E=64, k=8, d_ff=256, routelab's layer (whatever
path its dispatcher picks) and the same layer with `decode_fast_path=False` (the sort-based per-expert loop) against
the bandwidth floor — the bytes of the experts the batch touches (3·D·d_ff fp32 weights each) divided by the streaming
read bandwidth, measured in the same rounds by summing a 96 MiB tensor — and against transformers' `eager` Qwen3-MoE
block with the same weights. Ratios are per-round medians, as above; every timed call starts with cold caches (a 64 MiB
buffer is read before it, untimed), as the streaming read does.

`--threads 1,2` runs every section once per thread count (a sweep), in this one process. With more than one thread
the main, scaling and decode sections add `routelab_shared_threads`: the same layer with every per-expert op split
across the intra-op threads instead of whole experts per thread (`dispatch/workers.py`), i.e. what routelab did
before.

Router overhead: every registered router (`routelab.list_routers()`, default options — plus the options a router
requires, from REQUIRED_OPTIONS — E=64) timed alone in training mode on the T tokens as sequences of SEQ_LEN (the
context sequence-scoped routers read), as a fraction of the time of the whole top-k MoELayer forward (E=64, k=8,
d_ff=256) measured in the same rounds.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import routelab
from routelab.dispatch import LocalDispatcher

D_MODEL = 512
MAIN_SHAPES = [(8, 2, 256), (64, 8, 256), (128, 8, 128)]  # (E, k, d_ff)
SCALING_K, SCALING_F = 8, 128  # E grows at fixed k·d_ff = 1024
SCALING_E = [8, 32, 128, 256]
DECODE_TOKENS = [1, 8, 64]
DECODE_SHAPE = (64, 8, 256)
STREAM_BYTES = 96 * 2**20
RESULTS = Path(__file__).parent / "results" / "layer.json"


# -- the variants ---------------------------------------------------------------------------------------------------


class DenseSwiGLU(torch.nn.Module):
    """The physical limit: one SwiGLU MLP of width k·d_ff, plain autograd."""

    def __init__(self, d_model: int, width: int) -> None:
        super().__init__()
        self.width = width
        self.w_gate_up = torch.nn.Parameter(torch.randn(d_model, 2 * width) / d_model**0.5)
        self.w_down = torch.nn.Parameter(torch.randn(width, d_model) / width**0.5)

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        h = x_TD @ self.w_gate_up
        return (F.silu(h[:, : self.width]) * h[:, self.width :]) @ self.w_down


def build_routelab(E: int, k: int, d_ff: int, seed: int = 0) -> routelab.MoELayer:
    torch.manual_seed(seed)
    router = routelab.create_router("topk", d_model=D_MODEL, num_experts=E, k=k)
    return routelab.MoELayer(D_MODEL, d_ff, router)


class HFBlock(torch.nn.Module):
    """transformers' Qwen3MoeSparseMoeBlock on [T, D] input, with the routelab layer's weights."""

    def __init__(self, layer: routelab.MoELayer, implementation: str) -> None:
        super().__init__()
        from transformers import Qwen3MoeConfig
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock

        E, k = layer.router.num_experts, layer.router.k
        config = Qwen3MoeConfig(
            hidden_size=D_MODEL, moe_intermediate_size=layer.d_ff, num_experts=E, num_experts_per_tok=k,
            norm_topk_prob=k > 1, num_hidden_layers=1, num_attention_heads=4, num_key_value_heads=4,
            intermediate_size=4 * D_MODEL, vocab_size=128,
        )
        config._experts_implementation = implementation
        self.block = Qwen3MoeSparseMoeBlock(config)
        with torch.no_grad():
            self.block.gate.weight.copy_(layer.router.gate.weight)
            self.block.experts.gate_up_proj.copy_(layer.experts.w_gate_up.transpose(1, 2))
            self.block.experts.down_proj.copy_(layer.experts.w_down.transpose(1, 2))

    def forward(self, x_TD: torch.Tensor) -> torch.Tensor:
        return self.block(x_TD[None])[0]


def hf_available() -> str | None:
    """None when transformers' Qwen3-MoE block can be imported, else the reason it cannot."""
    try:
        from transformers.models.qwen3_moe.modeling_qwen3_moe import Qwen3MoeSparseMoeBlock  # noqa: F401
    except Exception as exc:  # noqa: BLE001 - any import failure means: skip these columns
        return f"transformers not importable ({type(exc).__name__}: {exc})"
    return None


class SharedThreads(LocalDispatcher):
    """The local dispatcher without whole experts per thread: every per-expert op split across the intra-op threads
    (what routelab did before; `dispatch/workers.py`)."""

    def workers(self, *args) -> int:
        return 1


def build_shared_threads(E: int, k: int, d_ff: int) -> routelab.MoELayer:
    layer = build_routelab(E, k, d_ff)  # the same weights (same seed)
    layer.dispatcher = SharedThreads()
    return layer


def build_variants(E: int, k: int, d_ff: int, hf: bool, threads: int = 1) -> dict[str, torch.nn.Module]:
    layer = build_routelab(E, k, d_ff)
    torch.manual_seed(1)
    variants: dict[str, torch.nn.Module] = {"dense": DenseSwiGLU(D_MODEL, k * d_ff), "routelab": layer}
    if threads > 1:
        variants["routelab_shared_threads"] = build_shared_threads(E, k, d_ff)
    if hf:
        for impl in ("eager", "grouped_mm"):
            variants[f"hf_{impl}"] = HFBlock(layer, impl)
    return variants


def check_outputs_match(variants: dict[str, torch.nn.Module], T: int) -> dict[str, float]:
    """Max abs difference of each HF block's output from routelab's, on the same input (must be ~1e-5)."""
    x = torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        ref = variants["routelab"](x)
        diffs = {name: float((m(x) - ref).abs().max()) for name, m in variants.items() if name.startswith("hf_")}
    for name, diff in diffs.items():
        if diff > 1e-4:
            raise AssertionError(f"{name} output differs from routelab's by {diff:.2e}: weights not loaded right")
    return diffs


# -- timing ---------------------------------------------------------------------------------------------------------


def step(module: torch.nn.Module, x: torch.Tensor, grad: torch.Tensor | None) -> None:
    """One forward (grad is None: under no_grad) or forward + backward."""
    if grad is None:
        with torch.no_grad():
            module(x)
        return
    module.zero_grad(set_to_none=True)
    x.grad = None
    module(x).backward(grad)


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
CLOCK = CLOCKS["wall"]


def time_interleaved(fns: dict[str, callable], rounds: int, warmup: int = 1) -> dict[str, list[float]]:
    """Run every fn once per round, rotating the order each round; returns the times of each."""
    names = list(fns)
    for _ in range(warmup):
        for name in names:
            fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names) :] + names[: r % len(names)]:
            t0 = CLOCK()
            fns[name]()
            times[name].append(CLOCK() - t0)
    return times


def ratios_to(times: dict[str, list[float]], base: str) -> dict[str, dict[str, float]]:
    """Median over rounds of time/base-time, with the median absolute time (ms) of each variant."""
    out = {}
    for name, ts in times.items():
        per_round = [t / b for t, b in zip(ts, times[base])]
        out[name] = {"ratio": statistics.median(per_round), "ms": 1e3 * statistics.median(ts)}
    return out


def time_shape(E: int, k: int, d_ff: int, T: int, rounds: int, hf: bool, threads: int = 1) -> dict:
    variants = build_variants(E, k, d_ff, hf, threads)
    diffs = check_outputs_match(variants, 256) if hf else {}
    x = torch.randn(T, D_MODEL, requires_grad=True)
    grad = torch.randn(T, D_MODEL)
    result = {"E": E, "k": k, "d_ff": d_ff, "T": T, "hf_max_abs_diff": diffs}
    for mode, g in (("fwd_bwd", grad), ("fwd", None)):
        fns = {name: (lambda m=m: step(m, x, g)) for name, m in variants.items()}
        result[mode] = ratios_to(time_interleaved(fns, rounds), "dense")
    return result


def time_decode(T: int, rounds: int, hf: bool, threads: int = 1) -> dict:
    """Forward-only times at a decode-size batch, as ratios to the bandwidth floor of the experts it touches."""
    E, k, d_ff = DECODE_SHAPE
    layer = build_routelab(E, k, d_ff).eval()
    loop_layer = build_routelab(E, k, d_ff).eval()  # the same weights (same seed)
    loop_layer.dispatcher = LocalDispatcher(decode_fast_path=False)
    x = torch.randn(T, D_MODEL, generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        touched = int((layer.router(x).expert_load() > 0).sum())
    touched_bytes = touched * 3 * D_MODEL * d_ff * 4
    stream = torch.ones(STREAM_BYTES // 4)
    fns = {
        "stream": lambda: stream.sum(),
        "routelab": lambda: step(layer, x, None),
        "routelab_loop": lambda: step(loop_layer, x, None),
    }
    if threads > 1:
        shared = build_shared_threads(E, k, d_ff).eval()
        fns["routelab_shared_threads"] = lambda: step(shared, x, None)
    if hf:
        hf_eager = HFBlock(layer, "eager").eval()
        fns["hf_eager"] = lambda: step(hf_eager, x, None)
    # Every call starts cold, as the floor does: a 64 MiB buffer is read (untimed) before each one, so no variant
    # finds the expert weights in the cache because of the variant it happened to follow.
    evict = torch.ones(64 * 2**20 // 4)
    names = list(fns)
    for name in names * 2:
        fns[name]()
    times: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        for name in names[r % len(names):] + names[: r % len(names)]:
            evict.sum()
            t0 = CLOCK()
            fns[name]()
            times[name].append(CLOCK() - t0)
    # The floor of each round: the touched bytes at the bandwidth of that round's streaming read.
    times["floor"] = [t * touched_bytes / STREAM_BYTES for t in times["stream"]]
    result = {"T": T, "E": E, "k": k, "d_ff": d_ff, "experts_touched": touched,
              "bandwidth_GBps": STREAM_BYTES / statistics.median(times["stream"]) / 1e9,
              "vs_floor": ratios_to(times, "floor")}
    if hf:
        result["speedup_vs_hf_eager"] = statistics.median(h / r for h, r in zip(times["hf_eager"], times["routelab"]))
    return result


# -- memory ---------------------------------------------------------------------------------------------------------


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")


def _reset_peak_rss() -> None:
    """Linux ≥ 4.0: make the peak resident set size (VmHWM) restart from the current one."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def _peak_rss_bytes() -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) * 1024 for line in f if line.startswith("VmHWM:"))


def memory_child(E: int, k: int, d_ff: int, T: int, name: str) -> None:
    """In a fresh process: the peak activation bytes of one fwd+bwd of variant `name`, printed as JSON."""
    threads = int(os.environ.get("ROUTELAB_BENCH_THREADS", "2"))
    torch.set_num_threads(threads)
    module = build_variants(E, k, d_ff, hf=name.startswith("hf_"), threads=threads)[name]
    step(module, torch.randn(64, D_MODEL, requires_grad=True), torch.randn(64, D_MODEL))  # load every code path
    module.zero_grad(set_to_none=True)
    x = torch.randn(T, D_MODEL, requires_grad=True)
    grad = torch.randn(T, D_MODEL)
    before = _rss_bytes()
    _reset_peak_rss()
    module(x).backward(grad)
    peak = _peak_rss_bytes()
    grad_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if p.requires_grad)
    print(json.dumps({"peak_activation_bytes": peak - before - grad_bytes}))


def measure_memory(E: int, k: int, d_ff: int, T: int, names: list[str], threads: int) -> dict[str, float]:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", ROUTELAB_BENCH_THREADS=str(threads))
    out = {}
    for name in names:
        args = [sys.executable, __file__, "--memory-child", f"{E},{k},{d_ff},{T},{name}"]
        proc = subprocess.run(args, env=env, capture_output=True, text=True, check=True)
        out[name] = json.loads(proc.stdout.strip().splitlines()[-1])["peak_activation_bytes"]
    return out


# -- router overhead ------------------------------------------------------------------------------------------------


# Routers with options that have no default get these in the overhead table.
REQUIRED_OPTIONS = {"null_experts": {"num_null_experts": 8, "k": 8}}
SEQ_LEN = 512


def router_overhead(T: int, rounds: int) -> list[dict]:
    E, k, d_ff = 64, 8, 256
    layer = build_routelab(E, k, d_ff)
    x = torch.randn(T, D_MODEL)
    fns = {"layer": lambda: step(layer, x, None)}
    rows = []
    for name in routelab.list_routers():
        try:
            router = routelab.create_router(name, d_model=D_MODEL, num_experts=E, **REQUIRED_OPTIONS.get(name, {}))
            router.train()
            batch_shape = (T // SEQ_LEN, SEQ_LEN) if T % SEQ_LEN == 0 else (1, T)
            ctx = routelab.RoutingContext(
                token_ids=torch.randint(0, 50_000, batch_shape), batch_shape=batch_shape, layer_index=0, step=0
            )
            router(x, ctx)
        except Exception as exc:  # noqa: BLE001 - a router that cannot run here is listed with the reason
            rows.append({"router": name, "note": f"skipped: {type(exc).__name__}: {exc}"})
            continue
        fns[name] = lambda r=router, c=ctx: r(x, c)
    times = ratios_to(time_interleaved(fns, rounds), "layer")
    for name, t in times.items():
        if name != "layer":
            rows.append({"router": name, "ms": t["ms"], "fraction_of_layer": t["ratio"]})
    rows.append({"router": "(layer: topk E=64 k=8 d_ff=256, forward)", "ms": times["layer"]["ms"]})
    return rows


# -- the report -----------------------------------------------------------------------------------------------------


def print_table(title: str, rows: list[dict], columns: list[str]) -> None:
    print(f"\n{title}")
    header = ["shape", *columns]
    print("| " + " | ".join(header) + " |")
    print("|" + "---|" * len(header))
    for row in rows:
        cells = [f"E={row['E']}, k={row['k']}, d_ff={row['d_ff']}"]
        for col in columns:
            mode, name = col.split(":")
            v = row[mode].get(name)
            cells.append("—" if v is None else f"{v['ratio']:.2f}× ({v['ms']:.0f} ms)")
        print("| " + " | ".join(cells) + " |")


def run_sections(sections: set[str], args: argparse.Namespace, threads: int, rounds: int, T: int, hf: bool,
                 hf_note: str | None) -> dict:
    report: dict = {"threads": threads}
    print(f"\ntorch {torch.__version__}, {threads} threads, {args.clock} clock, fp32, T={T}, d_model={D_MODEL}, "
          f"{rounds} rounds" + ("" if hf else f"; transformers columns skipped: {hf_note}"))
    hf_decode, hf = hf, hf and not args.hf_decode_only
    names = ["routelab", "dense"] + (["routelab_shared_threads"] if threads > 1 else []) + (
        ["hf_eager", "hf_grouped_mm"] if hf else [])
    cols = [f"{mode}:{n}" for mode in ("fwd_bwd", "fwd") for n in names if n != "dense"]

    if "main" in sections:
        shapes = MAIN_SHAPES[1:2] if args.quick else MAIN_SHAPES
        report["main"] = [time_shape(E, k, f, T, rounds, hf, threads) for E, k, f in shapes]
        print_table("Time as a ratio to dense (k·d_ff wide), median over rounds", report["main"], cols)
    if "scaling" in sections:
        es = SCALING_E[::3] if args.quick else SCALING_E
        report["scaling"] = [time_shape(E, SCALING_K, SCALING_F, T, rounds, False, threads) for E in es]
        print_table(f"E grows at k={SCALING_K}, d_ff={SCALING_F} (routelab only)", report["scaling"],
                    [c for c in cols if c.split(":")[1].startswith("routelab")])
    if "decode" in sections:
        report["decode"] = [time_decode(t, max(rounds, 9), hf_decode, threads) for t in DECODE_TOKENS]
        E, k, f = DECODE_SHAPE
        print(f"\nDecode shapes, forward only, E={E}, k={k}, d_ff={f}: time / bandwidth floor (touched expert bytes "
              "÷ streaming-read bandwidth, same rounds)")
        shared_col = threads > 1
        print("| T | experts touched | floor | routelab | loop kernel | " + ("shared threads | " if shared_col else "")
              + "transformers eager | routelab speed-up vs eager |")
        print("|---|---|---|---|---|---|---|" + ("---|" if shared_col else ""))
        for row in report["decode"]:
            v = row["vs_floor"]
            hf_cells = (f"{v['hf_eager']['ratio']:.2f}× ({v['hf_eager']['ms']:.2f} ms) | "
                        f"{row['speedup_vs_hf_eager']:.2f}×") if "hf_eager" in v else "— | —"
            print(f"| {row['T']} | {row['experts_touched']} | {v['floor']['ms']:.2f} ms "
                  f"({row['bandwidth_GBps']:.0f} GB/s) | {v['routelab']['ratio']:.2f}× ({v['routelab']['ms']:.2f} ms) | "
                  f"{v['routelab_loop']['ratio']:.2f}× ({v['routelab_loop']['ms']:.2f} ms) | "
                  + (f"{v['routelab_shared_threads']['ratio']:.2f}× | " if shared_col else "") + f"{hf_cells} |")
    if "memory" in sections:
        E, k, f = 64, 8, 256
        mem = measure_memory(E, k, f, T, names, threads)
        report["memory"] = {"E": E, "k": k, "d_ff": f, "peak_activation_bytes": mem}
        print(f"\nPeak activation memory of fwd+bwd, E={E}, k={k}, d_ff={f} (peak RSS − RSS before − grad bytes)")
        for name, b in mem.items():
            print(f"  {name:14s} {b / 2**20:8.1f} MiB  {b / mem['dense']:.2f}× dense")
    if "routers" in sections:
        report["routers"] = router_overhead(T, rounds)
        print("\nRouter decision time (training-mode forward, default options, E=64) / top-k layer forward")
        for row in report["routers"]:
            if "note" in row:
                print(f"  {row['router']:20s} {row['note']}")
            elif "fraction_of_layer" in row:
                print(f"  {row['router']:20s} {row['ms']:7.1f} ms  {100 * row['fraction_of_layer']:5.1f} %")
            else:
                print(f"  {row['router']} {row['ms']:.1f} ms")
    return report


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="fewer rounds and shapes (a smoke run)")
    parser.add_argument("--threads", default="2", help="intra-op threads; a comma list (1,2) sweeps them")
    parser.add_argument("--tokens", type=int, default=4096)
    parser.add_argument("--rounds", type=int, default=None, help="timed rounds per shape (default 7, quick 3)")
    parser.add_argument("--only", choices=["main", "scaling", "decode", "memory", "routers"], action="append",
                        help="run only these sections (repeatable)")
    parser.add_argument("--clock", choices=sorted(CLOCKS), default="wall",
                        help="wall (default) or cpu: process CPU time, for a busy shared machine with --threads 1, "
                        "where wall time measures the other processes; with more threads it counts spinning threads")
    parser.add_argument("--no-hf", action="store_true", help="leave out the transformers columns")
    parser.add_argument("--hf-decode-only", action="store_true",
                        help="transformers only in the decode section (its eager block is slow at T=4096)")
    parser.add_argument("--output", type=Path, default=RESULTS)
    parser.add_argument("--memory-child", help=argparse.SUPPRESS)
    args = parser.parse_args()

    if args.memory_child:
        E, k, d_ff, T, name = args.memory_child.split(",")
        memory_child(int(E), int(k), int(d_ff), int(T), name)
        return

    try:
        thread_counts = [int(t) for t in args.threads.split(",")]
        if not thread_counts or min(thread_counts) < 1:
            raise ValueError
    except ValueError:
        parser.error(f"--threads must be positive integers separated by commas, got {args.threads!r}")
    global CLOCK
    CLOCK = CLOCKS[args.clock]
    rounds = args.rounds or (3 if args.quick else 7)
    sections = set(args.only or ["main", "scaling", "decode", "memory", "routers"])
    hf_note = "disabled by --no-hf" if args.no_hf else hf_available()
    hf = hf_note is None
    T = args.tokens
    report: dict = {"torch": torch.__version__, "clock": args.clock, "tokens": T, "d_model": D_MODEL,
                    "rounds": rounds, "hf_note": hf_note, "by_threads": {}}
    for threads in thread_counts:
        torch.set_num_threads(threads)
        report["by_threads"][str(threads)] = run_sections(sections, args, threads, rounds, T, hf, hf_note)

    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps(report, indent=2))
    print(f"\nwrote {args.output}")


if __name__ == "__main__":
    main()
