"""ReXMoE: a layer's routed experts are its own plus those of neighbouring layers (the same tensors, reused).

Paper: "ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts" (2025).

Defining property: MoE layer ℓ routes over the experts of the layers in a window of r layers on either side
(its own included), so its candidate set grows to E·(2r+1) at no parameter cost: the neighbours' experts are the
same tensors, trained by every layer that routes to them. With r = 0 the layer is the plain per-layer MoE layer.

Reconstruction: the window is shifted, not clipped, at the ends of the stack (the first layer reuses layers 1..2r),
so every layer has the same E·(2r+1) candidates; candidates are ordered by layer, the layer's own bank at its
position in the window. The paper's progressive scaling routing (a schedule that widens the candidate pool during
training) is **not implemented**: every layer routes over its whole window from the first step.

Shape legend: S rows (sorted by expert), D model width, F expert width, E experts of the whole window.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn

from routelab.experts.base import ExpertBank
from routelab.experts.swiglu import SwiGLUExperts


class ReusedExperts(ExpertBank):
    """The concatenation of `banks` (registered here too, so they are shared modules): expert j of this bank is
    expert j - offset of the bank that holds it. Every bank must have the same d_model and d_ff."""

    def __init__(self, banks: list[ExpertBank], *, own: int) -> None:
        if not banks or not all(isinstance(b, ExpertBank) for b in banks):
            raise ValueError("ReusedExperts needs a non-empty list of expert banks")
        first = banks[0]
        if any(b.d_model != first.d_model or b.d_ff != first.d_ff for b in banks):
            raise ValueError("every reused bank must have the same d_model and d_ff")
        super().__init__(sum(b.num_experts for b in banks), first.d_model, first.d_ff)
        self.banks = nn.ModuleList(banks)
        self.own = own  # index of the layer's own bank in `banks`

    def forward(self, rows_SD: Tensor, counts_E: Tensor) -> Tensor:
        outputs, start, e0 = [], 0, 0
        for bank in self.banks:
            counts = counts_E[e0 : e0 + bank.num_experts]
            n = int(counts.sum())
            if n:
                outputs.append(bank(rows_SD[start : start + n], counts))
            start, e0 = start + n, e0 + bank.num_experts
        if not outputs:
            return rows_SD.new_zeros(0, self.d_model)
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def expert(self, x_ND: Tensor, e: int) -> Tensor:
        for bank in self.banks:
            if e < bank.num_experts:
                return bank.expert(x_ND, e)
            e -= bank.num_experts
        raise IndexError(e)

    def swiglu_weights(self) -> tuple[Tensor, Tensor] | None:
        # the fused kernel wants stacked weights: a concatenation (a copy per forward, with gradients to each bank)
        if not all(isinstance(b, SwiGLUExperts) and b.fused for b in self.banks):
            return None
        return torch.cat([b.w_gate_up for b in self.banks]), torch.cat([b.w_down for b in self.banks])


def window(layer: int, n_layers: int, r: int) -> list[int]:
    """The 2r+1 layer indices layer `layer` reuses (shifted at the ends of the stack; all layers if fewer)."""
    size = min(2 * r + 1, n_layers)
    start = min(max(0, layer - r), n_layers - size)
    return list(range(start, start + size))
