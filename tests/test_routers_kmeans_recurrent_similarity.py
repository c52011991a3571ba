"""kmeans (ROUTERS.md §10), recurrent (§11), similarity (§12): centroid updates by hand, routing before update,
scale invariance; depth recurrence per token, one shared cell, gradients across layers; mixing against a loop,
causal and per-sequence masks, A = I reproduces softmax top-k."""

import pytest
import torch

import routelab
from routelab.routing import router_class


# -- kmeans ------------------------------------------------------------------------------------------------------


def _kmeans(**options):
    return routelab.create_router("kmeans", d_model=6, num_experts=4, init="random", **options)


def test_kmeans_update_moves_centroids_toward_their_tokens_by_hand():
    torch.manual_seed(0)
    router = _kmeans(k=1, momentum=0.9)
    mu = router.centroids.clone().double()
    x = torch.randn(10, 6)
    x[:, 0] += 3.0  # most tokens near one centroid direction, so some experts get none
    d = router(x)
    routed, expected_pairs = {e: [] for e in range(4)}, []
    for t in range(10):
        unit = x[t].double() / x[t].double().norm()
        cos = [float(unit @ mu[e] / mu[e].norm()) for e in range(4)]
        best = max(range(4), key=lambda e: (cos[e], -e))
        routed[best].append(unit)
        expected_pairs.append((t, best))
    assert sorted(zip(d.token_index.tolist(), d.expert_index.tolist())) == expected_pairs
    routelab.update_routers(router)
    for e in range(4):
        if routed[e]:
            expected = 0.9 * mu[e] + 0.1 * torch.stack(routed[e]).mean(0)
            torch.testing.assert_close(router.centroids[e].double(), expected, rtol=1e-6, atol=1e-6)
        else:
            assert torch.equal(router.centroids[e].double(), mu[e])  # experts without tokens stay put
    assert any(not units for units in routed.values())


def test_kmeans_routes_a_batch_with_pre_update_centroids_and_is_scale_invariant():
    torch.manual_seed(1)
    router = _kmeans(k=2, weighting="softmax", momentum=0.5)
    x = torch.randn(30, 6)
    router.eval()
    frozen = router(x)
    router.train()
    during = router(x)  # accumulates, but routes with the centroids from before
    assert torch.equal(during.expert_index, frozen.expert_index) and torch.equal(during.weight, frozen.weight)
    routelab.update_routers(router)
    assert not torch.equal(router(x).weight, frozen.weight)
    for alpha in (0.5, 8.0):
        d = router(alpha * x)
        assert torch.equal(d.expert_index, router(x).expert_index)
    assert list(router.parameters()) == []


def test_kmeans_micro_batches_add_up_to_one_global_batch():
    torch.manual_seed(9)
    a, b = _kmeans(k=2, momentum=0.8), _kmeans(k=2, momentum=0.8)
    x = torch.randn(24, 6)
    a(x[:10]), a(x[10:])  # two micro-batches of one optimizer step
    b(x)
    routelab.update_routers(a), routelab.update_routers(b)
    torch.testing.assert_close(a.centroids, b.centroids, rtol=1e-6, atol=1e-7)


def test_kmeans_first_batch_init_and_reseeding():
    torch.manual_seed(2)
    router = routelab.create_router("kmeans", d_model=6, num_experts=4, k=1, reseed_after=1)
    x = torch.randn(8, 6)
    router(x)
    routelab.update_routers(router)
    units = x / x.norm(dim=-1, keepdim=True)
    for e in range(4):  # each centroid is one of the first batch's tokens
        assert torch.isclose(units, router.centroids[e]).all(-1).any()
    # every token now goes to the centroid that is its own row; an expert left idle for one update is reseeded
    y = units[[0]].repeat(5, 1)
    router(y)
    routelab.update_routers(router)
    assert int(router.idle_updates.max()) == 0


# -- recurrent ---------------------------------------------------------------------------------------------------


def _recurrent_layers(n=2, **options):
    options = {"hidden": 12, **options}
    shared = router_class("recurrent").shared_modules(d_model=8, num_experts=4, **options)
    make = lambda: routelab.create_router("recurrent", d_model=8, num_experts=4, **{**options, **shared})  # noqa: E731
    return [routelab.MoELayer(8, 6, make()) for _ in range(n)]


