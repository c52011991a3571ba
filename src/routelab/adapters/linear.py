"""The routed-LoRA linear and the two ways of executing a routed mixture of LoRAs.

    y = base(x) + Σ_{(t,e) ∈ decision} w · B_e A_e x_t · alpha/r           base frozen; A_e [r, D], B_e [O, r]

Shape legend: T tokens, D in_features, O out_features, E experts (LoRAs), R ranks of one expert (r), S assignments.

Executions (equal in exact arithmetic; `tests/test_adapters_execution.py` checks outputs and every gradient in fp64):
- stacked: one matmul over all E·R ranks (`x @ A_all`, [T, E·R]), the ranks of each expert scaled by the token's
  routing weight for it (0 where not selected), one matmul back (`@ B_all`). Wastes E/k of the adapter FLOPs but
  runs as two large matmuls with no gather, sort or Python loop.
- grouped: the assignments sorted by expert (`routelab.dispatch.make_plan`), one small matmul pair per expert on its
  rows only, scatter-added back. Exact active FLOPs, but row gathers, scatters and E small matmuls.
`benchmarks/lora.py` times both; "auto" picks stacked while the stacked rank E·R is at most `STACKED_MAX_RANK` = 128,
the measured crossover at k=2, R=8 on CPU with one thread (E=8: stacked 1.23-1.45x the rank-16 LoRA linear, grouped
1.81-1.85x; E=16: equal; E=32: grouped 1.72x vs 2.26x; E=64: 2.15x vs 3.71x). With two threads on an overloaded
machine the grouped form's many small ops each waited for the second core and stacked won at every E.
The stacked form is autograd around `GateRanks` (the rank masking, gradchecked); the grouped form is one custom
autograd function (`_grouped.py`, gradchecked).
"""

from __future__ import annotations

import itertools
from typing import Any, ClassVar

import torch
from torch import Tensor, nn

from routelab._checks import check_choice, check_int, check_number
from routelab.adapters._grouped import GroupedLoRA
from routelab.dispatch.permute import make_plan
from routelab.routing.base import RoutingContext, RoutingDecision

EXECUTIONS = ("auto", "stacked", "grouped")
# "auto" uses the stacked form up to this many stacked ranks E·R (see benchmarks/lora.py for the measurement).
STACKED_MAX_RANK = 128


def stacked_lora(h_TER: Tensor, gate_TE: Tensor, B_ERO: Tensor) -> Tensor:
    """Σ_e gate[t, e] · h[t, e, :] @ B[e]: the down-projected ranks of every expert, masked by the routing weights,
    through all up-projections in one matmul. Returns [T, O]."""
    T, E, R = h_TER.shape
    masked_TX = GateRanks.apply(h_TER, gate_TE.to(h_TER.dtype))
    return masked_TX @ B_ERO.reshape(E * R, B_ERO.shape[-1])


class GateRanks(torch.autograd.Function):
    """apply(h_TER, gate_TE) -> (h · gate[..., None]) as [T, E·R]: each expert's ranks scaled by its gate.

    Autograd's own backward of that product makes three passes over [T, E, R] (dh; dgate as a product, then a sum
    over R); here dgate is one batched dot product, and it is skipped when the gate needs no gradient. Each pass is
    a parallel region, which costs most on a busy CPU (benchmarks/lora.py). Gradchecked in
    tests/test_adapters_execution.py.
    """

    @staticmethod
    def forward(ctx, h_TER: Tensor, gate_TE: Tensor) -> Tensor:
        ctx.save_for_backward(h_TER, gate_TE)
        T, E, R = h_TER.shape
        return (h_TER * gate_TE.unsqueeze(-1)).reshape(T, E * R)

    @staticmethod
    def backward(ctx, d_TX: Tensor) -> tuple[Tensor | None, Tensor | None]:
        h_TER, gate_TE = ctx.saved_tensors
        T, E, R = h_TER.shape
        d_TER = d_TX.reshape(T, E, R)
        dh_TER = d_TER * gate_TE.unsqueeze(-1) if ctx.needs_input_grad[0] else None
        dgate_TE = None
        if ctx.needs_input_grad[1]:
            if R == 1:
                dgate_TE = (d_TER * h_TER).reshape(T, E)
            else:
                dgate_TE = torch.bmm(d_TER.reshape(T * E, 1, R), h_TER.reshape(T * E, R, 1)).reshape(T, E)
        return dh_TER, dgate_TE


