"""Gather → SwiGLU experts → weighted scatter-add in one autograd function, one expert group at a time.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments (sorted by expert), N rows of one
expert group.

    y_t = Σ_{s: token_s = t} weight_s · (silu(x_t W_g[e_s]) ⊙ (x_t W_u[e_s])) W_d[e_s]

Why a custom function (measured on CPU, fp32, in benchmarks/layer.py): plain autograd over permute → experts →
combine keeps the gathered rows [S, D], the expert outputs [S, D] and three [S, F] activations alive for backward,
and materialises each of them whole. Here each expert's rows are gathered, used and dropped while they are still
in cache, and backward keeps only the input x (alive anyway) and the gate/up pre-activations h [S, 2F]: the SwiGLU
is recomputed from h, the gathered rows are gathered again, and the combine-weight gradient comes from
<act_s, dy_t W_dᵀ> (= <expert output_s, dy_t>) without storing expert outputs. No [S, D] tensor exists in either
pass. Groups are reduced into y with index_add_, in expert order (deterministic on CPU).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab.dispatch.groups import expert_groups


def routed_swiglu(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, group_sizes: list[int], w_gate_up_ED2F: Tensor, w_down_EFD: Tensor
) -> Tensor:
    """y [T, D] = Σ over assignments of weight · SwiGLU expert(x row); assignments sorted by expert.

    token_S [S] (long) and weight_S [S] are in expert-sorted order; group_sizes (Python ints, length E) counts the
    rows of each expert. Differentiable in x_TD, weight_S and both weight banks.
    """
    weight_S = weight_S.to(x_TD.dtype)
    tensors = (x_TD, weight_S, w_gate_up_ED2F, w_down_EFD)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return RoutedSwiGLU.apply(x_TD, weight_S, w_gate_up_ED2F, w_down_EFD, token_S, group_sizes)
    return _forward(x_TD, weight_S, w_gate_up_ED2F, w_down_EFD, token_S, group_sizes, h_S2F=None)


def _forward(x_TD, weight_S, w_gate_up, w_down, token_S, group_sizes, h_S2F):
    """The forward; writes the pre-activations of every row into h_S2F when it is given (for backward)."""
    F_ = w_down.shape[1]
    y_TD = x_TD.new_zeros(x_TD.shape)
    for e, s0, s1 in expert_groups(group_sizes):
        token_N = token_S[s0:s1]
        x_ND = x_TD.index_select(0, token_N)
        h_N2F = torch.mm(x_ND, w_gate_up[e], out=h_S2F[s0:s1]) if h_S2F is not None else x_ND @ w_gate_up[e]
        act_NF = F.silu(h_N2F[:, :F_]).mul_(h_N2F[:, F_:]).mul_(weight_S[s0:s1, None])
        y_TD.index_add_(0, token_N, act_NF @ w_down[e])
    return y_TD


class RoutedSwiGLU(torch.autograd.Function):
    """Autograd of `routed_swiglu`; saves x (an input, alive anyway), the weights, and h [S, 2F]."""

    @staticmethod
    def forward(ctx, x_TD, weight_S, w_gate_up, w_down, token_S, group_sizes):
        h_S2F = x_TD.new_empty(token_S.shape[0], w_gate_up.shape[2])
        y_TD = _forward(x_TD, weight_S, w_gate_up, w_down, token_S, group_sizes, h_S2F)
        ctx.save_for_backward(x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F)
        ctx.group_sizes = group_sizes
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F = ctx.saved_tensors
        need_x, need_w, need_gu, need_down = ctx.needs_input_grad[:4]
        F_ = w_down.shape[1]
        dy_TD = dy_TD.contiguous()
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dweight_S = torch.zeros_like(weight_S) if need_w else None
        dgate_up = torch.zeros_like(w_gate_up) if need_gu else None
        ddown = torch.zeros_like(w_down) if need_down else None
        for e, s0, s1 in expert_groups(ctx.group_sizes):
            token_N, w_N1 = token_S[s0:s1], weight_S[s0:s1, None]
            dy_ND = dy_TD.index_select(0, token_N)
            gate_NF, up_NF = h_S2F[s0:s1, :F_], h_S2F[s0:s1, F_:]
            silu_NF = F.silu(gate_NF)
            act_NF = silu_NF * up_NF  # the unweighted expert activation, recomputed
            dact_NF = dy_ND @ w_down[e].t()  # gradient of the unweighted activation, before the combine weight
            if need_w:
                dweight_S[s0:s1] = (act_NF * dact_NF).sum(dim=1)
            if need_down:
                torch.mm(act_NF.mul_(w_N1).t(), dy_ND, out=ddown[e])
            if not (need_x or need_gu):
                continue
            dact_NF.mul_(w_N1)
            dh_N2F = torch.empty_like(h_S2F[s0:s1])
            torch.mul(dact_NF, silu_NF, out=dh_N2F[:, F_:])
            dh_N2F[:, :F_] = torch.ops.aten.silu_backward(dact_NF.mul_(up_NF), gate_NF)
            if need_gu:
                torch.mm(x_TD.index_select(0, token_N).t(), dh_N2F, out=dgate_up[e])
            if need_x:
                dx_TD.index_add_(0, token_N, dh_N2F @ w_gate_up[e].t())
        return dx_TD, dweight_S, dgate_up, ddown, None, None
