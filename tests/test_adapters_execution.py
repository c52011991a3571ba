"""The stacked and grouped executions of routed LoRA equal each other and a plain per-assignment loop, in fp64:
outputs and every gradient (input, A, B, router gate), for several routers and methods."""

import copy

import pytest
import torch

from routelab.adapters.wrap import AdapterSpec
from routelab.routing.base import RoutingContext

D, O, E, R, T = 10, 7, 5, 3, 13

ROUTERS = [
    ("topk", {"k": 1}),
    ("topk", {"k": 2}),
    ("topk", {"k": 3, "normalize": "none"}),
    ("top_p", {"p": 0.5, "max_k": 3}),
    ("null_experts", {"num_null_experts": 2, "k": 2}),
    ("expert_choice", {"capacity_factor": 1.0}),
]


def _pair(method, router, options):
    torch.manual_seed(0)
    spec = AdapterSpec(method=method, num_experts=E, r=R, alpha=6.0, router=router, router_options=options,
                       execution="stacked")
    stacked = spec.build(D, O).double()
    with torch.no_grad():
        stacked.B.normal_()  # B starts at zero; a random B exercises every gradient
    grouped = copy.deepcopy(stacked)
    grouped.execution_used = "grouped"
    return stacked, grouped


def _run(adapter, x):
    x = x.detach().clone().requires_grad_(True)
    y, decision = adapter(x, RoutingContext(batch_shape=(1, x.shape[0])))
    y.backward(torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y))
    grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
    return y.detach(), x.grad, grads, decision


def _loop_reference(adapter, x, decision):
    """y_t = Σ_{s: token_s = t} w_s · B_e A_e x_t · alpha/r, one assignment at a time (molora's math)."""
    y = torch.zeros(x.shape[0], O, dtype=x.dtype)
    for t, e, w in zip(decision.token_index.tolist(), decision.expert_index.tolist(), decision.weight.tolist()):
        A_e = adapter.A[e] if adapter.A.dim() == 3 else adapter.A
        y[t] += w * ((x[t] @ A_e.T) @ adapter.B[e]) * adapter.scale
    return y


@pytest.mark.parametrize("method", ["molora", "hydra", "remix"])
@pytest.mark.parametrize("router,options", ROUTERS)
def test_stacked_equals_grouped_and_loop(method, router, options):
    if method == "remix" and router in ("top_p", "expert_choice"):
        pytest.skip("remix needs a router with a fixed k")
    stacked, grouped = _pair(method, router, options)
    stacked.eval(), grouped.eval()  # remix samples in training; eval uses the router's own selection
    x = torch.randn(T, D, dtype=torch.float64)
    y_s, dx_s, g_s, decision = _run(stacked, x)
    y_g, dx_g, g_g, _ = _run(grouped, x)
    torch.testing.assert_close(y_s, y_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_s, dx_g, rtol=1e-12, atol=1e-12)
    assert g_s.keys() == g_g.keys() and {"A", "B"} <= g_s.keys()
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_g[name], rtol=1e-12, atol=1e-12, msg=name)
    with torch.no_grad():
        torch.testing.assert_close(y_s, _loop_reference(stacked, x, decision), rtol=1e-12, atol=1e-12)
    # The gate gets a gradient through the weights (remix's equal weights carry none, by design).
    if method != "remix":
        assert g_s["router.gate.weight"].abs().sum() > 0


