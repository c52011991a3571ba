"""Sort-based dispatch: permute token rows into expert-contiguous order, combine the results back.

Shape legend: T tokens, D model width, E experts, S assignments.

The dispatcher keeps no state: `permute` returns the rows, the group sizes and a `DispatchPlan`, and `combine`
takes the plan back. Combine weights are applied in `combine` and nowhere else — except on the fused fast path
(`dispatch/routed_swiglu.py`), which replaces permute → experts → combine as a whole and applies them once inside.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor

from routelab.routing.base import RoutingDecision


@dataclass(frozen=True)
class DispatchPlan:
    """Where each expert-sorted row came from and what it weighs.

    token_S:       LongTensor [S], the token of each row in expert-sorted order.
    weight_S:      Tensor [S], the combine weight of each row, in the same order.
    group_sizes_E: LongTensor [E], rows per expert; the rows of expert e are contiguous and in expert order.
    num_tokens:    T.
    """

    token_S: Tensor
    weight_S: Tensor
    group_sizes_E: Tensor
    num_tokens: int


def make_plan(decision: RoutingDecision) -> DispatchPlan:
    """Sort the assignments by expert (stable, so each expert's rows keep token order)."""
    order_S = torch.sort(decision.expert_index, stable=True).indices
    return DispatchPlan(
        token_S=decision.token_index[order_S],
        weight_S=decision.weight[order_S],
        group_sizes_E=torch.bincount(decision.expert_index, minlength=decision.num_experts),
        num_tokens=decision.num_tokens,
    )


def permute(x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchPlan]:
    """Gather the rows each expert needs: returns (rows_SD, group_sizes_E, plan)."""
    plan = make_plan(decision)
    rows_SD = x_TD.index_select(0, plan.token_S)
    return rows_SD, plan.group_sizes_E, plan


def combine(rows_SD: Tensor, plan: DispatchPlan) -> Tensor:
    """Weighted scatter-add of expert outputs back to their tokens: y_t = Σ_s weight_s · rows_s over s with token t.

    Tokens without assignments (dropped, null-routed, padding) get zeros.
    """
    weighted_SD = rows_SD * plan.weight_S.to(rows_SD.dtype)[:, None]
    y_TD = rows_SD.new_zeros(plan.num_tokens, rows_SD.shape[-1])
    return y_TD.index_add(0, plan.token_S, weighted_SD)
