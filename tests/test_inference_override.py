"""routelab.inference.override_routing: the one wrapper that edits logits before selection and the decision after.

References: the unwrapped model (bit-identical when nothing is set and after remove()), a model whose router was
built with k=1, a Hugging Face Mixtral with num_experts_per_tok=1, and hand-computed sets and weights on hand-built
logits.
"""

from __future__ import annotations

import math

import pytest
import torch

import routelab
from routelab.inference import moe_layers, override_routing
from routelab.models import ModelConfig, MoETransformerLM


def _lm(seed: int = 0, **router_options) -> MoETransformerLM:
    torch.manual_seed(seed)
    cfg = ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=2, d_ff=32, num_experts=6,
                      router_options=router_options, max_seq_len=64)
    return MoETransformerLM(cfg).eval()


def _ids(B=2, L=12, seed=1):
    return torch.randint(0, 64, (B, L), generator=torch.Generator().manual_seed(seed))


def _hand_layer(normalize: str | None = None, k: int = 2, E: int = 4) -> routelab.MoELayer:
    """A layer whose router logits are its input: gate = identity (d_model = E)."""
    router = routelab.create_router("topk", d_model=E, num_experts=E, k=k, aux_loss_coef=0.0,
                                    **({} if normalize is None else {"normalize": normalize}))
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(E))
    return routelab.MoELayer(E, 8, router)


def _sets(decision) -> list[set[int]]:
    out = [set() for _ in range(decision.num_tokens)]
    for t, e in zip(decision.token_index.tolist(), decision.expert_index.tolist()):
        out[t].add(e)
    return out


def _weights(decision) -> dict[tuple[int, int], float]:
    return {(t, e): w for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(),
                                         decision.weight.tolist())}


def test_nothing_set_and_remove_are_bit_identical():
    model, ids = _lm(), _ids()
    with torch.no_grad():
        before = model(ids)[0]
        with override_routing(model) as handle:
            assert torch.equal(model(ids)[0], before)
        assert not handle.active
        with override_routing(model, k=1, mask=[2], logit_bias=torch.randn(6)):
            changed = model(ids)[0]
        after = model(ids)[0]
    assert not torch.equal(changed, before)
    assert torch.equal(after, before)
    assert all(not layer.router._forward_hooks for layer in model.moe_layers)
    h = override_routing(model, k=1)
    h.remove()
    h.remove()  # idempotent
    with torch.no_grad():
        assert torch.equal(model(ids)[0], before)


def test_own_k_reproduces_the_router():
    model, ids = _lm(), _ids()
    with torch.no_grad():
        before = model(ids)[0]
        decisions = [layer.last_decision for layer in model.moe_layers]
        with override_routing(model, k=2):
            again = model(ids)[0]
            for layer, d in zip(model.moe_layers, decisions):
                assert torch.equal(layer.last_decision.expert_index, d.expert_index)
                torch.testing.assert_close(layer.last_decision.weight, d.weight, rtol=0, atol=1e-7)
    torch.testing.assert_close(again, before, rtol=0, atol=1e-6)


def test_k1_equals_a_router_built_with_k1():
    model, ids = _lm(normalize="none"), _ids()
    reference = _lm(seed=5, k=1)  # k=1 defaults to normalize="none"
    reference.load_state_dict(model.state_dict())
    with torch.no_grad(), override_routing(model, k=1):
        out = model(ids)[0]
        for layer in model.moe_layers:
            assert layer.last_decision.experts_per_token().eq(1).all()
        expected = reference(ids)[0]
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_mask_never_and_force_always_per_layer():
    model, ids = _lm(), _ids(B=3, L=16)
    with torch.no_grad(), override_routing(model, mask={0: [1, 2], 2: torch.tensor([1, 0, 0, 0, 0, 1]).bool()},
                                           force={1: [4]}):
        model(ids)
        d0, d1, d2 = (layer.last_decision for layer in model.moe_layers)
    assert not torch.isin(d0.expert_index, torch.tensor([1, 2])).any()
    assert not torch.isin(d2.expert_index, torch.tensor([0, 5])).any()
    assert all(4 in s for s in _sets(d1))
    assert d0.experts_per_token().eq(2).all() and d2.experts_per_token().eq(2).all()
    assert d1.experts_per_token().eq(2).all()  # the forced expert takes one of the k slots
    assert torch.allclose(d0.dense_weights().sum(-1), torch.ones(d0.num_tokens))


