"""null_experts (ROUTERS.md §6): against a per-token loop; nulls never computed; null bias lowers true experts per
token; the bucketed balance loss."""

import math

import pytest
import torch

import routelab
from routelab.routing.null_experts import null_balance_loss


def _router(E=4, m=2, k=2, d=8, **options):
    return routelab.create_router("null_experts", d_model=d, num_experts=E, num_null_experts=m, k=k, **options)


def _loop_reference(x, w_true, w_null, k):
    """(token, expert, weight) by a loop: softmax over true+null logits, top-k′, keep true picks, renormalise."""
    E = w_true.shape[0]
    out = []
    for t in range(x.shape[0]):
        logits = [float(v) for v in torch.cat([w_true @ x[t], w_null @ x[t]]).double()]
        z = max(logits)
        probs = [math.exp(v - z) for v in logits]
        probs = [p / sum(probs) for p in probs]
        picks = sorted(range(len(probs)), key=lambda e: (-probs[e], e))[:k]
        true = [e for e in picks if e < E]
        total = sum(probs[e] for e in true)
        out += [(t, e, probs[e] / total) for e in sorted(true)]
    return out


@pytest.mark.parametrize("separate", [True, False])
def test_matches_loop_and_nulls_never_listed(separate):
    torch.manual_seed(0)
    E, m, k = 4, 3, 3
    router = _router(E=E, m=m, k=k, separate_null_gate=separate)
    x = torch.randn(40, 8)
    d = router(x)
    if separate:
        w_true, w_null = router.gate.weight.detach(), router.null_gate.weight.detach()
    else:
        w_true, w_null = router.gate.weight.detach()[:E], router.gate.weight.detach()[E:]
    ref = _loop_reference(x, w_true, w_null, k)
    got = sorted(zip(d.token_index.tolist(), d.expert_index.tolist(), d.weight.tolist()))
    assert [(t, e) for t, e, _ in got] == [(t, e) for t, e, _ in ref]
    for (_, _, w), (_, _, w_ref) in zip(got, ref):
        assert w == pytest.approx(w_ref, rel=1e-5)
    assert d.expert_index.max() < E and d.experts_per_token().max() <= k
    has = d.experts_per_token() > 0
    torch.testing.assert_close(d.dense_weights().sum(-1)[has], torch.ones(int(has.sum())))
    assert d.expert_load().sum() == d.num_assignments == len(ref)  # only true picks reach the experts


def test_null_biased_router_uses_fewer_than_k_true_experts():
    torch.manual_seed(1)
    router = _router(E=4, m=4, k=2)
    x = torch.randn(200, 8)
    x[:, 0] = 1.0
    unbiased = router(x).experts_per_token().float().mean()
    with torch.no_grad():
        router.null_gate.weight[:, 0] += 2.0
    per_token = router(x).experts_per_token()
    assert per_token.float().mean() < 2 and per_token.float().mean() < unbiased
    assert (per_token == 0).any()  # some tokens give every slot to nulls and compute nothing
    layer = routelab.MoELayer(8, 6, router)
    y = layer(x)
    assert torch.all(y[per_token == 0] == 0)


def test_balance_loss_hand_computation_and_null_permutation():
    probs = torch.tensor([[0.4, 0.1, 0.2, 0.2, 0.1], [0.1, 0.3, 0.1, 0.1, 0.4]])  # E = 3 true + 2 null
    load = torch.tensor([2, 1, 0, 0, 3])
    P = [(0.4 + 0.1) / 2, (0.1 + 0.3) / 2, (0.2 + 0.1) / 2, (0.2 + 0.1) / 2, (0.1 + 0.4) / 2]
    f = [2 / 6, 1 / 6, 0.0, 1.5 / 6, 1.5 / 6]  # nulls share their mean load
    expected = 5 * sum(fi * pi for fi, pi in zip(f, P))
    assert null_balance_loss(probs, load, 3).item() == pytest.approx(expected, rel=1e-6)
    assert null_balance_loss(probs, torch.tensor([2, 1, 0, 3, 0]), 3).item() == pytest.approx(expected, rel=1e-6)
    uniform = torch.full((6, 5), 0.2)
    assert null_balance_loss(uniform, torch.tensor([5, 0, 0, 4, 3]), 3).item() == pytest.approx(1.0, rel=1e-6)


def test_aux_loss_reaches_both_gates():
    torch.manual_seed(2)
    router = _router(aux_loss_coef=1.0)
    router(torch.randn(30, 8)).aux_losses["aux"].backward()
    assert router.gate.weight.grad.abs().sum() > 0 and router.null_gate.weight.grad.abs().sum() > 0


@pytest.mark.parametrize(
    "options,match",
    [
        (dict(m=0), "num_null_experts"),
        (dict(k=0), "k must be"),
        (dict(k=7), "k must be"),
        (dict(separate_null_gate=1), "separate_null_gate must be one of"),
        (dict(aux_loss_coef=-1.0), "aux_loss_coef"),
    ],
)
def test_invalid_options(options, match):
    with pytest.raises(ValueError, match=match):
        _router(**options)


def test_required_options_are_named():
    with pytest.raises(TypeError, match="num_null_experts"):
        routelab.create_router("null_experts", d_model=8, num_experts=4, k=2)