def grouped_lora(x_TD: Tensor, decision: RoutingDecision, A_ERD: Tensor | None, B_ERO: Tensor) -> Tensor:
    """Each expert's LoRA on its own rows only: the assignments sorted by expert (`make_plan`), then per expert
    gather its rows, (x A_eᵀ · w) B_e, scatter-add back (`adapters/_grouped.py`, one custom autograd function that
    never holds an [S, D] tensor). The routing weights multiply the [S, R] rank rows, their one place here.

    A_ERD None means the rows are already down-projected (HydraLoRA's shared A): x_TD is then h_TR.
    Returns [T, O]; tokens without assignments get zeros.
    """
    plan = make_plan(decision)
    return GroupedLoRA.apply(x_TD, plan.token_S, plan.weight_S.to(x_TD.dtype), A_ERD, B_ERO,
                             plan.group_sizes_E.tolist())


def resolve_execution(execution: str, stacked_rank: int) -> str:
    """The execution a method uses: "stacked" or "grouped" as asked, "auto" by the stacked rank E·R."""
    check_choice("execution", execution, EXECUTIONS)
    if execution == "auto":
        return "stacked" if stacked_rank <= STACKED_MAX_RANK else "grouped"
    return execution


def init_lora_pair(A: Tensor, B: Tensor) -> None:
    """PEFT's LoRA initialisation: each A_e like an nn.Linear weight (Kaiming uniform, a=√5), B = 0, so a freshly
    wrapped model computes exactly what its base computes."""
    with torch.no_grad():
        for index in itertools.product(*(range(n) for n in A.shape[:-2])):
            nn.init.kaiming_uniform_(A[index], a=5**0.5)  # a view, also when A is a transposed view
        B.zero_()


class LoRAExperts(nn.Module):
    """Base of every method: `forward(x_TD, ctx) -> (delta_TO, decision or None)`; the delta already carries the
    alpha/r scaling. Subclasses set `method` (the registry name) and implement `forward`, `options` (the JSON-able
    method options that rebuild it) and `adapter_flops(decision)` (active adapter FLOPs per token, router included).

    Every method shares: `r` (rank of one LoRA expert), `num_experts`, `alpha` (scaling alpha/r), `dropout` (on the
    LoRA input, as PEFT; routers see the undropped input).
    """

    method: ClassVar[str] = ""

    def __init__(self, in_features: int, out_features: int, *, num_experts: int, r: int, alpha: float,
                 dropout: float) -> None:
        super().__init__()
        check_int("in_features", in_features, 1)
        check_int("out_features", out_features, 1)
        check_int("num_experts", num_experts, 1)
        check_int("r", r, 1)
        check_number("alpha", alpha, low=0, open_low=True)
        check_number("dropout", dropout, low=0)
        if dropout >= 1:
            raise ValueError(f"dropout must be in [0, 1), got {dropout!r}")
        self.in_features, self.out_features = in_features, out_features
        self.num_experts, self.r, self.alpha = num_experts, r, float(alpha)
        self.scale = float(alpha) / r
        self.dropout = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.dropout_p = float(dropout)

    def forward(self, x_TD: Tensor, ctx: RoutingContext | None = None) -> tuple[Tensor, RoutingDecision | None]:
        raise NotImplementedError  # pragma: no cover - every method overrides it

    def options(self) -> dict[str, Any]:
        """Method options (beyond the shared ones) that rebuild this adapter; JSON-able."""
        return {}

    def adapter_flops(self, decision: RoutingDecision | None) -> float:
        raise NotImplementedError  # pragma: no cover - every method overrides it

    def lora_input(self, x_TD: Tensor) -> Tensor:
        return self.dropout(x_TD)

    def extra_repr(self) -> str:
        return (f"method={self.method}, in={self.in_features}, out={self.out_features}, experts={self.num_experts}, "
                f"r={self.r}, alpha={self.alpha}")


