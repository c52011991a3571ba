"""Pre-gating: each MoE layer's router also decides the next MoE layer's experts, one layer ahead.

Paper: Read-ME: Refactorizing LLMs as Router-Decoupled Mixture of Experts with System Co-Design (Cai et al.,
NeurIPS 2024), and Pre-gated MoE: An Algorithm-System Co-Design for Fast and Scalable Mixture-of-Expert Inference
(Hwang et al., ISCA 2024).

Defining property: the routing of MoE layer l+1 is a function of layer l's input only (decoupled from the layer it
routes), so while layer l computes, layer l+1's experts are already known exactly and can be loaded; the choice
handed on equals the choice made (prefetch accuracy 1 by construction).

Algorithm (fp32):
    first MoE layer (no state):  z_0 = W_gate x_0                    # routes itself from its own input
    MoE layer l ≥ 1:             z_l = state handed on by layer l−1   # = W_next^(l−1) x_{l−1}
    every layer:                 state = W_next^(l) x_l               # the next layer's logits
    p = softmax(z), top-k, "selected" weights (k = 1: "none"), Switch aux loss.
The logits travel in `RoutingDecision.state` → `RoutingContext.state`, with their graph, so layer l+1's task loss
and aux loss train W_next^(l) ("trained with the model"). `next_layer_choice(decision, next_router)` gives the next
layer's selection as a boolean [T, E] mask, computed exactly as that layer will compute it.

Options (keyword-only) and defaults: k=2, aux_loss_coef=1e-2.

Our reconstruction: Read-ME's released form is one pre-gating Transformer over token ids that routes every layer
(distilled from a dense model); here pre-gating is per layer, from the previous layer's hidden state (Pre-gated
MoE's form, which the issue allows), trained end to end instead of distilled. A layer used alone (no previous
layer) routes itself with W_gate, so it is an ordinary softmax top-k router there.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_int, check_number
from routelab.routing._util import real_mask, switch_aux_losses, top_indices, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router


@register_router("pregate")
class PreGateRouter(Router):
    """Routes this layer from the logits the previous layer handed on (or its own gate first), and hands on the
    next layer's logits computed from this layer's input."""

    causal = True
    hands_on_state = True

    def __init__(self, *, d_model: int, num_experts: int, k: int = 2, aux_loss_coef: float = 1e-2) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("k", k, 1, num_experts)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.k, self.aux_loss_coef = k, float(aux_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        self.next_gate = nn.Linear(d_model, num_experts, bias=False)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E = x_TD.shape[0], self.num_experts
        dtype = router_dtype(x_TD)
        x = x_TD.to(dtype)
        handed = None if ctx is None else ctx.state
        if handed is None:
            logits_TE = F.linear(x, self.gate.weight.to(dtype))
        elif not isinstance(handed, Tensor) or handed.shape != (T, E):
            raise ValueError(
                f"pregate: RoutingContext.state must be the previous pre-gating layer's logits [T, E] = {(T, E)}, "
                f"got {handed if not isinstance(handed, Tensor) else tuple(handed.shape)}"
            )
        else:
            logits_TE = handed.to(dtype)
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        token_S, expert_S, weight_S = top_k_choices(probs_TE, self.k, real_T, renormalize=self.k > 1)
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=switch_aux_losses(self.aux_loss_coef, probs_TE, expert_S, real_T),
            router_logits=logits_TE,
            state=F.linear(x, self.next_gate.weight.to(dtype)),
        )

    def next_layer_choice(self, decision: RoutingDecision, next_router: PreGateRouter) -> Tensor:
        """BoolTensor [T, E]: the experts `next_router` (the next MoE layer's) will select from `decision.state`,
        computed as it computes them (every token; a padded token's prediction is simply unused)."""
        if not isinstance(next_router, PreGateRouter):
            raise TypeError(f"the next MoE layer's router is a {type(next_router).__name__}, not a pre-gating router")
        logits_TE = decision.state.detach()
        expert_TK = top_indices(logits_TE.softmax(-1), next_router.k)
        choice_TE = torch.zeros(logits_TE.shape, dtype=torch.bool, device=logits_TE.device)
        return choice_TE.scatter_(1, expert_TK, True)

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}"
