"""Batched autoregressive generation with the decode cache: greedy, temperature and top-k sampling.

Shape legend: B prompts, P longest prompt, N new tokens, V vocabulary.

Prompts of different lengths are left-padded into one batch; padding is never attended to nor routed and does not
move a row's rotary positions (`DecodeCache`), so each row's tokens are those it would get alone. Every step feeds
only the newest token of each row through the model: attention reads the cached keys/values, and routers whose
routing reads earlier tokens read them from their `RouterCache`. Routers that are not causal at inference
(expert choice, similarity with causal=False, top-k with a capacity) are refused: a token's experts would depend on
tokens that do not exist yet. Mixture-of-Depths blocks (`mod_capacity`) decode with their causal predictor (the model
runs in eval mode), the cache hiding each block's skipped slots from later tokens.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from torch import Tensor

from routelab._checks import check_int, check_number
from routelab.models.transformer import MoETransformerLM


@dataclass(frozen=True)
class Generation:
    """tokens: the new tokens of each prompt (stopping before `eos_id`); logits: [B, N, V] fp32, the logits each
    step's token was chosen from (only with keep_logits=True; rows past their eos keep running)."""

    tokens: list[list[int]]
    logits: Tensor | None = None


def generation_problem(model: MoETransformerLM) -> str | None:
    """Why `model` cannot generate token by token (in eval mode), or None when it can."""
    reasons = []
    for i, layer in enumerate(model.moe_layers):
        router = layer.router
        was = router.training
        router.eval()  # causality is judged at inference (sinkhorn's transport branch is training-only)
        causal = bool(router.causal)
        router.train(was)
        if not causal:
            reasons.append(f"MoE layer {i} ({type(router).registry_name})")
    timed = [f"MoE layer {i} ({type(layer.router).registry_name})" for i, layer in enumerate(model.moe_layers)
             if layer.router.needs_timestep]
    if timed:
        return (f"the model's routers need a diffusion timestep ({', '.join(timed)}), which an autoregressive model "
                "does not have: train them in a diffusion model (routelab.models.diffusion_lm)")
    if not reasons:
        return None
    return (
        f"the model's routers are not causal at inference ({', '.join(reasons)}): each token's experts depend on "
        "later tokens of its sequence or batch, so the model cannot generate one token at a time"
    )


@torch.no_grad()
def generate(
    model: MoETransformerLM,
    prompts: Sequence[Sequence[int]],
    *,
    max_new_tokens: int,
    temperature: float = 0.0,
    top_k: int | None = None,
    seed: int | None = None,
    eos_id: int | None = None,
    keep_logits: bool = False,
    prefill_chunk: int | None = None,
) -> Generation:
    """Continue each prompt (a list of token ids) by up to `max_new_tokens` tokens.

    prefill_chunk: feed the prompts this many slots per forward (None: all at once). Smaller chunks bound what one
    forward needs at once (e.g. the experts an offloaded model must hold together, `inference/offload.py`).

    temperature 0 is greedy (argmax, first index on ties); above 0, samples from softmax(logits / temperature),
    restricted to the `top_k` most likely tokens when given, from a generator seeded with `seed` (None: the global
    RNG). The model runs in eval mode and is put back in its previous mode afterwards.
    """
    if not isinstance(model, MoETransformerLM):
        raise TypeError(f"generate expects a routelab MoETransformerLM, got {type(model).__name__}")
    cfg = model.config
    check_int("max_new_tokens", max_new_tokens, 1)
    check_number("temperature", temperature, low=0)
    if top_k is not None:
        check_int("top_k", top_k, 1, cfg.vocab_size)
    if seed is not None:
        check_int("seed", seed, 0)
    if eos_id is not None:
        check_int("eos_id", eos_id, 0, cfg.vocab_size - 1)
    if prefill_chunk is not None:
        check_int("prefill_chunk", prefill_chunk, 1)
    if isinstance(prompts, (str, bytes)) or not isinstance(prompts, Sequence) or not prompts:
        raise ValueError("prompts must be a non-empty list of token-id lists")
    rows = []
    for i, prompt in enumerate(prompts):
        ids = [int(t) for t in prompt]
        if not ids:
            raise ValueError(f"prompt {i} is empty: generation needs at least one token to continue")
        if min(ids) < 0 or max(ids) >= cfg.vocab_size:
            raise ValueError(f"prompt {i} has token ids outside [0, vocab_size={cfg.vocab_size})")
        if len(ids) + max_new_tokens > cfg.max_seq_len:
            raise ValueError(
                f"prompt {i} has {len(ids)} tokens; with max_new_tokens={max_new_tokens} that exceeds the model's "
                f"max_seq_len={cfg.max_seq_len}"
            )
        rows.append(ids)
    problem = generation_problem(model)
    if problem is not None:
        raise ValueError(problem)

    was_training = model.training
    model.eval()
    try:
        return _decode(model, rows, max_new_tokens, temperature, top_k, seed, eos_id, keep_logits, prefill_chunk)
    finally:
        model.train(was_training)


