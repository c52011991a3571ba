"""Routing across layers and depth: Chain-of-Experts, UniPool, Duo-LLM's experts of different widths, and the
active-compute accounting that counts them — each against a plain fp64 loop or a hand count."""

from __future__ import annotations

import pytest
import torch

import routelab
from reference import reference_moe, reference_topk, swiglu_row
from routelab.experts.heterogeneous import HeterogeneousSwiGLUExperts
from routelab.experts.swiglu import SwiGLUExperts
from routelab.layers.chain import ChainOfExpertsLayer
from routelab.models.transformer import ModelConfig, MoETransformerLM
from routelab.routing.base import RoutingDecision
from routelab.train.loop import active_expert_units, evaluate

D, F_, E = 8, 6, 4


def _topk(seed: int, k: int = 2) -> routelab.Router:
    torch.manual_seed(seed)
    return routelab.create_router("topk", d_model=D, num_experts=E, k=k).double()


def test_chain_of_experts_with_one_iteration_is_the_plain_layer():
    torch.manual_seed(0)
    plain = routelab.MoELayer(D, F_, _topk(1)).double()
    chain = ChainOfExpertsLayer(D, F_, plain.router, extra_routers=[], experts=plain.experts).double()
    x = torch.randn(3, 5, D, dtype=torch.float64)
    assert torch.equal(chain(x), plain(x))
    assert torch.equal(chain.last_decision.expert_index, plain.last_decision.expert_index)


def test_chain_of_experts_with_two_iterations_equals_a_hand_loop_outputs_and_every_gradient():
    torch.manual_seed(0)
    r1, r2 = _topk(1), _topk(2)
    bank = SwiGLUExperts(E, D, F_).double()
    chain = ChainOfExpertsLayer(D, F_, r1, extra_routers=[r2], experts=bank)
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    y = chain(x)
    # hand loop: iteration 1 routes x, iteration 2 routes x + Δ¹, the same experts; the layer returns Δ¹ + Δ²
    params = [x, bank.w_gate_up, bank.w_down, r1.gate.weight, r2.gate.weight]
    d1 = reference_moe(x, reference_topk(x, r1.gate.weight, k=2, normalize="selected"), bank.w_gate_up, bank.w_down)
    x1 = x + d1
    d2 = reference_moe(x1, reference_topk(x1, r2.gate.weight, k=2, normalize="selected"), bank.w_gate_up,
                       bank.w_down)
    ref = d1 + d2
    torch.testing.assert_close(y, ref)
    g = torch.randn_like(y)
    got = torch.autograd.grad(y, params, g)
    want = torch.autograd.grad(ref, params, g)
    for name, a, b in zip(("x", "w_gate_up", "w_down", "router 1", "router 2"), got, want):
        torch.testing.assert_close(a, b, msg=lambda m, name=name: f"{name}: {m}")
    assert chain.last_decision.num_assignments == 2 * 7 * 2  # both iterations' assignments, counted as compute


def _tiny(**kw) -> MoETransformerLM:
    torch.manual_seed(0)
    base = dict(vocab_size=64, d_model=16, n_layers=3, n_heads=2, d_ff=12, num_experts=4)
    return MoETransformerLM(ModelConfig(**{**base, **kw})).double()


def test_unipool_layers_hold_the_same_expert_tensors_and_every_layer_s_gradient_reaches_them():
    pooled = _tiny(expert_pool="unipool")
    banks = [layer.experts for layer in pooled.moe_layers]
    assert all(b is banks[0] for b in banks) and len({id(layer.router) for layer in pooled.moe_layers}) == 3
    # the same weights in an ordinary per-layer model: each layer owns a copy of the pool
    separate = _tiny()
    separate.load_state_dict(pooled.state_dict())
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(1))
    loss_pooled = pooled(ids, ids)[1]
    loss_separate = separate(ids, ids)[1]
    torch.testing.assert_close(loss_pooled, loss_separate)
    loss_pooled.backward()
    loss_separate.backward()
    for name in ("w_gate_up", "w_down"):
        per_layer = [getattr(layer.experts, name).grad for layer in separate.moe_layers]
        assert all(g.abs().sum() > 0 for g in per_layer)  # every layer contributes
        torch.testing.assert_close(getattr(banks[0], name).grad, sum(per_layer))
    n_pool = sum(p.numel() for p in pooled.parameters())
    n_separate = sum(p.numel() for p in separate.parameters())
    assert n_separate - n_pool == 2 * banks[0].w_gate_up.numel() + 2 * banks[0].w_down.numel()


