"""Incremental decoding: the KV/router cache gives what a full recompute of the growing sequence gives, for every
registered router that is causal at inference; the others are refused by generate, with the reason."""

from __future__ import annotations

import pytest
import torch

from routelab.models import ModelConfig, MoETransformerLM
from routelab.models.decoding import generate, generation_problem
from routelab.routing import create_router, list_routers, router_class
from routelab.routing.base import RouterCache, RoutingContext
from zoo_cases import CASES, IDS

V = 61
TINY = dict(vocab_size=V, d_model=32, n_layers=3, n_heads=2, d_ff=24, num_experts=4, max_seq_len=40)


def _model(router: str, options: dict, seed: int = 0, *, scale: float = 4.0, **changes) -> MoETransformerLM:
    torch.manual_seed(seed)
    model = MoETransformerLM(ModelConfig(**{**TINY, **changes}, router=router, router_options=options))
    with torch.no_grad():  # larger weights than the init: routing changes from token to token and matters downstream
        for p in model.parameters():
            p.mul_(scale)
    return model.eval()


def _greedy_by_recompute(model, prompt: list[int], n: int) -> tuple[list[int], torch.Tensor]:
    ids = list(prompt)
    logits = []
    with torch.no_grad():
        for _ in range(n):
            last_V = model(torch.tensor([ids]))[0][0, -1].float()
            logits.append(last_V)
            ids.append(int(last_V.argmax()))
    return ids[len(prompt) :], torch.stack(logits)


def _causal_at_inference(name: str, options: dict) -> bool:
    router = create_router(name, d_model=8, num_experts=4, **{k: v for k, v in options.items() if k != "cell"})
    return bool(router.eval().causal)


def test_every_registered_router_is_covered():
    assert {name for name, _ in CASES} == set(list_routers())


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_cached_greedy_decode_equals_full_recompute(name, options):
    model = _model(name, options)
    prompt = [3, 17, 5, 42, 8, 1, 29]
    if router_class(name).needs_timestep:  # diffusion-only routers: an autoregressive model has no timestep
        with pytest.raises(ValueError, match="need a diffusion timestep .*autoregressive model does not have"):
            generate(model, [prompt], max_new_tokens=4)
        return
    if not _causal_at_inference(name, options):
        with pytest.raises(ValueError, match="not causal at inference .*cannot generate one token at a time"):
            generate(model, [prompt], max_new_tokens=4)
        return
    # fp32 at the init scale, to the 1e-5; fp64 with large weights (sensitive routing), to rounding.
    for dtype, scale, atol in ((torch.float32, 1.0, 1e-5), (torch.float64, 4.0, 1e-10)):
        model = _model(name, options, scale=scale).to(dtype)
        want_tokens, want_logits = _greedy_by_recompute(model, prompt, 12)
        got = generate(model, [prompt], max_new_tokens=12, keep_logits=True)
        assert got.tokens == [want_tokens]
        torch.testing.assert_close(got.logits[0], want_logits.float(), atol=atol, rtol=0)


@pytest.mark.parametrize(
    "name,options",
    [("topk", {"k": 2}), ("similarity", {}), ("recurrent", {"hidden": 16}), ("hash", {}), ("top_p", {})],
)
def test_batched_prompts_of_different_lengths_equal_each_alone(name, options):
    prompts = [[5], [9, 2, 33, 14, 7, 7, 21], [40, 1, 2]]
    for dtype, scale, atol in ((torch.float32, 1.0, 1e-5), (torch.float64, 4.0, 1e-10)):
        model = _model(name, options, seed=1, scale=scale).to(dtype)
        batched = generate(model, prompts, max_new_tokens=8, keep_logits=True)
        for b, prompt in enumerate(prompts):
            alone = generate(model, [prompt], max_new_tokens=8, keep_logits=True)
            assert batched.tokens[b] == alone.tokens[0]
            torch.testing.assert_close(batched.logits[b], alone.logits[0], atol=atol, rtol=0)


