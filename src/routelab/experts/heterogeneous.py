"""A bank of SwiGLU experts of different widths (Duo-LLM's small / big experts).

Shape legend: S rows (assignments, sorted by expert), N rows of one expert, D model width, F_e expert e's width,
E experts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routelab._checks import check_int
from routelab.experts.base import ExpertBank
from routelab.experts.swiglu import swiglu


class HeterogeneousSwiGLUExperts(ExpertBank):
    """E SwiGLU experts, expert e of width `widths[e]`; `d_ff` is the reference width that FLOPs are counted in
    (an expert of width F_e costs F_e / d_ff of a reference expert: every SwiGLU matmul is linear in F).

    Expert e's weights are `w_gate_up.{e}` [D, 2F_e] and `w_down.{e}` [F_e, D] (a ParameterList: the widths differ,
    so the bank cannot stack them over E; expert parallelism, which slices stacked banks, does not apply to it).
    Init as `SwiGLUExperts`: std 1/sqrt(D) for gate/up, 1/sqrt(F_e) for down.
    """

    def __init__(self, widths: list[int], d_model: int, d_ff: int) -> None:
        if not isinstance(widths, (list, tuple)) or not widths:
            raise ValueError(f"expert_widths must be a non-empty list of positive integers, got {widths!r}")
        for i, w in enumerate(widths):
            check_int(f"expert_widths[{i}]", w, 1)
        super().__init__(len(widths), d_model, d_ff)
        self.widths = [int(w) for w in widths]
        self.w_gate_up = nn.ParameterList(nn.Parameter(torch.empty(d_model, 2 * w)) for w in self.widths)
        self.w_down = nn.ParameterList(nn.Parameter(torch.empty(w, d_model)) for w in self.widths)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        for gate_up, down, w in zip(self.w_gate_up, self.w_down, self.widths):
            nn.init.normal_(gate_up, std=1.0 / math.sqrt(self.d_model))
            nn.init.normal_(down, std=1.0 / math.sqrt(w))

    def relative_widths(self) -> Tensor:
        """[E] float64: each expert's width over the reference width d_ff (its FLOPs per row, relative)."""
        return torch.tensor(self.widths, dtype=torch.float64) / self.d_ff

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        return swiglu(x_ND, self.w_gate_up[e], self.w_down[e])

    def extra_repr(self) -> str:
        return f"widths={self.widths}, d_model={self.d_model}, reference d_ff={self.d_ff}"
