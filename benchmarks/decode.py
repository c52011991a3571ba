"""Decode speed: the default compare model with top-k routing against the same model with dense FFNs of the same
active width (k·d_ff), generating with the KV cache, at batch 1 and 8.

    PYTHONPATH=src python benchmarks/decode.py            # JSON to benchmarks/results/decode.json
    PYTHONPATH=src python benchmarks/decode.py --quick

Both models come from the same `ModelConfig` (the `default` compare preset's model, top-k k=2, vocabulary 4096,
max_seq_len 128), random weights; the dense one has every MoE layer replaced by a SwiGLU MLP of width k·d_ff, so its
active FLOPs per token equal the MoE model's (the router's gate aside). Each round generates `--new` tokens greedily
after a prompt of `--prompt` tokens with `routelab.generate` for each variant, in alternating order; the ratio is the
median over rounds of (dense time / MoE time in that round), i.e. MoE tokens/s as a fraction of dense tokens/s, in
one process. fp32 on the CPU with `--threads` threads. Also reported: the share of the MoE model's decode step spent
in its MoE layers, and the same MoE model with the tiny-S decode path switched off
(`LocalDispatcher(decode_fast_path=False)`: the sort-based kernel with its per-expert loop and host sync).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from routelab.compare import load_preset
from routelab.dispatch import LocalDispatcher
from routelab.models import ModelConfig, MoETransformerLM
from routelab.models.decoding import generate
from routelab.models.transformer import DenseSwiGLU

RESULTS = Path(__file__).parent / "results" / "decode.json"


def build(k: int = 2) -> tuple[MoETransformerLM, MoETransformerLM]:
    preset = load_preset("default")["model"]
    cfg = ModelConfig(**preset, vocab_size=4096, max_seq_len=128, router="topk", router_options={"k": k})
    torch.manual_seed(0)
    moe = MoETransformerLM(cfg).eval()
    torch.manual_seed(0)
    dense = MoETransformerLM(cfg)
    for block in dense.blocks:
        block.ffn = DenseSwiGLU(cfg.d_model, k * cfg.d_ff)
    return moe, dense.eval()


def decode_seconds(model: MoETransformerLM, batch: int, prompt: int, new: int, fast_path: bool = True) -> float:
    g = torch.Generator().manual_seed(batch)
    prompts = torch.randint(0, model.config.vocab_size, (batch, prompt), generator=g).tolist()
    for layer in model.moe_layers:
        layer.dispatcher = LocalDispatcher(decode_fast_path=fast_path)
    try:
        t0 = time.perf_counter()
        generate(model, prompts, max_new_tokens=new)
        return time.perf_counter() - t0
    finally:
        for layer in model.moe_layers:
            layer.dispatcher = LocalDispatcher()


def moe_share(model: MoETransformerLM, batch: int, steps: int = 50) -> tuple[float, float]:
    """(MoE layers, their routers): fractions of one-token decode forwards spent inside them (wall time, measured
    around `forward_with_decision`, which the model calls directly, and around each router's forward)."""
    spent = {"moe": 0.0, "router": 0.0}

    def timed(method, key):
        def wrapper(*args, **kwargs):
            t0 = time.perf_counter()
            try:
                return method(*args, **kwargs)
            finally:
                spent[key] += time.perf_counter() - t0

        return wrapper

    for layer in model.moe_layers:
        layer.forward_with_decision = timed(layer.forward_with_decision, "moe")
        layer.router.forward = timed(layer.router.forward, "router")
    try:
        with torch.no_grad():
            cache = model.new_cache(batch, steps + 1)
            model(torch.zeros(batch, 1, dtype=torch.long), cache=cache)
            spent.update(moe=0.0, router=0.0)
            t0 = time.perf_counter()
            for _ in range(steps):
                model(torch.zeros(batch, 1, dtype=torch.long), cache=cache)
            total = time.perf_counter() - t0
    finally:
        for layer in model.moe_layers:  # back to the classes' methods
            del layer.forward_with_decision
            del layer.router.forward
    return spent["moe"] / total, spent["router"] / total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--prompt", type=int, default=16)
    parser.add_argument("--new", type=int, default=96)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    torch.set_num_threads(args.threads)
    moe, dense = build()
    report = {"threads": args.threads, "prompt": args.prompt, "new_tokens": args.new, "rounds": rounds, "batches": {}}
    for batch in (1, 8):
        for model in (moe, dense):  # warm-up
            decode_seconds(model, batch, args.prompt, 8)
        times: dict[str, list[float]] = {"moe": [], "dense": [], "moe_no_fast_path": []}
        for r in range(rounds):
            order = ["moe", "dense", "moe_no_fast_path"]
            if r % 2:
                order.reverse()
            for name in order:
                model = dense if name == "dense" else moe
                times[name].append(decode_seconds(model, batch, args.prompt, args.new, name != "moe_no_fast_path"))
        row = {
            "moe_tokens_per_s": batch * args.new / statistics.median(times["moe"]),
            "dense_tokens_per_s": batch * args.new / statistics.median(times["dense"]),
            "moe_vs_dense": statistics.median(d / m for d, m in zip(times["dense"], times["moe"])),
            "no_fast_path_vs_dense": statistics.median(d / m for d, m in zip(times["dense"], times["moe_no_fast_path"])),
        }
        row["moe_share_of_step"], row["router_share_of_step"] = moe_share(moe, batch)
        report["batches"][str(batch)] = row
        print(f"batch {batch}: MoE {row['moe_tokens_per_s']:.0f} tok/s, dense {row['dense_tokens_per_s']:.0f} tok/s, "
              f"MoE/dense speed {row['moe_vs_dense']:.3f} (without the decode fast path "
              f"{row['no_fast_path_vs_dense']:.3f}); MoE layers {100 * row['moe_share_of_step']:.0f}% of a decode step (routers "
              f"{100 * row['router_share_of_step']:.0f}%)")
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
