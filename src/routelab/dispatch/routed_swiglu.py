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

Whole experts per thread (`workers` > 1, `dispatch/workers.py`): each run of experts is computed by its own thread
into its own output buffer (its own dx in backward), and the buffers are summed in a fixed order. Every expert's
rows stay on one thread, so the expert-weight and combine-weight gradients are computed exactly as with one worker;
y and dx differ only in the order of the per-token sums (rounding).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab.dispatch.workers import in_parallel, split_groups, summed


def routed_swiglu(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, group_sizes: list[int], w_gate_up_ED2F: Tensor, w_down_EFD: Tensor,
    *, workers: int = 1,
) -> Tensor:
    """y [T, D] = Σ over assignments of weight · SwiGLU expert(x row); assignments sorted by expert.

    token_S [S] (long) and weight_S [S] are in expert-sorted order; group_sizes (Python ints, length E) counts the
    rows of each expert. Differentiable in x_TD, weight_S and both weight banks. workers: threads that each own
    whole experts (see the module docstring; 1: this thread alone). The weight banks are read by every worker at
    once, so a bank that fetches weights on access must be called with 1.
    """
    weight_S = weight_S.to(x_TD.dtype)
    runs = split_groups(group_sizes, workers)
    tensors = (x_TD, weight_S, w_gate_up_ED2F, w_down_EFD)
    if torch.is_grad_enabled() and any(t.requires_grad for t in tensors):
        return RoutedSwiGLU.apply(x_TD, weight_S, w_gate_up_ED2F, w_down_EFD, token_S, runs)
    return summed(in_parallel(_forward, runs, x_TD, weight_S, w_gate_up_ED2F, w_down_EFD, token_S, None))


def _forward(run, x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F):
    """The forward of the groups in `run`; writes their pre-activations into h_S2F when it is given (backward)."""
    F_ = w_down.shape[1]
    y_TD = x_TD.new_zeros(x_TD.shape)
    for e, s0, s1 in run:
        token_N = token_S[s0:s1]
        x_ND = x_TD.index_select(0, token_N)
        h_N2F = torch.mm(x_ND, w_gate_up[e], out=h_S2F[s0:s1]) if h_S2F is not None else x_ND @ w_gate_up[e]
        act_NF = F.silu(h_N2F[:, :F_]).mul_(h_N2F[:, F_:]).mul_(weight_S[s0:s1, None])
        y_TD.index_add_(0, token_N, act_NF @ w_down[e])
    return y_TD


class RoutedSwiGLU(torch.autograd.Function):
    """Autograd of `routed_swiglu`; saves x (an input, alive anyway), the weights, and h [S, 2F]."""

    @staticmethod
    def forward(ctx, x_TD, weight_S, w_gate_up, w_down, token_S, runs):
        h_S2F = x_TD.new_empty(token_S.shape[0], w_gate_up.shape[2])
        y_TD = summed(in_parallel(_forward, runs, x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F))
        ctx.save_for_backward(x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F)
        ctx.runs = runs
        return y_TD

    @staticmethod
    def backward(ctx, dy_TD):
        x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F = ctx.saved_tensors
        need = ctx.needs_input_grad[:4]
        dweight_S = torch.zeros_like(weight_S) if need[1] else None
        dgate_up = torch.zeros_like(w_gate_up) if need[2] else None
        ddown = torch.zeros_like(w_down) if need[3] else None
        dx_parts = in_parallel(_backward, ctx.runs, dy_TD.contiguous(), x_TD, weight_S, w_gate_up, w_down, token_S,
                                h_S2F, need, dweight_S, dgate_up, ddown)
        return summed(dx_parts) if need[0] else None, dweight_S, dgate_up, ddown, None, None


def _backward(run, dy_TD, x_TD, weight_S, w_gate_up, w_down, token_S, h_S2F, need, dweight_S, dgate_up, ddown):
    """The backward of the groups in `run`: writes their rows of dweight_S and their experts' weight gradients (no
    other run touches them) and returns this run's part of dx (None when x needs no gradient)."""
    need_x, need_w, need_gu, need_down = need
    F_ = w_down.shape[1]
    dx_TD = torch.zeros_like(x_TD) if need_x else None
    for e, s0, s1 in run:
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
    return dx_TD
