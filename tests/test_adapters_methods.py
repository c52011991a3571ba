"""Each method's defining property, against hand computations."""

import itertools
import math

import pytest
import torch
from torch import nn

import routelab
from routelab.adapters import add_lora_experts, rloo_loss, routed_lora_layers
from routelab.adapters.wrap import AdapterSpec

D, O = 12, 9


def _rand_B(adapter):
    with torch.no_grad():
        adapter.B.normal_()
    return adapter


def test_smora_with_every_rank_active_is_one_lora_of_rank_rE():
    """k = r·E and a uniform router (zero gate): every rank's gate is exactly 1, so the update is the plain LoRA
    B A x · alpha/r of rank r·E — outputs and the gradients of A, B and x."""
    E, r = 3, 2
    adapter = _rand_B(AdapterSpec(method="smora", num_experts=E, r=r, alpha=5.0,
                                  router_options={"k": E * r}).build(D, O).double())
    with torch.no_grad():
        adapter.router.gate.weight.zero_()
    A_RD = adapter.A.detach().reshape(E * r, D).clone().requires_grad_(True)
    B_RO = adapter.B.detach().reshape(E * r, O).clone().requires_grad_(True)
    x = torch.randn(7, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, decision = adapter(x)
    y_ref = (x_ref @ A_RD.T) @ B_RO * (5.0 / r)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    assert decision.experts_per_token().eq(E * r).all()
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.A.grad.reshape(E * r, D), A_RD.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.B.grad.reshape(E * r, O), B_RO.grad, rtol=1e-12, atol=1e-12)


def test_smora_gate_is_weight_times_selected_ranks():
    """Top-k ranks of a learned router: y = B diag(g) A x with g = k·w on the selected ranks, 0 elsewhere."""
    adapter = _rand_B(AdapterSpec(method="smora", num_experts=4, r=2, alpha=2.0,
                                  router_options={"k": 3}).build(D, O).double())
    x = torch.randn(6, D, dtype=torch.float64)
    y, decision = adapter(x)
    g = torch.zeros(6, 8, dtype=torch.float64)
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(), decision.weight.tolist()):
        g[t, e] = 3 * w
    ref = ((x @ adapter.A.detach().reshape(8, D).T) * g) @ adapter.B.detach().reshape(8, O) * (2.0 / 2)
    torch.testing.assert_close(y.detach(), ref, rtol=1e-12, atol=1e-12)
    assert adapter.router.balance == "loss_free"  # the paper's bias balancing is the default


def test_hydra_has_one_A():
    adapter = AdapterSpec(method="hydra", num_experts=5, r=3).build(D, O)
    a_params = [(n, p) for n, p in adapter.named_parameters() if n == "A" or n.endswith(".A")]
    assert len(a_params) == 1 and a_params[0][1].shape == (3, D)
    assert adapter.B.shape == (5, 3, O)
    # Every expert's update is B_e (A x): with the A shared, y = Σ_e w_e B_e A x by hand.
    _rand_B(adapter)
    x = torch.randn(4, D)
    y, decision = adapter(x)
    ref = torch.zeros(4, O)
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(), decision.weight.tolist()):
        ref[t] += w * (x[t] @ adapter.A.detach().T) @ adapter.B.detach()[e] * adapter.scale
    torch.testing.assert_close(y.detach(), ref, rtol=1e-5, atol=1e-6)


def test_flylora_A_is_frozen_sparse_and_routes_by_magnitude():
    E, r, k = 4, 4, 5
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(40, 24))
    add_lora_experts(model, target_modules=["0"], method="flylora", num_experts=E, r=r,
                     method_options={"k": k}, verbose=False)
    adapter = model[0].adapter
    A = adapter.A.clone()
    R = E * r
    p = round(40 * k / R)  # default sparsity k/R, the authors' choice
    assert A.shape == (R, 40)
    assert torch.count_nonzero(A, dim=1).eq(p).all()
    assert all(not n.endswith("projection") for n, _ in adapter.named_parameters())
    assert "router.projection" in adapter.state_dict()  # a buffer: saved with the adapters, never trained
    opt = torch.optim.AdamW([q for q in model.parameters() if q.requires_grad], lr=1e-1)
    x = torch.randn(32, 40)
    for _ in range(3):
        model(x).square().mean().backward()
        opt.step()
        opt.zero_grad()
        routelab.update_routers(model)
    assert torch.equal(adapter.A, A)
    # Routing: the k ranks with the largest |A x + d|, weight 1; d moved by exactly ±rate per update.
    model.eval()
    model(x)
    decision = model[0].last_decision
    h = x @ A.T + adapter.router.expert_bias
    expected = h.abs().topk(k, dim=1).indices.sort(dim=1).values
    got = decision.expert_index.view(32, k).sort(dim=1).values
    assert torch.equal(got, expected)
    assert torch.equal(decision.weight, torch.ones(32 * k))
    steps = adapter.router.expert_bias / adapter.router.bias_update_rate
    assert torch.allclose(steps, steps.round(), atol=1e-3) and steps.abs().max() <= 3


def test_remix_weights_are_exactly_one_over_k():
    adapter = AdapterSpec(method="remix", num_experts=6, r=2, router_options={"k": 3}).build(D, O)
    x = torch.randn(10, D)
    for training in (True, False):
        adapter.train(training)
        _, decision = adapter(x)
        assert torch.equal(decision.weight, torch.full((30,), 1 / 3))
        assert not decision.weight.requires_grad
        assert decision.experts_per_token().eq(3).all()
        per_token = decision.expert_index.view(10, 3)
        assert all(len(set(row)) == 3 for row in per_token.tolist())


