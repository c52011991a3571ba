"""Banks of SwiGLU experts, run as a grouped matmul over expert-contiguous rows.

Shape legend: S rows (assignments, sorted by expert), D model width, F expert width, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab.dispatch.permute import DispatchPlan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.experts.base import ExpertBank


class SwiGLUExperts(ExpertBank):
    """E independent SwiGLU MLPs stored as 3-D weights.

    w_gate_up [E, D, 2F]: the gate projection is the first F columns, the up projection the last F.
    w_down    [E, F, D].
    Expert e on a row x: (silu(x @ w_gate_up[e][:, :F]) * (x @ w_gate_up[e][:, F:])) @ w_down[e].

    Init: normal with std 1/sqrt(D) for w_gate_up and 1/sqrt(F) for w_down, so that a unit-variance input gives
    gate/up pre-activations of unit variance and an output of roughly the input's scale (LeCun-style fan-in).
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__(num_experts, d_model, d_ff)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_ff))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        # `routed` runs the fused permute → experts → combine kernel; False takes the generic path (tests compare them).
        self.fused = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.d_ff))

    def routed(self, x_TD: Tensor, plan: DispatchPlan) -> Tensor:
        """permute → experts → combine for the plan's assignments: y_TD [T, D] from token rows x_TD [T, D].

        The plain SwiGLU bank runs the three as one pass (`dispatch/routed_swiglu.py`: no [S, D] tensor, SwiGLU
        recomputed in backward); with `fused = False` it takes `ExpertBank`'s generic path: gather the rows,
        `forward`, `combine`.
        """
        if not self.fused:
            return super().routed(x_TD, plan)
        sizes = plan.group_sizes_E.tolist()
        return routed_swiglu(x_TD, plan.token_S, plan.weight_S, sizes, self.w_gate_up, self.w_down)

    def forward(self, rows_SD: Tensor, group_sizes_E: Tensor) -> Tensor:
        """rows_SD sorted by expert, group_sizes_E rows per expert → expert outputs [S, D] in the same order."""
        # NOTE: a loop over non-empty experts on contiguous slices; each iteration is one dense matmul pair.
        # The weights are unbound once: indexing w[e] per expert would make backward build one full-size zero
        # gradient per expert (SelectBackward), while UnbindBackward stacks the per-expert gradients once.
        slices = rows_SD.split(group_sizes_E.tolist())
        gate_up_E, down_E = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        outputs = [
            swiglu(rows_ND, gate_up_E[e], down_E[e]) for e, rows_ND in enumerate(slices) if rows_ND.shape[0]
        ]
        if not outputs:
            return rows_SD.new_zeros(0, self.d_model)
        return torch.cat(outputs)

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e on rows x_ND."""
        return swiglu(x_ND, self.w_gate_up[e], self.w_down[e])

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


def swiglu(x_ND: Tensor, w_gate_up_D2F: Tensor, w_down_FD: Tensor) -> Tensor:
    """One SwiGLU expert on rows x_ND: (silu(x @ gate) * (x @ up)) @ down, gate and up the halves of w_gate_up."""
    F_ = w_down_FD.shape[0]
    h_N2F = x_ND @ w_gate_up_D2F
    return (F.silu(h_N2F[:, :F_]) * h_N2F[:, F_:]) @ w_down_FD
