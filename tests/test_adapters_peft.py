"""PEFT is the anchor: molora with one expert, k=1 and weight 1 is PEFT's LoRA, and mhr is PEFT's poly (MHR) —
outputs and every gradient, in fp64."""

import copy

import pytest
import torch
from torch import nn

from routelab.adapters import add_lora_experts, routed_lora_layers

peft = pytest.importorskip("peft")

D, O, R, ALPHA = 12, 10, 4, 8.0


class Tiny(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.proj = nn.Linear(D, O, bias=True)
        self.out = nn.Linear(O, 3)

    def forward(self, x):
        return self.out(torch.tanh(self.proj(x)))


def _grads(module):
    return {n: p.grad for n, p in module.named_parameters() if p.grad is not None}


def test_molora_one_expert_equals_peft_lora():
    torch.manual_seed(0)
    base = Tiny().double()
    ours, ref = copy.deepcopy(base), copy.deepcopy(base)
    ref = peft.get_peft_model(ref, peft.LoraConfig(r=R, lora_alpha=ALPHA, target_modules=["proj"], lora_dropout=0.0))
    add_lora_experts(ours, target_modules=["proj"], method="molora", num_experts=1, r=R, alpha=ALPHA,
                     router_options={"k": 1}, verbose=False)
    lora_A = ref.base_model.model.proj.lora_A["default"].weight  # [R, D]
    lora_B = ref.base_model.model.proj.lora_B["default"].weight  # [O, R]
    with torch.no_grad():
        lora_B.normal_()  # PEFT starts B at zero; a non-zero B makes the comparison (and A's gradient) non-trivial
        adapter = ours.proj.adapter
        adapter.A.copy_(lora_A[None])
        adapter.B.copy_(lora_B.T[None])
    x = torch.randn(3, 5, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y, y_ref = ours(x), ref(x_ref)
    torch.testing.assert_close(y, y_ref, rtol=1e-12, atol=1e-12)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.A.grad[0], lora_A.grad, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(adapter.B.grad[0], lora_B.grad.T, rtol=1e-12, atol=1e-12)
    # The decision is one expert per token with weight exactly 1; base weights get no gradient on either side.
    decision = routed_lora_layers(ours)["proj"].last_decision
    assert torch.equal(decision.weight, torch.ones(15, dtype=decision.weight.dtype))
    for model in (ours, ref):
        for name, p in model.named_parameters():
            if "lora" not in name and "adapter" not in name:
                assert p.grad is None and not p.requires_grad, name


@pytest.mark.parametrize("n_splits", [2, 4])
def test_mhr_equals_peft_poly(n_splits):
    """routelab routes per token; a bias-only sigmoid router ('selected' over all skills) gives every token the
    weights sigmoid(b)/Σ sigmoid(b), which is PEFT poly's eval-mode routing of one task with module_logits b."""
    from peft.tuners.poly.config import PolyConfig
    from peft.tuners.poly.layer import Linear as PolyLinear

    torch.manual_seed(1)
    S, r = 3, 2
    base = nn.Linear(D, 8, bias=False).double()
    ref = PolyLinear(copy.deepcopy(base), "default", PolyConfig(r=r, n_skills=S, n_splits=n_splits, n_tasks=1,
                                                                   target_modules=["x"])).double()
    holder = nn.Sequential()
    holder.add_module("lin", copy.deepcopy(base))
    add_lora_experts(holder, target_modules=["lin"], method="mhr", num_experts=S, r=r, alpha=1.0,
                     router_options={"k": S, "score": "sigmoid", "normalize": "selected", "router_bias": True,
                                     "aux_loss_coef": 0.0},
                     method_options={"n_splits": n_splits}, verbose=False)
    ours = holder.lin.adapter
    with torch.no_grad():
        ref.poly_lora_B["default"].normal_()
        ref.poly_router["default"].module_logits.normal_()
        ours.A.copy_(ref.poly_lora_A["default"])
        ours.B.copy_(ref.poly_lora_B["default"])
        logits = ref.poly_router["default"].module_logits.view(n_splits, S)
        for q, router in enumerate(ours.routers):
            router.gate.weight.zero_()
            router.gate.bias.copy_(logits[q])
    ref.eval()
    holder.eval()
    x = torch.randn(2, 5, D, dtype=torch.float64, requires_grad=True)
    x_ref = x.detach().clone().requires_grad_(True)
    y = holder(x)
    y_ref = ref(x_ref, task_ids=torch.zeros(2, dtype=torch.long))
    torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
    dy = torch.randn_like(y)
    y.backward(dy)
    y_ref.backward(dy)
    torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.A.grad, ref.poly_lora_A["default"].grad, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(ours.B.grad, ref.poly_lora_B["default"].grad, rtol=1e-10, atol=1e-10)
    bias_grad = torch.stack([router.gate.bias.grad for router in ours.routers]).reshape(-1)
    torch.testing.assert_close(bias_grad, ref.poly_router["default"].module_logits.grad.reshape(-1),
                               rtol=1e-9, atol=1e-10)
