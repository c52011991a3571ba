"""Offloaded generation (experts on disk, a bounded cache) against the fully resident model, and the cache
simulator's speed.

    PYTHONPATH=src python benchmarks/offload.py            # the full table (a few minutes on 2 shared cores)
    PYTHONPATH=src python benchmarks/offload.py --quick    # fewer tokens and rounds

Models: routelab's default small LM (`ModelConfig()`: d_model 128, 4 MoE layers of 8 experts, k = 2, d_ff 256) and a
patched tiny Mixtral-style Hugging Face model (hidden 128, 4 layers, 8 experts, k = 2, intermediate 256), both
random-initialised with seeded weights (`--model DIR` uses a trained routelab model folder instead). Prompts are
byte tokens of ../shared/data/tinyshakespeare.txt when present (else of this file).

For each model, capacity (25/50/100% of the experts per layer) and policy (lru, lfu, arc, lru + pre-gated
prefetch, belady), one row: the executor's hit rate, the Belady bound on that run (the simulator on the run's trace),
and tokens/s as a ratio to the resident model: every round offloads a fresh copy (cold cache), then times the
offloaded and the resident generation back to back (alternating which goes first); the ratio is the median over
rounds of (offloaded tokens/s / resident tokens/s in that round). Generation is greedy, batch 1; when the capacity
is below the experts, the prompt is fed one token at a time (to both), so that a step needs at most k experts.
Every offloaded run is checked to produce exactly the resident tokens. The store is on the local disk and read
through the page cache (warm after the first round): the tokens/s ratios measure the executor's overhead (mmap
reads, CRC checks, copies), not a disk's bandwidth; the simulator's stall model covers that.

Simulator speed: LRU (vectorised) on a synthetic 1M-step trace (one MoE layer of 8 experts, k = 2, skewed
popularity), in layer-steps per second of wall time and of this process's CPU time (the machine is shared); and the
step-by-step engine (what LFU/ARC/Belady run) on a 100k-step trace, in the same rounds.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from routelab.inference import TraceRecorder, offload_experts, simulate_cache  # noqa: E402
from routelab.inference.cache import demand, lru_sweep  # noqa: E402
from routelab.inference.trace import RoutingTrace  # noqa: E402
from routelab.models.decoding import generate  # noqa: E402
from routelab.models.transformer import ModelConfig, MoETransformerLM  # noqa: E402

RESULTS = Path(__file__).parent / "results" / "offload.json"
POLICIES = [("lru", False), ("lfu", False), ("arc", False), ("lru", True), ("belady", False)]


def prompt_ids(vocab: int, length: int) -> list[int]:
    text = ROOT.parent / "shared" / "data" / "tinyshakespeare.txt"
    data = text.read_bytes()[:4000] if text.is_file() else Path(__file__).read_bytes()[:4000]
    return [b % vocab for b in data[1000 : 1000 + length]]


# -- the two models and their generation loops ----------------------------------------------------------------------


def routelab_model(folder: str | None):
    if folder:
        from routelab.models.io import load_model

        return load_model(folder)[0]
    torch.manual_seed(0)
    model = MoETransformerLM(ModelConfig()).eval()
    for layer in model.moe_layers:  # a trained router is far from uniform; so is this one
        torch.nn.init.normal_(layer.router.gate.weight, std=0.5)
    return model


def routelab_generate(model, prompt, n, chunk):
    return generate(model, [prompt], max_new_tokens=n, prefill_chunk=chunk).tokens[0]


def mixtral_model():
    import transformers

    from routelab.interop.hf import patch_model

    transformers.logging.set_verbosity_error()
    cfg = transformers.MixtralConfig(vocab_size=1024, hidden_size=128, num_hidden_layers=4, num_attention_heads=4,
                                     num_key_value_heads=2, intermediate_size=256, num_local_experts=8,
                                     num_experts_per_tok=2, max_position_embeddings=256)
    torch.manual_seed(0)
    model = transformers.AutoModelForCausalLM.from_config(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                p.normal_(0.0, 0.5)
    patch_model(model)
    return model


@torch.no_grad()
def hf_generate(model, prompt, n, chunk):
    """Greedy with the KV cache, the prompt fed `chunk` tokens per forward (None: all at once)."""
    ids = torch.tensor([prompt])
    step = ids.shape[1] if chunk is None else chunk
    past, logits = None, None
    for s in range(0, ids.shape[1], step):
        out = model(input_ids=ids[:, s : s + step], past_key_values=past, use_cache=True)
        past, logits = out.past_key_values, out.logits
    tokens = []
    for i in range(n):
        token = int(logits[0, -1].argmax())
        tokens.append(token)
        if i + 1 < n:
            out = model(input_ids=torch.tensor([[token]]), past_key_values=past, use_cache=True)
            past, logits = out.past_key_values, out.logits
    return tokens


# -- the measurements -----------------------------------------------------------------------------------------------


def run_model(name, model, gen, prompt, n_new, rounds, experts):
    rows = []
    capacities = sorted({max(2, experts // 4), experts // 2, experts})
    for capacity in capacities:
        chunk = None if capacity >= experts else 1
        want = gen(model, prompt, n_new, chunk)
        with TraceRecorder(model) as rec:  # the run's trace, from the resident model: Belady's future
            assert gen(model, prompt, n_new, chunk) == want
        trace = rec.trace()
        bound = simulate_cache(trace, capacity, "belady").hit_rate
        for policy, prefetch in POLICIES:
            ratios, hit_rate, read = [], None, 0
            for r in range(rounds):
                copy_ = copy.deepcopy(model)
                with tempfile.TemporaryDirectory() as tmp:
                    ex = offload_experts(copy_, Path(tmp) / "store", capacity=capacity, policy=policy,
                                         prefetch=prefetch, trace=trace if policy == "belady" else None)
                    pair = {}
                    for which in (("off", "res") if r % 2 == 0 else ("res", "off")):
                        m = copy_ if which == "off" else model
                        t0 = time.perf_counter()
                        got = gen(m, prompt, n_new, chunk)
                        pair[which] = n_new / (time.perf_counter() - t0)
                        assert got == want, f"{name}: offloaded tokens differ from the resident model's"
                    ratios.append(pair["off"] / pair["res"])
                    totals = ex.totals()
                    hit_rate, read = totals["hit_rate"], totals["bytes_read"]
            label = policy + (" + prefetch" if prefetch else "")
            rows.append({"model": name, "capacity": capacity, "experts": experts, "policy": label,
                         "hit_rate": hit_rate, "belady_hit_rate": bound,
                         "tokens_per_s_ratio": statistics.median(ratios),
                         "mb_read_per_token": read / 1e6 / n_new})
            print(f"{name:9s} cap {capacity}/{experts} {label:15s} hit {hit_rate:.3f} (belady {bound:.3f}) "
                  f"tokens/s ×{rows[-1]['tokens_per_s_ratio']:.2f} of resident, {rows[-1]['mb_read_per_token']:.3f} "
                  "MB read/token", flush=True)
    return rows


def synthetic_trace(n_steps: int, E: int = 8, k: int = 2, seed: int = 0) -> RoutingTrace:
    rng = np.random.default_rng(seed)
    scores = rng.random((n_steps, E)) + np.linspace(0, 1.5, E)  # skewed popularity, varying per step
    ids = np.sort(np.argsort(-scores, axis=1)[:, :k], axis=1).astype(np.int16)
    return RoutingTrace(token_ids=np.zeros(n_steps, np.int32), sequence_ids=np.zeros(n_steps, np.int32),
                        positions=np.arange(n_steps, dtype=np.int32), step_offsets=np.arange(n_steps + 1),
                        experts=[ids], weights=[np.ones(ids.shape, np.float32)], num_experts=[E], expert_bytes=[1])


def simulator_speed(n_steps: int, loop_steps: int, rounds: int) -> dict:
    """Layer-steps per second, by wall clock and by this process's CPU time (the machine is shared: the CPU-time
    rate is what the simulator does with the core it gets)."""
    trace = synthetic_trace(n_steps)
    prefix = synthetic_trace(loop_steps)
    vec, vec_cpu, loop, loop_cpu = [], [], [], []
    for _ in range(rounds):
        t0, c0 = time.perf_counter(), time.process_time()
        res = lru_sweep(demand(trace), [4])[0]  # includes turning the trace into per-step expert sets
        vec.append(n_steps / (time.perf_counter() - t0))
        vec_cpu.append(n_steps / (time.process_time() - c0))
        t0, c0 = time.perf_counter(), time.process_time()
        simulate_cache(prefix, 4, "lru", engine="loop")
        loop.append(loop_steps / (time.perf_counter() - t0))
        loop_cpu.append(loop_steps / (time.process_time() - c0))
    out = {"lru_vector_layer_steps_per_s": statistics.median(vec),
           "lru_vector_layer_steps_per_cpu_s": statistics.median(vec_cpu),
           "loop_layer_steps_per_s": statistics.median(loop), "loop_layer_steps_per_cpu_s": statistics.median(loop_cpu),
           "steps": n_steps, "lru_hit_rate": res.hit_rate}
    print(f"simulator: LRU vectorised {out['lru_vector_layer_steps_per_s'] / 1e6:.2f} M layer-steps/s wall, "
          f"{out['lru_vector_layer_steps_per_cpu_s'] / 1e6:.2f} M per CPU second, on a {n_steps:,}-step trace; "
          f"step-by-step engine {out['loop_layer_steps_per_s'] / 1e3:.0f} k/s wall, "
          f"{out['loop_layer_steps_per_cpu_s'] / 1e3:.0f} k per CPU second "
          f"(vectorised ×{out['lru_vector_layer_steps_per_cpu_s'] / out['loop_layer_steps_per_cpu_s']:.0f})",
          flush=True)
    return out


def markdown(rows: list[dict]) -> str:
    lines = ["| model | capacity | policy | hit rate | Belady bound | tokens/s vs resident | MB read / token |",
             "|---|---:|---|---:|---:|---:|---:|"]
    for r in rows:
        lines.append(f"| {r['model']} | {r['capacity']}/{r['experts']} | {r['policy']} | {r['hit_rate']:.3f} | "
                     f"{r['belady_hit_rate']:.3f} | ×{r['tokens_per_s_ratio']:.2f} | {r['mb_read_per_token']:.3f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--model", help="a trained routelab model folder instead of the seeded default model")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--skip-hf", action="store_true", help="leave out the Mixtral model")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    n_new, rounds = (16, 2) if args.quick else (48, 3)
    rows = []
    lm = routelab_model(args.model)
    rows += run_model("routelab", lm, routelab_generate, prompt_ids(lm.config.vocab_size, 16), n_new, rounds,
                      lm.config.num_experts)
    if not args.skip_hf:
        rows += run_model("mixtral", mixtral_model(), hf_generate, prompt_ids(1024, 16), n_new, rounds, 8)
    speed = simulator_speed(200_000 if args.quick else 1_000_000, 20_000 if args.quick else 100_000, 3)
    print()
    print(markdown(rows))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"rows": rows, "simulator": speed, "threads": args.threads}, indent=1) + "\n")
    print(f"\n→ {RESULTS}")


if __name__ == "__main__":
    main()
