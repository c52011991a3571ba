"""Mixture-of-Depths speed: training steps and eval forwards of top-k against the same model with every other block
routed at capacity 0.5 and 0.125, next to the block-FLOPs ratio the compare report counts for them.

    PYTHONPATH=src python benchmarks/mod.py            # JSON to benchmarks/results/mod.json
    PYTHONPATH=src python benchmarks/mod.py --quick

Model: the `paper` compare preset's (d_model 128, 4 layers, 8 experts of d_ff 256, top-2; vocabulary 4096), batches
of 8 sequences of `--seq-len` tokens, random token ids, fp32 on the CPU with one thread. A training step is forward
+ backward + AdamW step (top-C per sequence: routed blocks run C = ⌈capacity·L⌉ tokens); an eval forward is a
no-grad eval-mode forward (the causal predictor selects; routed blocks run every row with the skipped ones masked,
so no time is saved there: `layers/depth.py`). Variants run interleaved, order rotated each round; each ratio is
the median over rounds of (top-k time / MoD time in that round) = MoD speed relative to top-k, in one process.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from routelab.compare import load_preset
from routelab.layers.depth import capacity_tokens
from routelab.models import ModelConfig, MoETransformerLM
from routelab.models.flops import block_flops_per_token, reference_block_flops_per_token

RESULTS = Path(__file__).parent / "results" / "mod.json"
VARIANTS = {"topk": None, "mod 0.5": 0.5, "mod 0.125": 0.125}


def build(capacity: float | None, seq_len: int) -> MoETransformerLM:
    preset = load_preset("paper")["model"]
    cfg = ModelConfig(**preset, vocab_size=4096, max_seq_len=seq_len, router="topk", router_options={"k": 2},
                      mod_capacity=capacity)
    torch.manual_seed(0)
    return MoETransformerLM(cfg)


def training_flops_ratio(model: MoETransformerLM, seq_len: int) -> float:
    """The block FLOPs of a training step relative to top-k: routed blocks process ⌈capacity·L⌉ / L of the tokens."""
    cfg = model.config
    processed = [1.0] * cfg.n_layers
    for i, block in enumerate(model.blocks):
        if block.mod is not None:
            processed[i] = capacity_tokens(cfg.mod_capacity, seq_len) / seq_len
    moe_at = set(cfg.moe_layer_indices())
    units = [2.0 * processed[i] for i in range(cfg.n_layers) if i in moe_at]
    spent = block_flops_per_token(cfg, processed_by_block=processed, expert_units_by_moe_layer=units)
    return spent / reference_block_flops_per_token(cfg, 2)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--steps", type=int, default=2, help="steps (or forwards) per variant per round")
    parser.add_argument("--seq-len", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="3 rounds")
    args = parser.parse_args()
    torch.set_num_threads(1)
    rounds, batch, L = 3 if args.quick else args.rounds, 8, args.seq_len
    ids = torch.randint(0, 4096, (batch, L + 1), generator=torch.Generator().manual_seed(0))
    models = {name: build(cap, L) for name, cap in VARIANTS.items()}
    optimizers = {name: torch.optim.AdamW(m.parameters(), lr=1e-3) for name, m in models.items()}

    def train_step(name: str) -> None:
        model = models[name].train()
        optimizers[name].zero_grad(set_to_none=True)
        _, loss = model(ids[:, :-1], ids[:, 1:])
        loss.backward()
        optimizers[name].step()

    @torch.no_grad()
    def eval_forward(name: str) -> None:
        models[name].eval()(ids[:, :-1])

    report: dict = {"seq_len": L, "batch": batch, "rounds": rounds, "steps_per_round": args.steps, "threads": 1,
                    "variants": {}}
    for kind, fn in (("train_step", train_step), ("eval_forward", eval_forward)):
        names = list(models)
        for name in names:  # warm-up
            fn(name)
        times: dict[str, list[float]] = {name: [] for name in names}
        for r in range(rounds):
            for name in names[r % len(names):] + names[: r % len(names)]:
                t0 = time.perf_counter()
                for _ in range(args.steps):
                    fn(name)
                times[name].append((time.perf_counter() - t0) / args.steps)
        for name in names:
            row = report["variants"].setdefault(name, {"training_block_flops_vs_topk":
                                                       training_flops_ratio(models[name], L)})
            row[f"{kind}_seconds"] = statistics.median(times[name])
            row[f"{kind}_speed_vs_topk"] = statistics.median(t / m for t, m in zip(times["topk"], times[name]))
            print(f"{kind} {name}: {row[f'{kind}_seconds'] * 1e3:.1f} ms, speed vs top-k "
                  f"{row[f'{kind}_speed_vs_topk']:.3f} (training block FLOPs vs top-k "
                  f"{row['training_block_flops_vs_topk']:.3f})", flush=True)
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(report, indent=1) + "\n")
    print(f"wrote {RESULTS}")


if __name__ == "__main__":
    main()
