"""`routelab generate MODEL --prompt TEXT [--prompt ...]`: continue prompts with a model folder (batched, KV cache).

Greedy by default; `--temperature T` (> 0) samples, `--top-k K` restricts sampling to the K most likely tokens,
`--seed S` makes sampling repeatable. Generation stops at the tokenizer's end-of-text token or after
`--max-new-tokens` (default: 64, or what the model's max_seq_len leaves after the longest prompt).
"""

from __future__ import annotations

import argparse
import math

from routelab.commands import fail

DEFAULT_NEW_TOKENS = 64
EOS = "<|endoftext|>"


def register(commands: argparse._SubParsersAction) -> None:
    parser = commands.add_parser(
        "generate",
        help="continue one or more prompts with a model folder (greedy, or sampling with temperature/top-k)",
        description="Generate continuations of prompts (batched, with a KV cache) from a model folder.",
    )
    parser.add_argument("model", metavar="MODEL", help="model folder (config.json, model.safetensors, tokenizer.json)")
    parser.add_argument("--prompt", action="append", required=True, metavar="TEXT",
                        help="a prompt; repeat for several (generated together as one batch)")
    parser.add_argument("--max-new-tokens", type=int,
                        help=f"tokens to add per prompt (default: {DEFAULT_NEW_TOKENS}, or what max_seq_len leaves)")
    parser.add_argument("--temperature", type=float, default=0.0,
                        help="0 is greedy; > 0 samples from softmax(logits / T) (default: %(default)s)")
    parser.add_argument("--top-k", type=int, help="sample only from the K most likely tokens")
    parser.add_argument("--seed", type=int, help="seed of the sampling")
    parser.add_argument("--threads", type=int, default=1, help="torch threads (default: %(default)s)")
    parser.set_defaults(run=run)


def run(args: argparse.Namespace) -> int:
    from routelab.models.io import ModelFolderError, load_model, read_model_config

    if args.max_new_tokens is not None and args.max_new_tokens < 1:
        return fail("generate", f"--max-new-tokens must be an integer >= 1, got {args.max_new_tokens}")
    if not math.isfinite(args.temperature) or args.temperature < 0:
        return fail("generate", f"--temperature must be a number >= 0 (0: greedy), got {args.temperature}")
    if args.top_k is not None and args.top_k < 1:
        return fail("generate", f"--top-k must be an integer >= 1, got {args.top_k}")
    if args.seed is not None and args.seed < 0:
        return fail("generate", f"--seed must be an integer >= 0, got {args.seed}")
    if args.threads < 1:
        return fail("generate", f"--threads must be an integer >= 1, got {args.threads}")
    try:
        config, _ = read_model_config(args.model)
        if args.top_k is not None and args.top_k > config.vocab_size:
            return fail("generate", f"--top-k must be at most the vocabulary size {config.vocab_size}, got {args.top_k}")
        model, tokenizer = load_model(args.model)
    except ModelFolderError as exc:
        return fail("generate", exc)

    import torch

    from routelab.data.tokenizer import encode
    from routelab.models.decoding import generate, generation_problem

    torch.set_num_threads(args.threads)
    problem = generation_problem(model)
    if problem is not None:
        return fail("generate", f"{args.model}: {problem}")
    prompts = [encode(tokenizer, text) for text in args.prompt]
    for i, ids in enumerate(prompts):
        if not ids:
            return fail("generate", f"--prompt {i + 1} is empty: give at least one character to continue")
        if len(ids) >= config.max_seq_len:
            return fail("generate", f"--prompt {i + 1} is {len(ids)} tokens; the model's max_seq_len is "
                        f"{config.max_seq_len}, which leaves no room for a new token")
    room = config.max_seq_len - max(len(ids) for ids in prompts)
    if args.max_new_tokens is not None and args.max_new_tokens > room:
        return fail("generate", f"--max-new-tokens {args.max_new_tokens} does not fit: the longest prompt leaves "
                    f"{room} of the model's max_seq_len={config.max_seq_len} tokens")
    max_new = args.max_new_tokens or min(DEFAULT_NEW_TOKENS, room)
    out = generate(model, prompts, max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k,
                   seed=args.seed, eos_id=tokenizer.token_to_id(EOS))
    for i, (text, tokens) in enumerate(zip(args.prompt, out.tokens)):
        if len(args.prompt) > 1:
            print(f"--- prompt {i + 1} ---")
        print(text + tokenizer.decode(tokens, skip_special_tokens=False))
    return 0