def test_top_p_and_min_weight_ratio_pick_the_documented_sets():
    probs = torch.tensor([[0.5, 0.3, 0.15, 0.05], [0.05, 0.15, 0.3, 0.5]])
    x = probs.log()
    layer = _hand_layer(normalize="none")
    with torch.no_grad():
        for p, want in ((0.4, [{0}, {3}]), (0.75, [{0, 1}, {3, 2}]), (0.85, [{0, 1, 2}, {3, 2, 1}]),
                        (1.0, [{0, 1, 2, 3}] * 2)):
            with override_routing(layer, top_p=p):
                d = layer.router(x)
            assert _sets(d) == want, p
            assert _weights(d)[(0, 0)] == pytest.approx(0.5)  # "none": the score itself
        with override_routing(layer, top_p=0.85, k=2):  # k caps the prefix
            assert _sets(layer.router(x)) == [{0, 1}, {3, 2}]
        for beta, want in ((0.5, [{0, 1}] * 1), (0.7, [{0}])):
            with override_routing(layer, k=3, min_weight_ratio=beta):
                d = layer.router(x[:1])
            assert _sets(d) == want  # 0.15 < 0.5·0.5 drops; 0.3 < 0.7·0.5 drops
            assert _weights(d)[(0, 0)] == pytest.approx(0.5)  # "none" router: weights left as they were


def test_renormalize_modes_on_a_selected_router():
    x = torch.tensor([[0.5, 0.3, 0.15, 0.05]]).log()
    layer = _hand_layer()  # k=2, "selected": weights 0.625, 0.375
    with torch.no_grad():
        with override_routing(layer, min_weight_ratio=0.7):
            assert _weights(layer.router(x)) == {(0, 0): pytest.approx(1.0)}  # as the router does: renormalised
        with override_routing(layer, min_weight_ratio=0.7, renormalize=False):
            assert _weights(layer.router(x)) == {(0, 0): pytest.approx(0.625)}
        with override_routing(layer, k=3, renormalize=True):
            w = _weights(layer.router(x))
        assert sum(w.values()) == pytest.approx(1.0) and w[(0, 2)] == pytest.approx(0.15 / 0.95)
    none_layer = _hand_layer(normalize="none")
    with torch.no_grad(), override_routing(none_layer, min_weight_ratio=0.7, renormalize=True):
        assert _weights(none_layer.router(x)) == {(0, 0): pytest.approx(0.8)}  # the original mass 0.5 + 0.3


def test_logit_bias_and_mask_edit_the_logits_before_the_score_function():
    z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])
    layer = _hand_layer(normalize="none", k=1)
    bias = torch.tensor([0.0, 0.0, 3.0, 0.0])
    with torch.no_grad():
        with override_routing(layer, logit_bias=bias):
            d = layer.router(z)
        want = torch.softmax(z + bias, -1)
        assert _weights(d) == {(0, 2): pytest.approx(float(want[0, 2]))}
        assert torch.equal(d.router_logits, z)  # the router's own logits are kept
        with override_routing(layer, mask=[0]):
            d = layer.router(z)
        assert _weights(d) == {(0, 1): pytest.approx(float(torch.softmax(z[:, 1:], -1)[0, 0]))}


def test_loss_free_bias_stays_in_the_ranking():
    layer = _hand_layer(normalize="none", k=1)
    router = routelab.create_router("topk", d_model=4, num_experts=4, k=1, balance="loss_free", aux_loss_coef=0.0)
    router.load_state_dict({"gate.weight": torch.eye(4), "expert_bias": torch.tensor([0.0, 0.5, 0.0, 0.0])})
    layer.router = router
    z = torch.tensor([[1.0, 0.9, 0.0, 0.0]])  # probs ≈ .41, .37: the bias makes expert 1 win
    with torch.no_grad():
        own = _sets(router(z))
        with override_routing(layer, top_p=1.0, k=1):
            assert _sets(router(z)) == own == [{1}]


