"""The grouped execution of routed LoRA as one custom autograd function, one expert group at a time.

Shape legend: T tokens, D in_features, O out_features, E experts, R ranks of one expert, S assignments (sorted by
expert), n rows of one expert.

    y_t = Σ_{s: token_s = t} w_s · (A_e x_t) B_e                  e the expert of assignment s

Forward and backward gather the rows of one expert at a time ([n, D] and [n, O]) and scatter-add its results, so no
[S, D] or [S, O] tensor is ever held and only the rank rows h_s = A_e x_t ([S, R]) are saved for the backward.
`tests/test_adapters_execution.py` gradchecks it in fp64 and compares it with the stacked form and a per-assignment
loop (outputs and every gradient).
"""

from __future__ import annotations

import torch
from torch import Tensor


class GroupedLoRA(torch.autograd.Function):
    """apply(x_TD, token_S, weight_S, A_ERD or None, B_ERO, sizes) -> y_TO.

    token_S / weight_S: the assignments in expert order (`routelab.dispatch.make_plan`); sizes: a Python list of the
    E group sizes. A None means x is already down-projected (HydraLoRA's shared A: x_TD is then h_TR).
    """

    @staticmethod
    def forward(ctx, x_TD: Tensor, token_S: Tensor, weight_S: Tensor, A_ERD: Tensor | None, B_ERO: Tensor,
                sizes: list[int]) -> Tensor:
        y_TO = x_TD.new_zeros(x_TD.shape[0], B_ERO.shape[-1])
        h_parts = []
        start = 0
        for e, n in enumerate(sizes):
            index = token_S[start:start + n]
            rows_nD = x_TD.index_select(0, index)
            h_nR = rows_nD if A_ERD is None else rows_nD @ A_ERD[e].T
            h_parts.append(h_nR)
            y_TO.index_add_(0, index, (h_nR * weight_S[start:start + n, None]) @ B_ERO[e])
            start += n
        h_SR = torch.cat(h_parts) if h_parts else x_TD.new_zeros(0, B_ERO.shape[1])
        ctx.sizes = sizes
        ctx.has_A = A_ERD is not None
        ctx.save_for_backward(x_TD, token_S, weight_S, h_SR, A_ERD if A_ERD is not None else x_TD.new_empty(0), B_ERO)
        return y_TO

    @staticmethod
    def backward(ctx, dy_TO: Tensor):
        x_TD, token_S, weight_S, h_SR, A_ERD, B_ERO = ctx.saved_tensors
        need_x, _, need_w, need_A, need_B, _ = ctx.needs_input_grad
        dx_TD = torch.zeros_like(x_TD) if need_x else None
        dw_S = torch.zeros_like(weight_S) if need_w else None
        dA = torch.zeros_like(A_ERD) if (need_A and ctx.has_A) else None
        dB = torch.zeros_like(B_ERO) if need_B else None
        dy_TO = dy_TO.contiguous()
        start = 0
        for e, n in enumerate(ctx.sizes):
            if n == 0:
                continue
            index = token_S[start:start + n]
            w_n1 = weight_S[start:start + n, None]
            h_nR = h_SR[start:start + n]
            dy_nO = dy_TO.index_select(0, index)
            if dB is not None:
                dB[e] = (h_nR * w_n1).T @ dy_nO
            dhw_nR = dy_nO @ B_ERO[e].T
            if dw_S is not None:
                dw_S[start:start + n] = (dhw_nR * h_nR).sum(dim=1)
            dh_nR = dhw_nR * w_n1
            if ctx.has_A:
                if dA is not None:
                    dA[e] = dh_nR.T @ x_TD.index_select(0, index)
                if dx_TD is not None:
                    dx_TD.index_add_(0, index, dh_nR @ A_ERD[e])
            elif dx_TD is not None:
                dx_TD.index_add_(0, index, dh_nR)
            start += n
        return dx_TD, None, dw_S, dA, dB, None
