"""ERC loss (ROUTERS.md §13): hand computation by loops, batch independence, zero when diagonally dominant, the
noise bound, and the MoELayer option (training only, gradients, linear-gate routers only)."""

import pytest
import torch

import routelab
from routelab.experts import ExpertBank
from routelab.routing.erc import erc_loss, perturb_rows


def test_perturbation_stays_within_half_the_nearest_row_distance():
    torch.manual_seed(0)
    R = torch.randn(6, 10, dtype=torch.float64)
    for seed in range(5):
        noisy = perturb_rows(R, torch.Generator().manual_seed(seed))
        for i in range(6):
            nearest = min((R[i] - R[j]).norm() for j in range(6) if j != i)
            assert (noisy[i] - R[i]).norm() <= nearest / 2 + 1e-12


def test_erc_matches_a_loop_over_expert_pairs():
    torch.manual_seed(1)
    E, D, F, alpha = 4, 6, 5, 0.8
    R, W = torch.randn(E, D, dtype=torch.float64), torch.randn(E, D, F, dtype=torch.float64)
    loss = erc_loss(R, W, alpha=alpha, generator=torch.Generator().manual_seed(7))
    noisy = perturb_rows(R, torch.Generator().manual_seed(7))
    M = [[(noisy[i] @ W[j]).norm().item() for j in range(E)] for i in range(E)]
    terms = [
        max(0.0, M[i][j] - alpha * M[i][i]) + max(0.0, M[j][i] - alpha * M[i][i])
        for i in range(E)
        for j in range(E)
        if i != j
    ]
    assert loss.item() == pytest.approx(sum(terms) / len(terms), rel=1e-12)


def test_erc_is_zero_when_M_is_diagonally_dominant():
    E = D = 4
    R = torch.eye(E) * 2.0  # router row i reads only direction i (and the noise keeps it that way)
    W = torch.full((E, D, 3), 0.01)
    for j in range(E):
        W[j, j] = 5.0  # expert j's gate responds strongly to direction j only
    assert erc_loss(R, W).item() == 0.0


def _layer(name="topk", coef=0.1, **options):
    router = routelab.create_router(name, d_model=8, num_experts=4, **options)
    return routelab.MoELayer(8, 6, router, erc_loss_coef=coef)


def test_layer_erc_is_batch_independent_training_only_and_has_gradients():
    torch.manual_seed(2)
    layer = _layer(aux_loss_coef=0.0)
    small, large = torch.randn(3, 8), torch.randn(40, 8) * 3
    torch.manual_seed(5)
    layer(small)
    first = layer.last_decision.aux_losses["erc"]
    torch.manual_seed(5)
    layer(large)
    second = layer.last_decision.aux_losses["erc"]
    assert first.item() == second.item() and first.item() > 0
    routelab.total_aux_loss(layer).backward()
    assert layer.router.gate.weight.grad.abs().sum() > 0
    grad = layer.experts.w_gate_up.grad
    assert grad[:, :, :6].abs().sum() > 0 and torch.all(grad[:, :, 6:] == 0)  # only the gate projections
    layer.eval()
    layer(torch.randn(3, 8))
    assert "erc" not in layer.last_decision.aux_losses


def test_layer_erc_uses_only_the_true_expert_rows_of_a_wider_gate():
    layer = _layer("null_experts", num_null_experts=2, k=2, separate_null_gate=False)
    layer(torch.randn(5, 8))
    assert torch.isfinite(layer.last_decision.aux_losses["erc"])


@pytest.mark.parametrize(
    "name,options", [("cosine", {}), ("hash", {}), ("random_fixed", {}), ("kmeans", {}), ("recurrent", dict(hidden=8))]
)
def test_erc_rejects_routers_without_a_linear_gate(name, options):
    with pytest.raises(ValueError, match="linear gate"):
        _layer(name, **options)


@pytest.mark.parametrize(
    "kwargs,match", [(dict(erc_loss_coef=-1.0), "erc_loss_coef"), (dict(erc_alpha=-0.5), "erc_alpha")]
)
def test_erc_options_validated(kwargs, match):
    router = routelab.create_router("topk", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match=match):
        routelab.MoELayer(8, 6, router, **kwargs)


def test_erc_needs_a_bank_that_declares_gate_projections_checked_at_build():
    class Plain(ExpertBank):  # computes fine, but declares no gate projections
        def expert(self, x_ND, e):
            return x_ND

    router = routelab.create_router("topk", d_model=8, num_experts=4)
    with pytest.raises(ValueError, match="gate projections.*Plain"):
        routelab.MoELayer(8, 6, router, experts=Plain(4, 8, 6), erc_loss_coef=0.1)
    layer = routelab.MoELayer(8, 6, router, experts=Plain(4, 8, 6))  # without ERC it builds and runs
    assert layer(torch.randn(3, 8)).shape == (3, 8)
