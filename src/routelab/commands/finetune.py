"""`routelab finetune`: fine-tune a trained model on new text with each routed-LoRA method (and plain LoRA),
same budget and seed, reported side by side."""

from __future__ import annotations

import argparse

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "finetune",
        help="fine-tune a model folder on new text with each routed-LoRA method and plain LoRA; report side by side",
        description="Fine-tune a trained model (a folder from `routelab train`) on new text once per routed-LoRA "
        "method, plus plain LoRA with about the same trainable parameters, with the same seed, batches and steps, "
        "and write a report folder (report.md, results.json, plots, each variant's adapters).",
    )
    parser.add_argument("model", help="model folder (e.g. runs/prose/model from `routelab train`)")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="the new domain: UTF-8 text files, or builtin:prose / builtin:code")
    parser.add_argument("--method", default="molora,hydra,smora,flylora,remix,mhr",
                        help="routed methods, comma-separated (default: %(default)s); plain LoRA always runs too")
    parser.add_argument("--out", required=True, help="report folder")
    parser.add_argument("--r", type=int, default=8, help="rank of one LoRA expert (default: %(default)s)")
    parser.add_argument("--experts", type=int, default=8, help="LoRA experts per layer (default: %(default)s)")
    parser.add_argument("--k", type=int, default=2, help="experts per token (default: %(default)s)")
    parser.add_argument("--original", nargs="+", metavar="FILE", help="the model's original domain for the "
                        "forgetting column (default: what its training.json records)")
    parser.add_argument("--target", nargs="+", metavar="NAME", help="linear layers to wrap (default: qkv proj "
                        "gate_up down)")
    parser.add_argument("--steps", type=int, default=100, help="fine-tuning steps per variant (default: %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--seq-len", type=int, help="tokens per sequence (default: 64, or the model's max_seq_len "
                        "when shorter)")
    parser.add_argument("--lr", type=float, default=3e-3)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--max-chars", type=int, default=200_000, help="characters per new domain (default: "
                        "%(default)s)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    """Validate the arguments before any work; errors print one line and exit 2."""
    from pathlib import Path

    import torch

    from routelab.data.corpus import DataError

    methods = [m.strip() for m in args.method.split(",") if m.strip()]
    for name in ("steps", "batch_size", "r", "experts", "k", "threads", "max_chars"):
        if getattr(args, name) < 1:
            return fail("finetune", f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.seq_len is not None and args.seq_len < 1:
        return fail("finetune", f"--seq-len must be >= 1, got {args.seq_len}")
    if not args.lr > 0:
        return fail("finetune", f"--lr must be > 0, got {args.lr}")
    if args.k > args.experts:
        return fail("finetune", f"--k must be at most --experts={args.experts}, got {args.k}")
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        return fail("finetune", f"--out {out} is a file; give a folder")
    if out.is_dir() and any(out.iterdir()) and not (out / "results.json").is_file():
        return fail("finetune", f"--out {out} is a non-empty folder that is not a finetune report; give a new or "
                    "empty folder")
    from routelab.adapters.finetune import run_finetune
    from routelab.models.io import ModelFolderError

    previous = torch.get_num_threads()
    torch.set_num_threads(args.threads)
    try:
        summary = run_finetune(args.model, data=args.data, methods=methods, out_dir=out, r=args.r,
                               experts=args.experts, k=args.k, original=args.original, target_modules=args.target,
                               steps=args.steps, batch_size=args.batch_size, seq_len=args.seq_len, lr=args.lr,
                               seed=args.seed, max_chars=args.max_chars, quiet=args.quiet)
    except (ModelFolderError, DataError, ValueError) as exc:
        return fail("finetune", exc)
    finally:
        torch.set_num_threads(previous)
    print(f"report: {out}/report.md ({summary['wall_seconds']:.0f} s)")
    return 0
