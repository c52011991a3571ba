"""The shared contract every registered router passes, driven by the cases in zoo_cases.py (one or more per router).

Decisions are well formed; the layer equals a per-assignment fp64 loop given the decision (output and every
gradient); eval changes no buffer; state_dict round trips; T = 1 and T = 0; bf16; causal routers ignore later
tokens; padding is never routed; a 2-layer MoE trains.
"""

import copy

import pytest
import torch

import routelab
from reference import reference_moe
from zoo_cases import CASES, D, IDS, ToyModel, make_ctx, make_layer, make_routers


def test_every_router_has_a_case():
    assert {name for name, _ in CASES} == set(routelab.list_routers())


def _check_well_formed(decision, T):
    assert decision.token_index.dtype == torch.long and decision.expert_index.dtype == torch.long
    pairs = list(zip(decision.token_index.tolist(), decision.expert_index.tolist()))
    assert len(pairs) == len(set(pairs)), "duplicate (token, expert) assignment"
    assert decision.num_tokens == T
    assert torch.isfinite(decision.weight).all() and (decision.weight >= 0).all()
    assert decision.weight.dtype in (torch.float32, torch.float64)
    if decision.router_logits is not None:
        assert decision.router_logits.dtype in (torch.float32, torch.float64)
    for loss in decision.aux_losses.values():
        assert torch.isfinite(loss)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_decision_well_formed_and_padding_unrouted(name, options, training):
    torch.manual_seed(0)
    layer = make_layer(name, options).train(training)
    B, L = 2, 7
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 4:] = True
    x = torch.randn(B, L, D)
    y, decision = layer.forward_with_decision(x, make_ctx(B, L))
    _check_well_formed(decision, B * L)
    assert y.shape == x.shape and torch.isfinite(y).all()
    y, decision = layer.forward_with_decision(x, make_ctx(B, L, padding_mask=pad))
    _check_well_formed(decision, B * L)
    assert not pad.reshape(-1)[decision.token_index].any(), "a padded token was routed"
    assert (y[pad] == 0).all()


def _grads(output, tensors, seed):
    upstream = torch.randn(output.shape, generator=torch.Generator().manual_seed(seed), dtype=output.dtype)
    grads = torch.autograd.grad(output, tensors, upstream, allow_unused=True, retain_graph=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_layer_matches_reference_loop_given_the_decision_fp64(name, options):
    torch.manual_seed(1)
    layer = make_layer(name, options).double()
    B, L = 2, 5
    x = torch.randn(B, L, D, dtype=torch.float64, requires_grad=True)
    y, decision = layer.forward_with_decision(x, make_ctx(B, L))
    assert decision.weight.dtype == torch.float64
    assignments = [
        (t, e, decision.weight[s])
        for s, (t, e) in enumerate(zip(decision.token_index.tolist(), decision.expert_index.tolist()))
    ]
    y_ref = reference_moe(x.reshape(-1, D), assignments, layer.experts.w_gate_up, layer.experts.w_down)
    torch.testing.assert_close(y.reshape(-1, D), y_ref, rtol=1e-10, atol=1e-10)
    tensors = [x, *[p for p in layer.parameters() if p.requires_grad]]
    for g, g_ref in zip(_grads(y.reshape(-1, D), tensors, 3), _grads(y_ref, tensors, 3)):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10)


