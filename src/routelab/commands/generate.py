"""`routelab generate MODEL --prompt TEXT [--prompt ...]`: continue prompts with a model folder (batched, KV cache).

Greedy by default; `--temperature T` (> 0) samples, `--top-k K` restricts sampling to the K most likely tokens,
`--seed S` makes sampling repeatable. Generation stops at the tokenizer's end-of-text token or after
`--max-new-tokens` (default: 64, or what the model's max_seq_len leaves after the longest prompt).

`--offload --capacity N` runs with the routed experts on disk (`routelab.inference.offload_experts`): N experts per
MoE layer stay in memory, the rest load on demand by `--policy`; it reports tokens/s, bytes read and the hit rate.
"""

from __future__ import annotations

import argparse
import math
import sys

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
    off = parser.add_argument_group("expert offloading")
    off.add_argument("--offload", action="store_true", help="keep the routed experts on disk, N in memory per layer")
    off.add_argument("--capacity", type=int, help="experts held in memory per MoE layer (default: all of them)")
    off.add_argument("--policy", default="lru", help="eviction: lru, lfu or arc (default: %(default)s)")
    off.add_argument("--prefetch", action="store_true", help="load the next layer's predicted experts early "
                     "(Pre-gated MoE; exact for the pregate router)")
    off.add_argument("--store", metavar="DIR", help="an empty or new folder for the expert files (default: a "
                     "temporary folder, removed afterwards)")
    off.add_argument("--prefill-chunk", type=int, help="prompt slots per forward (default: the whole prompt when "
                     "every expert fits in memory, else 1, so a step needs at most k experts per prompt)")
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
    if not args.offload and (args.capacity is not None or args.store or args.prefetch or args.prefill_chunk):
        return fail("generate", "--capacity, --store, --prefetch and --prefill-chunk need --offload")
    if args.policy not in ("lru", "lfu", "arc"):
        return fail("generate", f"--policy must be one of lru, lfu, arc; got {args.policy!r}")
    if args.prefill_chunk is not None and args.prefill_chunk < 1:
        return fail("generate", f"--prefill-chunk must be an integer >= 1, got {args.prefill_chunk}")
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
    offload = None
    if args.offload:
        try:
            offload = _offload(args, model, len(prompts))
        except (ValueError, TypeError) as exc:
            return fail("generate", exc)
    import time

    start = time.perf_counter()
    try:
        out = generate(model, prompts, max_new_tokens=max_new, temperature=args.temperature, top_k=args.top_k,
                       seed=args.seed, eos_id=tokenizer.token_to_id(EOS),
                       prefill_chunk=None if offload is None else offload["prefill_chunk"])
    finally:
        seconds = time.perf_counter() - start
        if offload is not None and offload["temporary"]:
            offload["cleanup"]()
    for i, (text, tokens) in enumerate(zip(args.prompt, out.tokens)):
        if len(args.prompt) > 1:
            print(f"--- prompt {i + 1} ---")
        print(text + tokenizer.decode(tokens, skip_special_tokens=False))
    if offload is not None:
        t = offload["executor"].totals()
        n = sum(len(tokens) for tokens in out.tokens)
        where = "a temporary folder" if offload["temporary"] else offload["store"]
        print(f"offload: capacity {offload['capacity']}/{offload['experts']} experts per MoE layer ({args.policy}"
              f"{' + prefetch' if args.prefetch else ''}), {n} tokens in {seconds:.2f} s ({n / seconds:.1f} tokens/s), "
              f"hit rate {t['hit_rate']:.3f}, {t['bytes_read'] / 1e6:.2f} MB read from {where}, peak resident "
              f"experts {t['peak_resident_bytes'] / 1e6:.2f} MB", file=sys.stderr)
    return 0


def _offload(args: argparse.Namespace, model, num_prompts: int) -> dict:
    """Offload the model's experts as the flags say; checks the capacity against one decode step first."""
    import shutil
    import tempfile
    from pathlib import Path

    from routelab.inference.offload import offload_experts

    E = model.config.num_experts
    capacity = E if args.capacity is None else args.capacity
    if capacity < 1:
        raise ValueError(f"--capacity must be an integer >= 1, got {capacity}")
    ks = [int(getattr(layer.router, "k", 1)) for layer in model.moe_layers]
    need = min(E, num_prompts * max(ks))
    if capacity < need:
        raise ValueError(f"--capacity {capacity} is below the {need} experts one decode step of {num_prompts} "
                         f"prompt(s) may need at once (k={max(ks)} per token); use --capacity >= {need} or fewer "
                         "prompts")
    chunk = args.prefill_chunk or (None if capacity >= E else 1)
    temporary = args.store is None
    store = Path(tempfile.mkdtemp(prefix="routelab-experts-")) if temporary else Path(args.store)
    try:
        executor = offload_experts(model, store, capacity=capacity, policy=args.policy, prefetch=args.prefetch)
    except BaseException:
        if temporary:
            shutil.rmtree(store, ignore_errors=True)
        raise
    return {"executor": executor, "capacity": capacity, "experts": E, "store": store, "temporary": temporary,
            "prefill_chunk": chunk, "cleanup": lambda: shutil.rmtree(store, ignore_errors=True)}
