"""Whole-model training speed: tokens/s of the default compare model with top-k routing against the same model with
dense FFNs of the same active width (k·d_ff), and the same for a fine-grained 64-expert model.

    PYTHONPATH=src python benchmarks/train_speed.py            # JSON to benchmarks/results/train_speed.json
    PYTHONPATH=src python benchmarks/train_speed.py --quick --threads 1,2

Models: the `default` compare preset's model (d_model 64, 4 layers, 8 experts of d_ff 128, top-k k=2; vocabulary
4096, sequences of 128, batches of 8 — the preset's 1024 tokens per step), and the same model with 64 experts of
d_ff 32 at k=8 (the same active width 256, finer experts: the DeepSeek/Qwen3 direction). Each dense twin replaces
every MoE layer by one SwiGLU MLP of width k·d_ff, so active FLOPs per token match (the router's gate aside).
A step is forward + backward + AdamW step on random token ids. Variants run interleaved (order rotated each
round); each ratio is the median over rounds of (dense step time / MoE step time in that round) = MoE tokens/s as a
fraction of dense tokens/s, in one process. fp32 on the CPU.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from routelab.compare import load_preset
from routelab.models import ModelConfig, MoETransformerLM
from routelab.models.transformer import DenseSwiGLU

RESULTS = Path(__file__).parent / "results" / "train_speed.json"
MODELS = {"default (E=8, k=2, d_ff=128)": {}, "64 experts (E=64, k=8, d_ff=32)": {"num_experts": 64, "d_ff": 32, "k": 8}}


def build(changes: dict) -> tuple[MoETransformerLM, MoETransformerLM]:
    preset = dict(load_preset("default")["model"])
    k = changes.get("k", 2)
    preset.update({key: v for key, v in changes.items() if key != "k"})
    cfg = ModelConfig(**preset, vocab_size=4096, max_seq_len=128, router="topk", router_options={"k": k})
    torch.manual_seed(0)
    moe = MoETransformerLM(cfg)
    torch.manual_seed(0)
    dense = MoETransformerLM(cfg)
    for block in dense.blocks:
        block.ffn = DenseSwiGLU(cfg.d_model, k * cfg.d_ff)
    return moe.train(), dense.train()


def trainer(model: MoETransformerLM, batch: int, seq_len: int):
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(0, model.config.vocab_size, (batch, seq_len + 1), generator=g)

    def step() -> None:
        optimizer.zero_grad(set_to_none=True)
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizer.step()

    return step


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=9)
    parser.add_argument("--steps", type=int, default=3, help="training steps per variant per round")
    parser.add_argument("--threads", default="1", help="intra-op threads; a comma list (1,2) sweeps them")
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    rounds = 3 if args.quick else args.rounds
    batch, seq_len = 8, 128
    report: dict = {"tokens_per_step": batch * seq_len, "rounds": rounds, "steps_per_round": args.steps,
                    "by_threads": {}}
    for threads in (int(t) for t in args.threads.split(",")):
        torch.set_num_threads(threads)
        rows = {}
        for label, changes in MODELS.items():
            moe, dense = build(changes)
            fns = {"moe": trainer(moe, batch, seq_len), "dense": trainer(dense, batch, seq_len)}
            for fn in fns.values():  # warm-up
                fn()
            times: dict[str, list[float]] = {name: [] for name in fns}
            for r in range(rounds):
                for name in (list(fns) if r % 2 == 0 else list(fns)[::-1]):
                    t0 = time.perf_counter()
                    for _ in range(args.steps):
                        fns[name]()
                    times[name].append((time.perf_counter() - t0) / args.steps)
            tokens = batch * seq_len
            rows[label] = {
                "moe_tokens_per_s": tokens / statistics.median(times["moe"]),
                "dense_tokens_per_s": tokens / statistics.median(times["dense"]),
                "moe_vs_dense": statistics.median(d / m for d, m in zip(times["dense"], times["moe"])),
            }
            row = rows[label]
            print(f"{threads} thread(s), {label}: MoE {row['moe_tokens_per_s']:.0f} tok/s, dense same active width "
                  f"{row['dense_tokens_per_s']:.0f} tok/s, MoE/dense speed {row['moe_vs_dense']:.3f}", flush=True)
        report["by_threads"][str(threads)] = rows
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