def test_similarity_router_with_cache_equals_full_routing_and_needs_it():
    torch.manual_seed(0)
    router = create_router("similarity", d_model=8, num_experts=4, k=2).eval()
    x_BLD = torch.randn(2, 9, 8)
    pad_BL = torch.zeros(2, 9, dtype=torch.bool)
    pad_BL[1, :3] = True  # left padding in the second sequence
    with torch.no_grad():
        full = router(x_BLD.reshape(-1, 8), RoutingContext(batch_shape=(2, 9), padding_mask=pad_BL))
        want_TE = full.dense_weights().view(2, 9, 4)
        cache, stale = RouterCache(), []
        for t in range(9):
            ctx = RoutingContext(batch_shape=(2, 1), padding_mask=pad_BL[:, t : t + 1], cache=cache)
            step = router(x_BLD[:, t].reshape(2, 8), ctx)
            torch.testing.assert_close(step.dense_weights(), want_TE[:, t], atol=1e-6, rtol=0)
            alone = router(x_BLD[:, t].reshape(2, 8), RoutingContext(batch_shape=(2, 1)))
            stale.append(not torch.allclose(alone.dense_weights(), want_TE[:, t], atol=1e-6))
    assert any(stale)  # without the cached earlier tokens the routing differs: the cache is what makes it exact


def test_sampling_is_seeded_and_top_k_one_is_greedy():
    model = _model("topk", {"k": 2})
    prompts = [[1, 2, 3], [4]]
    a = generate(model, prompts, max_new_tokens=10, temperature=1.5, seed=7)
    b = generate(model, prompts, max_new_tokens=10, temperature=1.5, seed=7)
    c = generate(model, prompts, max_new_tokens=10, temperature=1.5, seed=8)
    assert a.tokens == b.tokens and a.tokens != c.tokens
    greedy = generate(model, prompts, max_new_tokens=10)
    assert generate(model, prompts, max_new_tokens=10, temperature=2.0, top_k=1, seed=0).tokens == greedy.tokens
    # top-k sampling only ever picks one of the k most likely tokens of its step
    out = generate(model, [[1, 2, 3]], max_new_tokens=10, temperature=5.0, top_k=3, seed=1, keep_logits=True)
    for n, token in enumerate(out.tokens[0]):
        assert token in out.logits[0, n].topk(3).indices.tolist()


def test_eos_stops_and_model_mode_is_restored():
    model = _model("topk", {"k": 2})
    full = generate(model, [[1, 2, 3]], max_new_tokens=10).tokens[0]
    eos = full[4]
    cut = generate(model, [[1, 2, 3]], max_new_tokens=10, eos_id=eos).tokens[0]
    assert cut == full[: full.index(eos)]
    model.train()
    generate(model, [[1, 2, 3]], max_new_tokens=2)
    assert model.training


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(max_new_tokens=0), "max_new_tokens must be an integer >= 1"),
        (dict(max_new_tokens=2, temperature=-0.5), "temperature must be a number >= 0"),
        (dict(max_new_tokens=2, top_k=0), "top_k must be an integer"),
        (dict(max_new_tokens=35), "prompt 0 has 7 tokens; with max_new_tokens=35 that exceeds the model's max_seq_len=40"),
    ],
)
def test_bad_arguments_fail_before_work(kwargs, match):
    model = _model("topk", {"k": 2})
    with pytest.raises(ValueError, match=match):
        generate(model, [[1] * 7], **kwargs)
    with pytest.raises(ValueError, match="prompt 1 is empty"):
        generate(model, [[1], []], max_new_tokens=2)
    with pytest.raises(ValueError, match="outside"):
        generate(model, [[V]], max_new_tokens=2)


def test_sinkhorn_decodes_with_its_inference_branch_even_from_training_mode():
    model = _model("sinkhorn", {"p": 1.0})
    model.train()
    assert generation_problem(model) is None
    tokens, _ = _greedy_by_recompute(model.eval(), [1, 2, 3], 5)
    model.train()
    assert generate(model, [[1, 2, 3]], max_new_tokens=5).tokens == [tokens]