def test_padding_gets_nothing_and_batch1_decoding_under_no_grad():
    model = _lm()
    with torch.no_grad(), override_routing(model, mask=[0, 1], k=1):
        ids = _ids(B=1, L=3)
        for _ in range(4):  # greedy decoding at batch 1, recomputing the growing sequence
            logits, _ = model(ids)
            for layer in model.moe_layers:
                d = layer.last_decision
                assert d.experts_per_token().eq(1).all() and not torch.isin(d.expert_index, torch.tensor([0, 1])).any()
            ids = torch.cat([ids, logits[:, -1:].argmax(-1)], dim=1)
    layer = _hand_layer()
    ctx = routelab.RoutingContext(padding_mask=torch.tensor([False, True, False]))
    with torch.no_grad(), override_routing(layer, k=3):
        d = layer.router(torch.randn(3, 4), ctx)
    assert d.experts_per_token().tolist() == [3, 0, 3]


def test_gradients_reach_the_router_through_the_override():
    model, ids = _lm(), _ids()
    model.train()
    with override_routing(model, k=1, logit_bias=torch.ones(6)):
        _, loss = model(ids, ids)
        loss.backward()
    assert all(layer.router.gate.weight.grad.abs().sum() > 0 for layer in model.moe_layers)


def test_bad_input():
    model = _lm()
    with pytest.raises(ValueError, match=r"layers must hold MoE layer indices in \[0, 3\)"):
        override_routing(model, layers=[3], k=1)
    with pytest.raises(ValueError, match=r"mask must hold expert ids in \[0, num_experts=6\)"):
        override_routing(model, mask=[6])
    with pytest.raises(ValueError, match=r"force\[1\] must hold expert ids"):
        override_routing(model, force={1: [-1]})
    for bad in (0, 7, 1.5):
        with pytest.raises(ValueError, match=r"k must be an integer in \[1, num_experts=6\]"):
            override_routing(model, k=bad)
    for bad in (0, 1.5, -0.1):
        with pytest.raises(ValueError, match=r"top_p must be a number in \(0, 1\]"):
            override_routing(model, top_p=bad)
    with pytest.raises(ValueError, match=r"logit_bias must have shape \[num_experts=6\]"):
        override_routing(model, logit_bias=torch.zeros(5))
    with pytest.raises(ValueError, match="min_weight_ratio"):
        override_routing(model, min_weight_ratio=2)
    with pytest.raises(ValueError, match="masks all 6 experts"):
        override_routing(model, mask=list(range(6)))
    with pytest.raises(ValueError, match="mask and force both"):
        override_routing(model, mask=[1], force=[1])
    with pytest.raises(ValueError, match="not among the overridden"):
        override_routing(model, layers=[0], k={1: 1})
    with pytest.raises(ValueError, match="has no MoE layers"):
        override_routing(torch.nn.Linear(2, 2), k=1)
    with pytest.raises(ValueError, match="renormalize"):
        override_routing(model, renormalize="yes")
    torch.manual_seed(0)
    ec = MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=1, n_heads=2, d_ff=32, num_experts=4,
                                      router="expert_choice"))
    with pytest.raises(ValueError, match="layer 0's router is a ExpertChoiceRouter"):
        override_routing(ec, k=1)
    with override_routing(model, k=1):
        with pytest.raises(ValueError, match="already has a routing override"):
            override_routing(model, layers=[2], mask=[0])
    assert all(not layer.router._forward_hooks for layer in model.moe_layers)  # nothing left behind by failures


transformers = pytest.importorskip("transformers", reason="the Hugging Face part needs the hf extra")


def _mixtral(k: int):
    cfg = transformers.MixtralConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     num_key_value_heads=2, max_position_embeddings=64, intermediate_size=24,
                                     num_local_experts=4, num_experts_per_tok=k, experts_implementation="eager")
    torch.manual_seed(0)
    return transformers.MixtralForCausalLM(cfg).eval()