def _buffers(module):
    return {k: v.clone() for k, v in module.named_buffers()}


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_eval_changes_no_buffer(name, options):
    torch.manual_seed(2)
    layer = make_layer(name, options)
    x = torch.randn(2, 6, D)
    layer(x, make_ctx(2, 6))  # a training forward first, then apply it, so pending state is clean but non-trivial
    routelab.update_routers(layer)
    layer.eval()
    before, params = _buffers(layer), copy.deepcopy(layer.state_dict())
    for seed in range(2):
        layer(torch.randn(2, 6, D), make_ctx(2, 6, seed=seed))
    routelab.update_routers(layer)
    after = _buffers(layer)
    assert before.keys() == after.keys()
    for key in before:
        assert torch.equal(before[key], after[key]), f"eval changed buffer {key}"
    for key, value in layer.state_dict().items():
        assert torch.equal(value, params[key])


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_state_dict_round_trip(name, options):
    torch.manual_seed(3)
    layer = make_layer(name, options)
    for step in range(2):
        layer(torch.randn(2, 6, D), make_ctx(2, 6, seed=step, step=step))
        routelab.update_routers(layer)
    torch.manual_seed(99)
    fresh = make_layer(name, options)
    fresh.load_state_dict(layer.state_dict())
    layer.eval(), fresh.eval()
    x, ctx = torch.randn(2, 6, D), make_ctx(2, 6, seed=7)
    (y1, d1), (y2, d2) = layer.forward_with_decision(x, ctx), fresh.forward_with_decision(x, ctx)
    assert torch.equal(d1.token_index, d2.token_index) and torch.equal(d1.expert_index, d2.expert_index)
    assert torch.equal(d1.weight, d2.weight) and torch.equal(y1, y2)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("L", [1, 0])
