"""`routelab analyze`: how a trained model routes text — per layer, per domain, local consistency (SRP/SCH)."""

from __future__ import annotations

import argparse
from pathlib import Path

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "analyze",
        help="read a model's routing on text: load, entropy, congestion, per-domain shares and similarity, SRP/SCH",
        description="Run a model folder on text files (one domain each) and write report.md, analysis.json and PNG "
        "plots: per MoE layer the load, routing entropy, imbalance and congestion; each domain's expert shares and "
        "the cross-domain routing similarity; local routing consistency (SRP, SCH); each expert's most frequent "
        "tokens.",
    )
    parser.add_argument("model", help="a model folder (routelab train / save_model)")
    parser.add_argument("--data", nargs="+", metavar="FILE", help="UTF-8 text files, one domain each (default: "
                        "the held-out validation part of the built-in corpus, domains prose and code)")
    parser.add_argument("--out", required=True, help="report folder: new, empty, or an earlier `routelab analyze` "
                        "report (its files are replaced); another non-empty folder is refused (see --overwrite)")
    parser.add_argument("--overwrite", action="store_true",
                        help="write into a non-empty --out that is not a routelab analyze run (files of the same "
                        "names are replaced; nothing else is deleted)")
    add_window_options(parser)
    parser.add_argument("--segment-lengths", default="1,4,16,64", help="SRP/SCH segment lengths m (default %(default)s)")
    parser.add_argument("--cache-size", type=int, help="SCH cache size per layer (default: 2 × experts per token)")
    parser.set_defaults(run=run)


def add_window_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--seq-len", type=int, help="tokens per window (default: 128, or the model's max_seq_len if less)")
    parser.add_argument("--windows", type=int, default=16, help="windows per domain (default %(default)s)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default %(default)s)")


def load_inputs(command: str, args: argparse.Namespace, outputs: tuple[str, ...]):
    """(model, tokenizer, {domain: (eval, calibration)}, layout) after validating every argument (--out by
    routelab._runs' rules: nothing is written yet), or an exit code."""
    import torch

    import routelab
    from routelab._runs import RunLayout, check_out
    from routelab.data.corpus import DataError
    from routelab.inference.windows import text_windows

    for name in ("seq_len", "windows", "batch_size", "threads"):
        if getattr(args, name) is not None and getattr(args, name) < 1:
            return fail(command, f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    layout = RunLayout(command, {"": outputs})
    try:
        check_out(args.out, layout, overwrite=args.overwrite)
        model, tokenizer = routelab.load_model(args.model)
    except (ValueError, OSError) as exc:
        return fail(command, exc)
    if args.seq_len is None:
        args.seq_len = min(128, model.config.max_seq_len)
    if args.seq_len > model.config.max_seq_len:
        return fail(command, f"--seq-len {args.seq_len} exceeds the model's max_seq_len {model.config.max_seq_len}")
    torch.set_num_threads(args.threads)
    try:
        domains = text_windows(args.data, tokenizer, seq_len=args.seq_len, max_windows=args.windows)
    except DataError as exc:
        return fail(command, exc)
    return model, tokenizer, domains, layout


def claim(command: str, args: argparse.Namespace, layout) -> Path | int:
    """Claim --out (marker; an earlier report's files removed) just before writing; the folder, or an exit code."""
    from routelab._runs import claim_out

    try:
        claim_out(args.out, layout, resume=False, overwrite=args.overwrite)
    except (ValueError, OSError) as exc:
        return fail(command, exc)
    return Path(args.out)


def parse_list(flag: str, text: str | None, kind: type) -> list:
    """Comma-separated numbers; a ValueError naming the flag otherwise."""
    if text is None:
        return []
    try:
        return [kind(item) for item in text.split(",") if item.strip()]
    except ValueError:
        raise ValueError(f"{flag} must be comma-separated {'integers' if kind is int else 'numbers'}, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        ms = parse_list("--segment-lengths", args.segment_lengths, int)
    except ValueError as exc:
        return fail("analyze", exc)
    if not ms or any(m < 1 for m in ms):
        return fail("analyze", f"--segment-lengths must be integers >= 1, got {args.segment_lengths!r}")
    if args.cache_size is not None and args.cache_size < 1:
        return fail("analyze", f"--cache-size must be >= 1, got {args.cache_size}")
    from routelab.inference.analysis import OUTPUTS, analyze, write_analysis

    loaded = load_inputs("analyze", args, OUTPUTS)
    if isinstance(loaded, int):
        return loaded
    model, tokenizer, domains, layout = loaded
    result = analyze(model, {d: w[0] for d, w in domains.items()}, tokenizer=tokenizer, batch_size=args.batch_size,
                     segment_lengths=ms, cache_size=args.cache_size)
    result["model"] = str(args.model)
    out = claim("analyze", args, layout)
    if isinstance(out, int):
        return out
    write_analysis(result, out, title=f"routelab analyze {args.model}")
    print(f"report: {out}/report.md")
    return 0