def test_patched_hf_model_k1_equals_hf_with_one_expert_per_token_and_generate():
    from routelab.interop.hf import patch_model

    hf2, hf1 = _mixtral(2), _mixtral(1)
    hf1.load_state_dict(hf2.state_dict())
    ids = _ids(B=2, L=10)
    with torch.no_grad():
        expected = hf1(ids).logits
        original = hf2(ids).logits
        patch_model(hf2)
        with override_routing(hf2, k=1):
            got = hf2(ids).logits
        restored = hf2(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(restored, original, rtol=1e-5, atol=1e-5)
    assert len(moe_layers(hf2)) == 2

    seen: list[tuple[int, torch.Tensor]] = []
    with torch.no_grad(), override_routing(hf2, mask=[1], force=[3]):
        # registered after the override's wrapper, so these see the overridden decisions
        hooks = [layer.router.register_forward_hook(lambda m, a, d: seen.append((d.num_tokens, d.expert_index)))
                 for layer in moe_layers(hf2)]
        out = hf2.generate(ids[:1, :4], max_new_tokens=5, do_sample=False, pad_token_id=0)
    for h in hooks:
        h.remove()
    assert out.shape == (1, 9)
    assert sum(t == 1 for t, _ in seen) >= 2 * 4  # incremental steps: one token at batch 1
    assert all(not (e == 1).any() and (e == 3).any() for _, e in seen)
    assert math.isfinite(float(out.float().sum()))


def test_patched_qwen3_moe_k1_and_analysis_of_a_patched_model():
    from routelab.inference import analyze
    from routelab.interop.hf import patch_model

    def qwen3(k):
        cfg = transformers.Qwen3MoeConfig(vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                          num_key_value_heads=2, max_position_embeddings=64, intermediate_size=48,
                                          moe_intermediate_size=24, num_experts=4, num_experts_per_tok=k,
                                          norm_topk_prob=True, experts_implementation="eager")
        torch.manual_seed(0)
        return transformers.Qwen3MoeForCausalLM(cfg).eval()

    hf2, hf1 = qwen3(2), qwen3(1)
    hf1.load_state_dict(hf2.state_dict())
    ids = _ids(B=2, L=10)
    with torch.no_grad():
        expected = hf1(ids).logits
        patch_model(hf2)
        with override_routing(hf2, k=1):
            got = hf2(ids).logits
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-5)
    result = analyze(hf2, {"x": ids[:1], "y": ids[1:]}, segment_lengths=(1, 4))
    assert [sum(L["load"]) for L in result["layers"]] == [2.0 * ids.numel()] * 2
    assert result["layers"][0]["srp"]["1"] == pytest.approx(1.0)


def test_patched_deepseek_v3_groups_bias_and_scaling_go_through_the_wrapper():
    from routelab.interop.hf import patch_model

    def deepseek(k):
        cfg = transformers.DeepseekV3Config(
            vocab_size=64, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
            max_position_embeddings=64, intermediate_size=48, moe_intermediate_size=16, n_routed_experts=8,
            num_experts_per_tok=k, n_group=4, topk_group=2, n_shared_experts=1, first_k_dense_replace=1,
            routed_scaling_factor=2.5, q_lora_rank=16, kv_lora_rank=16, qk_rope_head_dim=4, qk_nope_head_dim=4,
            v_head_dim=8, experts_implementation="eager")
        torch.manual_seed(0)
        model = transformers.DeepseekV3ForCausalLM(cfg).eval()
        with torch.no_grad():
            for name, buf in model.named_buffers():
                if name.endswith("e_score_correction_bias"):
                    buf.copy_(torch.randn(buf.shape) * 0.1)  # a correction bias that changes the selection
        return model

    hf2, hf1 = deepseek(2), deepseek(1)
    hf1.load_state_dict(hf2.state_dict())
    ids = _ids(B=2, L=10)
    with torch.no_grad():
        expected1 = hf1(ids).logits
        patch_model(hf2)
        plain = hf2(ids).logits
        with override_routing(hf2, min_weight_ratio=0.0):  # the whole wrapper, nothing changed
            same = hf2(ids).logits
        with override_routing(hf2, k=1):
            got1 = hf2(ids).logits
    torch.testing.assert_close(same, plain, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got1, expected1, rtol=1e-5, atol=1e-5)


