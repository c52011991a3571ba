"""ProMoE's prototypical routing: scale invariance in the prototypes and the routing contrastive loss by hand."""

from __future__ import annotations

import math

import pytest
import torch

import routelab


def _router(**kw):
    torch.manual_seed(0)
    return routelab.create_router("prototype", d_model=6, num_experts=4, **kw).double()


def test_routing_is_invariant_to_the_scale_of_each_prototype():
    router = _router(k=2)
    x = torch.randn(9, 6, dtype=torch.float64)
    before = router(x)
    with torch.no_grad():
        router.prototypes.mul_(torch.tensor([[0.01], [3.0], [250.0], [1.0]], dtype=torch.float64))
    after = router(x)
    assert torch.equal(before.expert_index, after.expert_index)
    torch.testing.assert_close(before.weight, after.weight)
    torch.testing.assert_close(router(7.5 * x).weight, after.weight)  # and of the token


def test_routing_contrastive_loss_equals_a_hand_computation():
    router = _router(k=1, rcl_coef=1.0, aux_loss_coef=0.0, temperature=2.0, rcl_temperature=0.5)
    router.train()
    x = torch.randn(8, 6, dtype=torch.float64)
    decision = router(x)
    # by hand: first choices from cosines, centroids of unit tokens per chosen expert, InfoNCE over prototypes
    P = router.prototypes.detach()
    unit = [x[t] / x[t].norm() for t in range(8)]
    proto = [P[e] / P[e].norm() for e in range(4)]
    first = [max(range(4), key=lambda e: float(unit[t] @ proto[e])) for t in range(8)]
    terms = []
    for e in sorted(set(first)):
        members = [unit[t] for t in range(8) if first[t] == e]
        c = sum(members) / len(members)
        c = c / c.norm()
        logits = [float(c @ proto[j]) / 0.5 for j in range(4)]
        terms.append(-(logits[e] - math.log(sum(math.exp(v) for v in logits))))
    assert decision.aux_losses["rcl"].item() == pytest.approx(sum(terms) / len(terms), rel=1e-10)
    assert [int(e) for e in decision.expert_index] == first
    # the loss reaches the prototypes, and eval mode computes none
    decision.aux_losses["rcl"].backward()
    assert router.prototypes.grad.abs().sum() > 0
    router.eval()
    assert "rcl" not in router(x).aux_losses
