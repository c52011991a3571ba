"""The pre-gating router (Read-ME / Pre-gated MoE): layer l+1's routing is decided from layer l's input."""

from __future__ import annotations

import torch

import routelab
from routelab.models.transformer import ModelConfig, MoETransformerLM
from zoo_cases import D, ToyModel, make_ctx


def test_next_layer_routing_depends_only_on_the_previous_layers_input():
    torch.manual_seed(0)
    r0 = routelab.create_router("pregate", d_model=D, num_experts=6, k=2)
    r1 = routelab.create_router("pregate", d_model=D, num_experts=6, k=2)
    x0, x1 = torch.randn(10, D), torch.randn(10, D)
    d0 = r0(x0)
    d1 = r1(x1, routelab.RoutingContext(state=d0.state))
    d1_other_input = r1(3 * torch.randn(10, D), routelab.RoutingContext(state=d0.state))
    assert torch.equal(d1.expert_index, d1_other_input.expert_index) and torch.equal(d1.weight, d1_other_input.weight)
    # the choice handed on is the choice made: exact by construction
    predicted = r0.next_layer_choice(d0, r1)
    assert torch.equal(predicted, d1.dense_weights() > 0)
    # and it is W_next x0's top-k: a reference computation
    ref = torch.topk((x0 @ r0.next_gate.weight.t()).softmax(-1), 2).indices
    assert torch.equal(predicted, torch.zeros(10, 6, dtype=torch.bool).scatter_(1, ref, True))


def test_first_layer_routes_itself_and_next_gate_trains_through_the_next_layer():
    torch.manual_seed(1)
    model = ToyModel("pregate", {}, num_layers=2)
    x, ctx = torch.randn(2, 5, D), make_ctx(2, 5)
    out = model(x, ctx)
    out.pow(2).sum().backward()
    first, second = model.layers[0].router, model.layers[1].router
    assert first.next_gate.weight.grad is not None and first.next_gate.weight.grad.abs().sum() > 0
    assert first.gate.weight.grad.abs().sum() > 0
    assert second.gate.weight.grad is None  # layer 2 is routed by layer 1's pre-gate, never by its own gate


def test_in_an_lm_every_later_layer_follows_the_pregate():
    torch.manual_seed(2)
    model = MoETransformerLM(ModelConfig(vocab_size=64, d_model=32, n_layers=3, n_heads=4, d_ff=24, router="pregate"))
    model.eval()
    captured = {}
    hooks = [layer.router.register_forward_hook(lambda m, a, y, i=i: captured.__setitem__(i, a[0]))
             for i, layer in enumerate(model.moe_layers)]  # a router sees its layer's input rows
    ids = torch.randint(0, 64, (1, 9))
    with torch.no_grad():
        model(ids)
    for h in hooks:
        h.remove()
    for i in range(1, 3):
        prev = model.moe_layers[i - 1].router
        logits = captured[i - 1] @ prev.next_gate.weight.t()
        want = torch.sort(torch.topk(logits.softmax(-1), 2).indices, dim=-1).values
        got = model.moe_layers[i].last_decision
        got_TK = torch.sort(got.expert_index.reshape(-1, 2), dim=-1).values
        assert torch.equal(got_TK, want)
