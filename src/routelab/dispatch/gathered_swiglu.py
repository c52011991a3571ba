"""Routed SwiGLU experts for a handful of assignments (incremental decoding): one batched matmul over gathered
expert weights, with no sort, no per-expert loop and no device-to-host sync.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments (in any order).

    y_t = Σ_{s: token_s = t} weight_s · (silu(x_t W_g[e_s]) ⊙ (x_t W_u[e_s])) W_d[e_s]

Why: at one new token per sequence, S = B·k is a few rows, and the sort-based path (`make_plan` + the per-expert
loop of `routed_swiglu`) costs a sort, a bincount, a `.tolist()` sync and a Python loop over experts — more than the
matmuls themselves. Here each assignment gathers its expert's weights (S·3·D·F elements; the caller bounds that)
and two `bmm`s do the work. Inference only (no autograd function); `routed_swiglu` is the reference it is tested
against.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gathered_swiglu(
    x_TD: Tensor, token_S: Tensor, expert_S: Tensor, weight_S: Tensor, w_gate_up_ED2F: Tensor, w_down_EFD: Tensor
) -> Tensor:
    """y [T, D] = Σ over assignments of weight · SwiGLU expert(x row), for a few assignments in any order."""
    F_ = w_down_EFD.shape[1]
    x_S1D = x_TD.index_select(0, token_S)[:, None]
    h_S2F = torch.bmm(x_S1D, w_gate_up_ED2F.index_select(0, expert_S)).squeeze(1)
    act_SF = F.silu(h_S2F[:, :F_]) * h_S2F[:, F_:] * weight_S.to(x_TD.dtype)[:, None]
    y_SD = torch.bmm(act_SF[:, None], w_down_EFD.index_select(0, expert_S)).squeeze(1)
    return x_TD.new_zeros(x_TD.shape).index_add_(0, token_S, y_SD)
