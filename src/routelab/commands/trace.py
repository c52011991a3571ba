"""`routelab trace`: record which experts every MoE layer of a saved model picks on some text."""

from __future__ import annotations

import argparse
from pathlib import Path

from routelab.commands import fail


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "trace",
        help="record a model's routing (experts and weights per MoE layer and token) on text files",
        description="Run a saved routelab model (a folder from routelab.save_model) over UTF-8 text files and write "
        "its routing trace: per MoE layer the experts and weights of every token, token ids, sequence boundaries, "
        "in decode order, plus each layer's pre-gated prediction of the next layer's experts (safetensors).",
    )
    parser.add_argument("model", metavar="MODEL", help="a routelab model folder")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE", help="UTF-8 text files")
    parser.add_argument("--out", required=True, metavar="TRACE", help="the trace file to write (.safetensors)")
    parser.add_argument("--seq-len", type=int, default=256, help="tokens per sequence (default: %(default)s)")
    parser.add_argument("--max-tokens", type=int, default=50_000, help="stop after this many tokens (default: "
                        "%(default)s)")
    parser.add_argument("--batch-size", type=int, default=1, help="sequences per forward, i.e. per trace step "
                        "(default: %(default)s)")
    parser.add_argument("--generate", type=int, default=0, metavar="N", help="instead of one forward per sequence, "
                        "use each sequence as a prompt and generate N tokens greedily (KV cache): the trace holds the "
                        "prefill step and then one step per new token, as served")
    parser.add_argument("--prefill-chunk", type=int, help="with --generate: prompt tokens per forward (default: the "
                        "whole prompt; 1 traces what `routelab generate --offload` runs below full capacity)")
    parser.add_argument("--no-predict", action="store_true", help="skip the next-layer predictions (one router "
                        "call less per layer)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    for name in ("seq_len", "max_tokens", "batch_size"):
        if getattr(args, name) < 1:
            return fail("trace", f"--{name.replace('_', '-')} must be >= 1, got {getattr(args, name)}")
    if args.generate < 0:
        return fail("trace", f"--generate must be >= 0, got {args.generate}")
    if args.prefill_chunk is not None and (args.prefill_chunk < 1 or not args.generate):
        return fail("trace", "--prefill-chunk needs --generate and must be >= 1")
    out = Path(args.out)
    problem = check_output_file(out)
    if problem:
        return fail("trace", problem)
    files = [Path(p) for p in args.data]
    for path in files:
        if not path.is_file():
            return fail("trace", f"--data: {path} is not a file")
    import torch

    from routelab.data.tokenizer import encode
    from routelab.inference.trace import record_trace, save_trace
    from routelab.models.io import ModelFolderError, load_model

    try:
        model, tokenizer = load_model(args.model)
    except ModelFolderError as exc:
        return fail("trace", exc)
    seq_len = min(args.seq_len, model.config.max_seq_len - args.generate)
    if seq_len < 1:
        return fail("trace", f"--generate {args.generate} leaves no room for a prompt in the model's max_seq_len="
                    f"{model.config.max_seq_len}")
    ids: list[int] = []
    for path in files:
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as exc:
            return fail("trace", f"--data: cannot read {path} as UTF-8 text ({exc})")
        ids += encode(tokenizer, text)
        if len(ids) >= args.max_tokens:
            break
    ids = ids[: args.max_tokens]
    if not ids:
        return fail("trace", "--data: the files hold no text to trace")
    sequences = [torch.tensor(ids[i : i + seq_len]) for i in range(0, len(ids), seq_len)]
    if args.generate:
        from routelab.inference.trace import TraceRecorder
        from routelab.models.decoding import generate, generation_problem

        problem = generation_problem(model)
        if problem is not None:
            return fail("trace", f"{args.model}: {problem}")
        with TraceRecorder(model, predict=not args.no_predict) as rec:
            for i in range(0, len(sequences), args.batch_size):
                rec.new_sequences()
                batch = [s.tolist() for s in sequences[i : i + args.batch_size]]
                generate(model, batch, max_new_tokens=args.generate, prefill_chunk=args.prefill_chunk)
        trace = rec.trace()
    else:
        trace = record_trace(model, sequences, batch_size=args.batch_size, predict=not args.no_predict)
    save_trace(trace, out)
    print(f"routelab trace: {trace.num_tokens} tokens, {trace.num_steps} steps, {trace.num_layers} MoE layers "
          f"({trace.num_experts[0]} experts each) → {out}")
    return 0


def check_output_file(path: Path) -> str | None:
    """Why `path` may not be written (a folder, or a file routelab did not write), or None."""
    if path.is_dir():
        return f"--out {path} is a folder; give a file name such as trace.safetensors"
    if path.exists():
        from routelab.inference.trace import TraceError, load_trace

        try:
            load_trace(path)
        except TraceError:
            return f"--out {path} exists and is not a routelab trace; refusing to overwrite it"
    return None
