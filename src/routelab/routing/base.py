"""The routing contract: what a router receives (`RoutingContext`) and hands over (`RoutingDecision`).

Shape legend: T tokens, D model width, E routed experts, S assignments (one per selected (token, expert) pair).

A decision is a flat list of assignments (COO form). It fits every router: token-choice top-k (S = T·k),
expert choice (a token may get 0..E experts), dynamic k and null experts (variable S), capacity dropping (dropped
assignments are simply absent).
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from routelab._checks import check_int


@dataclass(frozen=True)
class RoutingContext:
    """What some routers need beyond the token rows; every field is optional.

    token_ids:    LongTensor [*batch_shape], the input ids (hash routing, id-prefix routers).
    batch_shape:  the leading shape of the layer input before it was flattened to [T, D], e.g. (B, L); the layer
                  fills it. Sequence-scoped routers read it; a 2-D input is one sequence.
    padding_mask: BoolTensor [*batch_shape], True where the position is padding. Padding is never routed and is
                  left out of balance statistics and losses.
    layer_index:  index of the MoE layer in its model.
    state:        whatever the previous MoE layer handed on (recurrent routers).
    timestep:     per-sample diffusion time / mask ratio in [0, 1] (capacity schedules).
    step:         the training step (schedules, seeded branches).
    cache:        a `RouterCache` while a model decodes incrementally (a few new tokens per call, B sequences of
                  `batch_shape`); None otherwise. Causal routers whose routing reads earlier tokens keep what they
                  need in it; per-token routers ignore it.
    available:    BoolTensor [E], True for the experts the router may choose in this forward; None: every expert.
                  Unavailable experts get neither an assignment nor probability mass (their logits count as −inf).
                  Only routers whose `cannot_restrict` returns None honour it; the layer checks that when it is
                  built (ReXMoE's progressive scaling routing, experts/reused.py, sets it while training).
    """

    token_ids: Tensor | None = None
    batch_shape: tuple[int, ...] | None = None
    padding_mask: Tensor | None = None
    layer_index: int | None = None
    state: Any = None
    timestep: Tensor | float | None = None
    step: int | None = None
    cache: RouterCache | None = None
    available: Tensor | None = None

    def replace(self, **changes: Any) -> RoutingContext:
        return dataclasses.replace(self, **changes)

    def flat_padding_mask(self, num_tokens: int) -> Tensor | None:
        """The padding mask as [T] booleans, or None when there is no padding."""
        if self.padding_mask is None:
            return None
        mask_T = self.padding_mask.reshape(-1).to(torch.bool)
        if mask_T.numel() != num_tokens:
            raise ValueError(
                f"RoutingContext.padding_mask has {mask_T.numel()} positions but the input has {num_tokens} tokens"
            )
        return mask_T


class RouterCache:
    """What one router keeps from the earlier tokens of the sequences a model decodes incrementally.

    The model makes one per MoE layer for a decode and passes it as `RoutingContext.cache` on every call; each call
    brings the next tokens of the same B sequences (`batch_shape` [B, L_new]). Tensors are [B, L_past, ...], with
    no gradient.
    """

    def __init__(self) -> None:
        self.tensors: dict[str, Tensor] = {}

    def extend(self, **new: Tensor) -> tuple[Tensor, ...]:
        """Append each [B, L_new, ...] tensor to the one cached under its name (along dim 1); returns the full
        [B, L_past + L_new, ...] tensors in the order given."""
        out = []
        for name, value in new.items():
            value = value.detach()
            past = self.tensors.get(name)
            full = value if past is None else torch.cat((past, value), dim=1)
            self.tensors[name] = full
            out.append(full)
        return tuple(out)


@dataclass(frozen=True)
class RoutingDecision:
    """The one object that crosses from router to dispatcher.

    token_index:   LongTensor [S], row of the flattened input x.reshape(-1, D).
    expert_index:  LongTensor [S], expert id in 0..num_experts-1 (null experts and dropped assignments are absent).
    weight:        Tensor [S], combine weight ≥ 0, differentiable with respect to the router's parameters.
                   A NaN/inf weight raises FloatingPointError (a non-finite input reached the router), a negative
                   one ValueError.
    num_tokens:    T (an int).
    num_experts:   E (an int; routed experts that compute; null experts are not counted).
    aux_losses:    scalar losses, already multiplied by their coefficients (keys "aux", "z", "dyn", "erc", ...).
    router_logits: Tensor [T, E'] of raw scores (E' ≥ E when a router also scores null experts), or None.
    num_dropped:   assignments the router selected and then dropped for capacity.
    state:         what the router hands on to the next MoE layer (recurrent routers), or None.
    """

    token_index: Tensor
    expert_index: Tensor
    weight: Tensor
    num_tokens: int
    num_experts: int
    aux_losses: dict[str, Tensor] = field(default_factory=dict)
    router_logits: Tensor | None = None
    num_dropped: int = 0
    state: Any = None

    def __post_init__(self) -> None:
        for name in ("token_index", "expert_index", "weight"):
            value = getattr(self, name)
            if not isinstance(value, Tensor) or value.dim() != 1:
                raise ValueError(f"RoutingDecision.{name} must be a 1-D tensor, got {_describe(value)}")
        for name in ("token_index", "expert_index"):
            if getattr(self, name).dtype != torch.long:
                raise ValueError(f"RoutingDecision.{name} must be int64 (long), got {getattr(self, name).dtype}")
        if not self.weight.is_floating_point():
            raise ValueError(f"RoutingDecision.weight must be floating point, got {self.weight.dtype}")
        S = self.token_index.numel()
        if self.expert_index.numel() != S or self.weight.numel() != S:
            raise ValueError(
                "RoutingDecision.token_index, expert_index and weight must have equal lengths, got "
                f"{S}, {self.expert_index.numel()}, {self.weight.numel()}"
            )
        for name in ("num_tokens", "num_experts"):
            value = getattr(self, name)
            if type(value) is not int:  # noqa: E721 — not bool, float or a 0-d tensor: sizes are plain ints
                raise ValueError(f"RoutingDecision.{name} must be an int, got {_describe(value)}")
        if self.num_tokens < 0 or self.num_experts < 1:
            raise ValueError(
                f"RoutingDecision needs num_tokens >= 0 and num_experts >= 1, got {self.num_tokens}, {self.num_experts}"
            )
        if S:
            _check_assignments(self.token_index, self.num_tokens, self.expert_index, self.num_experts, self.weight)
        if self.router_logits is not None and (
            self.router_logits.dim() != 2 or self.router_logits.shape[0] != self.num_tokens
        ):
            raise ValueError(
                f"RoutingDecision.router_logits must be [num_tokens={self.num_tokens}, E], "
                f"got {tuple(self.router_logits.shape)}"
            )
        for key, loss in self.aux_losses.items():
            if not isinstance(loss, Tensor) or loss.dim() != 0:
                raise ValueError(f"RoutingDecision.aux_losses[{key!r}] must be a 0-d tensor, got {_describe(loss)}")

    @property
    def num_assignments(self) -> int:
        return self.token_index.numel()

    def expert_load(self) -> Tensor:
        """LongTensor [E]: assignments per expert."""
        return torch.bincount(self.expert_index, minlength=self.num_experts)

    def experts_per_token(self) -> Tensor:
        """LongTensor [T]: assignments per token."""
        return torch.bincount(self.token_index, minlength=self.num_tokens)

    def dense_weights(self) -> Tensor:
        """Tensor [T, E] with each assignment's weight at (token, expert); zero elsewhere."""
        # index_add over the flat (token, expert) index: same sums as index_put(accumulate=True), whose CPU kernel and
        # backward cost ~15x more at T=4096 (the routed-LoRA stacked form calls this every forward; benchmarks/lora.py).
        flat_S = self.token_index * self.num_experts + self.expert_index
        dense_X = self.weight.new_zeros(self.num_tokens * self.num_experts)
        return dense_X.index_add(0, flat_S, self.weight).view(self.num_tokens, self.num_experts)

    def detached(self) -> RoutingDecision:
        """A copy for statistics: tensors detached, except the aux losses, which keep their graph so that
        `total_aux_loss` can be backpropagated after the forward."""
        copy = object.__new__(RoutingDecision)  # not dataclasses.replace: this decision was validated already, and
        changes = {  # re-validating costs device-to-host syncs on every forward (measured in benchmarks/decode.py)
            "token_index": self.token_index.detach(),
            "expert_index": self.expert_index.detach(),
            "weight": self.weight.detach(),
            "router_logits": None if self.router_logits is None else self.router_logits.detach(),
            "state": None,
        }
        for f in dataclasses.fields(self):
            object.__setattr__(copy, f.name, changes.get(f.name, getattr(self, f.name)))
        return copy


class Router(nn.Module):
    """Base class of every router: `forward(x_TD, ctx=None) -> RoutingDecision`.

    Subclasses set `causal` (does a token's routing depend only on itself and earlier tokens?), as a class
    attribute or per instance when options change it. Non-gradient state lives in buffers; training-mode forwards
    only accumulate statistics, and `apply_updates` (called through `routelab.update_routers`, once per optimizer
    step) applies them. Eval-mode forwards change nothing.
    """

    causal: ClassVar[bool] | bool = True
    # True when routing reads RoutingContext.timestep (a diffusion time): only models that pass one (the diffusion
    # LM, the DiT) run such a router; an autoregressive LM cannot (it has no timestep to give).
    needs_timestep: ClassVar[bool] | bool = False
    # True when decisions hand routing state (`RoutingDecision.state`, per token) to the next MoE layer: a model
    # that gives a layer only some tokens (Mixture-of-Depths, `layers/depth.py`) cannot combine with such a router.
    hands_on_state: ClassVar[bool] = False
    # A torch.distributed process group whose ranks see different tokens of one step (expert or data parallel),
    # set by `routelab.distributed.expert_parallel`; None: statistics are this process's own.
    statistics_group: Any = None

    def __init__(self, *, d_model: int, num_experts: int) -> None:
        super().__init__()
        check_int("d_model", d_model, 1)
        check_int("num_experts", num_experts, 1)
        self.d_model = d_model
        self.num_experts = num_experts

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:  # pragma: no cover
        raise NotImplementedError

    @classmethod
    def shared_modules(cls, *, d_model: int, num_experts: int, **options: Any) -> dict[str, nn.Module]:
        """Modules that every layer of one model shares (e.g. a recurrent router's cell over depth).

        A model building one router per layer calls this once and passes the result to every layer's router as
        extra options, so the layers hold the same parameter objects. Most routers share nothing.
        """
        return {}

    def _apply(self, fn, recurse=True):  # type: ignore[override]
        # model.to(torch.bfloat16) must not round routing state (biases, duals, centroids, load counts) to half
        # precision: counts above 256 would stop adding up and bias steps of 1e-3 would vanish. Parameters follow
        # the model's dtype; this router's own floating buffers keep at least their original precision.
        before = {name: buf.dtype for name, buf in self._buffers.items() if buf is not None}
        super()._apply(fn, recurse)
        for name, buf in self._buffers.items():
            if buf is not None and buf.dtype in (torch.bfloat16, torch.float16) and before.get(name) != buf.dtype:
                self._buffers[name] = buf.to(before[name])
        return self

    def sum_over_group(self, t: Tensor) -> Tensor:
        """t summed over `statistics_group` (a new tensor; t itself without a group). A collective: every rank of
        the group calls it at the same point, which the routers guarantee by calling it unconditionally."""
        if self.statistics_group is None:
            return t
        import torch.distributed as dist  # only reached under torch.distributed

        out = t.detach().clone()
        dist.all_reduce(out, group=self.statistics_group)
        return out

    def gate_rows(self) -> Tensor | None:
        """[E, D]: the rows of a linear gate that score the E routed experts (a capability: the ERC loss couples them
        to the experts' gate projections), or None. Routers declare it by holding `gate`, an nn.Linear whose first
        E output rows score the E experts."""
        gate = getattr(self, "gate", None)
        if isinstance(gate, nn.Linear) and gate.out_features >= self.num_experts:
            return gate.weight[: self.num_experts]
        return None

    def logit_gate(self) -> tuple[Tensor, Tensor | None] | None:
        """(weight [E', D], bias [E'] or None) of the linear gate whose output `route_logits` accepts, or None.

        A capability: a caller that multiplies x by other weights anyway (a routed-LoRA layer's down-projection) can
        compute the router's logits in the same matmul and hand them over. None when the router cannot take
        precomputed logits: it has no linear gate, or its logits are not F.linear(x, weight, bias) right now (e.g.
        input jitter while training). The default is None; routers that support it override both methods.
        """
        return None

    def route_logits(self, x_TD: Tensor, logits_TE: Tensor, ctx: RoutingContext | None = None) -> RoutingDecision:
        """What `forward(x_TD, ctx)` returns, given logits_TE = F.linear(x_TD, *self.logit_gate()) computed by the
        caller in `router_dtype(x_TD)` (gradients flow back through logits_TE, and through x_TD where the router
        reads it otherwise). Routers whose `logit_gate()` is None refuse with TypeError."""
        raise TypeError(
            f"router {type(self).__name__} does not take precomputed logits (its logit_gate() is None); "
            "call it as router(x_TD, ctx)"
        )

    def cannot_restrict(self, num_available: int) -> str | None:
        """Why this router cannot route when only `num_available` of its experts are available
        (`RoutingContext.available`), or None when it can. A capability: the default is a refusal, and routers that
        honour the mask override it."""
        name = getattr(type(self), "registry_name", type(self).__name__)
        return f"router {name!r} cannot restrict its choice to a subset of its experts (RoutingContext.available)"

    @torch.no_grad()
    def apply_updates(self) -> None:
        """Apply the statistics accumulated by training forwards since the last call; stateless routers do nothing."""

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, num_experts={self.num_experts}, causal={self.causal}"


def update_routers(model: nn.Module) -> None:
    """Apply every router's accumulated statistics (loss-free bias, BIP duals, k-means centroids).

    The training loop calls this once per optimizer step; it is a no-op for stateless routers.
    """
    for module in model.modules():
        if isinstance(module, Router):
            module.apply_updates()


def router_dtype(x: Tensor) -> torch.dtype:
    """Routers compute in fp32, or fp64 when the input is fp64 (so fp64 reference tests are exact)."""
    return torch.float64 if x.dtype == torch.float64 else torch.float32


def _check_assignments(token_S: Tensor, num_tokens: int, expert_S: Tensor, num_experts: int, weight_S: Tensor) -> None:
    """Indices in range and weights finite and >= 0. This runs on every forward: three min/max passes and two host
    syncs (benchmarks/decision_checks.py: about the cost of the index checks alone before)."""
    t, e, w = torch.aminmax(token_S), torch.aminmax(expert_S), torch.aminmax(weight_S.detach())
    t_lo, t_hi, e_lo, e_hi = torch.stack([t.min, t.max, e.min, e.max]).tolist()
    w_lo, w_hi = torch.stack([w.min, w.max]).tolist()  # min/max propagate NaN
    for name, lo, hi, upper in (("token_index", t_lo, t_hi, num_tokens), ("expert_index", e_lo, e_hi, num_experts)):
        if lo < 0 or hi >= upper:
            raise ValueError(f"RoutingDecision.{name} must lie in [0, {upper}), got values in [{lo}, {hi}]")
    if not (w_lo >= 0 and w_hi < math.inf):  # NaN fails both comparisons
        if w_lo < 0:
            raise ValueError(f"RoutingDecision.weight must be >= 0, got negative weights (values in [{w_lo}, {w_hi}])")
        bad = "NaN" if math.isnan(w_lo) or math.isnan(w_hi) else "infinite"
        raise FloatingPointError(
            f"RoutingDecision.weight must be finite, got {bad} weights (values in [{w_lo}, {w_hi}]); "
            "non-finite weights usually come from NaN/inf in the layer input (MoELayer(check_finite=True) names it)"
        )


def _describe(value: object) -> str:
    if isinstance(value, Tensor):
        return f"a tensor of shape {tuple(value.shape)} and dtype {value.dtype}"
    return type(value).__name__
