"""The ERC (expert–router coupling) loss: each router row should drive its own expert's gate hardest.

Paper: Coupling Experts and Routers in Mixture-of-Experts via an Auxiliary Loss.

Defining property: the loss depends only on the router rows and the experts' gate projections (and the noise
seed), never on the batch; it is zero when M is α-diagonally dominant; its cost grows with E², not T.

Algorithm (paper for the idea; formula from secondary sources; fp32):
    R = router rows [E, D];  ε_i = min_{j≠i} ‖R_i - R_j‖ / (2‖R_i‖)          (ε detached: our reading)
    R̃_i = R_i ⊙ U(1 - ε_i, 1 + ε_i)^D      (so ‖R̃_i - R_i‖ ≤ min_j ‖R_i - R_j‖ / 2)
    M_ij = ‖R̃_i W_g^j‖                      (W_g^j [D, F]: expert j's gate projection)
    L = mean_{i≠j} [ReLU(M_ij - α·M_ii) + ReLU(M_ji - α·M_ii)]
The noise comes from `generator` (or torch's default generator), so a fixed seed gives a fixed loss.
`MoELayer(..., erc_loss_coef=c, erc_alpha=α)` adds c·L to the decision's aux losses as "erc" in training mode.
Only a router that declares linear gate rows (`Router.gate_rows()`) with a bank that declares gate projections
(`ExpertBank.gate_projections()`) qualifies; the layer checks both when it is built.

Pitfall: inflating W_g lowers the loss; watch weight norms.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.routing.base import Router


def perturb_rows(router_ED: Tensor, generator: torch.Generator | None = None) -> Tensor:
    """R̃ [E, D]: rows times U(1 - ε_i, 1 + ε_i) noise, ε_i = min_{j≠i} ‖R_i - R_j‖ / (2‖R_i‖), detached."""
    E = router_ED.shape[0]
    with torch.no_grad():
        dist_EE = torch.cdist(router_ED, router_ED)
        if E > 1:
            dist_EE.fill_diagonal_(float("inf"))
        eps_E = dist_EE.amin(dim=1).nan_to_num(0.0, posinf=0.0) / (
            2 * router_ED.norm(dim=1).clamp_min(torch.finfo(router_ED.dtype).tiny)
        )
        u_ED = torch.rand(router_ED.shape, generator=generator, dtype=router_ED.dtype, device=router_ED.device)
        scale_ED = 1 + eps_E[:, None] * (2 * u_ED - 1)
    return router_ED * scale_ED


def erc_loss(
    router_ED: Tensor, gate_EDF: Tensor, *, alpha: float = 1.0, generator: torch.Generator | None = None
) -> Tensor:
    """The unscaled ERC loss (0-d, fp32 or fp64) from router rows [E, D] and expert gate projections [E, D, F]."""
    E = router_ED.shape[0]
    dtype = torch.float64 if router_ED.dtype == torch.float64 else torch.float32
    R_ED, W_EDF = router_ED.to(dtype), gate_EDF.to(dtype)
    if E < 2:
        return (R_ED.sum() + W_EDF.sum()) * 0.0
    noisy_ED = perturb_rows(R_ED, generator)
    M_EE = torch.einsum("id,jdf->ijf", noisy_ED, W_EDF).norm(dim=-1)
    diag_E = M_EE.diagonal()
    off_EE = ~torch.eye(E, dtype=torch.bool, device=R_ED.device)
    terms_EE = torch.relu(M_EE - alpha * diag_E[:, None]) + torch.relu(M_EE.T - alpha * diag_E[:, None])
    return terms_EE[off_EE].mean()


def check_erc_options(router: Router, experts: nn.Module, coef: float, alpha: float) -> None:
    """Validate the layer's ERC options when the layer is built: ERC needs a router that declares linear gate rows
    (`Router.gate_rows`) and a bank that declares its experts' gate projections (`ExpertBank.gate_projections`)."""
    for name, value in (("erc_loss_coef", coef), ("erc_alpha", alpha)):
        if not isinstance(value, (int, float)) or isinstance(value, bool) or value < 0:
            raise ValueError(f"{name} must be a number >= 0, got {value!r}")
    if coef > 0 and router.gate_rows() is None:
        raise ValueError(
            f"erc_loss_coef > 0 needs a router with a linear gate (router.gate: nn.Linear with >= num_experts rows); "
            f"{type(router).__name__} has none"
        )
    if coef > 0 and experts.gate_projections() is None:
        raise ValueError(
            f"erc_loss_coef > 0 needs an expert bank that declares gate projections (ExpertBank.gate_projections); "
            f"{type(experts).__name__} does not"
        )


def layer_erc_loss(router: Router, experts: nn.Module, alpha: float) -> Tensor:
    """ERC loss of a layer: its router's gate rows [E, D] against its experts' gate projections [E, D, F]."""
    return erc_loss(router.gate_rows(), experts.gate_projections(), alpha=alpha)
