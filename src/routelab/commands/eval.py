"""`routelab eval MODEL --data FILES...`: perplexity, loss and routing statistics of a model folder, per file.

Each file is one domain. Its text is encoded with the model's tokenizer and cut into consecutive windows of
`--seq-len` + 1 tokens (default: the model's max_seq_len), each overlapping the next by one token so that every
token but the first is predicted exactly once; a tail shorter than a window is left out (a file shorter than one
window is one shorter window). The forwards are compare's evaluation (`train.loop.evaluate`): mean next-token
cross-entropy over the windows' targets, mean experts per token and expert load per MoE layer. Load imbalance per
layer is max/mean of that layer's expert load summed over the file.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Any

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "eval",
        help="perplexity, loss, experts per token and load imbalance of a model folder, per data file",
        description="Evaluate a model folder (from routelab train, compare, or save_model) on text files, each one "
        "domain: perplexity and loss, mean experts per token, load imbalance per MoE layer.",
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files, one domain each")
    parser.add_argument("--json", metavar="OUT", help="write every number to this JSON file")
    parser.add_argument("--seq-len", type=int, help="window length (default: the model's max_seq_len)")
    parser.add_argument("--max-windows", type=int, help="at most this many windows per file (default: all)")
    parser.add_argument("--batch-size", type=int, default=8, help="windows per forward (default: %(default)s)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routelab.data.corpus import DataError, file_corpus
    from routelab.models.io import ModelFolderError, load_model, read_model_config

    for name in ("seq_len", "max_windows"):
        value = getattr(args, name)
        if value is not None and value < 1:
            return fail("eval", f"--{name.replace('_', '-')} must be an integer >= 1, got {value}")
    if args.batch_size < 1 or args.threads < 1:
        return fail("eval", "--batch-size and --threads must be integers >= 1")
    json_out = None if args.json is None else Path(args.json)
    if json_out is not None and (json_out.is_dir() or json_out.is_symlink()):
        return fail("eval", f"--json {json_out} must be a file path (it is a folder or a link)")
    try:
        config, _ = read_model_config(args.model)
        if args.seq_len is not None and args.seq_len > config.max_seq_len:
            return fail("eval", f"--seq-len {args.seq_len} exceeds the model's max_seq_len={config.max_seq_len}")
        domains = file_corpus(args.data)  # missing, unreadable, non-UTF-8 or empty files fail here
        model, tokenizer = load_model(args.model)
    except (ModelFolderError, DataError) as exc:
        return fail("eval", exc)

    import torch

    torch.set_num_threads(args.threads)
    seq_len = args.seq_len or config.max_seq_len
    results = []
    for domain in domains:
        try:
            inputs, targets = windows(tokenizer, domain.text, seq_len=seq_len, max_windows=args.max_windows)
        except ValueError as exc:
            return fail("eval", f"{domain.source}: {exc}")
        results.append({"file": domain.source, "name": domain.name,
                        **evaluate_windows(model, inputs, targets, batch_size=args.batch_size, name=domain.name)})
    report = {"model": str(args.model), "seq_len": seq_len, "router": config.router, "causal": model.causal,
              "files": results}
    print_table(results)
    if json_out is not None:
        import json

        from routelab._atomic import atomic_write_text
        from routelab.compare.runner import json_safe

        atomic_write_text(json_out, json.dumps(json_safe(report), indent=1) + "\n")
        print(f"wrote {json_out}", file=sys.stderr)
    return 0


def windows(tokenizer: Any, text: str, *, seq_len: int, max_windows: int | None = None):
    """(inputs, targets), LongTensors [N, L]: consecutive windows of the encoded text (see the module docstring)."""
    import torch

    from routelab.data.tokenizer import encode

    ids = torch.tensor(encode(tokenizer, text), dtype=torch.long)
    if ids.numel() < 2:
        raise ValueError(f"the text encodes to {ids.numel()} token(s); at least 2 are needed to predict one")
    n = max(1, (ids.numel() - 1) // seq_len)
    if max_windows is not None:
        n = min(n, max_windows)
    L = min(seq_len, ids.numel() - 1)
    block = torch.stack([ids[i * L : i * L + L + 1] for i in range(n)])
    return block[:, :-1], block[:, 1:]


def evaluate_windows(model, inputs, targets, *, batch_size: int, name: str = "data") -> dict[str, Any]:
    """Loss, perplexity, tokens, experts per token (mean and per layer), load and imbalance per layer."""
    from routelab.train.loop import evaluate

    ev = evaluate(model, [(name, inputs, targets)], batch_size=batch_size, stats=True)
    load = ev["load"]
    imbalance = [max(layer) / (sum(layer) / len(layer)) if sum(layer) > 0 else float("nan") for layer in load]
    ept = ev["experts_per_token_by_layer"]
    return {
        "tokens": targets.numel(),
        "windows": inputs.shape[0],
        "loss": ev["val_loss"],
        "perplexity": math.exp(ev["val_loss"]) if ev["val_loss"] < 700 else float("inf"),
        "experts_per_token": sum(ept) / len(ept),
        "experts_per_token_by_layer": ept,
        "imbalance_max_over_mean_by_layer": imbalance,
        "load_by_layer": load,
        "dropped_fraction": ev["dropped_fraction"],
    }


def print_table(results: list[dict[str, Any]]) -> None:
    head = f"{'file':<32} {'tokens':>9} {'loss':>7} {'ppl':>9} {'exp/tok':>7}  imbalance max/mean per layer"
    print(head)
    for r in results:
        name = r["file"] if len(r["file"]) <= 32 else "…" + r["file"][-31:]
        layers = " ".join(f"{v:.2f}" for v in r["imbalance_max_over_mean_by_layer"])
        print(f"{name:<32} {r['tokens']:>9,} {r['loss']:>7.3f} {r['perplexity']:>9.2f} "
              f"{r['experts_per_token']:>7.2f}  {layers}")