def test_experts_of_different_widths_equal_a_plain_loop_outputs_and_gradients():
    torch.manual_seed(0)
    bank = HeterogeneousSwiGLUExperts([3, 9, 5, 12], D, F_).double()
    layer = routelab.MoELayer(D, F_, _topk(3), experts=bank)
    x = torch.randn(6, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    ref_rows = [x.new_zeros(D) for _ in range(6)]
    for t, e, w in reference_topk(x, layer.router.gate.weight, k=2, normalize="selected"):
        ref_rows[t] = ref_rows[t] + w * swiglu_row(x[t], bank.w_gate_up[e], bank.w_down[e])
    ref = torch.stack(ref_rows)
    torch.testing.assert_close(y, ref)
    params = [x, *bank.w_gate_up, *bank.w_down, layer.router.gate.weight]
    g = torch.randn_like(y)
    used = {int(e) for e in layer.last_decision.expert_index}
    got = torch.autograd.grad(y, params, g, allow_unused=True)
    want = torch.autograd.grad(ref, params, g, allow_unused=True)
    for a, b in zip(got, want):
        if b is None:
            assert a is None or not a.any()
        else:
            torch.testing.assert_close(a, b)
    assert used  # some expert ran


def test_duo_flops_count_equals_a_hand_count():
    # Duo-LLM: a small (width 16) and a big (width 64) expert and a skip; reference width d_ff = 32
    bank = HeterogeneousSwiGLUExperts([16, 64], D, 32)
    layer = routelab.MoELayer(D, 32, routelab.create_router("null_experts", d_model=D, num_experts=2,
                                                            num_null_experts=1, k=1), experts=bank)
    # tokens 0..4: small, big, big, skip (absent), small  →  0.5 + 2 + 2 + 0 + 0.5 = 5 units of a d_ff expert
    decision = RoutingDecision(token_index=torch.tensor([0, 1, 2, 4]), expert_index=torch.tensor([0, 1, 1, 0]),
                               weight=torch.ones(4), num_tokens=5, num_experts=2)
    assert active_expert_units(layer, decision) == 5.0
    plain = routelab.MoELayer(D, 32, routelab.create_router("topk", d_model=D, num_experts=2, k=1))
    assert active_expert_units(plain, decision) == 4.0  # equal widths: one unit per assignment


def test_evaluate_reports_active_flops_per_layer_from_widths_and_chain_repeats():
    ids = torch.randint(0, 64, (4, 9), generator=torch.Generator().manual_seed(2))
    val = [("d", ids[:, :-1], ids[:, 1:])]
    duo = _tiny(router="null_experts", router_options={"num_null_experts": 1, "k": 1}, num_experts=2,
                expert_widths=[6, 24])
    ev = evaluate(duo.float(), val, batch_size=2, stats=True)
    hand = []
    for layer in duo.moe_layers:  # recount from each layer's decisions over the same two batches
        total = 0.0
        for i in range(0, 4, 2):
            duo(ids[i:i + 2, :-1])
            total += sum({0: 0.5, 1: 2.0}[int(e)] for e in layer.last_decision.expert_index)
        hand.append(total / (4 * 8))
    assert ev["active_expert_flops_by_layer"] == pytest.approx(hand)
    chain = _tiny(chain_iterations=3).float()
    ev = evaluate(chain, val, batch_size=2, stats=True)
    assert ev["active_expert_flops_by_layer"] == pytest.approx([3 * 2.0] * 3)  # 3 iterations × top-2


@pytest.mark.parametrize("field, value, message", [
    ("chain_iterations", 0, "model.chain_iterations must be an integer from 1 to 16"),
    ("expert_pool", "global", "model.expert_pool must be one of per_layer, unipool, rexmoe"),
    ("reuse_window", 1, "model.reuse_window=1 needs model.expert_pool: rexmoe"),
    ("reuse_window", -1, "model.reuse_window must be an integer >= 0"),
    ("expert_widths", [8, 8], "model.expert_widths must be null or a list of num_experts=8"),
])
def test_bad_depth_options_fail_clearly(field, value, message):
    with pytest.raises(ValueError, match=message):
        ModelConfig(**{field: value}).validate()


def test_default_options_leave_the_saved_config_as_before():
    assert set(ModelConfig().to_dict()) == {
        "vocab_size", "d_model", "n_layers", "n_heads", "d_ff", "num_experts", "moe_every", "shared_experts",
        "dense_d_ff", "max_seq_len", "rope_base", "router", "router_options", "k_schedule"}
    assert ModelConfig(chain_iterations=2).to_dict()["chain_iterations"] == 2


def test_rexmoe_with_window_0_equals_the_plain_per_layer_model():
    rex = _tiny(expert_pool="rexmoe", reuse_window=0)
    plain = _tiny()
    state = {k.replace(".experts.banks.0.", ".experts."): v for k, v in rex.state_dict().items()}
    plain.load_state_dict(state)
    ids = torch.randint(0, 64, (2, 9), generator=torch.Generator().manual_seed(3))
    loss_rex, loss_plain = rex(ids, ids)[1], plain(ids, ids)[1]
    torch.testing.assert_close(loss_rex, loss_plain, rtol=0, atol=0)
    loss_rex.backward()
    loss_plain.backward()
    for (name, a), b in zip(rex.named_parameters(), plain.parameters()):
        torch.testing.assert_close(a.grad, b.grad, msg=lambda m, name=name: f"{name}: {m}")


def test_rexmoe_layers_route_over_their_neighbours_experts_equal_to_a_plain_loop():
    from routelab.experts.reused import ReusedExperts, window

    assert window(0, 4, 1) == [0, 1, 2] and window(2, 4, 1) == [1, 2, 3] and window(3, 4, 1) == [1, 2, 3]
    model = _tiny(expert_pool="rexmoe", reuse_window=1)
    layers = model.moe_layers
    assert all(layer.router.num_experts == 12 for layer in layers)
    assert layers[0].experts.banks[1] is layers[1].experts.banks[1]  # the same tensors, reused
    torch.manual_seed(4)
    layer = layers[1]
    x = torch.randn(10, 16, dtype=torch.float64, requires_grad=True)
    y = layer(x)
    w_gu = torch.cat([b.w_gate_up for b in layer.experts.banks])
    w_dn = torch.cat([b.w_down for b in layer.experts.banks])
    ref = reference_moe(x, reference_topk(x, layer.router.gate.weight, k=2, normalize="selected"), w_gu, w_dn)
    torch.testing.assert_close(y, ref)
    params = [x, layer.router.gate.weight, *[b.w_gate_up for b in layer.experts.banks]]
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, params, g), torch.autograd.grad(ref, params, g)):
        torch.testing.assert_close(a, b)
    for bank in layer.experts.banks:  # the generic (unfused) path gives the same output
        bank.fused = False
    torch.testing.assert_close(layer(x), ref)
    assert isinstance(layer.experts, ReusedExperts)


