"""The MoE layer: route → permute → experts → combine (+ shared experts). A drop-in for an MLP.

Shape legend: T tokens, D model width, F expert width, E experts, S assignments.
"""

from __future__ import annotations

import dataclasses

import torch
from torch import Tensor, nn

from routelab._checks import check_bool, check_int
from routelab.dispatch.base import Dispatcher
from routelab.dispatch.local import LocalDispatcher
from routelab.experts.base import ExpertBank
from routelab.experts.gated import GatedSharedExpert
from routelab.experts.reused import ProgressiveScaling
from routelab.experts.swiglu import SwiGLUExperts
from routelab.routing.base import Router, RoutingContext, RoutingDecision
from routelab.routing.erc import check_erc_options, layer_erc_loss


class MoELayer(nn.Module):
    """Mixture-of-Experts feed-forward layer: `forward(x, ctx=None)` maps [..., d_model] to the same shape.

    router:          any `Router` with `d_model` and `num_experts` matching this layer.
    d_ff:            width of each routed expert.
    shared_experts:  n ≥ 0 always-on experts, run as one SwiGLU MLP of width n·d_ff.
    shared_d_ff:     width of that shared MLP when it is not n·d_ff (Qwen2-MoE); needs shared_experts ≥ 1.
    shared_expert_gate: scale the shared output per token by sigmoid(x·w) (Qwen2-MoE's `GatedSharedExpert`).
    experts:         a prebuilt routed expert bank (an `ExpertBank`, e.g. `ClampedSwiGLUExperts` for gpt-oss);
                     default a `SwiGLUExperts` bank.
    dispatcher:      how rows reach the experts and come back (a stateless `Dispatcher`); default a
                     `LocalDispatcher` (every expert here; fused SwiGLU fast path). Expert parallelism installs an
                     all-to-all one (`routelab.distributed.expert_parallel`).
    erc_loss_coef:   c ≥ 0; in training mode, adds c·ERC loss (routing/erc.py) to the aux losses as "erc".
    erc_alpha:       the ERC loss's α (default 1.0).
    check_finite:    raise a FloatingPointError when the input holds NaN or inf, before routing on it (off by default:
                     it costs a pass over the input and a host sync; turn it on to find where NaNs start).
    candidate_schedule: a `ProgressiveScaling` (ReXMoE, experts/reused.py), or None. With one, training-mode
                     forwards need `ctx.step` and let the router choose only the candidates available at that step
                     (`RoutingContext.available`); eval-mode forwards choose among all. The router must support it
                     (`Router.cannot_restrict`), checked here.

    After a forward, `last_decision` holds the routing decision (tensors detached, aux losses with their graph).
    """

    def __init__(
        self,
        d_model: int,
        d_ff: int,
        router: Router,
        *,
        shared_experts: int = 0,
        shared_d_ff: int | None = None,
        shared_expert_gate: bool = False,
        experts: ExpertBank | None = None,
        erc_loss_coef: float = 0.0,
        erc_alpha: float = 1.0,
        dispatcher: Dispatcher | None = None,
        check_finite: bool = False,
        candidate_schedule: ProgressiveScaling | None = None,
    ) -> None:
        super().__init__()
        if not isinstance(router, Router):
            raise TypeError(f"router must be a routelab Router (see routelab.create_router), got {type(router).__name__}")
        if router.d_model != d_model:
            raise ValueError(f"router.d_model={router.d_model} does not match d_model={d_model}")
        check_int("d_ff", d_ff, 1)
        check_int("shared_experts", shared_experts, 0)
        if (shared_d_ff is not None or shared_expert_gate) and not shared_experts:
            raise ValueError("shared_d_ff and shared_expert_gate need shared_experts >= 1")
        if shared_d_ff is not None:
            check_int("shared_d_ff (or None)", shared_d_ff, 1)
        if experts is not None and not isinstance(experts, ExpertBank):
            raise TypeError(f"experts must be a routelab ExpertBank, got {type(experts).__name__}")
        if experts is not None:
            for name, want in (("num_experts", router.num_experts), ("d_model", d_model), ("d_ff", d_ff)):
                if getattr(experts, name) != want:
                    raise ValueError(f"experts.{name}={getattr(experts, name)} does not match the layer's {name}={want}")
        if dispatcher is not None and not isinstance(dispatcher, Dispatcher):
            raise TypeError(f"dispatcher must be a routelab Dispatcher, got {type(dispatcher).__name__}")
        experts = experts if experts is not None else SwiGLUExperts(router.num_experts, d_model, d_ff)
        check_erc_options(router, experts, erc_loss_coef, erc_alpha)
        check_bool("check_finite", check_finite)
        if candidate_schedule is not None and not isinstance(candidate_schedule, ProgressiveScaling):
            raise TypeError(f"candidate_schedule must be a ProgressiveScaling or None, got "
                            f"{type(candidate_schedule).__name__}")
        self.candidate_schedule = candidate_schedule
        self.check_schedulable(router)
        self.check_finite = check_finite
        self.erc_loss_coef, self.erc_alpha = float(erc_loss_coef), float(erc_alpha)
        self.d_model, self.d_ff = d_model, d_ff
        self.router = router
        self.experts = experts
        # A plain object, not a module: it holds no parameters and nothing of it is saved with the model.
        self.dispatcher: Dispatcher = dispatcher if dispatcher is not None else LocalDispatcher()
        # A shared expert is a one-expert bank that every token enters with weight 1.
        shared_width = shared_d_ff if shared_d_ff is not None else shared_experts * d_ff
        self.shared_experts: nn.Module | None = None
        if shared_experts and shared_expert_gate:
            self.shared_experts = GatedSharedExpert(d_model, shared_width)
        elif shared_experts:
            self.shared_experts = SwiGLUExperts(1, d_model, shared_width)
        self.last_decision: RoutingDecision | None = None

    def check_schedulable(self, router: Router) -> None:
        """Raise ValueError when this layer has a candidate schedule that `router` cannot follow."""
        schedule = self.candidate_schedule
        if schedule is None:
            return
        if schedule.num_candidates != router.num_experts:
            raise ValueError(f"candidate_schedule covers {schedule.num_candidates} candidates but the router has "
                             f"num_experts={router.num_experts}")
        reason = router.cannot_restrict(schedule.fewest)
        if reason is not None:
            raise ValueError(f"{reason}, so it cannot follow ReXMoE's progressive scaling (model.reuse_schedule)")

    def forward(self, x: Tensor, ctx: RoutingContext | None = None) -> Tensor:
        return self.forward_with_decision(x, ctx)[0]

    def forward_with_decision(
        self, x: Tensor, ctx: RoutingContext | None = None, *, router: Router | None = None
    ) -> tuple[Tensor, RoutingDecision]:
        """The forward, also returning the decision with its graph (a model hands `decision.state` to the next
        MoE layer this way, explicitly). `router`: route with this router instead of the layer's own (Chain-of-
        Experts routes each iteration with its own router over the same experts)."""
        if not x.is_floating_point():
            raise TypeError(f"MoELayer input must be a floating-point tensor, got dtype {x.dtype}")
        if x.dim() < 1 or x.shape[-1] != self.d_model:
            raise ValueError(f"MoELayer input must have last dimension d_model={self.d_model}, got shape {tuple(x.shape)}")
        if self.check_finite and not bool(torch.isfinite(x).all()):
            bad = int((~torch.isfinite(x)).sum())
            raise FloatingPointError(f"MoELayer input holds {bad} non-finite value(s) (NaN/inf) in a tensor of shape "
                                     f"{tuple(x.shape)} (check_finite=True)")
        ctx = (ctx or RoutingContext()).replace(batch_shape=tuple(x.shape[:-1]))
        if ctx.available is not None:  # from the caller: only a router that honours it may receive it
            reason = (router or self.router).cannot_restrict(int(ctx.available.sum()))
            if reason is not None:
                raise ValueError(f"RoutingContext.available was given, but {reason}")
        if self.candidate_schedule is not None and self.training:
            ctx = self._restrict(ctx, x.device)
        x_TD = x.reshape(-1, self.d_model)

        decision = (router or self.router)(x_TD, ctx)
        if self.erc_loss_coef > 0 and self.training:
            erc = self.erc_loss_coef * layer_erc_loss(router or self.router, self.experts, self.erc_alpha)
            decision = dataclasses.replace(decision, aux_losses={**decision.aux_losses, "erc": erc})
        self.last_decision = decision.detached()
        try:
            if self.dispatcher.can_fuse(self.experts):  # fast path: gather → experts → weighted combine in one kernel
                y_TD = self.dispatcher.fused(x_TD, decision, self.experts)
            else:
                rows_SD, counts_E, plan = self.dispatcher.dispatch(x_TD, decision)  # rows sorted by expert
                y_TD = self.dispatcher.combine(self.experts(rows_SD, counts_E), plan)  # combine weights applied here
            if self.shared_experts is not None:
                y_TD = y_TD + self.shared_experts(x_TD, torch.tensor([x_TD.shape[0]]))
        except RuntimeError as exc:  # checked only on failure: autocast legitimately mixes dtypes, and it is free
            weight = next(self.experts.parameters(), None)
            if weight is not None and weight.dtype != x.dtype:
                raise TypeError(f"MoELayer input has dtype {x.dtype} but the layer's weights are {weight.dtype}; "
                                f"convert one (x.to({weight.dtype}) or layer.to({x.dtype}))") from exc
            raise
        return y_TD.reshape(x.shape), decision

    def _restrict(self, ctx: RoutingContext, device: torch.device) -> RoutingContext:
        """ctx with the candidates the schedule makes available at ctx.step (ANDed with any the caller gave)."""
        if ctx.step is None:
            raise ValueError("this MoE layer follows a candidate schedule (model.reuse_schedule) and a training-mode "
                             "forward needs the training step: call model(ids, targets, step=step), or model.eval()")
        available_E = self.candidate_schedule.available(ctx.step)
        if available_E is None:
            return ctx
        available_E = available_E.to(device)
        return ctx.replace(available=available_E if ctx.available is None else ctx.available & available_E)

    def extra_repr(self) -> str:
        return f"d_model={self.d_model}, d_ff={self.d_ff}"


def total_aux_loss(model: nn.Module) -> Tensor:
    """Sum of the aux losses of every MoE layer's last forward, and of the modules that keep aux losses of their own
    in `last_aux_losses` (Mixture-of-Depths' predictor, layers/depth.py): a 0-d tensor, with gradient when they
    have one."""
    losses = [
        loss
        for module in model.modules()
        if isinstance(module, MoELayer) and module.last_decision is not None
        for loss in module.last_decision.aux_losses.values()
    ] + [loss for module in model.modules() for loss in getattr(module, "last_aux_losses", {}).values()]
    if not losses:
        param = next(model.parameters(), None)
        return torch.zeros((), device=None if param is None else param.device)
    return sum(losses[1:], losses[0])
