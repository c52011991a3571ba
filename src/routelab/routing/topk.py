"""Token-choice top-k routing: each token picks its k highest-scoring experts.

Papers: GShard (Lepikhin et al., 2020); Switch Transformers (Fedus et al., 2021); ST-MoE (Zoph et al., 2022) for the
router z-loss; Mixtral of Experts (Jiang et al., 2024); Qwen3 technical report; DeepSeek-V3 (2024) for sigmoid scores,
group-limited selection and the routed scaling factor; Auxiliary-Loss-Free Load Balancing Strategy for
Mixture-of-Experts (Wang et al., 2024) for the selection bias; Binary-Integer-Programming Based Algorithm for Expert
Load Balancing in MoE Models (2025) for the BIP duals.

Defining property: every token gets exactly k distinct experts (dropless); balancing biases change which experts
are selected, never the combine weights.

Algorithm (logits z = W x, in fp32):
    s = softmax(z) | sigmoid(z)                          score=
    u = s + b | s - q | s                                balance = "loss_free" | "bip" | "none"   (selection only)
    n_group: keep the topk_group groups with the best group score of u, mask the rest
    S_t = the k largest u_t (ties: lower expert index first);  weight = s at S_t → normalize → × scaling

Options (keyword-only) and defaults: k=2; score="softmax"; normalize = "selected" for k > 1 and "none" for k = 1
(a renormalised single gate is always 1 and gives the router no gradient); scaling=1.0; n_group=None;
topk_group=None; group_score = "top2_sum" when a balancing bias is used, else "max"; aux_loss_coef=1e-2 (Switch
loss, exactly 1·coef at uniform routing); aux_loss_form="switch" | "per_slot" (Hugging Face's Mixtral/Qwen/OLMoE
form for one layer: f counts every slot, f_e = load_e / T, so the loss is k times the Switch loss, k·coef at uniform
routing); z_loss_coef=0.0; balance="none"; bias_update_rate=1e-3 (γ);
bip_iters=4; capacity_factor=None (dropless); drop_policy="probs"; jitter=0.0 (training only: x · U(1-ε, 1+ε));
router_bias=False (a learned bias on the logits, as in GPT-OSS).

With `RoutingContext.available` (ReXMoE's progressive scaling routing, experts/reused.py) the unavailable experts'
logits become −inf before scoring (so `router_logits` holds −inf there), and the balance loss and the capacity count
the available experts only; refused with a balancing bias or groups (`cannot_restrict`).

Presets by options: Switch k=1 (capacity_factor 1.0-1.25, jitter 0.01); Mixtral k=2; Qwen3-MoE k=8 "selected";
DeepSeek-V3 score="sigmoid", n_group=8, topk_group=4, k=8, scaling=2.5, balance="loss_free".

Follows the authors' code: the Switch aux loss (f from assignment counts, P mean probability), the loss-free update
b_i += γ·sign(mean load - load_i) once per optimizer step, the z-loss, capacity C = ceil(factor·T·k/E) with
"position" keeping the first C choosers and "probs" the best C. Our reconstruction: the BIP dual update (below),
and with sigmoid scores P uses the scores normalised per token.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import top_indices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.capacity import DROP_POLICIES, expert_capacity, within_capacity
from routelab.routing.losses import router_z_loss, switch_balance_loss
from routelab.routing.registry import register_router

SCORES = ("softmax", "sigmoid")
NORMALIZATIONS = ("selected", "none")
BALANCES = ("none", "loss_free", "bip")
GROUP_SCORES = ("max", "top2_sum")
AUX_LOSS_FORMS = ("switch", "per_slot")


@register_router("topk")
class TopKRouter(Router):
    """Linear gate → softmax or sigmoid scores → top-k, with optional capacity, groups and balancing biases.

    Buffers (saved with the model, never trained by backward):
        expert_bias [E]: the loss-free selection bias b (balance="loss_free"; also the DeepSeek-V3 correction bias).
        bip_dual [E]:    the BIP capacity duals q (balance="bip").
    """

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        score: str = "softmax",
        normalize: str | None = None,
        scaling: float = 1.0,
        n_group: int | None = None,
        topk_group: int | None = None,
        group_score: str | None = None,
        aux_loss_coef: float = 1e-2,
        z_loss_coef: float = 0.0,
        balance: str = "none",
        bias_update_rate: float = 1e-3,
        bip_iters: int = 4,
        capacity_factor: float | None = None,
        drop_policy: str = "probs",
        jitter: float = 0.0,
        router_bias: bool = False,
        aux_loss_form: str = "switch",
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        E = num_experts
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= E:
            raise ValueError(f"k must be an integer in [1, num_experts={E}], got {k!r}")
        check_choice("score", score, SCORES)
        if normalize is None:
            normalize = "selected" if k > 1 else "none"
        check_choice("normalize", normalize, NORMALIZATIONS)
        if k == 1 and normalize == "selected":
            raise ValueError(
                'normalize="selected" with k=1 makes every weight 1, so the router gets no gradient; '
                'use normalize="none" for k=1'
            )
        check_choice("balance", balance, BALANCES)
        check_choice("drop_policy", drop_policy, DROP_POLICIES)
        check_choice("aux_loss_form", aux_loss_form, AUX_LOSS_FORMS)
        if group_score is None:
            group_score = "max" if balance == "none" else "top2_sum"
        check_choice("group_score", group_score, GROUP_SCORES)
        # Finite, not bool: a NaN coefficient would silently disable its loss (nan > 0 is False).
        for name, value in (
            ("aux_loss_coef", aux_loss_coef),
            ("z_loss_coef", z_loss_coef),
            ("bias_update_rate", bias_update_rate),
            ("jitter", jitter),
        ):
            check_number(name, value, low=0)
        if jitter >= 1:
            raise ValueError(f"jitter must be in [0, 1), got {jitter!r}")
        check_number("scaling", scaling, low=0, open_low=True)
        if capacity_factor is not None:
            check_number("capacity_factor (None for dropless)", capacity_factor, low=0, open_low=True)
        check_int("bip_iters", bip_iters, 1)
        if (n_group is None) != (topk_group is None):
            raise ValueError(f"n_group and topk_group must be set together, got n_group={n_group!r}, topk_group={topk_group!r}")
        if n_group is not None:
            if not isinstance(n_group, int) or n_group < 1 or E % n_group:
                raise ValueError(f"n_group must be a positive divisor of num_experts={E}, got {n_group!r}")
            if not isinstance(topk_group, int) or not 1 <= topk_group <= n_group:
                raise ValueError(f"topk_group must be an integer in [1, n_group={n_group}], got {topk_group!r}")
            if topk_group * (E // n_group) < k:
                raise ValueError(
                    f"topk_group·num_experts/n_group = {topk_group * (E // n_group)} experts is fewer than k={k}"
                )
            if group_score == "top2_sum" and E // n_group < 2:
                raise ValueError('group_score="top2_sum" needs at least 2 experts per group')

        self.k = k
        self.score = score
        self.normalize = normalize
        self.scaling = float(scaling)
        self.n_group = n_group
        self.topk_group = topk_group
        self.group_score = group_score
        self.aux_loss_coef = float(aux_loss_coef)
        self.aux_loss_form = aux_loss_form
        self.z_loss_coef = float(z_loss_coef)
        self.balance = balance
        self.bias_update_rate = float(bias_update_rate)
        self.bip_iters = bip_iters
        self.capacity_factor = capacity_factor
        self.drop_policy = drop_policy
        self.jitter = float(jitter)
        # Capacity makes a token's fate depend on how many other tokens (later ones included) chose its expert.
        self.causal = capacity_factor is None

        self.gate = nn.Linear(d_model, E, bias=router_bias)
        nn.init.normal_(self.gate.weight, std=d_model**-0.5)
        if router_bias:
            nn.init.zeros_(self.gate.bias)
        if balance == "loss_free":
            self.register_buffer("expert_bias", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("_pending_load", torch.zeros(E, dtype=torch.float64), persistent=False)
        if balance == "bip":
            self.register_buffer("bip_dual", torch.zeros(E, dtype=torch.float32))
            self.register_buffer("_pending_dual", torch.zeros(E, dtype=torch.float64), persistent=False)
            self.register_buffer("_pending_count", torch.zeros((), dtype=torch.float64), persistent=False)
        if balance in ("loss_free", "bip"):
            # token rows with NaN/inf scores left out of the balancing statistics so far (not saved)
            self.register_buffer("skipped_nonfinite", torch.zeros((), dtype=torch.long), persistent=False)

    # -- forward ------------------------------------------------------------------------------------------------

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        dtype = router_dtype(x_TD)
        x_TD = x_TD.to(dtype)
        if self.training and self.jitter > 0:
            x_TD = x_TD * torch.empty_like(x_TD).uniform_(1.0 - self.jitter, 1.0 + self.jitter)
        bias = None if self.gate.bias is None else self.gate.bias.to(dtype)
        return self._route(x_TD, F.linear(x_TD, self.gate.weight.to(dtype), bias), ctx)

    def logit_gate(self) -> tuple[Tensor, Tensor | None] | None:
        """The gate (weight [E, D], bias or None); None while training with input jitter (the logits then come from
        a jittered x)."""
        if self.training and self.jitter > 0:
            return None
        return self.gate.weight, self.gate.bias

    def route_logits(self, x_TD: Tensor, logits_TE: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        if self.logit_gate() is None:
            return super().route_logits(x_TD, logits_TE, ctx)
        T, E = x_TD.shape[0], self.num_experts
        if logits_TE.shape != (T, E) or logits_TE.dtype != router_dtype(x_TD):
            raise ValueError(
                f"logits_TE must be [T={T}, E={E}] in {router_dtype(x_TD)}, got {tuple(logits_TE.shape)} in "
                f"{logits_TE.dtype}"
            )
        return self._route(x_TD, logits_TE, ctx)

    def cannot_restrict(self, num_available: int) -> str | None:
        if self.balance != "none" or self.n_group is not None:
            # the balancing biases and duals would drift on experts that cannot be chosen; groups could hold none
            return (f"router 'topk' restricts its choice to available experts only with balance='none' and no "
                    f"n_group (got balance={self.balance!r}, n_group={self.n_group!r})")
        if self.k > num_available:
            return f"router 'topk' with k={self.k} needs at least k available experts, but only {num_available} are"
        return None

    def _route(self, x_TD: Tensor, logits_TE: Tensor, ctx: RoutingContext | None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        available_E = None if ctx is None else ctx.available
        if available_E is not None:
            if available_E.dtype != torch.bool or tuple(available_E.shape) != (E,):
                raise ValueError(f"RoutingContext.available must be a BoolTensor [{E}], got "
                                 f"{available_E.dtype} of shape {tuple(available_E.shape)}")
            reason = self.cannot_restrict(int(available_E.sum()))
            if reason is not None:
                raise ValueError(reason)
            # −inf, so the softmax (or sigmoid) gives the unavailable experts exactly 0 and top-k never picks them
            logits_TE = logits_TE.masked_fill(~available_E, float("-inf"))
        scores_TE = logits_TE.softmax(dim=-1) if self.score == "softmax" else logits_TE.sigmoid()

        pad_T = None if ctx is None else ctx.flat_padding_mask(T)
        real_T = None if pad_T is None else ~pad_T
        accumulate = self.training and torch.is_grad_enabled()

        if available_E is None:
            expert_TK = self.select(scores_TE.detach())
        else:  # ranked with −inf, not 0: a sigmoid score can underflow to 0 and tie with an unavailable expert
            expert_TK = top_indices(scores_TE.detach().masked_fill(~available_E, float("-inf")), k)
        weight_TK = scores_TE.gather(1, expert_TK)
        if self.normalize == "selected":
            weight_TK = weight_TK / weight_TK.sum(dim=-1, keepdim=True)
        weight_TK = weight_TK * self.scaling

        token_S = torch.arange(T, device=x_TD.device).repeat_interleave(k)
        expert_S = expert_TK.reshape(-1)
        weight_S = weight_TK.reshape(-1)
        if real_T is not None:
            keep_S = real_T[token_S]
            token_S, expert_S, weight_S = token_S[keep_S], expert_S[keep_S], weight_S[keep_S]
        # Incremental decoding without autograd computes no loss from these forwards: skip the aux-loss work.
        decoding = ctx is not None and ctx.cache is not None and not torch.is_grad_enabled()
        losses = not decoding
        if losses or accumulate:
            load_E = torch.bincount(expert_S, minlength=E)  # before capacity: what the router asked for

        aux_losses: dict[str, Tensor] = {}
        real_scores_TE = scores_TE if real_T is None else scores_TE[real_T]
        if self.aux_loss_coef > 0 and losses:
            probs_TE = real_scores_TE
            balanced_load_E = load_E
            if available_E is not None:  # balance over the available experts: E in the loss is their number
                probs_TE, balanced_load_E = probs_TE[:, available_E], load_E[available_E]
            if self.score == "sigmoid":
                probs_TE = probs_TE / probs_TE.sum(dim=-1, keepdim=True)
            # "per_slot" normalises the load by tokens, not assignments: Σ f = k, so k times the Switch loss.
            form_scale = k if self.aux_loss_form == "per_slot" else 1
            # Under a statistics group f counts every rank's assignments (global); P is this rank's tokens'.
            global_load_E = self.sum_over_group(balanced_load_E)
            aux_losses["aux"] = self.aux_loss_coef * form_scale * switch_balance_loss(probs_TE, global_load_E)
        if self.z_loss_coef > 0 and losses:
            real_logits_TE = logits_TE if real_T is None else logits_TE[real_T]
            aux_losses["z"] = self.z_loss_coef * router_z_loss(real_logits_TE)

        if accumulate and self.balance in ("loss_free", "bip"):
            self._accumulate(logits_TE.detach(), real_T, real_scores_TE.detach(), token_S, expert_S, load_E)

        num_dropped = 0
        if self.capacity_factor is not None and token_S.numel():
            num_real = T if real_T is None else int(real_T.sum())
            num_candidates = E if available_E is None else int(available_E.sum())
            capacity = expert_capacity(num_real, k, num_candidates, self.capacity_factor)
            if self.drop_policy == "probs":
                priority_S = scores_TE.detach()[token_S, expert_S]
            else:
                priority_S = -token_S.to(torch.float64)
            keep_S = within_capacity(expert_S, priority_S, E, capacity)
            num_dropped = int((~keep_S).sum())
            token_S, expert_S, weight_S = token_S[keep_S], expert_S[keep_S], weight_S[keep_S]

        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            aux_losses=aux_losses,
            router_logits=logits_TE,
            num_dropped=num_dropped,
        )

    def select(self, scores_TE: Tensor) -> Tensor:
        """LongTensor [T, k]: the selected experts, from unbiased scores plus the selection bias and groups."""
        return top_indices(self.selection_scores(scores_TE), self.k)

    def selection_scores(self, scores_TE: Tensor) -> Tensor:
        """[T, E]: what `select` ranks by — the scores plus the selection bias, −inf outside the kept groups."""
        choice_TE = scores_TE
        if self.balance == "loss_free":
            choice_TE = choice_TE + self.expert_bias.to(choice_TE.dtype)
        elif self.balance == "bip":
            choice_TE = choice_TE - self.bip_dual.to(choice_TE.dtype)
        if self.n_group is not None:
            T, G = choice_TE.shape[0], self.n_group
            grouped_TGX = choice_TE.view(T, G, self.num_experts // G)
            if self.group_score == "max":
                group_TG = grouped_TGX.amax(dim=-1)
            else:
                group_TG = grouped_TGX.topk(2, dim=-1).values.sum(dim=-1)
            kept_TG = top_indices(group_TG, self.topk_group)
            keep_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(1, kept_TG, True)
            # Masked experts are excluded with -inf, never 0: biased scores can be negative, and a zero would win.
            choice_TE = grouped_TGX.masked_fill(~keep_TG[..., None], float("-inf")).view(T, self.num_experts)
        return choice_TE

    # -- balancing state ----------------------------------------------------------------------------------------

    def _accumulate(self, logits_TE: Tensor, real_T: Tensor | None, real_scores_TE: Tensor, token_S: Tensor,
                    expert_S: Tensor, load_E: Tensor) -> None:
        """Add this forward's load counts (loss-free) or duals (BIP) to the pending statistics. Tokens whose logits
        are not finite (NaN/inf input) are left out and counted in `skipped_nonfinite`: a NaN dual or a count from a
        NaN score would steer every later token."""
        finite_T = torch.isfinite(logits_TE).all(dim=-1)
        if real_T is not None:
            finite_T = finite_T | ~real_T  # padding is already left out
        if not bool(finite_T.all()):
            self.skipped_nonfinite += int((~finite_T).sum())
            load_E = torch.bincount(expert_S[finite_T[token_S]], minlength=self.num_experts)
            real_finite = finite_T if real_T is None else finite_T[real_T]
            real_scores_TE = real_scores_TE[real_finite]
        if self.balance == "loss_free":
            self._pending_load += load_E.to(self._pending_load.dtype)
        elif real_scores_TE.shape[0] > 0:
            self._pending_dual += self._solve_duals(real_scores_TE).to(self._pending_dual.dtype)
            self._pending_count += 1

    def _solve_duals(self, scores_TE: Tensor) -> Tensor:
        """BIP capacity duals for this batch (our reconstruction of the paper's dual ascent).

        Maximise Σ s_tj x_tj with Σ_j x_tj ≤ k per token and Σ_t x_tj ≤ C = k·T/E per expert. Alternating the
        two dual updates, starting from the current q:
            λ_t = max(0, (k+1)-th largest_j (s_tj - q_j));  q_j = max(0, (C+1)-th largest_t (s_tj - λ_t)).
        """
        T, E, k = scores_TE.shape[0], self.num_experts, self.k
        capacity = (k * T) // E
        q_E = self.bip_dual.to(scores_TE.dtype).clone()
        for _ in range(self.bip_iters):
            if k < E:
                lam_T = (scores_TE - q_E).topk(k + 1, dim=1).values[:, k].clamp_min(0)
            else:
                lam_T = scores_TE.new_zeros(T)
            if capacity < T:
                q_E = (scores_TE - lam_T[:, None]).topk(capacity + 1, dim=0).values[capacity].clamp_min(0)
            else:
                q_E = scores_TE.new_zeros(E)
        return q_E

    @torch.no_grad()
    def apply_updates(self) -> None:
        if self.balance == "loss_free":
            load_E = self.sum_over_group(self._pending_load)  # every rank takes the same step
            if load_E.sum() > 0:
                step_E = torch.sign(load_E.mean() - load_E) * self.bias_update_rate
                self.expert_bias += step_E.to(self.expert_bias.dtype)
            self._pending_load.zero_()
        elif self.balance == "bip":
            # Under a statistics group: the mean of every rank's per-batch duals (each rank solves its own batch).
            dual_E, count = self.sum_over_group(self._pending_dual), self.sum_over_group(self._pending_count)
            if count > 0:
                self.bip_dual.copy_((dual_E / count).to(self.bip_dual.dtype))
            self._pending_dual.zero_()
            self._pending_count.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, score={self.score}, normalize={self.normalize}, balance={self.balance}"