def _remix_model(E=3, k=2, seed=0):
    torch.manual_seed(seed)
    model = nn.Sequential(nn.Linear(4, 3, bias=False))
    add_lora_experts(model, target_modules=["0"], method="remix", num_experts=E, r=2,
                     router_options={"k": k, "aux_loss_coef": 0.0}, verbose=False)
    adapter = model[0].adapter
    with torch.no_grad():
        adapter.B.normal_()
        adapter.router.gate.weight.normal_()
    return model, adapter


def test_remix_router_gets_gradient_only_through_rloo():
    model, adapter = _remix_model()
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    assert adapter.router.gate.weight.grad is None or adapter.router.gate.weight.grad.abs().sum() == 0
    adapter.zero_grad()
    loss = rloo_loss(model, lambda: model(x).square().sum(), num_samples=4)
    loss.backward()
    assert adapter.router.gate.weight.grad.abs().sum() > 0
    assert adapter.B.grad.abs().sum() > 0


def test_remix_rloo_is_unbiased():
    """One token, E=3, k=2: the exact ∇_z E_S[L(S)] (enumerating the ordered samples' Plackett-Luce
    probabilities by hand) equals the mean of many RLOO estimates within Monte Carlo error."""
    model, adapter = _remix_model()
    x = torch.randn(1, 4)
    c = torch.randn(3)
    A, B, s = adapter.A.detach(), adapter.B.detach(), adapter.scale

    def loss_of(S):
        y = x[0] @ model[0].base.weight.detach().T + sum(((x[0] @ A[e].T) @ B[e]) * s / len(S) for e in S)
        return float((y * c).sum() ** 2)

    z = (x @ adapter.router.gate.weight.detach().T)[0].clone().requires_grad_(True)
    p = z.softmax(0)
    expected_L = sum(p[a] * p[b] / (1 - p[a]) * loss_of({a, b}) for a, b in itertools.permutations(range(3), 2))
    exact = torch.autograd.grad(expected_L, z)[0]  # dE/dz
    exact_W = exact[:, None] * x  # dz/dW = x for a linear gate without bias

    # Many copies of the token as separate "sequences" (per-sequence rewards): one call averages their estimates.
    torch.manual_seed(123)
    n = 20000
    xs = x.expand(n, 1, 4)
    adapter.zero_grad()
    rloo_loss(model, lambda: ((model(xs)[:, 0] * c).sum(-1)) ** 2, num_samples=2).backward()
    estimate = adapter.router.gate.weight.grad
    err = (estimate - exact_W).abs().max() / exact_W.abs().max()
    assert err < 0.05, (estimate, exact_W)


def test_rloo_loss_needs_remix_layers_and_two_samples():
    model = nn.Sequential(nn.Linear(4, 3))
    add_lora_experts(model, target_modules=["0"], method="molora", num_experts=2, r=1, verbose=False)
    with pytest.raises(ValueError, match="no 'remix'"):
        rloo_loss(model, lambda: model(torch.randn(2, 4)).sum())
    remix, _ = _remix_model()
    with pytest.raises(ValueError, match="num_samples"):
        rloo_loss(remix, lambda: remix(torch.randn(2, 4)).sum(), num_samples=1)


def test_remix_rejects_routers_without_fixed_k():
    with pytest.raises(ValueError, match="fixed"):
        AdapterSpec(method="remix", router="top_p", router_options={"p": 0.5}).build(D, O)


def test_mhr_heads_route_separately_and_merge_into_one_decision():
    adapter = AdapterSpec(method="mhr", num_experts=4, r=2, router_options={"k": 2},
                          method_options={"n_splits": 3}).build(D, O)
    _, decision = adapter(torch.randn(5, D))
    assert decision.num_experts == 12
    per_head = torch.bincount(decision.expert_index // 4, minlength=3)
    assert per_head.tolist() == [10, 10, 10]  # each of the 3 heads picks 2 of its 4 skills for each of 5 tokens
    with pytest.raises(ValueError, match="n_splits"):
        AdapterSpec(method="mhr", method_options={"n_splits": 5}).build(D, O)


@pytest.mark.parametrize("method", ["lora", "molora", "hydra", "smora", "flylora", "remix", "mhr"])
def test_base_weights_get_no_gradient_and_start_equal(method):
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(D, 12), nn.GELU(), nn.Linear(12, O))
    reference = [p.detach().clone() for p in base.parameters()]
    x = torch.randn(6, D)
    y0 = base(x).detach()
    opts = {"n_splits": 3} if method == "mhr" else None
    add_lora_experts(base, target_modules=["0", "2"], method=method, num_experts=4, r=2,
                     method_options=opts, verbose=False)
    torch.testing.assert_close(base(x), y0)  # B = 0: the wrapped model starts as its base
    base(x).square().sum().backward()
    for layer in routed_lora_layers(base).values():
        assert layer.base.weight.grad is None and layer.base.bias.grad is None
        assert not layer.base.weight.requires_grad
        assert layer.adapter.B.grad is not None and layer.adapter.B.grad.abs().sum() > 0
    for p, ref in zip([layer.base.weight for layer in routed_lora_layers(base).values()], reference[::2]):
        assert torch.equal(p, ref)


def test_adapter_flops_count_active_ranks():
    adapter = AdapterSpec(method="molora", num_experts=8, r=4, router_options={"k": 2}).build(16, 32)
    _, decision = adapter(torch.randn(10, 16))
    assert adapter.adapter_flops(decision) == 2 * 4 * (16 + 32) * 2 + 2 * 16 * 8
    assert math.isclose(AdapterSpec(method="lora", r=8).build(16, 32).adapter_flops(None), 2 * 8 * 48)
