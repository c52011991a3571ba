"""The interface every routed expert bank offers the layer.

Shape legend: T tokens, S rows (assignments, sorted by expert), D model width, E experts.
"""

from __future__ import annotations

from torch import Tensor, nn

from routelab._checks import check_int
from routelab.dispatch.permute import DispatchPlan, combine


class ExpertBank(nn.Module):
    """A bank of E experts: `forward(rows_SD, group_sizes_E)` maps expert-contiguous rows to expert outputs.

    `routed(x_TD, plan)` is permute → experts → combine for a dispatch plan. This generic version gathers the
    [S, D] rows, runs `forward` and combines; a bank with a fused kernel (`SwiGLUExperts`) overrides it.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_int(name, value, 1)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff

    def routed(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        rows_SD = x_TD.index_select(0, plan.token_S)
        return combine(self(rows_SD, plan.group_sizes_E), plan)
