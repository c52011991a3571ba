"""Routed SwiGLU experts for inference forwards with few rows per expert (decoding, small batches): two grouped
matmuls over the expert-sorted rows, with no per-expert Python loop and no device-to-host sync.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments (sorted by expert).

    y_t = Σ_{s: token_s = t} weight_s · (silu(x_t W_g[e_s]) ⊙ (x_t W_u[e_s])) W_d[e_s]

Why (measured in benchmarks/layer.py's decode shapes, E=64, k=8, d_ff=256, d=512): at a few rows per expert the
per-expert loop of `routed_swiglu` spends its time in Python and in ~7 small kernel launches per expert, after a
`.tolist()` of the group sizes; gathering every assignment's expert weights (`gathered_swiglu`) copies S·3·D·F
weight elements, which at k=8 is many times the bytes of the experts themselves. `torch._grouped_mm` walks the
groups in C++ from the group offsets (a tensor, so nothing syncs) and reads each touched expert's weights in place,
once. Each group is one matmul of the same rows as the loop's, and the rows are scattered back in the same order,
so the result agrees with `routed_swiglu` (tests/test_grouped_swiglu.py asserts it). Inference only; fp32 only
(torch's CPU grouped matmul takes fp32, and half precision only with 16-byte-aligned strides).
"""

from __future__ import annotations

import functools

import torch
import torch.nn.functional as F
from torch import Tensor


@functools.cache
def grouped_mm_available(device_type: str) -> bool:
    """Whether this torch has a grouped matmul that runs fp32 on this device type (torch ≥ 2.8 on the CPU)."""
    if not hasattr(torch, "_grouped_mm"):
        return False
    try:
        a = torch.ones(3, 4, device=device_type)
        b = torch.ones(2, 4, 4, device=device_type)
        out = torch._grouped_mm(a, b, offs=torch.tensor([1, 3], dtype=torch.int32, device=device_type))
    except (RuntimeError, NotImplementedError):
        return False
    return bool((out == 4).all())


def grouped_swiglu(
    x_TD: Tensor, token_S: Tensor, weight_S: Tensor, group_sizes_E: Tensor, w_gate_up_ED2F: Tensor, w_down_EFD: Tensor
) -> Tensor:
    """y [T, D] = Σ over assignments of weight · SwiGLU expert(x row); assignments sorted by expert, group_sizes_E
    a LongTensor [E] of rows per expert. fp32 tensors; call only where `grouped_mm_available`."""
    F_ = w_down_EFD.shape[1]
    offsets_E = torch.cumsum(group_sizes_E, 0, dtype=torch.int32)
    x_SD = x_TD.index_select(0, token_S)
    h_S2F = torch._grouped_mm(x_SD, w_gate_up_ED2F, offs=offsets_E)
    act_SF = F.silu(h_S2F[:, :F_]).mul_(h_S2F[:, F_:]).mul_(weight_S.to(x_TD.dtype)[:, None])
    y_SD = torch._grouped_mm(act_SF, w_down_EFD, offs=offsets_E)
    return x_TD.new_zeros(x_TD.shape).index_add_(0, token_S, y_SD)