def _decode(model, rows, max_new_tokens, temperature, top_k, seed, eos_id, keep_logits, prefill_chunk) -> Generation:
    device = model.embed.weight.device
    B, P = len(rows), max(len(r) for r in rows)
    ids_BP = torch.zeros(B, P, dtype=torch.long)
    pad_BP = torch.ones(B, P, dtype=torch.bool)
    for b, r in enumerate(rows):
        ids_BP[b, P - len(r) :] = torch.tensor(r)
        pad_BP[b, P - len(r) :] = False
    ids_BP, pad_BP = ids_BP.to(device), pad_BP.to(device)
    generator = None
    if seed is not None and temperature > 0:
        generator = torch.Generator(device=device).manual_seed(seed)

    cache = model.new_cache(B, P + max_new_tokens - 1)  # the last token is chosen, never fed
    chunk = P if prefill_chunk is None else prefill_chunk
    padded = bool(pad_BP.any())
    for s0 in range(0, P, chunk):
        pad = pad_BP[:, s0 : s0 + chunk] if padded else None
        logits_BLV, _ = model(ids_BP[:, s0 : s0 + chunk], cache=cache, padding_mask=pad)
    next_BV = logits_BLV[:, -1].float()
    chosen, kept = [], []
    done_B = torch.zeros(B, dtype=torch.bool, device=device)
    for n in range(max_new_tokens):
        if keep_logits:
            kept.append(next_BV)
        token_B = _choose(next_BV, temperature, top_k, generator)
        chosen.append(token_B)
        if eos_id is not None:
            done_B |= token_B == eos_id
            if bool(done_B.all()) and not keep_logits:
                break
        if n + 1 < max_new_tokens:
            next_BV = model(token_B[:, None], cache=cache)[0][:, -1].float()

    tokens_BN = torch.stack(chosen, dim=1).tolist()
    if eos_id is not None:
        tokens_BN = [row[: row.index(eos_id)] if eos_id in row else row for row in tokens_BN]
    return Generation(tokens=tokens_BN, logits=torch.stack(kept, dim=1) if keep_logits else None)


def _choose(logits_BV: Tensor, temperature: float, top_k: int | None, generator: torch.Generator | None) -> Tensor:
    if temperature == 0:
        return logits_BV.argmax(dim=-1)
    scaled_BV = logits_BV / temperature
    if top_k is not None and top_k < scaled_BV.shape[-1]:
        kth_B1 = scaled_BV.topk(top_k, dim=-1).values[:, -1:]
        scaled_BV = scaled_BV.masked_fill(scaled_BV < kth_B1, float("-inf"))
    probs_BV = scaled_BV.softmax(dim=-1)
    return torch.multinomial(probs_BV, 1, generator=generator).squeeze(1)
