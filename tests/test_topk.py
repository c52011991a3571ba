"""Top-k router: selection, normalisation, aux and z losses against hand computations, capacity dropping."""

import math

import pytest
import torch

import routelab


def _router(E=8, d=16, **options):
    return routelab.create_router("topk", d_model=d, num_experts=E, **options)


def _set_logits(router, logits_TE):
    """Make the gate output the given logits for x = identity rows (d_model = T)."""
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.T)
    return torch.eye(logits_TE.shape[0])


def test_k_distinct_experts_per_token_and_weights():
    torch.manual_seed(0)
    for k in (1, 2, 3, 8):
        router = _router(E=8, k=k)
        d = router(torch.randn(50, 16))
        assert d.num_assignments == 50 * k
        assert torch.all(d.experts_per_token() == k)
        pairs = set(zip(d.token_index.tolist(), d.expert_index.tolist()))
        assert len(pairs) == 50 * k
        assert torch.all(d.weight >= 0)
        sums = d.dense_weights().sum(-1)
        if k > 1:  # "selected": weights of a token sum to 1
            torch.testing.assert_close(sums, torch.ones(50), rtol=1e-6, atol=1e-6)
        if k < 8 and k == 1:  # "none": a strict part of the softmax
            assert torch.all(sums < 1)


def test_normalize_none_keeps_softmax_probabilities_and_selects_largest():
    logits = torch.tensor([[0.0, 3.0, 1.0, 2.0], [5.0, 5.0, -1.0, 0.0]])
    router = _router(E=4, d=2, k=2, normalize="none", aux_loss_coef=0.0)
    x = _set_logits(router, logits)
    d = router(x)
    probs = torch.softmax(logits, -1)
    assert d.expert_index.tolist() == [1, 3, 0, 1]  # token 1 ties 0 and 1: lower index first
    torch.testing.assert_close(d.weight, torch.stack([probs[0, 1], probs[0, 3], probs[1, 0], probs[1, 1]]))


def test_k1_none_gives_router_gradient_from_task_loss():
    torch.manual_seed(0)
    router = _router(E=4, k=1, aux_loss_coef=0.0)
    layer = routelab.MoELayer(16, 8, router)
    layer(torch.randn(10, 16)).square().sum().backward()
    assert router.gate.weight.grad is not None and router.gate.weight.grad.abs().sum() > 0


def test_aux_loss_matches_hand_computation():
    torch.manual_seed(1)
    T, E, k, coef = 6, 4, 2, 0.05
    logits = torch.randn(T, E)
    router = _router(E=E, d=T, k=k, aux_loss_coef=coef)
    d = router(_set_logits(router, logits))
    probs = [[math.exp(v) for v in row] for row in logits.tolist()]
    probs = [[v / sum(row) for v in row] for row in probs]
    counts = [0] * E
    for row in probs:
        for e in sorted(range(E), key=lambda e: -row[e])[:k]:
            counts[e] += 1
    f = [c / (k * T) for c in counts]
    P = [sum(row[e] for row in probs) / T for e in range(E)]
    expected = coef * E * sum(fi * pi for fi, pi in zip(f, P))
    assert d.aux_losses["aux"].item() == pytest.approx(expected, rel=1e-6)


@pytest.mark.parametrize("E,k", [(8, 1), (8, 2), (16, 4), (6, 2)])
def test_aux_loss_is_coef_under_uniform_routing(E, k):
    router = _router(E=E, k=k, aux_loss_coef=0.01)
    with torch.no_grad():
        router.gate.weight.zero_()  # every probability exactly 1/E
    d = router(torch.randn(32, 16))
    assert d.aux_losses["aux"].item() == pytest.approx(0.01, rel=1e-6)


def test_aux_loss_reaches_router_and_imbalance_costs_more():
    torch.manual_seed(0)
    router = _router(E=4, k=1, aux_loss_coef=1.0)
    x = torch.randn(64, 16)
    d = router(x)
    d.aux_losses["aux"].backward()
    assert router.gate.weight.grad.abs().sum() > 0
    skewed = torch.zeros(64, 4)
    skewed[:, 0] = 5.0
    router2 = _router(E=4, d=64, k=1, aux_loss_coef=1.0)
    assert router2(_set_logits(router2, skewed)).aux_losses["aux"] > 1.0 + 1e-3


def test_z_loss_of_zero_logits_and_hand_computation():
    router = _router(E=8, k=2, aux_loss_coef=0.0, z_loss_coef=1e-3)
    with torch.no_grad():
        router.gate.weight.zero_()
    d = router(torch.randn(5, 16))
    assert d.aux_losses["z"].item() == pytest.approx(1e-3 * math.log(8) ** 2, rel=1e-6)
    logits = torch.tensor([[1.0, 2.0, 0.0], [-1.0, 0.5, 4.0]])
    router = _router(E=3, d=2, k=1, aux_loss_coef=0.0, z_loss_coef=0.5)
    d = router(_set_logits(router, logits))
    lse = [math.log(sum(math.exp(v) for v in row)) for row in logits.tolist()]
    assert d.aux_losses["z"].item() == pytest.approx(0.5 * sum(v * v for v in lse) / 2, rel=1e-6)
    shifted = logits + torch.tensor([[3.0], [0.0]])
    d2 = router(_set_logits(router, shifted))
    assert torch.equal(d2.expert_index, d.expert_index)
    assert d2.aux_losses["z"].item() != pytest.approx(d.aux_losses["z"].item())