def _run(layers, x):
    h, state, decisions = x, None, []
    for i, layer in enumerate(layers):
        y, d = layer.forward_with_decision(h, routelab.RoutingContext(state=state, layer_index=i))
        h, state = h + y, d.state
        decisions.append(d)
    return h, decisions


def test_recurrent_layers_share_one_cell():
    layers = _recurrent_layers(3)
    cells = [layer.router.cell for layer in layers]
    assert all(c is cells[0] for c in cells)
    ids = {id(p) for c in cells for p in c.parameters()}
    assert len(ids) == len(list(cells[0].parameters()))
    model = torch.nn.ModuleList(layers)
    assert sum(p.numel() for p in model.parameters()) == sum(
        p.numel() for n, p in model.named_parameters() if "cell" not in n
    ) + sum(p.numel() for p in cells[0].parameters())


def test_recurrent_routing_depends_only_on_the_same_tokens_earlier_layers():
    torch.manual_seed(3)
    layers = _recurrent_layers(3)
    x = torch.randn(6, 8)
    _, base = _run(layers, x)
    x2 = x.clone()
    x2[[0, 1, 3, 4, 5]] = torch.randn(5, 8)  # every token but 2 changes
    _, other = _run(layers, x2)
    for d1, d2 in zip(base, other):
        keep1, keep2 = d1.token_index == 2, d2.token_index == 2
        assert torch.equal(d1.expert_index[keep1], d2.expert_index[keep2])
        torch.testing.assert_close(d1.weight[keep1], d2.weight[keep2], rtol=0, atol=1e-6)
        torch.testing.assert_close(d1.state[2], d2.state[2], rtol=0, atol=1e-6)


def test_recurrent_state_carries_gradient_to_the_previous_layers_w1():
    torch.manual_seed(4)
    first, second = _recurrent_layers(2)
    x = torch.randn(6, 8)
    _, d1 = first.forward_with_decision(x, routelab.RoutingContext(layer_index=0))
    # layer 2 sees x itself, not layer 1's output: the only path back to layer 1's router is the state r_1
    _, d2 = second.forward_with_decision(x, routelab.RoutingContext(state=d1.state, layer_index=1))
    d2.router_logits.square().sum().backward()  # a loss at layer 2's router only
    assert first.router.w1.weight.grad.abs().sum() > 0
    assert first.router.w2.weight.grad is None
    with pytest.raises(ValueError, match="state"):
        first.router(torch.randn(6, 8), routelab.RoutingContext(state=torch.zeros(5, 12)))


def test_recurrent_identity_cell_gives_a_low_rank_linear_router():
    torch.manual_seed(5)
    d, E, hidden = 32, 24, 4
    router = routelab.create_router("recurrent", d_model=d, num_experts=E, hidden=hidden, cell="rnn")
    with torch.no_grad():  # an identity RNN cell on r_0 = 0: r = tanh(W1 x) ≈ W1 x for small inputs
        router.cell.weight_ih.copy_(torch.eye(hidden))
        router.cell.weight_hh.zero_(), router.cell.bias_ih.zero_(), router.cell.bias_hh.zero_()
        router.w1.weight.mul_(1e-3)
    x = torch.randn(100, d, dtype=torch.float64)
    logits = router.double()(x).router_logits
    linear = x @ (router.w2.weight @ router.w1.weight).T.detach()  # the linear router W2·W1, rank ≤ hidden
    torch.testing.assert_close(logits, linear, rtol=1e-4, atol=1e-8)  # tanh(u) = u + O(u³)
    assert torch.linalg.matrix_rank(linear) <= hidden


# -- similarity --------------------------------------------------------------------------------------------------


def _similarity_loop(x_BLD, pad_BL, W_r, W_s, tau, causal, kernel):
    """ŝ [B·L, E] by a loop over sequences and tokens."""
    B, L, _ = x_BLD.shape
    rows = []
    for b in range(B):
        probs = [torch.softmax(W_r @ x_BLD[b, j], 0) for j in range(L)]
        for t in range(L):
            js = [j for j in range(L) if (j <= t or not causal) and not pad_BL[b, j]] or [t]
            if t not in js:
                js.append(t)
            if kernel == "bilinear":
                sims = torch.stack([x_BLD[b, t] @ W_s @ x_BLD[b, j] / tau for j in js])
            else:
                sims = torch.stack([torch.cosine_similarity(x_BLD[b, t], x_BLD[b, j], 0) / tau for j in js])
            a = torch.softmax(sims, 0)
            rows.append(sum(a[i] * probs[j] for i, j in enumerate(js)))
    return torch.stack(rows)


