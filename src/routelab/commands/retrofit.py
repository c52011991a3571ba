"""`routelab retrofit MODEL --budget B --out DIR`: Dr.LLM-style skip / execute / repeat routers for a trained model.

Searches, for each training window, the plan (per block: skip, execute or repeat) with the lowest continuation loss
under the block-run budget, trains one bottleneck MLP router per block on those plans with the base model frozen,
and evaluates on held-out windows (`routelab.inference.retrofit` says what is reconstructed). Writes into --out
(routelab._runs' rules): routers.safetensors + routers.json (the routers), retrofit.json (every number) and
report.md (the table).

Windows: each data file (default: the held-out validation part of the built-in corpus) is cut into windows of
--seq-len tokens; the odd-numbered windows search and train, the even-numbered ones evaluate (never the same text).
"""

from __future__ import annotations

import argparse
import math
import time
from pathlib import Path
from typing import Any

from routelab.commands import fail

OUTPUTS = ("routers.safetensors", "routers.json", "retrofit.json", "report.md")


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "retrofit",
        help="train Dr.LLM-style skip/execute/repeat block routers on a frozen model from searched plans under a "
        "compute budget",
        description="Search per-window layer plans (skip / execute / repeat each block) under a block-run budget, "
        "train a bottleneck MLP router per block on them (the model frozen), and report validation loss and compute "
        "of the full model, the searched plans (oracle), the routers and the best static plan.",
    )
    parser.add_argument("model", help="a model folder (routelab train → OUT/model, or save_model)")
    parser.add_argument("--budget", type=float, default=1.0,
                        help="block runs a plan may spend, as a fraction of n_layers, in (0, 2]: plans run at most "
                        "floor(budget · n_layers) blocks, a repeat counting 2 (default %(default)s)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one domain each (default: "
                        "the held-out validation part of the built-in corpus, domains prose and code)")
    parser.add_argument("--out", required=True, help="folder for the routers and the report: new, empty, or an "
                        "earlier `routelab retrofit` run (its files are replaced); see --overwrite")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not a routelab retrofit run (files of the same "
                        "names are replaced; nothing else is deleted)")
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: 128, or the model's max_seq_len "
                        "if less)")
    parser.add_argument("--prompt-len", type=int, help="prompt tokens the routers read; the loss is measured on the "
                        "rest of the window (default: a quarter of --seq-len)")
    parser.add_argument("--train-windows", type=int, default=128, help="search/training windows per domain "
                        "(default %(default)s)")
    parser.add_argument("--val-windows", type=int, default=64, help="validation windows per domain "
                        "(default %(default)s)")
    parser.add_argument("--pool-windows", type=int, default=4, help="windows the prompt is mean-pooled over "
                        "(Dr.LLM's windowed pooling; default %(default)s)")
    parser.add_argument("--hidden", type=int, help="router bottleneck width (default: d_model / 4, at least 4)")
    parser.add_argument("--gamma", type=float, default=2.0, help="focal loss γ (0: class-balanced cross-entropy; "
                        "default %(default)s)")
    parser.add_argument("--no-class-balance", action="store_true", help="plain focal loss, without Dr.LLM's "
                        "class-balancing weights (α_c ∝ 1 / count of action c)")
    parser.add_argument("--steps", type=int, default=100, help="router training steps, full batch "
                        "(default %(default)s)")
    parser.add_argument("--lr", type=float, default=3e-3, help="router learning rate (default %(default)s)")
    parser.add_argument("--max-plans", type=int, default=729, help="search every plan when the budget allows at "
                        "most this many, else a beam search (default %(default)s = 3^6: exhaustive up to 6 layers)")
    parser.add_argument("--beam", type=int, default=4, help="beam width of the search beyond --max-plans plans "
                        "(default %(default)s)")
    parser.add_argument("--seed", type=int, default=0, help="router initialisation seed (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=16, help="windows per forward (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    import torch

    import routelab
    from routelab._checks import check_number
    from routelab._runs import RunLayout, check_out, claim_out
    from routelab.data.corpus import DataError
    from routelab.inference.retrofit import retrofit, save_routers
    from routelab.inference.windows import text_windows

    for name in ("seq_len", "prompt_len", "train_windows", "val_windows", "pool_windows", "hidden", "steps",
                 "max_plans", "beam", "batch_size", "threads"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail("retrofit", f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    for flag, value, kw in (("--budget", args.budget, {"low": 0.0, "high": 2.0, "open_low": True}),
                            ("--gamma", args.gamma, {"low": 0.0}),
                            ("--lr", args.lr, {"low": 0.0, "open_low": True})):
        try:
            check_number(flag, value, **kw)
        except ValueError as exc:
            return fail("retrofit", exc)
    if args.seed < 0:
        return fail("retrofit", f"--seed must be an integer >= 0, got {args.seed}")
    layout = RunLayout("retrofit", {"": OUTPUTS})
    try:
        check_out(args.out, layout, overwrite=args.overwrite)
        model, tokenizer = routelab.load_model(args.model)
    except (ValueError, OSError) as exc:
        return fail("retrofit", exc)
    cfg = model.config
    seq_len = args.seq_len if args.seq_len is not None else min(128, cfg.max_seq_len)
    if seq_len > cfg.max_seq_len:
        return fail("retrofit", f"--seq-len {seq_len} exceeds the model's max_seq_len {cfg.max_seq_len}")
    if seq_len < 2:
        return fail("retrofit", f"--seq-len must leave a prompt and a continuation (>= 2 tokens), got {seq_len}")
    prompt_len = args.prompt_len if args.prompt_len is not None else max(1, seq_len // 4)
    if prompt_len >= seq_len:
        return fail("retrofit", f"--prompt-len {prompt_len} must be less than --seq-len {seq_len} (the loss is "
                    "measured on the tokens after the prompt)")
    if args.pool_windows > prompt_len:
        return fail("retrofit", f"--pool-windows {args.pool_windows} must be <= --prompt-len {prompt_len}")
    torch.set_num_threads(args.threads)
    try:
        domains = text_windows(args.data, tokenizer, seq_len=seq_len,
                               max_windows=max(args.train_windows, args.val_windows))
    except DataError as exc:
        return fail("retrofit", exc)
    val_ids = torch.cat([ev[: args.val_windows] for ev, _ in domains.values()])
    train_ids = torch.cat([cal[: args.train_windows] for _, cal in domains.values()])

    t0 = time.perf_counter()
    try:
        routers, report = retrofit(
            model, train_ids, val_ids, budget=args.budget, prompt_len=prompt_len, pool_windows=args.pool_windows,
            hidden=args.hidden, gamma=args.gamma, class_balance=not args.no_class_balance, steps=args.steps, lr=args.lr,
            batch_size=args.batch_size,
            seed=args.seed, max_plans=args.max_plans, beam=args.beam, log=print,
        )
    except ValueError as exc:  # a model retrofit cannot execute (a stateful router, depth options)
        return fail("retrofit", exc)
    report["wall_s"] = time.perf_counter() - t0
    report["model"] = str(args.model)
    report["domains"] = list(domains)
    try:
        claim_out(args.out, layout, resume=False, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        return fail("retrofit", exc)
    out = Path(args.out)
    save_routers(routers, out)
    write_report(report, out)
    print_table(report)
    print(f"report: {out}/report.md")
    return 0


ROW_NAMES = {
    "full": "full model (every block once)",
    "static": "best static plan {plan} (one plan for every window, chosen on the training windows)",
    "routers": "routers (decided from the prompt)",
    "oracle": "searched plan per window (oracle: chosen on the judged tokens)",
}


def _ppl(row: dict[str, Any]) -> str:
    return f"{row['perplexity']:.2f}" if math.isfinite(row["perplexity"]) else "inf"


def print_table(report: dict[str, Any]) -> None:
    print(f"{'':<10} {'val loss':>9} {'ppl':>9} {'block runs':>10} {'expert FLOPs':>12}")
    for name in ROW_NAMES:
        r = report["rows"][name]
        print(f"{name:<10} {r['loss']:>9.4f} {_ppl(r):>9} {r['block_runs_fraction']:>10.3f} "
              f"{r['expert_flops_fraction']:>12.3f}")


def write_report(report: dict[str, Any], out: Path) -> None:
    """retrofit.json and report.md, atomically."""
    import json

    from routelab._atomic import atomic_write_text
    from routelab.compare.runner import json_safe
    from routelab.inference.retrofit import ACTIONS

    n = report["n_layers"]
    rows = report["rows"]
    searched = (f"all {report['plans_searched']} plans searched" if report["search"] == "exhaustive"
                else f"plans found by a {report['search']} search (see inference/retrofit.py)")
    lines = [
        f"# routelab retrofit {report['model']}", "",
        (f"Budget {report['budget']}: a plan runs at most {report['max_block_runs']} of {n} block runs (a repeat "
        f"counts 2); {searched}. {report['train_windows']} training and "
        f"{report['val_windows']} validation windows of {report['seq_len']} tokens; the routers read the first "
        f"{report['prompt_len']} tokens (mean-pooled over {report['routers']['pool_windows']} windows) and every loss "
        f"is measured on the {report['continuation_tokens_per_window']} tokens after them."), "",
        "| plans | val loss | val ppl | block runs / token (× full) | routed-expert FLOPs / token (× full) |",
        "|---|---:|---:|---:|---:|",
    ]
    for name, label in ROW_NAMES.items():
        r = rows[name]
        label = label.format(plan=tuple(r["plan"])) if name == "static" else label
        lines.append(f"| {label} | {r['loss']:.4f} | {_ppl(r)} | {r['block_runs_fraction']:.3f} | "
                     f"{r['expert_flops_fraction']:.3f} |")
    lines += [
        "", f"Routers' plans equal the oracle's on {rows['routers']['plan_matches_oracle']:.1%} of validation windows.",
        "", "| block | router accuracy (val) | majority-class accuracy | router accuracy (train) | oracle "
        + " / ".join(ACTIONS) + " | routers " + " / ".join(ACTIONS) + " |",
        "|---:|---:|---:|---:|---|---|",
    ]
    for i in range(n):
        oracle = " / ".join(f"{s:.2f}" for s in rows["oracle"]["action_shares_by_block"][i])
        routed = " / ".join(f"{s:.2f}" for s in rows["routers"]["action_shares_by_block"][i])
        lines.append(f"| {i} | {report['router_accuracy_by_block'][i]:.3f} | "
                     f"{report['majority_accuracy_by_block'][i]:.3f} | {report['router_train_accuracy_by_block'][i]:.3f}"
                     f" | {oracle} | {routed} |")
    lines += [
        "", ("- **block runs / token**: blocks run per token (skip 0, execute 1, repeat 2) over n_layers; "
        "**routed-expert FLOPs**: every MoE run's assignments weighted by expert width, over the full model's; router "
        "FLOPs are not counted."),
        ("- **router accuracy**: each block's router against the validation windows' searched action, on the hidden "
        "states of the searched plan (teacher forcing); the routers are trained with a class-balanced focal loss, "
        "so they trade majority-class accuracy for the rarer actions."),
        (f"- Wall time {report['wall_s']:.1f} s (search {report['timings_s']['search_s']:.1f} s, router training "
        f"{report['timings_s']['train_s']:.1f} s, evaluation {report['timings_s']['evaluate_s']:.1f} s)."), "",
    ]
    atomic_write_text(out / "retrofit.json", json.dumps(json_safe(report), indent=1) + "\n")
    atomic_write_text(out / "report.md", "\n".join(lines))
