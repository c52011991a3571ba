"""top_p (ROUTERS.md §7): the three rules against their definitions on sorted prefixes, uniform and one-hot cases,
min_k/max_k, weights, the hybrid, the dynamic loss, null and fixed experts."""

import math

import pytest
import torch

import routelab
from routelab.routing.top_p import entropy


def _router(E=8, **options):
    return routelab.create_router("top_p", d_model=E, num_experts=E, aux_loss_coef=0.0, **options)


def _route_probs(router, probs_TE):
    """Route tokens whose router distribution is exactly probs (gate = identity, x = log probs)."""
    with torch.no_grad():
        router.gate.weight.copy_(torch.eye(probs_TE.shape[1]))
    return router(torch.log(probs_TE))


def _sets(d, T):
    return [sorted(d.expert_index[d.token_index == t].tolist()) for t in range(T)]


def _rule_by_definition(probs, p, rule):
    """The expert set by the rule's definition, from a descending sort (ties: lower index)."""
    order = sorted(range(len(probs)), key=lambda e: (-probs[e], e))
    prefixes = [order[:n] for n in range(len(order) + 1)]
    mass = [sum(probs[e] for e in pre) for pre in prefixes]
    if rule == "exceed":  # sum > p, and ≤ p without its smallest member
        n = next(n for n in range(1, len(order) + 1) if mass[n] > p and mass[n - 1] <= p)
    elif rule == "reach":  # the shortest with sum ≥ p
        n = min(n for n in range(1, len(order) + 1) if mass[n] >= p)
    else:  # the longest with sum ≤ p
        n = max(n for n in range(len(order) + 1) if mass[n] <= p)
    return sorted(prefixes[n])


@pytest.mark.parametrize("rule", ["exceed", "reach", "within"])
@pytest.mark.parametrize("p", [0.2, 0.5, 0.8])
def test_rules_select_the_documented_prefix(rule, p):
    torch.manual_seed(0)
    E, T = 8, 64
    probs = torch.softmax(torch.randn(T, E) * 1.5, -1)
    router = _router(E=E, p=p, rule=rule, min_k=0)
    got = _sets(_route_probs(router, probs), T)
    checked = 0
    for t in range(T):
        row = probs[t].tolist()
        cums = torch.sort(probs[t], descending=True).values.cumsum(0)
        if (cums - p).abs().min() < 1e-4:  # keep cumsums away from p (the rules differ only there)
            continue
        assert got[t] == _rule_by_definition(row, p, rule), (t, row)
        checked += 1
    assert checked > T // 2


def test_uniform_and_one_hot():
    E = 8
    uniform = torch.full((1, E), 1.0 / E)
    for p in (0.3, 0.45, 0.6):
        n = {
            r: len(_sets(_route_probs(_router(E=E, p=p, rule=r, min_k=0), uniform), 1)[0])
            for r in ("exceed", "reach", "within")
        }
        assert n["exceed"] == math.floor(p * E) + 1 and n["reach"] == math.ceil(p * E)
        assert n["within"] == math.floor(p * E)
    one_hot = torch.full((1, E), 1e-9)
    one_hot[0, 3] = 1.0
    one_hot = one_hot / one_hot.sum()
    for rule in ("exceed", "reach", "within"):
        assert _sets(_route_probs(_router(E=E, p=0.5, rule=rule), one_hot), 1)[0] == [3]
    # p → 0: top-1
    torch.manual_seed(1)
    probs = torch.softmax(torch.randn(20, E), -1)
    d = _route_probs(_router(E=E, p=1e-6), probs)
    assert _sets(d, 20) == [[int(probs[t].argmax())] for t in range(20)]


