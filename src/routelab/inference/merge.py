"""Expert merging by router-logit similarity: MC-SMoE (Merge, Then Compress: Demystify Efficient SMoE with Hints
from Its Routing Policy; Li et al., ICLR 2024).

Defining property: per MoE layer, the `keep` most frequently used experts on the calibration text are dominant
(ties: lower id); every other expert joins the group of the dominant expert whose router-logit column is most
similar (cosine over the calibration tokens); each group becomes one expert whose weights are the members' weights
averaged by their usage frequency (a plain mean when no member was used); the router keeps only the dominant
experts' rows. A group of identical experts therefore merges into that same expert.

Reconstructed: MC-SMoE aligns the members' hidden neurons by weight matching before averaging; routelab averages
without the permutation alignment, and omits the "compress" stage (low-rank and pruning of the merged experts).
Supported routers and experts as `prune_experts`; a routelab LM's config gets `num_experts=keep`.
"""

from __future__ import annotations

import copy
from collections.abc import Iterable

import torch
from torch import Tensor, nn

from routelab.inference._collect import routing_statistics
from routelab.inference.override import moe_layers
from routelab.inference.prune import check_shrinkable, shrink_layer, update_config

__all__ = ["merge_experts", "merge_groups"]


def merge_groups(count_E: Tensor, gram_EE: Tensor, keep: int) -> tuple[Tensor, Tensor]:
    """(dominant_K, group_E): the dominant experts (ascending ids) and, per expert, the index in dominant_K of its
    group, from usage counts [E] and the router-logit Gram matrix [E, E]."""
    order = torch.sort(count_E, descending=True, stable=True).indices[:keep]
    dominant_K = torch.sort(order).values
    norms_E = gram_EE.diagonal().clamp_min(1e-300).sqrt()
    cosine_EE = gram_EE / (norms_E[:, None] * norms_E[None, :])
    group_E = cosine_EE[:, dominant_K].argmax(dim=1)  # ties: the lower dominant id
    group_E[dominant_K] = torch.arange(keep)
    return dominant_K, group_E


def merge_experts(
    model: nn.Module, data: Tensor | Iterable[Tensor], *, keep: int, batch_size: int = 16
) -> nn.Module:
    """A copy of `model` with `keep` experts per MoE layer, merged MC-SMoE style on `data` (token ids [N, L] or
    batches); `model` is left unchanged."""
    check_shrinkable(model, keep, "merge_experts")
    stats = routing_statistics(model, data, batch_size=batch_size, gram=True)
    merged = copy.deepcopy(model)
    for layer, s in zip(moe_layers(merged), stats):
        count_E = s["count"]
        dominant_K, group_E = merge_groups(count_E, s["gram"], keep)
        member_KE = torch.nn.functional.one_hot(group_E, keep).T.double()  # [K, E]
        mix_KE = member_KE * count_E[None, :]
        empty_K = mix_KE.sum(1) == 0
        mix_KE[empty_K] = member_KE[empty_K]  # unused groups: a plain mean
        mix_KE = mix_KE / mix_KE.sum(1, keepdim=True)
        shrink_layer(layer, dominant_K, mix_KE)
    update_config(merged, keep)
    return merged