def test_one_and_zero_tokens(name, options, L):
    torch.manual_seed(4)
    layer = make_layer(name, options)
    for training in (True, False):
        layer.train(training)
        x = torch.randn(1, L, D, requires_grad=True)
        y, decision = layer.forward_with_decision(x, make_ctx(1, L))
        _check_well_formed(decision, L)
        assert y.shape == x.shape
        if L == 1 and training:
            (y.sum() + routelab.total_aux_loss(layer)).backward()
            assert x.grad is not None and torch.isfinite(x.grad).all()
        routelab.update_routers(layer)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_bf16_runs_with_fp32_router_math(name, options):
    torch.manual_seed(5)
    layer = make_layer(name, options).to(torch.bfloat16)
    x = torch.randn(2, 6, D, dtype=torch.bfloat16, requires_grad=True)
    y, decision = layer.forward_with_decision(x, make_ctx(2, 6))
    assert y.dtype == torch.bfloat16 and torch.isfinite(y.float()).all()
    assert decision.weight.dtype == torch.float32
    (y.float().sum() + routelab.total_aux_loss(layer)).backward()
    assert torch.isfinite(x.grad.float()).all()
    routelab.update_routers(layer)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_causal_routers_ignore_later_tokens(name, options, training):
    torch.manual_seed(6)
    layer = make_layer(name, options).train(training)
    if not layer.router.causal:
        pytest.skip(f"{name} with {options} is not causal in this mode")
    L, cut = 9, 5
    x, ctx = torch.randn(1, L, D), make_ctx(1, L)
    x2, ids2 = x.clone(), ctx.token_ids.clone()
    x2[0, cut:] = 3 * torch.randn(L - cut, D)
    ids2[0, cut:] = torch.randint(50, 100, (L - cut,))
    d1 = layer.forward_with_decision(x, ctx)[1]
    d2 = layer.forward_with_decision(x2, ctx.replace(token_ids=ids2))[1]

    def prefix(d):
        keep = d.token_index < cut
        return d.token_index[keep], d.expert_index[keep], d.weight[keep]

    (t1, e1, w1), (t2, e2, w2) = prefix(d1), prefix(d2)
    assert torch.equal(t1, t2) and torch.equal(e1, e2)
    torch.testing.assert_close(w1, w2, rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
def test_causal_is_a_bool_on_every_instance_and_follows_the_mode(name, options):
    layer = make_layer(name, options)
    assert isinstance(routelab.routing.router_class(name).causal, bool)
    for model_mode in (True, False, True):
        layer.train(model_mode)  # a parent's train()/eval() reaches the router
        assert isinstance(layer.router.causal, bool)


def test_non_causal_routers_say_so():
    assert routelab.create_router("expert_choice", d_model=D, num_experts=4).causal is False
    sinkhorn = routelab.create_router("sinkhorn", d_model=D, num_experts=4, p=0.5)
    assert sinkhorn.causal is False and sinkhorn.eval().causal is True and sinkhorn.train().causal is False
    layer = routelab.MoELayer(D, 6, sinkhorn)
    assert layer.eval().router.causal is True and layer.train().router.causal is False
    assert routelab.create_router("similarity", d_model=D, num_experts=4, causal=False).causal is False
    assert routelab.create_router("topk", d_model=D, num_experts=4, capacity_factor=1.0).causal is False


SMOKE = {
    "sinkhorn": dict(p=0.5, xi=0.5),
    "null_experts": dict(num_null_experts=2, k=3),
    "recurrent": dict(hidden=16),
}


@pytest.mark.parametrize("name", sorted({name for name, _ in CASES}))
def test_training_smoke_two_layer_toy_regression(name):
    torch.manual_seed(7)
    vocab, B, L = 32, 4, 8
    table, target_table = torch.randn(vocab, D), torch.randn(vocab, D)
    model = ToyModel(name, SMOKE.get(name, {}))
    opt = torch.optim.Adam(model.parameters(), lr=3e-2)
    losses = []
    for step in range(40):
        ids = torch.randint(0, vocab, (B, L))
        ctx = routelab.RoutingContext(token_ids=ids, step=step, timestep=torch.rand(B))
        out = model(table[ids], ctx)
        loss = torch.nn.functional.mse_loss(out, target_table[ids])
        opt.zero_grad()
        (loss + routelab.total_aux_loss(model)).backward()
        opt.step()
        routelab.update_routers(model)
        losses.append(loss.item())
    assert all(torch.isfinite(torch.tensor(losses)))
    first, last = sum(losses[:5]) / 5, sum(losses[-5:]) / 5
    assert last < 0.5 * first, f"{name}: loss {first:.3f} -> {last:.3f}"  # at least halves


def _decision_grads(decision, tensors):
    """Gradients of a fixed random combination of the decision's weights, logits and aux losses."""
    gen = torch.Generator().manual_seed(5)
    total = (decision.weight * torch.randn(decision.weight.shape, generator=gen, dtype=decision.weight.dtype)).sum()
    if decision.router_logits is not None:
        total = total + decision.router_logits.square().sum() * 1e-3
    for loss in decision.aux_losses.values():
        total = total + loss
    grads = torch.autograd.grad(total, tensors, allow_unused=True)
    return [torch.zeros_like(t) if g is None else g for t, g in zip(tensors, grads)]


@pytest.mark.parametrize("name,options", CASES, ids=IDS)
@pytest.mark.parametrize("training", [True, False])
def test_precomputed_logits_equal_forward_or_are_refused(name, options, training):
    """The `logit_gate()` capability: a router that declares a gate routes given F.linear(x, *gate) exactly as its
    own forward does (fp64: decision and every gradient); one that declares none refuses with TypeError."""
    torch.manual_seed(2)
    (router,) = make_routers(name, options, 1)
    router = router.double().train(training)
    B, L = 2, 6
    x = torch.randn(B * L, D, dtype=torch.float64, requires_grad=True)
    gate = router.logit_gate()
    if gate is None:
        with pytest.raises(TypeError, match="precomputed logits"):
            router.route_logits(x, torch.zeros(B * L, router.num_experts, dtype=torch.float64), make_ctx(B, L))
        return
    weight, bias = gate
    assert weight.shape == (router.num_experts, D)
    tensors = [x, *[p for p in router.parameters() if p.requires_grad]]
    state = copy.deepcopy(router.state_dict())
    torch.manual_seed(3)
    ref = router(x, make_ctx(B, L))
    ref_grads = _decision_grads(ref, tensors)
    router.load_state_dict(state)
    torch.manual_seed(3)
    got = router.route_logits(x, torch.nn.functional.linear(x, weight, bias), make_ctx(B, L))
    got_grads = _decision_grads(got, tensors)
    assert torch.equal(got.token_index, ref.token_index) and torch.equal(got.expert_index, ref.expert_index)
    torch.testing.assert_close(got.weight, ref.weight, rtol=1e-12, atol=1e-12)
    assert got.aux_losses.keys() == ref.aux_losses.keys()
    for key in ref.aux_losses:
        torch.testing.assert_close(got.aux_losses[key], ref.aux_losses[key], rtol=1e-12, atol=1e-12)
    for g, g_ref in zip(got_grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-10, atol=1e-12)
    with pytest.raises(ValueError, match="logits_TE"):
        router.route_logits(x, torch.zeros(B * L, router.num_experts + 1, dtype=torch.float64))
