"""The local dispatcher: all experts in this process; sort-based permute and combine, or the fused SwiGLU kernel.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments.
"""

from __future__ import annotations

from torch import Tensor, nn

from routelab.dispatch.base import Dispatcher
from routelab.dispatch.permute import DispatchPlan, combine, make_plan
from routelab.dispatch.routed_swiglu import routed_swiglu
from routelab.routing.base import RoutingDecision


class LocalDispatcher(Dispatcher):
    """Every expert is in this process (the default of `MoELayer`).

    dispatch: sort the assignments by expert (stable) and gather their rows; combine: weighted scatter-add.
    Fast path: a bank whose `swiglu_weights()` gives its weights (plain SwiGLU experts) runs through
    `dispatch/routed_swiglu.py`, which gathers, computes and combines one expert group at a time without ever
    holding an [S, D] tensor (benchmarks/layer.py measures it).
    """

    def dispatch(self, x_TD: Tensor, decision: RoutingDecision) -> tuple[Tensor, Tensor, DispatchPlan]:
        plan = make_plan(decision)
        return x_TD.index_select(0, plan.token_S), plan.group_sizes_E, plan

    def combine(self, out_SD: Tensor, plan: DispatchPlan) -> Tensor:
        return combine(out_SD, plan)

    def can_fuse(self, experts: nn.Module) -> bool:
        return experts.swiglu_weights() is not None

    def fused(self, x_TD: Tensor, decision: RoutingDecision, experts: nn.Module) -> Tensor:
        w_gate_up_ED2F, w_down_EFD = experts.swiglu_weights()
        plan = make_plan(decision)
        return routed_swiglu(
            x_TD, plan.token_S, plan.weight_S, plan.group_sizes_E.tolist(), w_gate_up_ED2F, w_down_EFD
        )
