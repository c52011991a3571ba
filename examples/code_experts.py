"""Worked example: find the experts most specific to code, then (a) silence them and (b) bias routing toward them,
and show each domain's perplexity change — the shape of the Large Language Lobotomy (L³) and multilingual-steering
experiments, on a model trained on the built-in corpus (domains prose and code).

    routelab train --preset small --out runs/small
    python examples/code_experts.py runs/small/model

Experts are picked on calibration windows and perplexity is measured on other windows of the held-out part of the
built-in corpus. As a control, the same number of the most prose-specific experts is silenced too.
"""

from __future__ import annotations

import argparse
import json

import torch

import routelab
from routelab.inference import override_routing
from routelab.inference.analysis import analyze
from routelab.inference.sweep import evaluate_routing
from routelab.inference.windows import text_windows


def specific_experts(shares: list[dict], domain: str, other: str, n: int) -> dict[int, list[int]]:
    """Per MoE layer, the n experts whose share of `domain`'s assignments most exceeds their share of `other`'s."""
    out = {}
    for layer in shares:
        diff = torch.tensor(layer["domain_share"][domain]) - torch.tensor(layer["domain_share"][other])
        out[layer["layer"]] = sorted(torch.argsort(diff, descending=True, stable=True)[:n].tolist())
    return out


def run(model, tokenizer, *, per_layer: int = 1, biases: tuple[float, ...] = (0.25, 1.0, 2.0), windows: int = 16) -> dict:
    seq_len = min(128, model.config.max_seq_len)
    data = text_windows(None, tokenizer, seq_len=seq_len, max_windows=windows)
    evaluation = {d: w[0] for d, w in data.items()}
    calibration = {d: w[1] for d, w in data.items()}
    layers = analyze(model, calibration, segment_lengths=(1,))["layers"]
    code = specific_experts(layers, "code", "prose", per_layer)
    prose = specific_experts(layers, "prose", "code", per_layer)
    E = model.config.num_experts
    results = {"code_experts": code, "prose_experts": prose, "settings": {}}
    results["settings"]["trained"] = evaluate_routing(model, evaluation)
    with override_routing(model, mask=code):
        results["settings"]["silence code experts"] = evaluate_routing(model, evaluation)
    for bias in biases:
        steer = {j: torch.zeros(E).index_fill_(0, torch.tensor(ids), bias) for j, ids in code.items()}
        with override_routing(model, logit_bias=steer):
            results["settings"][f"bias toward code experts +{bias}"] = evaluate_routing(model, evaluation)
    with override_routing(model, mask=prose):
        results["settings"]["silence prose experts (control)"] = evaluate_routing(model, evaluation)
    return results


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", help="a model folder trained on the built-in corpus")
    parser.add_argument("--per-layer", type=int, default=1, help="code experts per layer (default %(default)s)")
    parser.add_argument("--bias", default="0.25,1,2", help="logit biases toward them (default %(default)s)")
    parser.add_argument("--windows", type=int, default=16, help="windows per domain (default %(default)s)")
    parser.add_argument("--json", help="also write the results here")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    model, tokenizer = routelab.load_model(args.model)
    biases = tuple(float(b) for b in args.bias.split(","))
    results = run(model, tokenizer, per_layer=args.per_layer, biases=biases, windows=args.windows)
    print("code-specific experts per layer:", results["code_experts"])
    print("prose-specific experts per layer:", results["prose_experts"])
    base = results["settings"]["trained"]["ppl_by_domain"]
    print(f"\n| setting | ppl prose | ppl code | Δ prose | Δ code |\n|---|---:|---:|---:|---:|")
    for name, r in results["settings"].items():
        p, c = r["ppl_by_domain"]["prose"], r["ppl_by_domain"]["code"]
        print(f"| {name} | {p:.2f} | {c:.2f} | {p / base['prose'] - 1:+.1%} | {c / base['code'] - 1:+.1%} |")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
