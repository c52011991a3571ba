"""The MoE layer (router → permute → grouped experts → combine) against a per-assignment loop in fp64:
outputs and every gradient (input, router weight, both expert weights, shared experts)."""

import pytest
import torch

import routelab
from reference import reference_moe, reference_topk

D, F = 13, 11  # odd widths on purpose

CASES = [
    (E, k, T, cap)
    for E in (1, 4, 8, 64)
    for k in (1, 2, 8)
    if k <= E
    for T in (1, 7, 257)
    for cap in (None, 1.0)
]


def _grads(output, tensors, seed):
    g = torch.Generator().manual_seed(seed)
    upstream = torch.randn(output.shape, generator=g, dtype=output.dtype)
    return torch.autograd.grad(output, tensors, upstream, allow_unused=False)


@pytest.mark.parametrize("E,k,T,cap", CASES)
def test_layer_matches_reference_loop_fp64(E, k, T, cap):
    torch.manual_seed(E * 1000 + k * 10 + T)
    shared = 1 if E in (4, 64) else 0
    router = routelab.create_router("topk", d_model=D, num_experts=E, k=k, capacity_factor=cap, aux_loss_coef=0.0)
    layer = routelab.MoELayer(D, F, router, shared_experts=shared).double()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)

    y = layer(x)

    params = [router.gate.weight, layer.experts.w_gate_up, layer.experts.w_down]
    if shared:
        params += [layer.shared_experts.w_gate_up, layer.shared_experts.w_down]
    ref_params = [p.detach().clone().requires_grad_(True) for p in params]
    x_ref = x.detach().clone().requires_grad_(True)
    normalize = "selected" if k > 1 else "none"
    assignments = reference_topk(x_ref, ref_params[0], k=k, normalize=normalize, capacity_factor=cap)
    shared_ref = (ref_params[3], ref_params[4]) if shared else None
    y_ref = reference_moe(x_ref, assignments, ref_params[1], ref_params[2], shared_ref)

    decision = layer.last_decision
    got = sorted(zip(decision.token_index.tolist(), decision.expert_index.tolist()))
    assert got == sorted((t, e) for t, e, _ in assignments)
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)

    grads = _grads(y, [x, *params], seed=T)
    ref_grads = _grads(y_ref, [x_ref, *ref_params], seed=T)
    names = ["x", "router", "w_gate_up", "w_down", "shared_gate_up", "shared_down"]
    for name, g, g_ref in zip(names, grads, ref_grads):
        torch.testing.assert_close(g, g_ref, rtol=1e-9, atol=1e-10, msg=lambda m, n=name: f"grad of {n}: {m}")


def test_layer_keeps_leading_shape_and_fills_batch_shape():
    seen = {}

    class Spy(routelab.Router):
        def forward(self, x_TD, ctx=None):
            seen["batch_shape"] = ctx.batch_shape
            T = x_TD.shape[0]
            return routelab.RoutingDecision(
                token_index=torch.arange(T), expert_index=torch.zeros(T, dtype=torch.long),
                weight=torch.ones(T), num_tokens=T, num_experts=1,
            )

    layer = routelab.MoELayer(8, 16, Spy(d_model=8, num_experts=1))
    x = torch.randn(2, 3, 8)
    y = layer(x)
    assert y.shape == x.shape
    assert seen["batch_shape"] == (2, 3)


def test_degenerate_one_expert_equals_dense_swiglu():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=D, num_experts=1, k=1)
    layer = routelab.MoELayer(D, F, router).double()
    x = torch.randn(5, D, dtype=torch.float64)
    w1, w2 = layer.experts.w_gate_up[0], layer.experts.w_down[0]
    dense = (torch.nn.functional.silu(x @ w1[:, :F]) * (x @ w1[:, F:])) @ w2
    torch.testing.assert_close(layer(x), dense, rtol=1e-12, atol=1e-12)


def test_zero_tokens_give_empty_output():
    layer = routelab.MoELayer(D, F, routelab.create_router("topk", d_model=D, num_experts=4), shared_experts=1)
    x = torch.randn(0, 3, D, requires_grad=True)
    y = layer(x)
    assert y.shape == (0, 3, D)
    y.sum().backward()
    assert x.grad.shape == x.shape


def test_experts_without_tokens_get_zero_gradients():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=D, num_experts=8, k=1)
    layer = routelab.MoELayer(D, F, router)
    y = layer(torch.randn(1, D))
    y.sum().backward()
    used = layer.last_decision.expert_index.item()
    grad = layer.experts.w_down.grad
    assert grad is not None and grad[used].abs().sum() > 0
    others = [e for e in range(8) if e != used]
    assert torch.count_nonzero(grad[others]) == 0


def test_bf16_layer_runs_and_stays_close_to_fp32():
    torch.manual_seed(0)
    router = routelab.create_router("topk", d_model=32, num_experts=8, k=2)
    layer = routelab.MoELayer(32, 48, router)
    x = torch.randn(64, 32)
    y32 = layer(x)
    decision32 = layer.last_decision
    y16 = layer.to(torch.bfloat16)(x.to(torch.bfloat16))
    assert y16.dtype == torch.bfloat16
    assert layer.last_decision.weight.dtype == torch.float32  # router math stays in fp32
    if torch.equal(layer.last_decision.expert_index, decision32.expert_index):
        torch.testing.assert_close(y16.float(), y32, rtol=5e-2, atol=5e-2)
