"""Plain, slow, obviously-correct references the fast code is tested against. Loops over tokens and assignments."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor


def swiglu_row(x_D: Tensor, w_gate_up_D2F: Tensor, w_down_FD: Tensor) -> Tensor:
    F_ = w_down_FD.shape[0]
    return (F.silu(x_D @ w_gate_up_D2F[:, :F_]) * (x_D @ w_gate_up_D2F[:, F_:])) @ w_down_FD


def reference_moe(x_TD, assignments, w_gate_up, w_down, shared=None) -> Tensor:
    """y_t = Σ over assignments (t, e, w) of w · expert_e(x_t), plus the shared MLP; one row at a time."""
    T = x_TD.shape[0]
    rows = [x_TD.new_zeros(x_TD.shape[1]) for _ in range(T)]
    for t, e, w in assignments:
        rows[t] = rows[t] + w * swiglu_row(x_TD[t], w_gate_up[e], w_down[e])
    if shared is not None:
        for t in range(T):
            rows[t] = rows[t] + swiglu_row(x_TD[t], shared[0][0], shared[1][0])
    return torch.stack(rows) if T else x_TD.new_zeros(0, x_TD.shape[1])


def reference_topk(x_TD, gate_weight_ED, *, k, normalize, capacity_factor=None, drop_policy="probs"):
    """Softmax top-k routing by a loop over tokens; ties go to the lower expert index.

    Returns a list of (token, expert, weight) with weight a differentiable scalar tensor.
    """
    T, E = x_TD.shape[0], gate_weight_ED.shape[0]
    chosen = []
    for t in range(T):
        probs = torch.softmax(gate_weight_ED @ x_TD[t], dim=0)
        values = probs.tolist()
        picked = sorted(range(E), key=lambda e: (-values[e], e))[:k]
        total = sum(probs[e] for e in picked)
        for e in picked:
            w = probs[e] / total if normalize == "selected" else probs[e]
            chosen.append((t, e, w, values[e]))
    if capacity_factor is not None:
        capacity = math.ceil(T * k / E * capacity_factor)
        kept = []
        for e in range(E):
            mine = [a for a in chosen if a[1] == e]
            if drop_policy == "probs":
                mine.sort(key=lambda a: (-a[3], a[0]))
            else:
                mine.sort(key=lambda a: a[0])
            kept.extend(mine[:capacity])
        chosen = sorted(kept, key=lambda a: (a[0], a[1]))
    return [(t, e, w) for t, e, w, _ in chosen]
