"""expert_choice (ROUTERS.md §4): exact per-expert capacity, weights, schedules, non-causality, validation."""

import math

import pytest
import torch

import routelab
from routelab.routing.expert_choice import schedule_phi


def _router(E=4, d=8, **options):
    return routelab.create_router("expert_choice", d_model=d, num_experts=E, **options)


def _route(router, x_BLD, **ctx):
    B, L, D = x_BLD.shape
    return router(x_BLD.reshape(-1, D), routelab.RoutingContext(batch_shape=(B, L), **ctx))


def _per_sequence_load(decision, B, L, E):
    load = torch.zeros(B, E, dtype=torch.long)
    for t, e in zip(decision.token_index.tolist(), decision.expert_index.tolist()):
        load[t // L, e] += 1
    return load


@pytest.mark.parametrize("gating", ["pre_softmax", "post_softmax", "sigmoid"])
@pytest.mark.parametrize("cf", [0.5, 1.0, 2.0, 3.0])
def test_every_expert_takes_exactly_C_tokens_per_sequence_for_any_weights(gating, cf):
    torch.manual_seed(0)
    B, L, E = 3, 10, 4
    router = _router(E=E, capacity_factor=cf, gating=gating)
    with torch.no_grad():
        router.gate.weight.normal_(std=5.0)  # random, skewed gate
    d = _route(router, torch.randn(B, L, 8))
    C = max(math.floor(L * cf / E), 1)
    assert torch.all(_per_sequence_load(d, B, L, E) == C)
    per_token = d.experts_per_token()
    assert per_token.float().mean().item() == pytest.approx(E * C / L)
    assert per_token.min() >= 0 and per_token.max() <= E


def test_batch_scope_and_padding():
    torch.manual_seed(1)
    B, L, E = 2, 9, 3
    router = _router(E=E, capacity_factor=1.0, scope="batch")
    d = _route(router, torch.randn(B, L, 8))
    assert torch.all(d.expert_load() == (B * L) // E)
    pad = torch.zeros(B, L, dtype=torch.bool)
    pad[1, 5:] = True  # 5 real tokens in sequence 1
    seq = _router(E=E, capacity_factor=1.0)
    d = _route(seq, torch.randn(B, L, 8), padding_mask=pad)
    load = _per_sequence_load(d, B, L, E)
    assert load[0].tolist() == [3, 3, 3] and load[1].tolist() == [1, 1, 1]
    assert not pad.reshape(-1)[d.token_index].any()


def test_pre_softmax_picks_and_weights_match_a_loop():
    torch.manual_seed(2)
    L, E, cf = 12, 4, 2.0
    router = _router(E=E, capacity_factor=cf)
    x = torch.randn(L, 8)
    d = router(x)
    W = router.gate.weight.detach().double()
    probs = [torch.softmax(W @ x[t].double(), 0).tolist() for t in range(L)]
    C = int(L * cf / E)
    expected = {}
    for e in range(E):
        for t in sorted(range(L), key=lambda t: (-probs[t][e], t))[:C]:
            expected[(t, e)] = probs[t][e]
    got = {(t, e): w for t, e, w in zip(d.token_index.tolist(), d.expert_index.tolist(), d.weight.tolist())}
    assert got.keys() == expected.keys()
    for key, w in expected.items():
        assert got[key] == pytest.approx(w, rel=1e-5)


def test_post_softmax_weights_sum_to_one_per_picked_token():
    torch.manual_seed(3)
    router = _router(E=4, capacity_factor=1.0, gating="post_softmax")
    x = torch.randn(16, 8)
    d = router(x)
    logits = router.gate.weight.detach() @ x.T  # [E, T]
    sums = d.dense_weights().sum(-1)
    picked = d.experts_per_token() > 0
    torch.testing.assert_close(sums[picked], torch.ones(int(picked.sum())))
    assert torch.all(sums[~picked] == 0)
    for t in range(16):  # each picked token: softmax of its logits over its picking experts
        mine = d.expert_index[d.token_index == t].tolist()
        if mine:
            ref = torch.softmax(logits[mine, t], 0)
            torch.testing.assert_close(d.weight[d.token_index == t], ref)


def test_schedules_monotone_and_mean():
    r = torch.linspace(0, 1, 1001, dtype=torch.float64)
    for name in ("linear", "cosine"):
        assert torch.all(schedule_phi(name, r).diff() >= 0)
        assert torch.all(schedule_phi(name + "_reverse", r).diff() <= 0)
    assert torch.all(schedule_phi("bell_gaussian_reverse", r[500:]).diff() >= 0)
    for name in ("bell", "bell_gaussian"):
        phi = schedule_phi(name, torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))
        torch.testing.assert_close(phi, torch.tensor([0.0, 1.0, 0.0], dtype=torch.float64))
    k_min, k_max = 8, 32
    k = torch.round(k_min + (k_max - k_min) * schedule_phi("linear", r)).clamp(k_min, k_max)
    assert k.mean().item() == pytest.approx((k_min + k_max) / 2, abs=0.05)
    assert schedule_phi("cosine", torch.tensor(0.25)).item() == pytest.approx((1 - math.cos(math.pi / 4)) / 2)


def test_schedule_sets_capacity_per_sample_from_timestep():
    torch.manual_seed(4)
    B, L, E = 3, 8, 4
    router = _router(E=E, schedule="linear", k_min=1, k_max=3)
    d = _route(router, torch.randn(B, L, 8), timestep=torch.tensor([0.0, 0.5, 1.0]))
    # k(r) = 1, 2, 3  →  C_b = floor(8·k/4) = 2, 4, 6
    load = _per_sequence_load(d, B, L, E)
    assert load.tolist() == [[2] * 4, [4] * 4, [6] * 4]
    reverse = _router(E=E, schedule="linear_reverse", k_min=1, k_max=3)
    d = _route(reverse, torch.randn(B, L, 8), timestep=torch.tensor([0.0, 0.5, 1.0]))
    assert _per_sequence_load(d, B, L, E).tolist() == [[6] * 4, [4] * 4, [2] * 4]
    with pytest.raises(ValueError, match="timestep"):
        _route(router, torch.randn(B, L, 8))


def test_not_causal_a_later_token_changes_an_earlier_assignment():
    torch.manual_seed(5)
    router = _router(E=4, capacity_factor=1.0)
    assert router.causal is False
    x = torch.randn(1, 12, 8)
    x2 = x.clone()
    x2[0, 6:] *= 20  # later tokens with extreme scores take the experts' places
    d1, d2 = _route(router, x), _route(router, x2)
    early = lambda d: {(t, e) for t, e in zip(d.token_index.tolist(), d.expert_index.tolist()) if t < 6}
    assert early(d1) != early(d2)


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(capacity_factor=0), "capacity_factor"),
        (dict(capacity_factor=5.0), "capacity_factor"),
        (dict(gating="softmax"), "gating must be one of"),
        (dict(scope="token"), "scope must be one of"),
        (dict(schedule="linear"), "k_min"),
        (dict(schedule="nope", k_min=1, k_max=2), "schedule must be one of"),
        (dict(schedule="linear", k_min=3, k_max=2), "k_max"),
        (dict(schedule="linear", k_min=1, k_max=2, scope="batch"), "scope"),
        (dict(k_min=1), "only used with a schedule"),
        (dict(bell_width=0), "bell_width"),
        (dict(z_loss_coef=-1), "z_loss_coef"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        _router(**options)
