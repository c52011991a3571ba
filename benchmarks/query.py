"""Routing decisions per second of every query router on 10,000 prompts, with the prompt encoder timed apart.

    python benchmarks/query.py            # JSON to benchmarks/results/query.json
    python benchmarks/query.py --quick    # 3 rounds instead of 7

Routers are fitted on LLMRouter's dcrouter training file (9 models) when ../shared/data/requests is present, else on
a synthetic 3-model table. The 10,000 prompts are test prompts repeated with a distinct suffix each, so that no
encoder cache can answer them. Encoders (tf-idf + SVD, WordLlama) are timed on the 10,000 prompts from scratch
(cache cleared each round). A decision = predicted scores from the embedding + the knob's argmax, i.e.
`router.route(prompts, willingness_to_pay=λ, scores_NM=router.predict(prompts, x_ND=x))` with x precomputed.

Every router is timed in the same process, interleaved round-robin (order rotated each round); the table gives the
median decisions/s over rounds and the median ratio to the knn router timed in the same round (cancels drifts in
machine load). One BLAS and one torch thread (the machine this was developed on is shared by many jobs).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path


ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))
sys.path.insert(0, str(ROOT / "tests"))
REQUESTS = ROOT.parent / "shared" / "data" / "requests"
N_PROMPTS = 10_000


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--output", default=str(ROOT / "benchmarks" / "results" / "query.json"))
    args = parser.parse_args()
    import torch
    from threadpoolctl import threadpool_limits

    from routelab.query import create_router, list_routers, load_outcomes
    from routelab.query.encoders import create_encoder

    torch.set_num_threads(1)
    threadpool_limits(1)
    rounds = 3 if args.quick else 7
    if (REQUESTS / "llmrouter-dcrouter" / "train.json").is_file():
        train = load_outcomes(REQUESTS / "llmrouter-dcrouter" / "train.json")
        test = load_outcomes(REQUESTS / "llmrouter-dcrouter" / "test.json")
        source = "llmrouter-dcrouter (9 models)"
    else:
        from query_cases import three_model_table

        train, test = three_model_table(2000, 0), three_model_table(500, 1)
        source = "synthetic 3-model table"
    prompts = [f"{test.prompts[i % test.num_prompts]} [{i}]" for i in range(N_PROMPTS)]

    encoders = {"tfidf": create_encoder("tfidf").fit(train.prompts), "wordllama": create_encoder("wordllama")}
    enc_times: dict[str, list[float]] = {name: [] for name in encoders}
    for _ in range(rounds):
        for name, enc in encoders.items():
            t0 = time.perf_counter()
            enc.encode_uncached(prompts)
            enc_times[name].append(time.perf_counter() - t0)
    x = encoders["tfidf"].encode_uncached(prompts)

    routers = {}
    for name in list_routers():
        r = create_router(name)
        r.fit(train, encoder=encoders["tfidf"] if r.uses_encoder else None)
        if r.needs_test_labels:
            continue  # the oracle reads test labels: not a deployable decision
        routers[name] = r
    knob = {n: ({"threshold": 0.5} if r.knob_name == "threshold" else {"willingness_to_pay": 1000.0})
            for n, r in routers.items()}
    times: dict[str, list[float]] = {n: [] for n in routers}
    ratios: dict[str, list[float]] = {n: [] for n in routers}
    names = list(routers)
    for rnd in range(rounds):
        order = names[rnd % len(names):] + names[: rnd % len(names)]
        this = {}
        for n in order:
            r = routers[n]
            t0 = time.perf_counter()
            r.route(prompts, scores_NM=r.predict(prompts, x_ND=x if r.uses_encoder else None), **knob[n])
            this[n] = time.perf_counter() - t0
        for n in names:
            times[n].append(this[n])
            ratios[n].append(this["knn"] / this[n])
    result = {"data": source, "prompts": N_PROMPTS, "rounds": rounds,
              "encoders": {n: {"prompts_per_s": N_PROMPTS / statistics.median(t)} for n, t in enc_times.items()},
              "routers": {n: {"decisions_per_s": N_PROMPTS / statistics.median(times[n]),
                              "speed_vs_knn": statistics.median(ratios[n])} for n in names}}
    print(f"data: {source}; {N_PROMPTS} prompts; median of {rounds} interleaved rounds; 1 thread; shared machine")
    print(f"{'encoder':<12} {'prompts/s':>12}")
    for n, v in result["encoders"].items():
        print(f"{n:<12} {v['prompts_per_s']:>12,.0f}")
    print(f"\n{'router':<12} {'decisions/s':>12} {'x knn':>8}")
    for n, v in sorted(result["routers"].items(), key=lambda kv: -kv[1]["decisions_per_s"]):
        print(f"{n:<12} {v['decisions_per_s']:>12,.0f} {v['speed_vs_knn']:>8.2f}")
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
