"""Banks of GPT-OSS-style experts: biased projections and a clamped, shifted SwiGLU.

Shape legend: S rows (assignments, sorted by expert), D model width, F expert width, E experts.

Expert e on a row x (OpenAI gpt-oss, as in Hugging Face transformers' `GptOssExperts`):
    h = x @ w_gate_up[e] + b_gate_up[e];  gate = h[:F].clamp(max=limit);  up = h[F:].clamp(-limit, limit)
    y = ((up + 1) · gate · sigmoid(alpha · gate)) @ w_down[e] + b_down[e]
The layout is routelab's (gate = first F columns, up = last F); gpt-oss stores gate and up interleaved, which
`routelab.interop.hf` converts.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn

from routelab._checks import check_number
from routelab.experts.base import ExpertBank


class ClampedSwiGLUExperts(ExpertBank):
    """E independent clamped-SwiGLU MLPs with biases, stored as 3-D weights (same interface as `SwiGLUExperts`).

    w_gate_up [E, D, 2F], b_gate_up [E, 2F], w_down [E, F, D], b_down [E, D].
    Options (keyword-only): alpha=1.702 (sigmoid sharpness), limit=7.0 (clamp bound), bias=True (set False for
    bias-free projections). Defaults are gpt-oss's.
    """

    def __init__(
        self, num_experts: int, d_model: int, d_ff: int, *, alpha: float = 1.702, limit: float = 7.0, bias: bool = True
    ) -> None:
        super().__init__(num_experts, d_model, d_ff)
        for name, value in (("alpha", alpha), ("limit", limit)):
            check_number(name, value, low=0, open_low=True)
        self.alpha, self.limit = float(alpha), float(limit)
        self.w_gate_up = nn.Parameter(torch.empty(num_experts, d_model, 2 * d_ff))
        self.w_down = nn.Parameter(torch.empty(num_experts, d_ff, d_model))
        if bias:
            self.b_gate_up = nn.Parameter(torch.empty(num_experts, 2 * d_ff))
            self.b_down = nn.Parameter(torch.empty(num_experts, d_model))
        else:
            self.register_parameter("b_gate_up", None)
            self.register_parameter("b_down", None)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.normal_(self.w_gate_up, std=1.0 / math.sqrt(self.d_model))
        nn.init.normal_(self.w_down, std=1.0 / math.sqrt(self.d_ff))
        if self.b_gate_up is not None:
            nn.init.zeros_(self.b_gate_up)
            nn.init.zeros_(self.b_down)

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        """Expert e on rows x_ND."""
        F_ = self.d_ff
        h_N2F = x_ND @ self.w_gate_up[e]
        if self.b_gate_up is not None:
            h_N2F = h_N2F + self.b_gate_up[e]
        gate_NF = h_N2F[:, :F_].clamp(max=self.limit)
        up_NF = h_N2F[:, F_:].clamp(min=-self.limit, max=self.limit)
        # NOTE: the same operation order as gpt-oss / transformers, so conversions agree to the last bit in fp32.
        glu_NF = gate_NF * torch.sigmoid(gate_NF * self.alpha)
        y_ND = ((up_NF + 1) * glu_NF) @ self.w_down[e]
        if self.b_down is not None:
            y_ND = y_ND + self.b_down[e]
        return y_ND

    def gate_projections(self) -> Tensor:
        return self.w_gate_up[:, :, : self.d_ff]

    def extra_repr(self) -> str:
        return (
            f"num_experts={self.num_experts}, d_model={self.d_model}, d_ff={self.d_ff}, alpha={self.alpha}, "
            f"limit={self.limit}, bias={self.b_gate_up is not None}"
        )
