"""sinkhorn (ROUTERS.md §5): plan marginals against a plain-domain reference, p = 0 ≡ topk, balance on the transport
branch, eval never transports, BASE-style exact balance, seeded branch, padding."""

import pytest
import torch

import routelab
from routelab.routing._util import unit_interval
from routelab.routing.sinkhorn import sinkhorn_plan


def _router(E=4, d=8, **options):
    return routelab.create_router("sinkhorn", d_model=d, num_experts=E, **options)


def _plain_sinkhorn(cost, xi, iters):
    """Textbook Sinkhorn–Knopp in the plain domain, fp64: scale rows to 1 and columns to T/E alternately."""
    T, E = cost.shape
    K = torch.exp(cost.double() / xi)
    u, v = torch.ones(T, dtype=torch.float64), torch.ones(E, dtype=torch.float64)
    for _ in range(iters):
        v = (T / E) / (K * u[:, None]).sum(0)
        u = 1.0 / (K * v[None, :]).sum(1)
    return u[:, None] * K * v[None, :]


def test_plan_marginals_and_plain_reference():
    torch.manual_seed(0)
    cost = torch.randn(12, 4).softmax(-1)
    plan = sinkhorn_plan(cost.double(), xi=0.5, max_iter=2000, tol=1e-9)
    torch.testing.assert_close(plan.sum(1), torch.ones(12, dtype=torch.float64), rtol=0, atol=1e-9)
    torch.testing.assert_close(plan.sum(0), torch.full((4,), 3.0, dtype=torch.float64), rtol=1e-8, atol=0)
    torch.testing.assert_close(plan, _plain_sinkhorn(cost, 0.5, 2000), rtol=1e-7, atol=1e-9)
    # fp32, the default tolerance, small ξ (exp(C/ξ) would overflow outside the log domain at ξ = 0.005)
    plan32 = sinkhorn_plan(cost, xi=0.01, max_iter=5000, tol=1e-4)
    assert torch.isfinite(plan32).all()
    torch.testing.assert_close(plan32.sum(1), torch.ones(12), rtol=0, atol=1e-5)
    assert (plan32.sum(0) - 3.0).abs().max() <= 1e-4 * 3.0 + 1e-5


def test_p0_is_bit_identical_to_topk():
    torch.manual_seed(1)
    for k in (1, 2):
        sink = _router(k=k, p=0.0)
        topk = routelab.create_router("topk", d_model=8, num_experts=4, k=k, aux_loss_coef=0.0)
        topk.gate.weight.data.copy_(sink.gate.weight.data)
        for step in range(3):
            x = torch.randn(20, 8)
            ctx = routelab.RoutingContext(step=step)
            a, b = sink(x, ctx), topk(x, ctx)
            assert torch.equal(a.token_index, b.token_index) and torch.equal(a.expert_index, b.expert_index)
            assert torch.equal(a.weight, b.weight)


def test_p1_transports_every_training_forward_and_eval_never():
    torch.manual_seed(2)
    router = _router(k=2, p=1.0, xi=0.5, max_iter=500, tol=1e-7)
    x = torch.randn(16, 8)
    scores = torch.softmax(x @ router.gate.weight.detach().T, -1)
    plan = _plain_sinkhorn(scores, 0.5, 500)
    for step in range(3):
        d = router(x, routelab.RoutingContext(step=step))
        for t in range(16):
            ranked = sorted(range(4), key=lambda e: (-plan[t, e].item(), e))[:2]
            mine = d.expert_index[d.token_index == t].tolist()
            assert sorted(mine) == sorted(ranked)
            w = d.weight[d.token_index == t].double()
            ref = plan[t, mine] / plan[t, mine].sum()
            torch.testing.assert_close(w, ref, rtol=1e-4, atol=1e-6)
    router.eval()
    topk = routelab.create_router("topk", d_model=8, num_experts=4, k=2, aux_loss_coef=0.0)
    topk.gate.weight.data.copy_(router.gate.weight.data)
    a, b = router(x), topk(x)
    assert torch.equal(a.expert_index, b.expert_index) and torch.equal(a.weight, b.weight)


