"""The interface every routed expert bank offers: rows and per-expert counts in, rows out.

Shape legend: S rows (assignments, sorted by expert), N rows of one expert, D model width, F expert width,
E experts.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor, nn

from routelab._checks import check_int
from routelab.dispatch.groups import expert_groups

ExpertFn = Callable[[Tensor], Tensor]


class ExpertBank(nn.Module):
    """A bank of E experts: `forward(rows_SD, counts_E)` maps expert-contiguous rows to expert outputs [S, D].

    Experts never see tokens, routing decisions or combine weights: the dispatcher gathers their rows and weights
    and sums their outputs. Every parameter of a bank is stacked over experts (leading dimension E), so expert
    parallelism can slice a bank into contiguous blocks of experts.

    Subclasses implement `expert(x_ND, e)`. `forward` is the one per-expert seam: it asks `active_experts` for the
    experts that have rows (and only those — a bank with weights on disk loads just these) and runs each on its
    contiguous rows. A grouped matmul or a custom kernel stands in by overriding `forward`.

    Capabilities (declared by overriding; checked by the layer when it is built):
        swiglu_weights(): (w_gate_up [E, D, 2F], w_down [E, F, D]) when every expert is exactly a plain SwiGLU of
                          these weights, so a dispatcher may run its fused SwiGLU kernel; else None.
        gate_projections(): [E, D, F], each expert's gate projection (the ERC loss needs it); else None.
    """

    def __init__(self, num_experts: int, d_model: int, d_ff: int) -> None:
        super().__init__()
        for name, value in (("num_experts", num_experts), ("d_model", d_model), ("d_ff", d_ff)):
            check_int(name, value, 1)
        self.num_experts, self.d_model, self.d_ff = num_experts, d_model, d_ff

    def forward(self, rows_SD: Tensor, counts_E: Tensor) -> Tensor:
        """rows_SD sorted by expert, counts_E [E] rows per expert → expert outputs [S, D] in the same order."""
        counts = counts_E.tolist()
        groups = list(expert_groups(counts))
        if not groups:
            return rows_SD.new_zeros(0, self.d_model)
        fns = self.active_experts([e for e, _, _ in groups])
        outputs = [fn(rows_SD[s0:s1]) for fn, (_, s0, s1) in zip(fns, groups)]
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs)

    def active_experts(self, experts: list[int]) -> list[ExpertFn]:
        """One function (rows_ND → outputs_ND) per listed expert, in that order; the experts without rows are never
        asked for. The default binds `expert`; override to fetch or unbind weights once for the whole batch."""
        return [lambda x_ND, e=e: self.expert(x_ND, e) for e in experts]

    def expert(self, x_ND: Tensor, e: int) -> Tensor:  # pragma: no cover - every bank implements it
        """Expert e on rows x_ND [N, D] → [N, D]."""
        raise NotImplementedError

    def swiglu_weights(self) -> tuple[Tensor, Tensor] | None:
        return None

    def gate_projections(self) -> Tensor | None:
        return None
