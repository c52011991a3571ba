"""Banks of SwiGLU experts, run as a grouped matmul over expert-contiguous rows.

Shape legend: S rows (assignments, sorted by expert), D model width, F expert width, E experts.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
        # True: offer the weights to the dispatcher's fused kernel; False: the generic path (tests compare them).
        self.fused = True
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.d_ff))

    def active_experts(self, experts: list[int]) -> list:
        # NOTE: the weights are unbound once: indexing w[e] per expert would make backward build one full-size
        # zero gradient per expert (SelectBackward), while UnbindBackward stacks the per-expert gradients once.
        gate_up_E, down_E = self.w_gate_up.unbind(0), self.w_down.unbind(0)
        return [lambda x_ND, e=e: swiglu(x_ND, gate_up_E[e], down_E[e]) for e in experts]

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e on rows x_ND."""
        return swiglu(x_ND, self.w_gate_up[e], self.w_down[e])

    def swiglu_weights(self) -> tuple[Tensor, Tensor] | None:
        """Both weight banks, so the local dispatcher runs its fused kernel; None when `fused` is False (the
        generic rows → experts → combine path, which tests compare against)."""
        return (self.w_gate_up, self.w_down) if self.fused else None

    def gate_projections(self) -> Tensor:
        return self.w_gate_up[:, :, : self.d_ff]

    def extra_repr(self) -> str:
        return f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}"


def swiglu(x_ND: Tensor, w_gate_up_D2F: Tensor, w_down_FD: Tensor) -> Tensor:
    """One SwiGLU expert on rows x_ND: (silu(x @ gate) * (x @ up)) @ down, gate and up the halves of w_gate_up."""
    F_ = w_down_FD.shape[0]
    h_N2F = x_ND @ w_gate_up_D2F
    return (F.silu(h_N2F[:, :F_]) * h_N2F[:, F_:]) @ w_down_FD