@pytest.mark.parametrize("changes", [dict(chain_iterations=2), dict(expert_pool="unipool"),
                                     dict(expert_pool="rexmoe", reuse_window=1), dict(expert_widths=[6, 24, 12, 12]),
                                     dict(expert_pool="rexmoe", reuse_window=1, reuse_schedule={"start": 0, "end": 9})],
                         ids=["chain", "unipool", "rexmoe", "widths", "rexmoe_psr"])
def test_models_with_depth_options_decode_as_a_full_recompute(changes):
    from routelab.models.decoding import generate

    model = _tiny(**changes).eval()
    prompt = [3, 17, 5, 42, 8]
    ids, want = list(prompt), []
    with torch.no_grad():
        for _ in range(6):
            last = model(torch.tensor([ids]))[0][0, -1]
            want.append(last)
            ids.append(int(last.argmax()))
    got = generate(model, [prompt], max_new_tokens=6, keep_logits=True)
    assert got.tokens == [ids[len(prompt):]]
    torch.testing.assert_close(got.logits[0].double(), torch.stack(want).double(), atol=1e-6, rtol=0)  # fp32 logits kept


def test_expert_parallelism_refuses_a_shared_pool_and_banks_that_are_not_stacked(tmp_path):
    import torch.distributed as dist

    from routelab.distributed.expert_parallel import expert_parallel

    dist.init_process_group("gloo", init_method=f"file://{tmp_path / 'store'}", rank=0, world_size=1)
    try:
        with pytest.raises(ValueError, match="share one expert bank"):
            expert_parallel(_tiny(expert_pool="unipool").float())
        with pytest.raises(ValueError, match="is not stacked over the"):
            expert_parallel(_tiny(expert_widths=[6, 24, 12, 12]).float())
    finally:
        dist.destroy_process_group()
