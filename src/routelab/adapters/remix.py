"""ReMix: k selected LoRAs with equal, non-learnable weights; the router trained by an RLOO gradient estimator.

Paper: ReMix: Reinforcement Routing for Mixtures of LoRAs in LLM Finetuning (Qiu et al., ICLR 2026). Learned soft
routing weights collapse onto one LoRA; ReMix gives every selected LoRA the weight 1/k and treats the router as a
policy, the supervision loss as the (negative) reward.

Defining property: the combine weights are exactly 1/k (1/|S_t| for routers with a variable count) and carry no
gradient; the router's gradient comes from the REINFORCE leave-one-out estimator over N sampled routings
(`rloo_loss`):  ∇ ≈ (1/N) Σ_i (L_i - mean_{j≠i} L_j) ∇ log π(S_i),  which is unbiased for ∇ E_S[L].

Our reconstruction (verify against the paper): in training, each token samples its k experts without replacement
from softmax(router logits) (Gumbel top-k; π is the Plackett-Luce probability of the ordered sample, which keeps the
estimator unbiased because the loss does not depend on the order); in eval, the router's own deterministic selection
(its top-k) is used. The router is any registered router with a fixed `k` that returns `router_logits`; its aux
losses (e.g. the Switch balance loss of "topk") are kept.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from routelab._checks import check_int
from routelab.adapters.molora import MoLoRA
from routelab.routing.base import RoutingContext, RoutingDecision


class ReMixLoRA(MoLoRA):
    """MoLoRA's experts and execution, with 1/k weights and sampled selection in training."""

    method = "remix"

    def __init__(self, in_features: int, out_features: int, **kwargs: Any) -> None:
        super().__init__(in_features, out_features, **kwargs)
        k = getattr(self.router, "k", None)
        if not isinstance(k, int) or isinstance(k, bool):
            raise ValueError(f"method 'remix' samples a fixed number k of LoRAs per token; router "
                             f"{self.router_name!r} has no fixed k (use e.g. router='topk')")
        self.k = k
        self.last_log_prob: Tensor | None = None  # [T], log π of the last training forward's sampled routing

    def route(self, x_TD: Tensor, ctx: RoutingContext | None) -> RoutingDecision:
        decision = self.router(x_TD, ctx)
        if decision.router_logits is None:
            raise ValueError(f"method 'remix' needs router logits to sample from; router {self.router_name!r} "
                             "returns none (use e.g. router='topk')")
        T, E = decision.num_tokens, self.num_experts
        if self.training and torch.is_grad_enabled():
            logits_TE = decision.router_logits[:, :E].float()
            expert_TK = sample_without_replacement(logits_TE.detach(), self.k)
            self.last_log_prob = plackett_luce_log_prob(logits_TE, expert_TK)
            token_S = torch.arange(T, device=x_TD.device).repeat_interleave(self.k)
            expert_S = expert_TK.reshape(-1)
        else:
            self.last_log_prob = None
            token_S, expert_S = decision.token_index, decision.expert_index
        count_S = torch.bincount(token_S, minlength=T)[token_S]
        weight_S = 1.0 / count_S.to(torch.float32)  # equal, non-learnable
        return RoutingDecision(token_index=token_S, expert_index=expert_S, weight=weight_S, num_tokens=T,
                               num_experts=E, aux_losses=decision.aux_losses, router_logits=decision.router_logits,
                               num_dropped=decision.num_dropped)


def sample_without_replacement(logits_TE: Tensor, k: int) -> Tensor:
    """LongTensor [T, k]: k distinct experts per token in sampling order, from softmax(logits) (Gumbel top-k)."""
    u = torch.rand_like(logits_TE).clamp_(1e-20, 1.0)
    return (logits_TE - torch.log(-torch.log(u))).topk(k, dim=-1).indices


def plackett_luce_log_prob(logits_TE: Tensor, expert_TK: Tensor) -> Tensor:
    """[T]: log-probability of drawing the experts in this order without replacement from softmax(logits):
    Σ_j [z_{s_j} - logsumexp(z over experts not yet drawn)]; differentiable in the logits."""
    taken_TE = torch.zeros_like(logits_TE, dtype=torch.bool)
    log_prob_T = logits_TE.new_zeros(logits_TE.shape[0])
    for j in range(expert_TK.shape[1]):
        pick_T1 = expert_TK[:, j : j + 1]
        remaining_TE = logits_TE.masked_fill(taken_TE, float("-inf"))
        log_prob_T = log_prob_T + logits_TE.gather(1, pick_T1).squeeze(1) - torch.logsumexp(remaining_TE, dim=1)
        taken_TE = taken_TE.scatter(1, pick_T1, True)
    return log_prob_T


def remix_layers(model: nn.Module) -> list[ReMixLoRA]:
    return [m for m in model.modules() if isinstance(m, ReMixLoRA)]


def rloo_loss(model: nn.Module, compute_loss: Callable[[], Tensor], *, num_samples: int = 2) -> Tensor:
    """Run `compute_loss()` (a training forward returning the loss) `num_samples` times, each sampling every ReMix
    layer's routing afresh, and return a loss to backpropagate: the mean of the N losses (the LoRA gradient), plus a
    zero-valued surrogate whose gradient with respect to the routers is the RLOO estimator
        (1/N) Σ_i (L_i - mean_{j≠i} L_j) ∇ log π(S_i),
    π(S_i) being the probability of sample i's routing in every ReMix layer.

    `compute_loss` may return a scalar (one reward for the whole batch) or a per-sequence loss [B] (one reward per
    sequence, whose log π sums over that sequence's tokens; lower variance); the returned loss is then its mean.
    """
    check_int("num_samples (RLOO needs at least 2)", num_samples, 2)
    layers = remix_layers(model)
    if not layers:
        raise ValueError("rloo_loss: the model has no 'remix' routed-LoRA layers")
    losses, log_probs = [], []
    for _ in range(num_samples):
        loss = compute_loss()
        if loss.dim() > 1:
            raise ValueError(f"compute_loss must return a scalar or a per-sequence loss [B], got {tuple(loss.shape)}")
        log_prob = 0
        for layer in layers:
            lp_T = layer.last_log_prob
            if lp_T is None:
                raise ValueError("rloo_loss: a ReMix layer did not sample its routing; call it in training mode "
                                 "with gradients enabled, and make compute_loss run the model's forward")
            log_prob = log_prob + (lp_T.sum() if loss.dim() == 0 else lp_T.reshape(loss.shape[0], -1).sum(1))
            layer.last_log_prob = None  # the graph is held here only until the backward
        losses.append(loss)
        log_probs.append(log_prob)
    L_N = torch.stack(losses)  # [N] or [N, B]
    baseline_N = (L_N.sum(0, keepdim=True) - L_N) / (num_samples - 1)
    advantage_N = (L_N - baseline_N).detach()
    surrogate = (advantage_N * torch.stack([torch.as_tensor(lp) for lp in log_probs])).mean()
    return L_N.mean() + (surrogate - surrogate.detach())
