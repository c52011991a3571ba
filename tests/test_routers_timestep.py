"""Timestep-conditioned routers: Denoising Task Routing's masks are the documented function of t and it has no
parameters (and its MoE layer is a dense FFN with those channel masks); the condition-aware router's scores depend on
t, and without the timestep gate it is plain softmax top-k."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routelab
from routelab.routing import RoutingContext


def dtr(E=8, **options):
    return routelab.create_router("dtr", d_model=6, num_experts=E, **options)


@pytest.mark.parametrize(
    "t, reverse, active",
    [  # E = 8, α = 0.5: k = 4 adjacent experts; E - k + 1 = 5 windows, one per fifth of [0, 1]
        (0.0, False, [0, 1, 2, 3]), (0.19, False, [0, 1, 2, 3]), (0.2, False, [1, 2, 3, 4]),
        (0.5, False, [2, 3, 4, 5]), (0.79, False, [3, 4, 5, 6]), (0.8, False, [4, 5, 6, 7]), (1.0, False, [4, 5, 6, 7]),
        (0.0, True, [4, 5, 6, 7]), (0.5, True, [2, 3, 4, 5]), (1.0, True, [0, 1, 2, 3]),
    ],
)
def test_dtr_mask_is_the_documented_window_of_t(t, reverse, active):
    router = dtr(reverse=reverse)
    expected = torch.zeros(8)
    expected[active] = 1.0
    assert torch.equal(router.mask(t), expected)


def test_dtr_has_no_parameters_and_routes_each_sequence_by_its_t():
    router = dtr(active_fraction=0.25)  # k = 2 of 8; 7 windows
    assert list(router.parameters()) == [] and router.state_dict() == {}
    t = torch.tensor([0.0, 0.5, 0.99])
    x = torch.randn(3 * 5, 6)
    dense = router(x, RoutingContext(batch_shape=(3, 5), timestep=t)).dense_weights()
    for b in range(3):
        for i in range(5):
            assert torch.equal(dense[b * 5 + i], router.mask(float(t[b])))
    # the token rows do not matter at all
    assert torch.equal(router(torch.randn(15, 6) * 100, RoutingContext(batch_shape=(3, 5), timestep=t)).dense_weights(),
                       dense)
    with pytest.raises(ValueError, match="dtr routing needs RoutingContext.timestep"):
        router(x, RoutingContext(batch_shape=(3, 5)))
    with pytest.raises(ValueError, match="active_fraction must be"):
        dtr(active_fraction=0.0)


def test_dtr_layer_is_a_dense_ffn_with_a_timestep_channel_mask_fp64():
    E, F_, D = 4, 3, 6
    layer = routelab.MoELayer(D, F_, dtr(E=E, active_fraction=0.5)).double()
    x = torch.randn(2, 5, D, dtype=torch.float64)
    t = torch.tensor([0.1, 0.9])
    y = layer(x, RoutingContext(timestep=t))
    # reference: one dense SwiGLU of width E·F (the experts' channels side by side), hidden channels masked by group
    w = layer.experts.w_gate_up  # [E, D, 2F]
    gate = torch.cat([w[e, :, :F_] for e in range(E)], dim=1)  # [D, E·F]
    up = torch.cat([w[e, :, F_:] for e in range(E)], dim=1)
    down = torch.cat([layer.experts.w_down[e] for e in range(E)], dim=0)  # [E·F, D]
    for b in range(2):
        channel_mask = layer.router.mask(float(t[b])).double().repeat_interleave(F_)
        ref = (F.silu(x[b] @ gate) * (x[b] @ up) * channel_mask) @ down
        torch.testing.assert_close(y[b], ref, rtol=1e-12, atol=1e-12)


def cond(**options):
    torch.manual_seed(0)
    return routelab.create_router("condition_aware", d_model=6, num_experts=5, **options)


def test_condition_aware_scores_depend_on_t_and_equal_topk_without_the_timestep_gate():
    router = cond(k=2).double()
    x = torch.randn(4, 6, dtype=torch.float64)
    logits_a = router(x, RoutingContext(timestep=torch.tensor(0.1))).router_logits
    logits_b = router(x, RoutingContext(timestep=torch.tensor(0.7))).router_logits
    assert not torch.allclose(logits_a, logits_b)
    # the token part is W x; the difference between two times is U (e(t1) - e(t2)), the same for every token
    diff = logits_a - logits_b
    torch.testing.assert_close(diff, diff[:1].expand_as(diff))
    with torch.no_grad():
        router.time_gate.weight.zero_()
    dec = router(x, RoutingContext(timestep=torch.tensor(0.3)))
    p = torch.softmax(x @ router.gate.weight.T, -1)  # fp64 hand computation: softmax top-2, renormalised
    top = p.topk(2, dim=-1)
    want = torch.zeros(4, 5, dtype=torch.float64).scatter(1, top.indices, top.values / top.values.sum(-1, keepdim=True))
    torch.testing.assert_close(dec.dense_weights(), want, rtol=1e-12, atol=1e-12)


def test_condition_aware_routes_the_same_token_differently_across_t_and_trains_its_timestep_gate():
    router = cond(k=1)
    with torch.no_grad():
        router.time_gate.weight.mul_(20)  # timestep scores dominate: routing follows t
    x = torch.randn(1, 6).expand(32, 6)
    ctx = RoutingContext(batch_shape=(32, 1), timestep=torch.linspace(0, 1, 32))
    dec = router(x, ctx)
    assert dec.expert_index.unique().numel() > 1
    dec.aux_losses["aux"].backward()  # k = 1 renormalised weights are all 1: the balance loss carries the gradient
    assert router.time_gate.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="condition_aware routing needs RoutingContext.timestep"):
        router(x, RoutingContext(batch_shape=(32, 1)))
    with pytest.raises(ValueError, match="time_dim must be an even integer"):
        cond(time_dim=5)


def test_timestep_routers_are_refused_in_the_autoregressive_compare_before_training():
    from routelab.compare import ConfigError, resolve

    with pytest.raises(ConfigError, match="needs a diffusion timestep.*model.kind: diffusion_lm"):
        resolve(preset="smoke", routers=["dtr"])
    cfg, _ = resolve(preset="diffusion", routers=["dtr", "condition_aware"])
    assert [v["router"] for v in cfg["variants"]] == ["dtr", "condition_aware"]