def test_smora_stacked_equals_grouped():
    stacked, grouped = _pair("smora", "topk", {"k": 4})
    x = torch.randn(T, D, dtype=torch.float64)
    y_s, dx_s, g_s, _ = _run(stacked, x)
    y_g, dx_g, g_g, _ = _run(grouped, x)
    torch.testing.assert_close(y_s, y_g, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(dx_s, dx_g, rtol=1e-12, atol=1e-12)
    for name in g_s:
        torch.testing.assert_close(g_s[name], g_g[name], rtol=1e-12, atol=1e-12, msg=name)


def test_grouped_experts_without_tokens_get_zero_gradients():
    """Two tokens, k=1, five experts: most experts get no rows; their A and B gradients are zeros, not missing."""
    stacked, grouped = _pair("molora", "topk", {"k": 1})
    x = torch.randn(2, D, dtype=torch.float64)
    _, _, g_g, decision = _run(grouped, x)
    idle = sorted(set(range(E)) - set(decision.expert_index.tolist()))
    assert idle
    for e in idle:
        assert torch.count_nonzero(g_g["A"][e]) == 0 and torch.count_nonzero(g_g["B"][e]) == 0
    _, _, g_s, _ = _run(stacked, x)
    torch.testing.assert_close(g_s["A"], g_g["A"], rtol=1e-12, atol=1e-12)


def test_auto_execution_follows_the_stacked_rank():
    from routelab.adapters.linear import STACKED_MAX_RANK

    small = AdapterSpec(method="molora", num_experts=8, r=8).build(16, 16)
    big = AdapterSpec(method="molora", num_experts=STACKED_MAX_RANK // 4 + 1, r=4).build(16, 16)
    assert small.execution_used == "stacked" and big.execution_used == "grouped"
    with pytest.raises(ValueError, match="execution must be one of"):
        AdapterSpec(method="molora", execution="fast").build(16, 16)


def test_grouped_function_gradcheck():
    from routelab.adapters._grouped import GroupedLoRA
    from routelab.dispatch.permute import make_plan
    from routelab.routing.base import RoutingDecision

    torch.manual_seed(0)
    T, E, R, D, O = 5, 3, 2, 4, 3
    token = torch.tensor([0, 1, 2, 3, 4, 0, 2, 4])
    expert = torch.tensor([0, 2, 0, 2, 2, 1, 2, 0])  # expert 1 gets one row; no expert is empty on purpose below
    weight = torch.rand(8, dtype=torch.float64, requires_grad=True)
    plan = make_plan(RoutingDecision(token_index=token, expert_index=expert, weight=weight, num_tokens=T,
                                     num_experts=E))
    sizes = plan.group_sizes_E.tolist()
    x = torch.randn(T, D, dtype=torch.float64, requires_grad=True)
    A = torch.randn(E, R, D, dtype=torch.float64, requires_grad=True)
    B = torch.randn(E, R, O, dtype=torch.float64, requires_grad=True)
    w = plan.weight_S.detach().clone().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda x, w, A, B: GroupedLoRA.apply(x, plan.token_S, w, A, B, sizes),
                                    (x, w, A, B))
    h = torch.randn(T, R, dtype=torch.float64, requires_grad=True)  # HydraLoRA: rows already down-projected
    assert torch.autograd.gradcheck(lambda h, w, B: GroupedLoRA.apply(h, plan.token_S, w, None, B, sizes), (h, w, B))
    empty = [sizes[0] + sizes[1], 0, sizes[2]]  # an expert without rows: its gradients are zeros
    out = GroupedLoRA.apply(x, plan.token_S, w, A, B, empty)
    out.sum().backward()
    assert torch.count_nonzero(A.grad[1]) == 0 and torch.count_nonzero(B.grad[1]) == 0


def _fused_and_unfused(adapter, x):
    """(fused forward, the unfused path: the router's own forward, then `mix`), each as output, aux losses and
    every gradient (input, A, B, gate) of output·g + Σ aux."""
    out = []
    for fused in (True, False):
        xg = x.detach().clone().requires_grad_(True)
        adapter.zero_grad(set_to_none=True)
        if fused:
            assert adapter.fused_gate(xg) is not None
            y, decision = adapter(xg, None)
        else:
            decision = adapter.router(xg, None)
            y = adapter.mix(adapter.lora_input(xg), decision)
        loss = (y * torch.linspace(-1, 1, y.numel(), dtype=y.dtype).view_as(y)).sum() + sum(decision.aux_losses.values())
        loss.backward()
        grads = {n: p.grad.clone() for n, p in adapter.named_parameters() if p.grad is not None}
        out.append((y.detach(), xg.grad, grads, decision))
    return out


@pytest.mark.parametrize("options", [{"k": 2}, {"k": 1}, {"k": 2, "router_bias": True, "z_loss_coef": 1e-2},
                                     {"k": 2, "score": "sigmoid", "balance": "loss_free", "jitter": 0.1}])
@pytest.mark.parametrize("training", [True, False])
def test_fused_gate_equals_unfused_router_fp64(options, training):
    """The router's logits computed in the down-projection's matmul give the unfused result: outputs, decision,
    aux losses and every gradient (fp64)."""
    stacked, _ = _pair("molora", "topk", options)
    stacked.train(training)
    if training and options.get("jitter"):
        assert stacked.fused_gate(torch.zeros(1, D, dtype=torch.float64)) is None  # jittered logits: never fused
        return
    (y, gx, grads, d), (y_ref, gx_ref, grads_ref, d_ref) = _fused_and_unfused(stacked, torch.randn(T, D, dtype=torch.float64))
    assert torch.equal(d.token_index, d_ref.token_index) and torch.equal(d.expert_index, d_ref.expert_index)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(gx, gx_ref, rtol=1e-12, atol=1e-12)
    assert grads.keys() == grads_ref.keys() and {"A", "B", "router.gate.weight"} <= grads.keys()
    for name in grads:
        torch.testing.assert_close(grads[name], grads_ref[name], rtol=1e-12, atol=1e-12, msg=name)
    for key in d_ref.aux_losses:
        torch.testing.assert_close(d.aux_losses[key], d_ref.aux_losses[key], rtol=1e-12, atol=1e-12)


def test_fused_gate_only_where_it_computes_the_same():
    x = torch.randn(T, D, dtype=torch.float64)
    for method in ("hydra", "smora", "remix"):  # own route or mix: the logits or A mean something else
        assert _pair(method, "topk", {"k": 2})[0].fused_gate(x) is None
    assert _pair("molora", "top_p", {"p": 0.5, "max_k": 3})[0].fused_gate(x) is None  # refuses precomputed logits
    stacked, grouped = _pair("molora", "topk", {"k": 2})
    assert grouped.fused_gate(x) is None and stacked.fused_gate(x) is not None
    assert stacked.fused_gate(x.float()) is None  # x not in the adapter's dtype
    torch.manual_seed(0)
    dropped = AdapterSpec(method="molora", num_experts=E, r=R, dropout=0.2, router_options={"k": 2}).build(D, O)
    assert dropped.train().fused_gate(x.float()) is None  # the router must see the undropped input
    assert dropped.eval().fused_gate(x.float()) is not None


@pytest.mark.parametrize("R", [1, 3])
def test_gate_ranks_gradcheck(R):
    from routelab.adapters.linear import GateRanks

    torch.manual_seed(0)
    h = torch.randn(4, 3, R, dtype=torch.float64, requires_grad=True)
    gate = torch.rand(4, 3, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(GateRanks.apply, (h, gate))
    expanded = torch.randn(4, 1, R, dtype=torch.float64, requires_grad=True)  # HydraLoRA's shared A: an expand
    assert torch.autograd.gradcheck(lambda h, g: GateRanks.apply(h.expand(-1, 3, -1), g), (expanded, gate))
    out = GateRanks.apply(h, gate.detach())
    torch.testing.assert_close(out, (h * gate[..., None]).reshape(4, 3 * R).detach(), rtol=0, atol=0)
