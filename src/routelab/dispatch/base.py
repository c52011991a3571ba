"""The dispatcher contract: move token rows to their experts and the expert outputs back, keeping no state.

Shape legend: T tokens, D model width, E experts (of this process), S rows.

    rows_SD, counts_E, plan = dispatcher.dispatch(x_TD, decision)   # rows sorted by expert, rows per expert
    out_SD = experts(rows_SD, counts_E)                              # experts see rows and counts only
    y_TD = dispatcher.combine(out_SD, plan)                          # combine weights applied here, once

`plan` is a frozen record that `combine` takes back: nothing is kept on the dispatcher between the two calls, so
one dispatcher object serves every layer and every forward. Communication (expert parallelism) may happen inside
`dispatch` and `combine`, never between them.

A dispatcher may also offer a fused path for banks it knows how to fuse with (`can_fuse(experts)` True): then
`fused(x_TD, decision, experts)` does dispatch → experts → combine in one kernel, and applies the combine weights
in that kernel instead of in `combine` — still exactly once.
"""

from __future__ import annotations

from typing import Any

from torch import Tensor, nn

from routelab.routing.base import RoutingDecision


class Dispatcher:
    """Base of every dispatcher; holds no parameters and no per-forward state."""

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, Any]:
        """(rows_SD, counts_E, plan): the rows the experts of this process compute, sorted by expert; LongTensor
        counts_E [E] (rows per expert, E = the experts held here); a frozen plan for `combine`."""
        raise NotImplementedError

    def combine(self, out_SD: Tensor, plan: Any) -> Tensor:
        """y_TD [T, D]: the expert outputs weighted by their combine weights and summed per token."""
        raise NotImplementedError

    def can_fuse(self, experts: nn.Module) -> bool:
        """Whether `fused` can run this bank (default: never)."""
        return False

    def fused(self, x_TD: Tensor, decision: RoutingDecision, experts: nn.Module) -> Tensor:
        """dispatch → experts → combine in one kernel; only called when `can_fuse(experts)`."""
        raise NotImplementedError(f"{type(self).__name__} has no fused path")

    def __repr__(self) -> str:
        return f"{type(self).__name__}()"
