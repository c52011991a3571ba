"""Router losses shared by several routers. Each returns an unscaled 0-d tensor; routers multiply by coefficients.

Shape legend: T tokens, E experts.
"""

from __future__ import annotations

import torch
from torch import Tensor


def switch_balance_loss(probs_TE: Tensor, load_E: Tensor) -> Tensor:
    """Switch Transformers' load-balancing loss E · Σ_e f_e · P_e (Fedus et al., 2021).

    f_e = load_e / Σ load, the fraction of assignments that went to e (no gradient: a count);
    P_e = mean over tokens of the router probability of e. It equals 1 whenever either f or P is uniform.
    `probs_TE` rows must sum to 1 (pass softmax probabilities, never logits: a second softmax would flatten P to
    about 1/E and silence the loss).
    """
    num_experts = probs_TE.shape[-1]
    if probs_TE.shape[0] == 0:
        return probs_TE.sum() * 0.0
    # No assignments (all dropped or null-routed): f = 0 and the loss is 0, without a host sync to find out.
    f_E = load_E.to(probs_TE.dtype) / load_E.sum().clamp_min(1)
    P_E = probs_TE.mean(dim=0)
    return num_experts * torch.dot(f_E, P_E)


def router_z_loss(logits_TE: Tensor) -> Tensor:
    """ST-MoE's router z-loss: mean over tokens of logsumexp(logits)² (Zoph et al., 2022)."""
    if logits_TE.shape[0] == 0:
        return logits_TE.sum() * 0.0
    return torch.logsumexp(logits_TE, dim=-1).square().mean()