def test_min_k_max_k_and_weights():
    torch.manual_seed(2)
    E, T = 8, 100
    probs = torch.softmax(torch.randn(T, E) * 0.3, -1)  # flat routers want many experts
    for rule in ("exceed", "reach", "within"):
        d = _route_probs(_router(E=E, p=0.6, rule=rule, min_k=2, max_k=3), probs)
        n = d.experts_per_token()
        assert n.min() >= 2 and n.max() <= 3
    d = _route_probs(_router(E=E, p=0.6, rule="exceed"), probs)
    sums = d.dense_weights().sum(-1)
    assert torch.all(sums > 0.6) and torch.all(sums <= 1 + 1e-6)
    torch.testing.assert_close(d.dense_weights()[d.token_index, d.expert_index], probs[d.token_index, d.expert_index])
    d = _route_probs(_router(E=E, p=0.6, rule="reach", normalize="selected"), probs)
    torch.testing.assert_close(d.dense_weights().sum(-1), torch.ones(T))


def test_tsallis_entropy_and_hybrid():
    uniform = torch.full((1, 8), 1 / 8)
    assert entropy(uniform, "tsallis", 1.1).item() == pytest.approx((1 - 8**-0.1) / 0.1, rel=1e-6)
    assert entropy(uniform, "tsallis", 1.1).item() == pytest.approx(1.877, abs=1e-3)
    assert entropy(uniform, "shannon").item() == pytest.approx(math.log(8), rel=1e-6)
    probs = torch.cat([uniform, torch.softmax(torch.tensor([[6.0, 0, 0, 0, 0, 0, 0, 0]]), -1)])
    router = _router(E=8, p=0.75, rule="within", min_k=2, entropy="tsallis", entropy_threshold=0.9)
    sets = _sets(_route_probs(router, probs), 2)
    assert sets[0] == list(range(8)) and len(sets[1]) == 2


def test_dynamic_loss_alone_lowers_the_number_of_experts():
    torch.manual_seed(3)
    router = routelab.create_router("top_p", d_model=16, num_experts=8, p=0.5, dyn_loss_coef=1.0, aux_loss_coef=0.0)
    with torch.no_grad():
        router.gate.weight.mul_(0.1)  # a flat start: many experts per token
    x = torch.randn(64, 16)
    before = router(x).experts_per_token().float().mean()
    opt = torch.optim.SGD(router.parameters(), lr=0.5)
    for _ in range(200):
        loss = router(x).aux_losses["dyn"]
        opt.zero_grad()
        loss.backward()
        opt.step()
    after = router(x).experts_per_token().float().mean()
    assert after < before - 0.5


def test_null_and_fixed_experts():
    torch.manual_seed(4)
    E = 6
    router = routelab.create_router(
        "top_p", d_model=8, num_experts=E, p=0.7, rule="reach", normalize="selected", num_null_experts=1, num_fixed=2
    )
    x = torch.randn(50, 8)
    d = router(x)
    assert d.expert_index.max() < E
    logits = x @ router.gate.weight.detach().T  # [T, E + 1]
    full = torch.softmax(logits, -1)
    dense = d.dense_weights()
    torch.testing.assert_close(dense[:, 4:6], full[:, 4:6])  # fixed experts: always on, their joint-softmax share
    dyn = torch.softmax(logits[:, [0, 1, 2, 3, 6]], -1)  # dynamic candidates: experts 0-3 and the null
    for t in range(50):
        picks = _rule_by_definition(dyn[t].tolist(), 0.7, "reach")
        total = sum(dyn[t, j].item() for j in picks)
        for j in picks:
            if j < 4:
                assert dense[t, j].item() == pytest.approx(dyn[t, j].item() / total, rel=1e-5)
        assert {e for e in range(4) if dense[t, e] > 0} == {j for j in picks if j < 4}


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(p=0), "p must be"),
        (dict(p=1.5), "p must be"),
        (dict(rule="top"), "rule must be one of"),
        (dict(min_k=9), "min_k"),
        (dict(min_k=3, max_k=2), "max_k"),
        (dict(normalize="true"), "normalize must be one of"),
        (dict(num_null_experts=-1), "num_null_experts"),
        (dict(num_fixed=8), "num_fixed"),
        (dict(entropy="renyi"), "entropy must be one of"),
        (dict(tsallis_q=1.0), "tsallis_q"),
        (dict(entropy_threshold=-1), "entropy_threshold"),
        (dict(dyn_loss_coef=-1), "dyn_loss_coef"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        routelab.create_router("top_p", d_model=8, num_experts=8, **options)