def test_routelab_generate_with_kv_cache_under_an_override():
    """Incremental decoding (KV cache, one token per step, left-padded batch) under an override gives the tokens of
    a plain greedy loop that recomputes the whole sequence under the same override."""
    model = _lm()
    prompts = [[5, 9, 3, 7], [11, 2]]
    seen: list[tuple[int, torch.Tensor]] = []
    with torch.no_grad(), override_routing(model, mask={0: [0, 1]}, k={1: 1}, force={2: [5]}):
        hooks = [layer.router.register_forward_hook(lambda m, a, d, j=j: seen.append((j, d)))
                 for j, layer in enumerate(model.moe_layers)]
        out = routelab.generate(model, prompts, max_new_tokens=5)
        for h in hooks:
            h.remove()
        for prompt, new in zip(prompts, out.tokens):
            ids = torch.tensor([prompt])
            for _ in range(5):  # batch 1, full recompute
                ids = torch.cat([ids, model(ids)[0][:, -1:].argmax(-1)], dim=1)
            assert new == ids[0, len(prompt):].tolist()
    assert any(d.num_tokens == 2 for _, d in seen)  # one new token per row per step
    for j, d in seen:
        if j == 0:
            assert not torch.isin(d.expert_index, torch.tensor([0, 1])).any()
        if j == 1:
            assert d.experts_per_token().max() <= 1
        if j == 2:
            assert (d.expert_index == 5).sum() == (d.experts_per_token() > 0).sum()


@pytest.mark.parametrize("name, options", [
    ("topk", {"k": 2}), ("topk", {"k": 3, "normalize": "none"}), ("topk", {"k": 2, "score": "sigmoid"}),
    ("topk", {"k": 2, "balance": "bip"}), ("topk", {"k": 2, "n_group": 3, "topk_group": 2}),
    ("topk", {"k": 3, "score": "sigmoid", "n_group": 3, "topk_group": 2, "balance": "loss_free"}),
    ("top_p", {"p": 0.5}), ("top_p", {"p": 0.6, "normalize": "selected"}),
    ("top_p", {"p": 0.3, "rule": "within", "min_k": 0}), ("cosine", {"k": 2}), ("cosine", {"k": 1}),
])  # fmt: skip
def test_an_option_that_changes_nothing_reproduces_each_supported_router(name, options):
    """min_weight_ratio=0 runs the whole wrapper (scores, ranking, own count, weighting) and drops nothing."""
    torch.manual_seed(0)
    router = routelab.create_router(name, d_model=16, num_experts=6, aux_loss_coef=0.0, **options)
    if name == "topk" and options.get("balance") == "bip":
        router.bip_dual.copy_(torch.rand(6) * 0.2)
    if name == "topk" and options.get("balance") == "loss_free":
        router.expert_bias.copy_(torch.rand(6) * 0.2 - 0.1)
    layer = routelab.MoELayer(16, 8, router).eval()
    x = torch.randn(50, 16)
    with torch.no_grad():
        own = router(x)
        with override_routing(layer, min_weight_ratio=0.0):
            again = router(x)
    assert _sets(again) == _sets(own)
    w_own, w_again = _weights(own), _weights(again)
    assert w_own.keys() == w_again.keys()
    assert all(w_again[key] == pytest.approx(w, rel=1e-6, abs=1e-7) for key, w in w_own.items())


def test_group_limited_topk_keeps_its_group_limit_under_k():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=16, num_experts=6, k=2, n_group=3, topk_group=1,
                                    aux_loss_coef=0.0)
    layer = routelab.MoELayer(16, 8, router)
    x = torch.randn(40, 16)
    with torch.no_grad():
        with override_routing(layer, k=4):  # only the 2 experts of the kept group are eligible
            d = router(x)
        groups = [{e // 2 for e in s} for s in _sets(d)]
        assert d.experts_per_token().eq(2).all() and all(len(g) == 1 for g in groups)
        with override_routing(layer, k=1, force=[5]):  # a forced expert may come from another group
            d = router(x)
        assert all(5 in s and len(s) <= 2 for s in _sets(d))


def test_top_p_on_sigmoid_scores_uses_the_normalised_mass():
    layer = _hand_layer(k=2)
    layer.router.score = "sigmoid"
    s = torch.tensor([[0.9, 0.6, 0.3, 0.2]])  # normalised mass 0.45, 0.30, 0.15, 0.10
    with torch.no_grad(), override_routing(layer, top_p=0.7):
        d = layer.router(torch.logit(s))
    assert _sets(d) == [{0, 1}]
    assert _weights(d)[(0, 0)] == pytest.approx(0.9 / 1.5)  # "selected": renormalised over the two
