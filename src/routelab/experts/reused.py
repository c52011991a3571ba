"""ReXMoE: a layer's routed experts are its own plus those of neighbouring layers (the same tensors, reused).

Paper: "ReXMoE: Reusing Experts with Minimal Overhead in Mixture-of-Experts" (Tan et al., 2025).

Defining property: MoE layer ℓ routes over the experts of the layers in a window of r layers on either side
(its own included), so its candidate set grows to E·(2r+1) at no parameter cost: the neighbours' experts are the
same tensors, trained by every layer that routes to them. With r = 0 the layer is the plain per-layer MoE layer.

Progressive scaling routing (PSR, the paper's §3.3; `ProgressiveScaling`): while training, the number of candidates
a router may choose starts at the layer's own N experts and widens linearly to all of them,

    N_t = N                                   for t ≤ t_s,
    N_t = ⌊N + (E_all − N)·(t − t_s)/(t_e − t_s)⌋   for t_s < t ≤ t_e,
    N_t = E_all                               for t > t_e,

(the paper's ⌊(1 + (r−1)(t−t_s)/(t_e−t_s))·N⌋ with r·N = E_all candidates), the others being masked before top-k.

Reconstruction: the window is shifted, not clipped, at the ends of the stack (the first layer reuses layers 1..2r),
so every layer has the same E·(2r+1) candidates; candidates are ordered by layer, the layer's own bank at its
position in the window (the paper's Eq. 4 groups r consecutive layers instead; here each layer's window is centred
on it where the stack allows). For PSR: t is the training loop's 0-based step (`RoutingContext.step`); the layer's
own N experts are always available (our reading of the paper's starting pool of N: at t ≤ t_s the layer is exactly
the plain per-layer layer), and the N_t − N extra candidates are drawn at random among the neighbours' experts,
afresh every step, as a fixed function of (layer, step), so a resumed or distributed run masks the same experts.
The paper sets the masked experts' gating *scores* to zero before top-k; here their *logits* become −inf, so they
take no softmax mass either (weights and balance loss are those of a layer holding only the available experts).
Eval-mode forwards (validation, inference, decoding) use every candidate, as after training.

Shape legend: S rows (sorted by expert), D model width, F expert width, E experts of the whole window.
"""

from __future__ import annotations

from dataclasses import dataclass

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


@dataclass(frozen=True)
class ProgressiveScaling:
    """ReXMoE's progressive scaling routing for one layer: which of its `num_candidates` experts a router may choose
    at training step t (module docstring). `own` = (first, end) candidate indices of the layer's own bank; `layer`
    seeds the per-step draw of the neighbours' experts, so that layers draw differently."""

    start: int
    end: int
    num_candidates: int
    own: tuple[int, int]
    layer: int = 0

    def __post_init__(self) -> None:
        first, stop = self.own
        if not (0 <= self.start < self.end) or not (0 <= first < stop <= self.num_candidates):
            raise ValueError(f"ProgressiveScaling needs 0 <= start < end and 0 <= own[0] < own[1] <= num_candidates, "
                             f"got start={self.start}, end={self.end}, own={self.own}, "
                             f"num_candidates={self.num_candidates}")

    @property
    def fewest(self) -> int:
        """The smallest pool a router sees: the layer's own experts."""
        return self.own[1] - self.own[0]

    def pool_size(self, step: int) -> int:
        """N_t: how many candidates are available at training step `step` (exact integer floor)."""
        n, total = self.fewest, self.num_candidates
        if step <= self.start:
            return n
        if step > self.end:
            return total
        return n + (total - n) * (step - self.start) // (self.end - self.start)

    def available(self, step: int) -> Tensor | None:
        """BoolTensor [num_candidates] (CPU) of the candidates available at `step`, or None when all are."""
        extra = self.pool_size(step) - self.fewest
        others = self.num_candidates - self.fewest
        if extra >= others:
            return None
        first, stop = self.own
        mask = torch.zeros(self.num_candidates, dtype=torch.bool)
        mask[first:stop] = True
        if extra:
            neighbours = torch.cat([torch.arange(first), torch.arange(stop, self.num_candidates)])
            # a fixed function of (layer, step): every rank and every resumed run draws the same experts
            g = torch.Generator().manual_seed((self.layer + 1) * 1_000_003 + step)
            mask[neighbours[torch.randperm(others, generator=g)[:extra]]] = True
        return mask
