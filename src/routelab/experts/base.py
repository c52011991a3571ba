"""The interface every routed expert bank offers the layer.

Shape legend: T tokens, S rows (assignments, sorted by expert), D model width, E experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from routelab.dispatch.permute import DispatchPlan, combine


class ExpertBank(nn.Module):
    """A bank of E experts: `forward(rows_SD, group_sizes_E)` maps expert-contiguous rows to expert outputs.

    `routed(x_TD, plan)` is permute → experts → combine for a dispatch plan. This generic version gathers the
    [S, D] rows, runs `forward` and combines; a bank with a fused kernel (`SwiGLUExperts`) overrides it.
    Subclasses set `num_experts`, `d_model` and `d_ff`.
    """

    num_experts: int
    d_model: int
    d_ff: int

    def routed(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        rows_SD = x_TD.index_select(0, plan.token_S)
        return combine(self(rows_SD, plan.group_sizes_E), plan)