@pytest.mark.parametrize("kernel,causal", [("bilinear", True), ("cosine", False), ("bilinear", False)])
def test_similarity_mixing_matches_a_loop_within_sequences(kernel, causal):
    torch.manual_seed(6)
    B, L, D, E, k = 2, 5, 8, 4, 2
    router = routelab.create_router("similarity", d_model=D, num_experts=E, k=k, kernel=kernel, causal=causal, tau=0.7)
    x = torch.randn(B, L, D, dtype=torch.float64)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 3:] = True
    router.double()
    d = router(x.reshape(-1, D), routelab.RoutingContext(batch_shape=(B, L), padding_mask=pad))
    W_s = router.similarity.detach() if kernel == "bilinear" else None
    mixed = _similarity_loop(x, pad, router.gate.weight.detach(), W_s, 0.7, causal, kernel)
    torch.testing.assert_close(mixed.sum(-1), torch.ones(B * L, dtype=torch.float64))  # ŝ is a distribution
    for t in range(B * L):
        mine = d.expert_index[d.token_index == t].tolist()
        if pad.reshape(-1)[t]:
            assert mine == []
            continue
        ranked = sorted(range(E), key=lambda e: (-mixed[t, e].item(), e))[:k]
        assert mine == ranked
        ref = mixed[t, ranked] / mixed[t, ranked].sum()
        torch.testing.assert_close(d.weight[d.token_index == t], ref, rtol=1e-9, atol=1e-12)


def test_similarity_with_identity_mixing_is_softmax_topk():
    torch.manual_seed(7)
    router = routelab.create_router("similarity", d_model=8, num_experts=4, k=2, kernel="cosine", tau=1e-4)
    topk = routelab.create_router("topk", d_model=8, num_experts=4, k=2, aux_loss_coef=0.0)
    topk.gate.weight.data.copy_(router.gate.weight.data)
    x = torch.randn(1, 10, 8)
    a = router(x.reshape(-1, 8), routelab.RoutingContext(batch_shape=(1, 10)))
    b = topk(x.reshape(-1, 8))
    assert torch.equal(a.expert_index, b.expert_index)
    torch.testing.assert_close(a.weight, b.weight, rtol=1e-6, atol=1e-7)


def test_similarity_routing_fluctuates_less_than_softmax_topk():
    torch.manual_seed(8)
    D, E, L = 16, 8, 64
    router = routelab.create_router("similarity", d_model=D, num_experts=E, k=2, kernel="cosine", causal=False, tau=0.1)
    topk = routelab.create_router("topk", d_model=D, num_experts=E, k=2)
    topk.gate.weight.data.copy_(router.gate.weight.data)
    centers = torch.randn(4, D)
    x = centers[torch.randint(0, 4, (L,))] + 0.5 * torch.randn(L, D)  # tokens in a few similar groups
    changed = {"similarity": 0, "topk": 0}
    for trial in range(10):
        noisy = x + 0.3 * torch.randn(L, D)
        for name, r in (("similarity", router), ("topk", topk)):
            ctx = routelab.RoutingContext(batch_shape=(1, L))
            a, b = r(x, ctx).dense_weights() > 0, r(noisy, ctx).dense_weights() > 0
            changed[name] += int((a != b).any(-1).sum())
    assert changed["similarity"] < changed["topk"]


@pytest.mark.parametrize(
    "name,options,match",
    [
        ("kmeans", dict(momentum=1.0), "momentum"),
        ("kmeans", dict(weighting="cos"), "weighting must be one of"),
        ("kmeans", dict(temperature=0), "temperature"),
        ("kmeans", dict(init="zeros"), "init must be one of"),
        ("kmeans", dict(reseed_after=0), "reseed_after"),
        ("recurrent", dict(hidden=0), "hidden"),
        ("recurrent", dict(cell="lstm"), "cell must be one of"),
        ("recurrent", dict(cell=torch.nn.GRUCell(4, 4)), "input_size"),
        ("recurrent", dict(cell=torch.nn.LSTMCell(256, 256)), "cell must be one of"),
        ("similarity", dict(kernel="dot"), "kernel must be one of"),
        ("similarity", dict(tau=0), "tau"),
        ("similarity", dict(causal=1), "causal must be one of"),
    ],
)
def test_invalid_options(name, options, match):
    with pytest.raises(ValueError, match=match):
        routelab.create_router(name, d_model=8, num_experts=4, **options)
