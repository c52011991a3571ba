"""A sigmoid-gated shared expert (Qwen1.5/2-MoE): an always-on SwiGLU MLP whose output each token scales by
sigmoid(x · w), w a learned [D] vector.

Shape legend: S rows, D model width, F expert width.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.experts.swiglu import SwiGLUExperts


class GatedSharedExpert(nn.Module):
    """One SwiGLU expert of width F whose output is multiplied by sigmoid(gate(x)), gate = Linear(D, 1, bias=False).

    Same interface as a one-expert bank: `forward(rows_SD, group_sizes_E)` with group_sizes_E = [S].
    Parameters: `mlp` (a `SwiGLUExperts(1, D, F)`), `gate.weight` [1, D] (init zeros: the gate starts at 1/2).
    """

    def __init__(self, d_model: int, d_ff: int) -> None:
        super().__init__()
        self.mlp = SwiGLUExperts(1, d_model, d_ff)
        self.gate = nn.Linear(d_model, 1, bias=False)
        nn.init.zeros_(self.gate.weight)
        self.num_experts, self.d_model, self.d_ff = 1, d_model, d_ff

    def forward(self, rows_SD: Tensor, group_sizes_E: Tensor) -> Tensor:
        return torch.sigmoid(self.gate(rows_SD)) * self.mlp(rows_SD, group_sizes_E)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"
