"""Dynamic expert skipping calibrated on text: MoDES (Efficient Multimodal LLM Inference with Dynamic Expert
Skipping; Huang et al., 2025), globally-modulated local gating.

Defining property: an assignment (token t, expert e) of MoE layer l is skipped when α_l · w_te < τ, where w_te is its
routing weight, α_l the layer's importance and τ one global threshold; τ is chosen on the calibration text so that
exactly the requested fraction of the calibration assignments would be skipped (up to ties), counted on the
model's unedited routing (skipping in one layer changes the inputs of the layers above it, so the realised
fraction differs slightly). The result is an
ordinary `override_routing` handle with `min_weight = τ / α_l` per layer and `renormalize=False` (kept assignments
keep their weights; a token may lose every routed expert, as in MoDES).

Reconstructed: α_l is the mean KL divergence between the model's next-token distribution and the one with layer l's
routed experts skipped entirely, over the calibration tokens, divided by its mean over layers (MoDES calibrates a
layer-wise importance offline from the effect of removing a layer's experts; its exact normalisation and its
separate thresholds per modality — text, vision — are not reproduced: one modality, one threshold).
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from routelab.inference._collect import batches, lm_logits
from routelab.inference.override import RoutingOverride, moe_layers, override_routing, score_rule

__all__ = ["calibrate_skipping"]


@torch.no_grad()
def calibrate_skipping(
    model: nn.Module, data: Tensor | Iterable[Tensor], target_skip: float, *, batch_size: int = 16
) -> RoutingOverride:
    """An active override that skips the fraction `target_skip` ∈ [0, 1) of assignments, calibrated on `data`
    (token ids [N, L] or batches). `handle.info` holds "importance" (α per layer), "threshold" (τ),
    "min_weight" (per layer) and "calibration_skip" (the fraction skipped on `data`)."""
    ok = isinstance(target_skip, (int, float)) and not isinstance(target_skip, bool) and 0 <= target_skip < 1
    if not ok:
        raise ValueError(f"target_skip must be a number in [0, 1), got {target_skip!r}")
    layers = moe_layers(model)
    for i, layer in enumerate(layers):  # an unsupported router fails here, before any forward
        score_rule(layer.router, where=f"layer {i}'s router")
    L = len(layers)
    data_batches = list(batches(data, batch_size))
    was_training = model.training
    model.eval()
    try:
        kl_L = torch.zeros(L, dtype=torch.float64)
        weights: list[list[Tensor]] = [[] for _ in range(L)]
        n_tokens = 0
        for ids in data_batches:
            full_logp = lm_logits(model, ids).float().log_softmax(-1)
            for j, layer in enumerate(layers):
                weights[j].append(layer.last_decision.weight.detach().double().cpu())
            n_tokens += ids.numel()
            for j in range(L):
                with override_routing(model, layers=[j], min_weight=math.inf):
                    skip_logp = lm_logits(model, ids).float().log_softmax(-1)
                kl_L[j] += (full_logp.exp() * (full_logp - skip_logp)).sum().double().item()
    finally:
        model.train(was_training)
    kl_L = (kl_L / n_tokens).clamp_min(0)
    importance_L = kl_L / kl_L.mean() if float(kl_L.mean()) > 0 else torch.ones(L, dtype=torch.float64)

    w_L = [torch.cat(w) for w in weights]
    scaled_S = torch.cat([importance_L[j] * w_L[j] for j in range(L)])
    S = scaled_S.numel()
    n_skip = round(target_skip * S)
    if n_skip == 0:
        tau = 0.0
    else:
        sorted_S = torch.sort(scaled_S).values
        tau = float(sorted_S[n_skip]) if n_skip < S else math.inf
    min_weight = {j: (tau / float(importance_L[j]) if float(importance_L[j]) > 0 else math.inf) for j in range(L)}
    skipped = sum(int((importance_L[j] * w_L[j] < tau).sum()) for j in range(L))
    handle = override_routing(model, min_weight=min_weight, renormalize=False)
    handle.info = {
        "importance": importance_L.tolist(),
        "threshold": tau,
        "min_weight": [min_weight[j] for j in range(L)],
        "calibration_skip": skipped / S if S else 0.0,
    }
    return handle
