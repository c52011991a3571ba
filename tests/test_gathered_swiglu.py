"""The tiny-S inference path (dispatch/gathered_swiglu.py) against a plain per-assignment loop in fp64, and the
MoE layer's choice of path."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import routelab
from routelab.dispatch.gathered_swiglu import gathered_swiglu
from routelab.dispatch import LocalDispatcher
from routelab.dispatch import local as local_module


def _loop(x_TD, token_S, expert_S, weight_S, w_gate_up, w_down):
    F_ = w_down.shape[1]
    y = torch.zeros_like(x_TD)
    for t, e, w in zip(token_S.tolist(), expert_S.tolist(), weight_S.tolist()):
        h = x_TD[t] @ w_gate_up[e]
        y[t] += w * ((F.silu(h[:F_]) * h[F_:]) @ w_down[e])
    return y


@pytest.mark.parametrize("T,k", [(1, 1), (1, 2), (3, 4), (8, 2), (5, 8)])
def test_gathered_swiglu_equals_a_plain_loop(T, k):
    g = torch.Generator().manual_seed(T * 10 + k)
    E, D, F_ = 8, 12, 10
    x = torch.randn(T, D, generator=g, dtype=torch.float64)
    w_gate_up = torch.randn(E, D, 2 * F_, generator=g, dtype=torch.float64)
    w_down = torch.randn(E, F_, D, generator=g, dtype=torch.float64)
    expert_S = torch.stack([torch.randperm(E, generator=g)[:k] for _ in range(T)]).reshape(-1)
    token_S = torch.arange(T).repeat_interleave(k)
    order = torch.randperm(T * k, generator=g)  # any order of assignments, tokens with one or several
    keep = order[: max(1, T * k - 1)]
    args = (token_S[keep], expert_S[keep], torch.rand(keep.numel(), generator=g, dtype=torch.float64))
    want = _loop(x, *args, w_gate_up, w_down)
    torch.testing.assert_close(gathered_swiglu(x, *args, w_gate_up, w_down), want, atol=1e-12, rtol=0)
    empty = torch.zeros(0, dtype=torch.long)
    assert torch.equal(gathered_swiglu(x, empty, empty, empty.double(), w_gate_up, w_down), torch.zeros_like(x))


def test_layer_takes_the_fast_path_only_for_a_few_assignments_without_grad(monkeypatch):
    monkeypatch.setattr(local_module, "grouped_mm_available", lambda device_type: False)  # its fallback is tested
    torch.manual_seed(0)
    layer = routelab.MoELayer(16, 24, routelab.create_router("topk", d_model=16, num_experts=4, k=2))
    calls = []
    real = local_module.gathered_swiglu
    monkeypatch.setattr(local_module, "gathered_swiglu", lambda *a: calls.append(a[1].numel()) or real(*a))
    x = torch.randn(3, 16)
    with_grad = layer(x)
    assert calls == []  # autograd needs the custom function's backward
    with torch.no_grad():
        fast = layer(x)
        assert calls == [6]
        layer.dispatcher = LocalDispatcher(decode_fast_path=False)
        slow = layer(x)
        assert calls == [6]
        layer.dispatcher = LocalDispatcher()
        layer(torch.randn(40, 16))  # 80 assignments: more than DECODE_MAX_ASSIGNMENTS
        assert calls == [6]
    wide = routelab.MoELayer(512, 1024, routelab.create_router("topk", d_model=512, num_experts=4, k=2))
    with torch.no_grad():
        wide(torch.randn(3, 512))  # 6 assignments, but 6·3·512·1024 weights gathered exceed DECODE_MAX_GATHERED
        assert calls == [6]
    torch.testing.assert_close(fast, with_grad.detach(), atol=1e-6, rtol=0)
    torch.testing.assert_close(fast, slow, atol=1e-6, rtol=0)


def test_decode_fast_path_option_is_validated():
    with pytest.raises(ValueError, match="decode_fast_path must be one of True, False"):
        LocalDispatcher(decode_fast_path=1)
