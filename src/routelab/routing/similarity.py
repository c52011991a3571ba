"""Similarity-aware routing: each token's routing distribution is mixed with those of similar tokens.

Paper: Improving Routing in Sparse Mixture of Experts with Graph of Tokens (Nguyen et al.).

Defining property: routing is mixed over a token graph within each sequence: ŝ_t = Σ_j A_tj p_j is a probability
vector; A = I reproduces softmax top-k; with causal=True token t ignores every j > t, and nothing mixes across
sequences or with padding.

Algorithm (paper for the idea; equations reconstructed; fp32):
    p_j = softmax(W_r x_j)                                   (W_r = `gate`, Linear(d, E))
    A_tj = softmax_j(x_tᵀ W_s x_j / τ)  (kernel="bilinear", W_s [D, D] learned, init I/√D)
         | softmax_j(cos(x_t, x_j) / τ)  (kernel="cosine")
         over j in t's sequence (ctx.batch_shape [B, L]; a 2-D input is one sequence), j ≤ t if causal, j not padding
    ŝ_t = Σ_j A_tj p_j;  S_t = TopK(ŝ_t, k);  weight = ŝ renormalised over S_t (k = 1: ŝ at S_t)
Every row of A keeps its diagonal, so no row is empty and the -inf mask never meets an empty softmax.

Options (keyword-only) and defaults: k=2, kernel="bilinear", tau=1.0, causal=True, aux_loss_coef=1e-2 (the Switch
loss on ŝ; a routelab default, as for `topk`). Cost O(L²·D) per sequence.

Our reconstruction: the kernels, W_s and its init, the renormalisation, the aux loss. The paper's entropy claim
concerns another quantity than the per-token entropy of ŝ (a mixture's entropy is at least the mean of its parts).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_bool, check_choice, check_int, check_number
from routelab.routing._util import real_mask, sequence_shape, switch_aux_losses, top_k_choices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

KERNELS = ("bilinear", "cosine")


@register_router("similarity")
class SimilarityRouter(Router):
    """Softmax gate, then mixing of the routing distributions over a (causal) token-similarity graph."""

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        kernel: str = "bilinear",
        tau: float = 1.0,
        causal: bool = True,
        aux_loss_coef: float = 1e-2,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        check_int("k", k, 1, num_experts)
        check_choice("kernel", kernel, KERNELS)
        check_number("tau", tau, low=0, open_low=True)
        check_bool("causal", causal)
        check_number("aux_loss_coef", aux_loss_coef, low=0)
        self.k, self.kernel, self.tau, self.causal = k, kernel, float(tau), causal
        self.aux_loss_coef = float(aux_loss_coef)
        self.gate = nn.Linear(d_model, num_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        self.similarity = None
        if kernel == "bilinear":
            self.similarity = nn.Parameter(torch.eye(d_model) * d_model**-0.5)

    def mixing(self, x_BLD: Tensor, real_BS: Tensor, keys_BSD: Tensor | None = None) -> Tensor:
        """A [B, L, S]: row t is t's distribution over the tokens it mixes with. The L queries are the last L of the
        S keys (`keys_BSD`: the cached earlier tokens then x, while decoding; x itself otherwise)."""
        keys_BSD = x_BLD if keys_BSD is None else keys_BSD
        L, S = x_BLD.shape[1], keys_BSD.shape[1]
        if self.kernel == "bilinear":
            sim_BLS = (x_BLD @ self.similarity.to(x_BLD.dtype)) @ keys_BSD.transpose(1, 2)
        else:
            sim_BLS = F.normalize(x_BLD, dim=-1) @ F.normalize(keys_BSD, dim=-1).transpose(1, 2)
        allowed_BLS = real_BS[:, None, :].expand(-1, L, -1)
        if self.causal:
            allowed_BLS = allowed_BLS & torch.ones(L, S, dtype=torch.bool, device=x_BLD.device).tril(S - L)
        self_LS = torch.arange(S, device=x_BLD.device)[None, :] == torch.arange(S - L, S, device=x_BLD.device)[:, None]
        allowed_BLS = allowed_BLS | self_LS
        return (sim_BLS / self.tau).masked_fill(~allowed_BLS, float("-inf")).softmax(-1)

    @staticmethod
    def mix(mix_BLL: Tensor, probs_BLE: Tensor) -> Tensor:
        """ŝ [B, L, E] = A p. A token outside t's row (a later one when causal, padding) has weight 0 there, but
        0·NaN is NaN: non-finite distributions are zeroed first, so such a token cannot reach t even as NaN (its
        own row is NaN through its similarities, as it should be)."""
        return mix_BLL @ torch.where(torch.isfinite(probs_BLE), probs_BLE, 0.0)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        logits_TE = F.linear(x_TD, self.gate.weight.to(dtype))
        probs_TE = logits_TE.softmax(-1)
        real_T = real_mask(ctx, T, x_TD.device)
        B, L = sequence_shape(ctx, T)
        x_BLD, real_BS, probs_BSE = x_TD.view(B, L, self.d_model), real_T.view(B, L), probs_TE.view(B, L, E)
        keys_BSD = None
        if ctx is not None and ctx.cache is not None and self.causal:  # decoding: earlier tokens come from the cache
            keys_BSD, real_BS, probs_BSE = ctx.cache.extend(x=x_BLD, real=real_BS, probs=probs_BSE)
        mix_BLS = self.mixing(x_BLD, real_BS, keys_BSD)
        mixed_TE = self.mix(mix_BLS, probs_BSE).reshape(T, E)

        token_S, expert_S, weight_S = top_k_choices(mixed_TE, k, real_T, renormalize=k > 1)
        aux_losses = switch_aux_losses(self.aux_loss_coef, mixed_TE, expert_S, real_T, self)
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=aux_losses,
            router_logits=logits_TE,
        )

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, kernel={self.kernel}, tau={self.tau}"