def test_padding_is_not_routed_and_left_out_of_the_aux_loss():
    torch.manual_seed(0)
    router = _router(E=4, k=2, aux_loss_coef=1.0)
    x = torch.randn(2, 5, 16)
    pad = torch.tensor([[False] * 5, [False, False, True, True, True]])
    d = router(x.reshape(-1, 16), routelab.RoutingContext(padding_mask=pad))
    assert set(d.token_index.tolist()) == {0, 1, 2, 3, 4, 5, 6}
    real = router(x.reshape(-1, 16)[~pad.reshape(-1)])
    torch.testing.assert_close(d.aux_losses["aux"], real.aux_losses["aux"])


@pytest.mark.parametrize("policy", ["probs", "position"])
@pytest.mark.parametrize("factor", [0.5, 1.0, 1.25])
def test_capacity_keeps_at_most_C_and_drops_the_right_ones(policy, factor):
    torch.manual_seed(3)
    T, E, k = 40, 4, 2
    router = _router(E=E, k=k, capacity_factor=factor, drop_policy=policy)
    dropless = _router(E=E, k=k)
    dropless.load_state_dict(router.state_dict())
    x = torch.randn(T, 16)
    x[:, 0] += 2.0  # skew toward whatever expert likes feature 0
    full, capped = dropless(x), router(x)
    C = math.ceil(T * k / E * factor)
    assert capped.expert_load().max() <= C
    assert capped.num_dropped == full.num_assignments - capped.num_assignments
    probs = torch.softmax(full.router_logits, -1)
    kept = set(zip(capped.token_index.tolist(), capped.expert_index.tolist()))
    for e in range(E):
        mine = [(t, probs[t, e].item()) for t, ee in zip(full.token_index.tolist(), full.expert_index.tolist()) if ee == e]
        keep = [m for m in mine if (m[0], e) in kept]
        drop = [m for m in mine if (m[0], e) not in kept]
        assert len(keep) == min(C, len(mine))
        if drop and policy == "probs":
            assert min(p for _, p in keep) >= max(p for _, p in drop)
        if drop and policy == "position":
            assert max(t for t, _ in keep) < min(t for t, _ in drop)
    # kept assignments keep their dropless weights
    dense_full, dense_capped = full.dense_weights(), capped.dense_weights()
    mask = dense_capped > 0
    torch.testing.assert_close(dense_capped[mask], dense_full[mask])


def test_capacity_hand_computed_dispatch():
    # k=1, E=2, T=4, factor 1 → C=2. All four tokens prefer expert 0 with probabilities rising with position.
    logits = torch.tensor([[1.0, 0.0], [2.0, 0.0], [3.0, 0.0], [4.0, 0.0]])
    for policy, kept in (("probs", [2, 3]), ("position", [0, 1])):
        router = _router(E=2, d=4, k=1, capacity_factor=1.0, drop_policy=policy)
        d = router(_set_logits(router, logits))
        assert d.token_index.tolist() == kept and d.expert_index.tolist() == [0, 0]
        assert d.num_dropped == 2


def test_large_capacity_drops_nothing():
    torch.manual_seed(0)
    router = _router(E=8, k=2, capacity_factor=8.0)
    x = torch.randn(100, 16)
    x[:, :4] *= 5
    d = router(x)
    assert d.num_dropped == 0 and d.num_assignments == 200
    assert router.causal is False and _router().causal is True


def test_router_math_is_fp32_for_bf16_input():
    router = _router(E=8, k=2).to(torch.bfloat16)
    d = router(torch.randn(10, 16, dtype=torch.bfloat16))
    assert d.weight.dtype == torch.float32 and d.router_logits.dtype == torch.float32


def test_jitter_only_in_training():
    torch.manual_seed(0)
    router = _router(E=8, k=2, jitter=0.5)
    x = torch.randn(200, 16)
    router.eval()
    assert torch.equal(router(x).weight, router(x).weight)
    router.train()
    assert not torch.equal(router(x).weight, router(x).weight)


@pytest.mark.parametrize("T", [3, 600])  # below and above SORT_ALL_MAX_ELEMENTS (sort every row / topk + tie search)
def test_top_indices_breaks_ties_to_the_lower_index_on_both_branches(T):
    from routelab.routing._util import SORT_ALL_MAX_ELEMENTS, top_indices

    E, k = 8, 3
    assert (T * E <= SORT_ALL_MAX_ELEMENTS) == (T == 3)
    g = torch.Generator().manual_seed(T)
    values = torch.randint(0, 4, (T, E), generator=g).float()  # many ties
    want = [sorted(range(E), key=lambda e: (-row[e], e))[:k] for row in values.tolist()]
    assert top_indices(values, k).tolist() == want


def test_decoding_without_grad_skips_the_aux_losses_and_nothing_else():
    from routelab.routing.base import RouterCache, RoutingContext

    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=16, num_experts=8, k=2, z_loss_coef=1e-3)
    x = torch.randn(5, 16)
    with torch.no_grad():
        evaluating = router(x, RoutingContext(batch_shape=(5, 1)))
        decoding = router(x, RoutingContext(batch_shape=(5, 1), cache=RouterCache()))
    assert set(evaluating.aux_losses) == {"aux", "z"}  # an eval loss under no_grad still counts them
    assert decoding.aux_losses == {}
    for name in ("token_index", "expert_index", "weight"):
        assert torch.equal(getattr(decoding, name), getattr(evaluating, name))
    assert set(router(x, RoutingContext(batch_shape=(5, 1), cache=RouterCache())).aux_losses) == {"aux", "z"}
