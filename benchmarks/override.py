"""The cost of the routing-override wrapper: the default small model (4 layers, 8 experts, top-2) with and without an
override whose routing equals the router's own (`min_weight_ratio=0`: the whole wrapper runs, nothing changes), and
with k=1 for scale.

    ./dev.sh python benchmarks/override.py [MODEL_FOLDER] [--rounds 7]

Two workloads: a scoring forward (batch 8 × 128 tokens, no_grad) and greedy decoding at batch 1 (routelab.generate,
KV cache, 32 new tokens). Variants run interleaved (round-robin, order rotated each round); each ratio is the median
over rounds of (variant time / no-override time in that round). With no folder, a random-init model of the same
shape is used (timing does not depend on the weights). fp32, 1 thread.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

import routelab
from routelab.inference import override_routing
from routelab.models import ModelConfig, MoETransformerLM

VARIANTS = {"no override": None, "override, same routing": {"min_weight_ratio": 0.0}, "override k=1": {"k": 1}}


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("model", nargs="?")
    parser.add_argument("--rounds", type=int, default=7)
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.model:
        model, _ = routelab.load_model(args.model)
    else:
        torch.manual_seed(0)
        model = MoETransformerLM(ModelConfig(vocab_size=4096, d_model=64, n_layers=4, n_heads=4, d_ff=128)).eval()
    V = model.config.vocab_size
    batch = torch.randint(0, V, (8, 128), generator=torch.Generator().manual_seed(0))
    prompt = [batch[0, :16].tolist()]

    def score():
        with torch.no_grad():
            model(batch)

    def decode():
        routelab.generate(model, prompt, max_new_tokens=32)

    for name, work in (("forward 8×128", score), ("decode batch 1, 32 tokens", decode)):
        times = {v: [] for v in VARIANTS}
        work()  # warm-up
        for r in range(args.rounds):
            order = list(VARIANTS)[r % len(VARIANTS):] + list(VARIANTS)[: r % len(VARIANTS)]
            for v in order:
                handle = None if VARIANTS[v] is None else override_routing(model, **VARIANTS[v])
                t0 = time.perf_counter()
                work()
                times[v].append(time.perf_counter() - t0)
                if handle is not None:
                    handle.remove()
        base = times["no override"]
        for v in VARIANTS:
            ratio = statistics.median(t / b for t, b in zip(times[v], base))
            print(f"{name:<28} {v:<24} {statistics.median(times[v]) * 1e3:8.1f} ms   {ratio:.2f}× no override")


if __name__ == "__main__":
    main()