@pytest.mark.parametrize("k", [1, 2])
def test_skewed_logits_still_give_balanced_hard_loads_on_the_transport_branch(k):
    torch.manual_seed(3)
    T, E = 64, 4
    # cost="logits": with cost="softmax" a saturated softmax flattens the cost differences between the
    # non-preferred experts, the plan's rows turn nearly uniform, and rounding them is not balanced (see the report).
    router = _router(E=E, k=k, p=1.0, xi=0.05, max_iter=500, cost="logits")
    x = torch.randn(T, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.gate.weight[:, 0] = 0.0
        router.gate.weight[0, 0] = 8.0  # every token prefers expert 0 by a margin of about 8 logits
    plain = router.eval()(x).expert_load()
    assert plain[0] == T  # top-k sends everyone to expert 0
    load = router.train()(x).expert_load()
    assert load.max() <= 1.25 * T * k / E and load.min() >= 0.75 * T * k / E


def test_balanced_k1_gives_exactly_T_over_E_per_expert():
    torch.manual_seed(4)
    router = _router(E=4, k=1, p=1.0, balanced=True)
    x = torch.randn(24, 8)
    with torch.no_grad():
        router.gate.weight[0] += 3.0
    d = router(x)
    assert d.expert_load().tolist() == [6, 6, 6, 6]
    assert torch.all(d.experts_per_token() == 1)


def test_branch_is_a_function_of_seed_step_layer():
    a, b, c = _router(p=0.3, seed=1), _router(p=0.3, seed=1), _router(p=0.3, seed=2)
    ctxs = [routelab.RoutingContext(step=s, layer_index=l) for s in range(400) for l in range(3)]
    branches = [a.transport_branch(ctx) for ctx in ctxs]
    assert branches == [b.transport_branch(ctx) for ctx in ctxs]
    assert branches != [c.transport_branch(ctx) for ctx in ctxs]
    assert 0.25 < sum(branches) / len(branches) < 0.35
    assert [a.transport_branch(ctx) for ctx in ctxs[:6]] == branches[:6]  # no hidden state consumed
    # without a step, the router's own count of optimizer steps decides; extra forwards change nothing
    b.gate.weight.data.copy_(a.gate.weight.data)
    x = torch.randn(8, 8)
    for _ in range(5):
        a(x), a(x), b(x)
        routelab.update_routers(a), routelab.update_routers(b)
    assert int(a.step_count) == 5
    assert a.transport_branch(None) == (unit_interval(1, 5, 0) < 0.3)
    assert torch.equal(a(x).weight, b(x).weight)


def test_padding_is_outside_the_marginals_and_unassigned():
    torch.manual_seed(5)
    router = _router(E=4, k=2, p=1.0, xi=0.5)
    x = torch.randn(12, 8)
    pad = torch.zeros(12, dtype=torch.bool)
    pad[[1, 5, 6, 11]] = True
    d = router(x, routelab.RoutingContext(padding_mask=pad, step=0))
    alone = router(x[~pad], routelab.RoutingContext(step=0))
    real = (~pad).nonzero().squeeze(1)
    assert torch.equal(d.token_index, real[alone.token_index])
    assert torch.equal(d.expert_index, alone.expert_index)
    torch.testing.assert_close(d.weight, alone.weight)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(k=5), "k must be"),
        (dict(p=1.5), "p must be"),
        (dict(xi=0), "xi must be"),
        (dict(max_iter=0), "max_iter"),
        (dict(tol=0), "tol must be"),
        (dict(cost="plan"), "cost must be one of"),
        (dict(gate_from="logits"), "gate_from must be one of"),
        (dict(balanced=True, k=2), "balanced=True"),
        (dict(balanced="yes", k=1), "balanced must be one of"),
        (dict(seed=-1), "seed"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        _router(**options)
