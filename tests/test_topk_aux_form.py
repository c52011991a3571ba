"""topk's aux_loss_form="per_slot": Hugging Face's per-layer balance loss (f counts every slot), k·coef at uniform
routing; the Switch form stays the default."""

import pytest
import torch

import routelab


@pytest.mark.parametrize("E,k", [(4, 1), (4, 2), (8, 3)])
def test_per_slot_form_is_k_times_switch_and_k_coef_at_uniform(E, k):
    switch = routelab.create_router("topk", d_model=E, num_experts=E, k=k, normalize="none", aux_loss_coef=0.01)
    per_slot = routelab.create_router(
        "topk", d_model=E, num_experts=E, k=k, normalize="none", aux_loss_coef=0.01, aux_loss_form="per_slot"
    )
    assert switch.aux_loss_form == "switch"  # default unchanged
    with torch.no_grad():
        per_slot.gate.weight.copy_(switch.gate.weight)
    x = torch.randn(64, E)
    a, b = switch(x).aux_losses["aux"], per_slot(x).aux_losses["aux"]
    torch.testing.assert_close(b, k * a)

    with torch.no_grad():  # zero logits: P uniform, so the loss is exactly k·coef whatever the (tie-broken) loads
        per_slot.gate.weight.zero_()
    assert per_slot(x).aux_losses["aux"].item() == pytest.approx(0.01 * k, rel=1e-6)


def test_aux_loss_form_is_validated():
    with pytest.raises(ValueError, match="aux_loss_form"):
        routelab.create_router("topk", d_model=4, num_experts=4, aux_loss_form="hf")
