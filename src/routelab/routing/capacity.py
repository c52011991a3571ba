"""Expert capacity: keep at most C assignments per expert, by a priority.

Shape legend: S assignments, E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

DROP_POLICIES = ("probs", "position")


def expert_capacity(num_tokens: int, k: float, num_experts: int, capacity_factor: float) -> int:
    """C = ceil(T·k/E · capacity_factor), the Switch/GShard capacity per expert."""
    return math.ceil(num_tokens * k / num_experts * capacity_factor)


def within_capacity(expert_S: Tensor, priority_S: Tensor, num_experts: int, capacity: int) -> Tensor:
    """BoolTensor [S]: True for the assignments each expert keeps, its `capacity` highest-priority ones.

    Ties in priority keep the earlier assignment. Sorting twice (by priority, then stably by expert) ranks every
    assignment within its expert without a loop over experts or a [T, E] mask.
    """
    S = expert_S.numel()
    by_priority_S = torch.sort(priority_S, descending=True, stable=True).indices
    order_S = by_priority_S[torch.sort(expert_S[by_priority_S], stable=True).indices]
    sizes_E = torch.bincount(expert_S, minlength=num_experts)
    starts_E = torch.cumsum(sizes_E, 0) - sizes_E
    rank_S = torch.empty_like(expert_S)
    rank_S[order_S] = torch.arange(S, device=expert_S.device) - starts_E[expert_S[order_S]]
    return rank_S < capacity
