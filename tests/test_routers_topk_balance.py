"""topk §3 properties beyond test_topk.py: loss-free bias steps and convergence, buffers outside parameters,
group-limited selection against a loop, Switch aux at uniform load with non-uniform P, BIP duals."""

import pytest
import torch

import routelab


def _router(E=4, d=8, **options):
    return routelab.create_router("topk", d_model=d, num_experts=E, **options)


def _set_logits(router, logits_TE):
    with torch.no_grad():
        router.gate.weight.copy_(logits_TE.T)
    return torch.eye(logits_TE.shape[0])


def test_loss_free_update_is_exactly_plus_minus_rate_or_zero_at_the_mean():
    # k = 1, T = 8, E = 4: loads 4, 2, 2, 0 (mean 2)
    prefs = [0, 0, 0, 0, 1, 1, 2, 2]
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.tensor(prefs)] = 3.0
    router = _router(E=4, d=8, k=1, balance="loss_free", bias_update_rate=1e-3, aux_loss_coef=0.0)
    x = _set_logits(router, logits)
    assert router(x).expert_load().tolist() == [4, 2, 2, 0]
    routelab.update_routers(router)
    gamma = torch.tensor(1e-3, dtype=torch.float32)
    assert torch.equal(router.expert_bias, torch.stack([-gamma, 0 * gamma, 0 * gamma, gamma]))
    router(x), router(x)  # two micro-batches, one update: still one step of γ
    routelab.update_routers(router)
    assert torch.equal(router.expert_bias, torch.stack([-gamma, 0 * gamma, 0 * gamma, gamma]) * 2)


def test_bias_buffers_are_outside_parameters_and_untouched_by_backward():
    torch.manual_seed(0)
    for balance, buf in (("loss_free", "expert_bias"), ("bip", "bip_dual")):
        router = _router(balance=balance)
        assert buf in router.state_dict() and all(buf not in n for n, _ in router.named_parameters())
        getattr(router, buf).fill_(0.01)
        before = getattr(router, buf).clone()
        d = router(torch.randn(16, 8))
        (d.weight.sum() + d.aux_losses["aux"]).backward()
        assert torch.equal(getattr(router, buf), before)


def test_loss_free_balancing_drives_max_violation_toward_zero_without_changing_weights():
    torch.manual_seed(1)
    E, T = 8, 256
    router = _router(E=E, d=16, k=2, score="sigmoid", balance="loss_free", aux_loss_coef=0.0, router_bias=True)
    with torch.no_grad():
        router.gate.bias.copy_(torch.linspace(0.6, -0.6, E))  # a skewed router
    x = torch.randn(T, 16)  # a stationary stream: the same batch every step

    def max_vio(d):
        load = d.expert_load().double()
        return ((load.max() - load.mean()) / load.mean()).item()

    first = router(x)
    routelab.update_routers(router)
    for _ in range(199):
        router(x)
        routelab.update_routers(router)
    router.eval()
    last = router(x)
    assert max_vio(first) > 0.5 and max_vio(last) < 0.15
    # weights come from unbiased scores: a token whose selection is unchanged keeps bit-identical weights
    same = ((first.dense_weights() > 0) == (last.dense_weights() > 0)).all(-1)
    assert same.sum() > T // 4
    assert torch.equal(first.dense_weights().detach()[same], last.dense_weights()[same])


def _grouped_reference(scores, bias, k, n_group, topk_group):
    """DeepSeek-V3 selection by a loop: groups ranked by the sum of their top-2 biased scores."""
    T, E = scores.shape
    size = E // n_group
    out = []
    for t in range(T):
        u = [scores[t, e].item() + bias[e].item() for e in range(E)]
        gscore = [sum(sorted(u[g * size : (g + 1) * size], reverse=True)[:2]) for g in range(n_group)]
        groups = sorted(range(n_group), key=lambda g: (-gscore[g], g))[:topk_group]
        allowed = [e for e in range(E) if e // size in groups]
        out.append(sorted(sorted(allowed, key=lambda e: (-u[e], e))[:k]))
    return out


def test_group_limited_selection_matches_loop_and_touches_at_most_topk_group_groups():
    torch.manual_seed(2)
    E, k, n_group, topk_group = 16, 4, 4, 2
    router = _router(
        E=E, d=16, k=k, score="sigmoid", n_group=n_group, topk_group=topk_group, balance="loss_free", scaling=2.5
    )
    router.expert_bias.copy_(torch.randn(E) * 0.2)
    x = torch.randn(60, 16)
    d = router(x)
    scores = torch.sigmoid(x @ router.gate.weight.detach().T)
    ref = _grouped_reference(scores, router.expert_bias, k, n_group, topk_group)
    got = [sorted(d.expert_index[d.token_index == t].tolist()) for t in range(60)]
    assert got == ref
    assert max(len({e // (E // n_group) for e in row}) for row in got) <= topk_group
    dense = d.dense_weights()
    for t in range(60):  # weights: unbiased sigmoid scores, normalised, × scaling
        s = scores[t, ref[t]]
        torch.testing.assert_close(dense[t, ref[t]], 2.5 * s / s.sum())


def test_switch_aux_is_exactly_coef_at_uniform_load_with_nonuniform_probabilities():
    # k = 1, E = 4, T = 8: two tokens per expert, probabilities far from uniform
    logits = torch.zeros(8, 4)
    winners = torch.tensor([0, 0, 1, 1, 2, 2, 3, 3])
    logits[torch.arange(8), winners] = torch.tensor([1.0, 4.0, 2.0, 0.5, 3.0, 1.0, 2.5, 0.7])
    router = _router(E=4, d=8, k=1, aux_loss_coef=0.02)
    d = router(_set_logits(router, logits))
    assert d.expert_load().tolist() == [2, 2, 2, 2]
    assert d.aux_losses["aux"].item() == pytest.approx(0.02, rel=1e-6)


def test_bip_duals_nonnegative_and_balance_up_to_ties_after_an_update():
    torch.manual_seed(3)
    T, E = 64, 4
    C = T // E
    router = _router(E=E, k=1, balance="bip", aux_loss_coef=0.0)
    x = torch.randn(T, 8)
    x[:, 0] = 1.0
    with torch.no_grad():
        router.gate.weight[:, 0] = 0.0
        router.gate.weight[0, 0] = 1.5  # overload expert 0
    before = router(x).expert_load()
    assert before.max() > 2 * C
    routelab.update_routers(router)
    q = router.bip_dual
    assert torch.all(q >= 0) and q[0] == q.max() and q[0] > 0
    scores = torch.softmax(x @ router.gate.weight.detach().T, -1)
    assert torch.equal(router(x).expert_index, (scores - q).argmax(-1))
    # the (C+1)-th token of an overloaded expert sits exactly on its dual (a tie), hence C + 1
    assert router(x).expert_load().max() <= C + 1


def test_bip_zero_duals_for_a_batch_within_capacity():
    router = _router(E=4, d=8, k=1, balance="bip", aux_loss_coef=0.0)
    logits = torch.zeros(8, 4)
    logits[torch.arange(8), torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])] = 2.0
    router(_set_logits(router, logits))
    routelab.update_routers(router)
    assert torch.all(router.bip_dual == 0)
