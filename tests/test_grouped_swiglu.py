"""The inference path for few rows per expert (dispatch/grouped_swiglu.py) against the per-expert loop kernel and a
plain per-assignment loop in fp64, and the MoE layer's choice of path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routelab
from routelab.dispatch import LocalDispatcher
from routelab.dispatch import local as local_module
from routelab.dispatch.grouped_swiglu import grouped_mm_available, grouped_swiglu
from routelab.dispatch.permute import make_plan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.routing.base import RoutingDecision

pytestmark = pytest.mark.skipif(not grouped_mm_available("cpu"), reason="this torch has no CPU grouped matmul")


def _loop_fp64(x_TD, token_S, expert_S, weight_S, w_gate_up, w_down):
    F_ = w_down.shape[1]
    x_TD, w_gate_up, w_down = x_TD.double(), w_gate_up.double(), w_down.double()
    y = torch.zeros_like(x_TD)
    for t, e, w in zip(token_S.tolist(), expert_S.tolist(), weight_S.tolist()):
        h = x_TD[t] @ w_gate_up[e]
        y[t] += w * ((F.silu(h[:F_]) * h[F_:]) @ w_down[e])
    return y


@pytest.mark.parametrize("T,k,E", [(1, 1, 8), (1, 8, 64), (3, 4, 8), (8, 8, 64), (64, 8, 64), (40, 2, 4)])
def test_grouped_swiglu_equals_the_loop_kernel_and_an_fp64_loop(T, k, E):
    g = torch.Generator().manual_seed(T * 100 + k * 10 + E)
    D, F_ = 24, 20
    x = torch.randn(T, D, generator=g)
    w_gate_up = torch.randn(E, D, 2 * F_, generator=g) / D**0.5
    w_down = torch.randn(E, F_, D, generator=g) / F_**0.5
    expert_S = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    token_S = torch.arange(T).repeat_interleave(k)
    keep = torch.randperm(T * k, generator=g)[: max(1, T * k - 1)]  # any order; a token may lose an assignment
    decision = RoutingDecision(token_index=token_S[keep], expert_index=expert_S[keep],
                               weight=torch.rand(keep.numel(), generator=g), num_tokens=T, num_experts=E)
    plan = make_plan(decision)
    got = grouped_swiglu(x, plan.token_S, plan.weight_S, plan.group_sizes_E, w_gate_up, w_down)
    loop = routed_swiglu(x, plan.token_S, plan.weight_S, plan.group_sizes_E.tolist(), w_gate_up, w_down)
    torch.testing.assert_close(got, loop, atol=1e-6, rtol=0)
    want = _loop_fp64(x, decision.token_index, decision.expert_index, decision.weight.double(), w_gate_up, w_down)
    torch.testing.assert_close(got.double(), want, atol=2e-5, rtol=0)
    empty = torch.zeros(0, dtype=torch.long)
    none = grouped_swiglu(x, empty, empty.float(), torch.zeros(E, dtype=torch.long), w_gate_up, w_down)
    assert torch.equal(none, torch.zeros_like(x))


def test_layer_takes_the_grouped_path_for_fp32_inference_with_few_rows_per_expert(monkeypatch):
    torch.manual_seed(0)
    D = 128  # 6 assignments · 128 · 3·128 weight elements > GATHER_FIRST_MAX_ELEMENTS: not the tiniest calls
    layer = routelab.MoELayer(D, 128, routelab.create_router("topk", d_model=D, num_experts=4, k=2))
    calls = []
    real = local_module.grouped_swiglu
    monkeypatch.setattr(local_module, "grouped_swiglu", lambda *a: calls.append(a[1].numel()) or real(*a))
    x = torch.randn(3, D)
    with_grad = layer(x)
    assert calls == []  # autograd needs the custom function's backward
    with torch.no_grad():
        fast = layer(x)
        assert calls == [6]
        layer(torch.randn(24, D))  # 48 assignments = 12 per expert: still grouped
        assert calls == [6, 48]
        layer(torch.randn(25, D))  # 50 > GROUPED_MAX_ROWS_PER_EXPERT · E: the loop kernel
        layer.double()(x.double())  # fp64: the loop kernel (the CPU grouped matmul is fp32 only)
        layer.float()
        layer.dispatcher = LocalDispatcher(decode_fast_path=False)
        slow = layer(x)
        assert calls == [6, 48]
    torch.testing.assert_close(fast, with_grad.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_the_tiniest_calls_gather_first(monkeypatch):
    """A decode step of a small model (S·D·3F ≤ GATHER_FIRST_MAX_ELEMENTS) takes the tiny-S kernel even where the
    grouped matmul is there (measured faster, benchmarks/decode.py), and agrees with the grouped kernel."""
    torch.manual_seed(0)
    layer = routelab.MoELayer(16, 24, routelab.create_router("topk", d_model=16, num_experts=4, k=2))
    calls = []
    for name in ("grouped_swiglu", "gathered_swiglu"):
        real = getattr(local_module, name)
        monkeypatch.setattr(local_module, name,
                            lambda *a, _n=name, _r=real: calls.append(_n) or _r(*a))
    x = torch.randn(3, 16)
    with torch.no_grad():
        tiny = layer(x)
        assert calls == ["gathered_swiglu"]
        monkeypatch.setattr(local_module, "GATHER_FIRST_MAX_ELEMENTS", 0)
        grouped = layer(x)
        assert calls == ["gathered_swiglu", "grouped_swiglu"]
    torch.testing.assert_close(tiny, grouped, atol=1e-6, rtol=0)