def router_flops(in_features: int, num_logits: int) -> float:
    """A linear gate's FLOPs per token."""
    return 2.0 * in_features * num_logits


def mean_per_token(decision: RoutingDecision) -> float:
    """Mean assignments per token of a decision (0 for an empty batch)."""
    return decision.num_assignments / decision.num_tokens if decision.num_tokens else 0.0


class RoutedLoRALinear(nn.Module):
    """A frozen `nn.Linear` plus a routed mixture of LoRA experts: `forward(x [..., D]) -> [..., O]`.

    `base` keeps its parameters (frozen, requires_grad False) under the `.base` suffix; `adapter` is a `LoRAExperts`
    method; `spec` the `AdapterSpec` it was built from (set by `add_lora_experts`). After a forward, `last_decision`
    holds the routing decision (detached tensors, aux losses with their graph; `adapter_aux_loss(model)` sums them)
    and `last_adapter_flops` the active adapter FLOPs per token.
    """

    def __init__(self, base: nn.Linear, adapter: LoRAExperts, spec: Any = None) -> None:
        super().__init__()
        if not isinstance(base, nn.Linear):
            raise TypeError(f"base must be an nn.Linear, got {type(base).__name__}")
        if (adapter.in_features, adapter.out_features) != (base.in_features, base.out_features):
            raise ValueError(
                f"adapter shape ({adapter.in_features} → {adapter.out_features}) does not match the base linear "
                f"({base.in_features} → {base.out_features})"
            )
        self.base = base
        for p in base.parameters():
            p.requires_grad_(False)
        self.adapter = adapter
        self.spec = spec  # the AdapterSpec that built the adapter (add_lora_experts sets it; save_adapters needs it)
        self.last_decision: RoutingDecision | None = None
        self.last_adapter_flops: float = 0.0
        # The model's input ids of the current forward, set by the hook add_lora_experts puts on the model, for
        # routers that read RoutingContext.token_ids (hash routing); used when they match this layer's tokens.
        self.token_ids: Tensor | None = None

    # Code written for an nn.Linear reads these (e.g. a model checking `proj.weight.dtype`).
    @property
    def in_features(self) -> int:
        return self.base.in_features

    @property
    def out_features(self) -> int:
        return self.base.out_features

    @property
    def weight(self) -> Tensor:
        return self.base.weight

    @property
    def bias(self) -> Tensor | None:
        return self.base.bias

    def forward(self, x: Tensor) -> Tensor:
        y = self.base(x)
        x_TD = x.reshape(-1, self.in_features)
        ids = self.token_ids if self.token_ids is not None and self.token_ids.numel() == x_TD.shape[0] else None
        ctx = RoutingContext(batch_shape=tuple(x.shape[:-1]), token_ids=ids)
        delta_TO, decision = self.adapter(x_TD, ctx)
        self.last_decision = None if decision is None else decision.detached()
        self.last_adapter_flops = self.adapter.adapter_flops(decision)
        return y + delta_TO.reshape(*x.shape[:-1], self.out_features).to(y.dtype)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}"


def routed_lora_layers(model: nn.Module) -> dict[str, RoutedLoRALinear]:
    """{qualified name: layer} of every routed-LoRA linear in `model`, in module order."""
    return {name: m for name, m in model.named_modules() if isinstance(m, RoutedLoRALinear)}


def adapter_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the aux losses (balance, z, ...) of every routed-LoRA linear's last forward; add it to the training
    loss (the `MoETransformerLM` loss covers only its MoE layers)."""
    losses = [
        loss
        for layer in routed_lora_layers(model).values()
        if layer.last_decision is not None
        for loss in layer.last_decision.aux_losses.values()
    ]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return sum(losses[1:], losses[0])


def capture_token_ids(model: nn.Module, args: tuple, kwargs: dict) -> None:
    """Forward pre-hook on a wrapped model: hand its input ids (the first positional argument or `input_ids`, when
    an integer tensor) to every routed-LoRA linear, so that id-based routers (hash) work inside any model."""
    ids = kwargs.get("input_ids", args[0] if args else None)
    if not isinstance(ids, Tensor) or ids.is_floating_point() or ids.is_complex():
        ids = None
    for layer in routed_lora_layers(model).values():
        layer.token_ids = ids
