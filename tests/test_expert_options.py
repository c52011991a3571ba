"""The expert kinds interop needs, against per-row loops in fp64 (outputs and every gradient): gpt-oss's biased
clamped SwiGLU bank, Qwen2-MoE's sigmoid-gated shared expert, and the MoELayer options that use them."""

import pytest
import torch
import torch.nn.functional as F

import routelab
from reference import reference_topk, swiglu_row
from routelab.experts import ClampedSwiGLUExperts, GatedSharedExpert, SwiGLUExperts

D, FF = 13, 11


def clamped_row(x_D, w_gate_up_D2F, b_2F, w_down_FD, b_D, alpha, limit):
    """gpt-oss's expert on one row, written from its definition (interleaving aside)."""
    h = x_D @ w_gate_up_D2F + b_2F
    gate, up = h[:FF].clamp(max=limit), h[FF:].clamp(min=-limit, max=limit)
    return ((up + 1) * gate * torch.sigmoid(alpha * gate)) @ w_down_FD + b_D


def _random_(module, std=0.5):
    with torch.no_grad():
        for p in module.parameters():
            p.normal_(0.0, std)


@pytest.mark.parametrize("bias", [True, False])
def test_clamped_swiglu_bank_matches_row_loop_fp64(bias):
    torch.manual_seed(0)
    E, limit, alpha = 3, 0.4, 1.702  # a small limit: about half the pre-activations are clamped
    bank = ClampedSwiGLUExperts(E, D, FF, alpha=alpha, limit=limit, bias=bias).double()
    _random_(bank)
    sizes = torch.tensor([4, 0, 5])
    rows = torch.randn(9, D, dtype=torch.float64, requires_grad=True)
    y = bank(rows, sizes)

    zeros_2F, zeros_D = torch.zeros(2 * FF, dtype=torch.float64), torch.zeros(D, dtype=torch.float64)
    experts = [0] * 4 + [2] * 5
    ref = torch.stack([
        clamped_row(rows[s], bank.w_gate_up[e], bank.b_gate_up[e] if bias else zeros_2F, bank.w_down[e],
                    bank.b_down[e] if bias else zeros_D, alpha, limit)
        for s, e in enumerate(experts)
    ])  # fmt: skip
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    params = [rows] + list(bank.parameters())
    upstream = torch.randn_like(y)
    got = torch.autograd.grad(y, params, upstream)
    want = torch.autograd.grad(ref, params, upstream)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)
    assert torch.all(got[2][1] == 0)  # expert 1 got no rows: zero gradient, not None


def test_clamped_swiglu_bank_validates_and_handles_no_rows():
    with pytest.raises(ValueError, match="limit"):
        ClampedSwiGLUExperts(2, D, FF, limit=0.0)
    with pytest.raises(ValueError, match="d_ff"):
        ClampedSwiGLUExperts(2, D, 0)
    bank = ClampedSwiGLUExperts(2, D, FF)
    assert bank(torch.zeros(0, D), torch.tensor([0, 0])).shape == (0, D)


def test_gated_shared_expert_scales_by_sigmoid_gate():
    torch.manual_seed(1)
    shared = GatedSharedExpert(D, FF).double()
    _random_(shared)
    x = torch.randn(5, D, dtype=torch.float64)
    y = shared(x, torch.tensor([5]))
    gate_T = torch.sigmoid(x @ shared.gate.weight[0])
    ref = torch.stack([gate_T[t] * swiglu_row(x[t], shared.mlp.w_gate_up[0], shared.mlp.w_down[0]) for t in range(5)])
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)


def test_layer_with_gated_shared_expert_of_own_width_matches_reference_fp64():
    torch.manual_seed(2)
    E, k, T, shared_ff = 4, 2, 7, 17
    router = routelab.create_router("topk", d_model=D, num_experts=E, k=k, normalize="none", aux_loss_coef=0.0)
    layer = routelab.MoELayer(D, FF, router, shared_experts=1, shared_d_ff=shared_ff, shared_expert_gate=True).double()
    _random_(layer)
    assert layer.shared_experts.mlp.w_down.shape == (1, shared_ff, D)
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    y = layer(x)

    rows = []
    for t in range(T):
        s = layer.shared_experts
        row = torch.sigmoid(s.gate.weight[0] @ x[t]) * swiglu_row(x[t], s.mlp.w_gate_up[0], s.mlp.w_down[0])
        rows.append(row)
    for t, e, w in reference_topk(x, router.gate.weight, k=k, normalize="none"):
        rows[t] = rows[t] + w * swiglu_row(x[t], layer.experts.w_gate_up[e], layer.experts.w_down[e])
    ref = torch.stack(rows)
    torch.testing.assert_close(y, ref, atol=1e-12, rtol=0)
    params = [x] + list(layer.parameters())
    upstream = torch.randn_like(y)
    for g, w in zip(torch.autograd.grad(y, params, upstream), torch.autograd.grad(ref, params, upstream)):
        torch.testing.assert_close(g, w, atol=1e-12, rtol=0)


def test_layer_with_custom_expert_bank():
    router = routelab.create_router("topk", d_model=D, num_experts=3, k=2)
    bank = ClampedSwiGLUExperts(3, D, FF)
    layer = routelab.MoELayer(D, FF, router, experts=bank)
    assert layer.experts is bank
    x = torch.randn(2, 4, D)
    layer(x).sum().backward()
    assert bank.b_gate_up.grad is not None
    with pytest.raises(ValueError, match="num_experts"):
        routelab.MoELayer(D, FF, router, experts=ClampedSwiGLUExperts(4, D, FF))
    with pytest.raises(ValueError, match="experts.d_model=12 does not match the layer's d_model"):
        routelab.MoELayer(D, FF, router, experts=ClampedSwiGLUExperts(3, 12, FF))
    with pytest.raises(ValueError, match="experts.d_ff"):
        routelab.MoELayer(D, FF, router, experts=ClampedSwiGLUExperts(3, D, FF + 1))
    with pytest.raises(TypeError, match="experts must be a routelab ExpertBank"):
        routelab.MoELayer(D, FF, router, experts=torch.nn.Linear(D, D))


def test_layer_option_defaults_and_validation():
    router = routelab.create_router("topk", d_model=D, num_experts=3, k=2)
    layer = routelab.MoELayer(D, FF, router, shared_experts=2)
    assert type(layer.experts) is SwiGLUExperts and type(layer.shared_experts) is SwiGLUExperts
    assert layer.shared_experts.d_ff == 2 * FF
    with pytest.raises(ValueError, match="shared_experts >= 1"):
        routelab.MoELayer(D, FF, router, shared_expert_gate=True)
    with pytest.raises(ValueError, match="shared_experts >= 1"):
        routelab.MoELayer(D, FF, router, shared_d_ff=8)
    with pytest.raises(ValueError, match="shared_d_ff"):
        routelab.MoELayer(D, FF, router, shared_experts=1, shared_d_ff=0)


def test_silu_reference_helper_is_swiglu():  # guards the reference the tests above lean on
    x, w, wd = torch.randn(D), torch.randn(D, 2 * FF), torch.randn(FF, D)
    torch.testing.assert_close(swiglu_row(x, w, wd), (F.silu(x @ w[:, :FF]) * (x @ w[:, FF:])) @ wd)
