"""Parameter-free online k-means routing: tokens go to their most cosine-similar centroids; centroids are running
means of the tokens routed to them.

Paper: Routers Learn the Geometry of Their Experts (parameter-free cosine centroids).

Defining property: the router has no parameters; a batch is routed with the centroids from before it (causal, and
eval changes nothing); routing is invariant to the scale of x; an update moves each centroid toward the mean of
its tokens and leaves experts without tokens where they were.

Algorithm (fp32; centroids μ [E, D] an fp32 buffer):
    S_t = TopK_e cos(x_t, μ_e)  (ties: lower index);  weight = 1/k ("uniform") or softmax(cos/τ) over S_t
    training forwards accumulate, per expert, the sum and count of the normalised x routed to it (rows with NaN/inf
    are skipped and counted: one bad token must not poison a centroid);
    update_routers:  μ_e ← β μ_e + (1 - β)·(sum_e / count_e)  for experts with count_e > 0
    init="first_batch": the first update sets the centroids to E distinct normalised tokens of the first training
    forward (evenly spaced real rows) instead; until then, the seeded random centroids route.
    reseed_after=n: an expert that received no token for n consecutive updates is moved to a token of the latest
    step (dead centroids).
Options (keyword-only) and defaults: k=2, momentum=0.99, weighting="uniform" | "softmax", temperature=0.1,
init="first_batch" | "random", reseed_after=None, seed=0 (the random centroids).

Follows the paper: parameter-free cosine centroids. Our reconstruction: the momentum update, the weights, the
initialisation and the re-seeding.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from routelab._checks import check_choice, check_int, check_number
from routelab.routing._util import flatten_choices, real_mask, top_indices
from routelab.routing.base import Router, RoutingContext, RoutingDecision, router_dtype
from routelab.routing.registry import register_router

WEIGHTINGS = ("uniform", "softmax")
INITS = ("first_batch", "random")


@register_router("kmeans")
class KMeansRouter(Router):
    """Top-k cosine to running-mean centroids (buffers), updated once per optimizer step.

    Buffers: centroids [E, D] (fp32), initialized (bool), idle_updates [E] (updates since the expert last had a
    token); the pending sums, counts and sample rows are not saved, nor `skipped_nonfinite` (token rows with NaN/inf
    left out of the statistics so far).
    """

    causal = True

    def __init__(
        self,
        *,
        d_model: int,
        num_experts: int,
        k: int = 2,
        momentum: float = 0.99,
        weighting: str = "uniform",
        temperature: float = 0.1,
        init: str = "first_batch",
        reseed_after: int | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__(d_model=d_model, num_experts=num_experts)
        E = num_experts
        check_int("k", k, 1, E)
        check_number("momentum", momentum, low=0)
        if momentum >= 1:
            raise ValueError(f"momentum must be a number in [0, 1), got {momentum!r}")
        check_choice("weighting", weighting, WEIGHTINGS)
        check_number("temperature", temperature, low=0, open_low=True)
        check_choice("init", init, INITS)
        if reseed_after is not None:
            check_int("reseed_after", reseed_after, 1)
        check_int("seed", seed, 0)
        self.k, self.momentum, self.weighting, self.temperature = k, float(momentum), weighting, float(temperature)
        self.init, self.reseed_after, self.seed = init, reseed_after, seed
        generator = torch.Generator().manual_seed(seed)
        self.register_buffer("centroids", F.normalize(torch.randn(E, d_model, generator=generator), dim=-1))
        self.register_buffer("initialized", torch.tensor(init == "random"))
        self.register_buffer("idle_updates", torch.zeros(E, dtype=torch.long))
        self.register_buffer("_pending_sum", torch.zeros(E, d_model, dtype=torch.float64), persistent=False)
        self.register_buffer("_pending_count", torch.zeros(E, dtype=torch.float64), persistent=False)
        self.register_buffer("_sample", torch.zeros(E, d_model, dtype=torch.float32), persistent=False)
        self.register_buffer("_sample_count", torch.zeros((), dtype=torch.long), persistent=False)
        self.register_buffer("skipped_nonfinite", torch.zeros((), dtype=torch.long), persistent=False)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        T, E, k = x_TD.shape[0], self.num_experts, self.k
        dtype = router_dtype(x_TD)
        unit_TD = F.normalize(x_TD.to(dtype), dim=-1)
        cos_TE = unit_TD @ F.normalize(self.centroids.to(dtype), dim=-1).T
        real_T = real_mask(ctx, T, x_TD.device)
        expert_TK = top_indices(cos_TE.detach(), k)
        if self.weighting == "uniform":
            weight_TK = torch.full((T, k), 1.0 / k, dtype=dtype, device=x_TD.device)
        else:
            weight_TK = (cos_TE.gather(1, expert_TK) / self.temperature).softmax(-1)
        keep_TK = real_T[:, None].expand(T, k)
        token_S, expert_S, weight_S = flatten_choices(expert_TK, weight_TK, keep_TK)

        if self.training and torch.is_grad_enabled():
            self._accumulate(unit_TD.detach()[real_T], expert_TK[real_T])
        return RoutingDecision(
            token_index=token_S,
            expert_index=expert_S,
            weight=weight_S,
            num_tokens=T,
            num_experts=E,
            router_logits=cos_TE,
        )

    @torch.no_grad()
    def _accumulate(self, unit_ND: Tensor, expert_NK: Tensor) -> None:
        # A non-finite row (NaN/inf input) would make its centroids NaN for good, and every later token would follow
        # them: such rows are left out of the statistics and counted in `skipped_nonfinite`.
        finite_N = torch.isfinite(unit_ND).all(dim=1)
        if not bool(finite_N.all()):
            self.skipped_nonfinite += int((~finite_N).sum())
            unit_ND, expert_NK = unit_ND[finite_N], expert_NK[finite_N]
        N = expert_NK.shape[0]
        # A k-hot [N, E] matrix turns the per-expert sums into one matmul instead of k copies of every row.
        assign_NE = unit_ND.new_zeros(N, self.num_experts).scatter_(1, expert_NK, 1.0)
        self._pending_sum += (assign_NE.T @ unit_ND).to(self._pending_sum.dtype)
        self._pending_count += assign_NE.sum(dim=0).to(self._pending_count.dtype)
        if int(self._sample_count) == 0 and N > 0:  # a few rows of the step's first batch, for init and re-seeding
            n = min(N, self.num_experts)
            picks = torch.linspace(0, N - 1, n, device=unit_ND.device).round().long()
            self._sample[:n] = unit_ND[picks].to(self._sample.dtype)
            self._sample_count.fill_(n)

    @torch.no_grad()
    def apply_updates(self) -> None:
        if self.statistics_group is not None:
            # Global: sums and counts over every rank's tokens; the sample rows are the group's first rank's.
            import torch.distributed as dist

            self._pending_sum.copy_(self.sum_over_group(self._pending_sum))
            self._pending_count.copy_(self.sum_over_group(self._pending_count))
            src = dist.get_global_rank(self.statistics_group, 0)
            dist.broadcast(self._sample, src=src, group=self.statistics_group)
            dist.broadcast(self._sample_count, src=src, group=self.statistics_group)
        n = int(self._sample_count)
        if not bool(self.initialized):
            if n > 0:
                self.centroids[:n] = self._sample[:n]
                self.initialized.fill_(True)
        else:
            count_E = self._pending_count
            has_E = count_E > 0
            mean_ED = self._pending_sum / count_E.clamp_min(1)[:, None]
            moved_ED = self.momentum * self.centroids.double() + (1 - self.momentum) * mean_ED
            moved_ED = torch.where(has_E[:, None], moved_ED, self.centroids.double())
            self.centroids.copy_(moved_ED.to(self.centroids.dtype))
            if n > 0:  # idle counts move only on steps that saw tokens
                self.idle_updates.copy_(torch.where(has_E, 0, self.idle_updates + 1))
            if self.reseed_after is not None and n > 0:
                dead = (self.idle_updates >= self.reseed_after).nonzero().squeeze(1)
                for i, e in enumerate(dead.tolist()):
                    self.centroids[e] = self._sample[i % n]
                    self.idle_updates[e] = 0
        self._pending_sum.zero_()
        self._pending_count.zero_()
        self._sample_count.zero_()

    def extra_repr(self) -> str:
        return f"{super().extra_repr()}, k={self.k}, momentum={self.momentum}, weighting={self.weighting}"
