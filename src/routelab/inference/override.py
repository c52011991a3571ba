"""Inference-time routing control: change how many and which experts each token uses, without touching weights.

Papers whose knobs this reproduces: Harder Tasks Need More Experts (k and top-p at inference); Not All Experts are
Equal (NAEE, dynamic skipping of an expert whose weight is small next to the token's largest: `min_weight_ratio`);
MoDES (an absolute threshold on routing weights, per layer: `min_weight`, set by `calibrate_skipping`); Large
Language Lobotomy (L³) and UOE (silencing experts: `mask`); forcing experts as llama.cpp users ask (`force`);
Multilingual Routing in MoE and Rewiring Experts on the Fly (steering with a bias on router logits: `logit_bias`).

Defining property: one mechanism. `override_routing` puts a wrapper around each chosen MoE layer's router (a forward
hook: the router module, its parameters and its state_dict keys are untouched); the wrapper takes the router's own
logits, edits them, selects experts from the router's own scores and edits that decision. `handle.remove()` takes
the hooks off, so the model computes exactly what it computed before (bit for bit); the handle is also a context
manager. With no option set for a layer, its decision is passed through unchanged.

The order, per layer (shape legend: T tokens, E experts, S assignments):

    1. logits   z = the router's logits [T, E];  z ← z + logit_bias;  masked experts' logits ← −inf
    2. scores   s = the router's score function of z (softmax or sigmoid): a masked expert scores 0, and under a
                softmax the others share its probability, as if it did not exist
    3. select   experts ranked by the router's own selection score (s plus its balancing bias, if any), forced
                experts first; each token takes the first n of that ranking, where
                    n = the first n whose normalised score mass (s / Σ s) reaches top_p (capped at k when both are
                        given), else k, else the router's own count (its k, or its own top-p rule);
                    n ≥ the number of forced experts (a forced expert is taken even beyond k); never a masked one
    4. weight   the router's own weighting of the selected set: s at the expert × scaling, divided by the sum of s
                over the selected set when the router normalises its selected weights ("selected")
    5. drop     an assignment whose weight is below min_weight_ratio × the token's largest weight (NAEE), or below
                min_weight (MoDES); forced experts are never dropped
    6. renorm   renormalize=None: as the router does (weights recomputed over the kept set when it normalises, left
                as they are otherwise); True: kept weights rescaled to sum to the token's original mass (the sum of its
                weights in the router's unedited decision); False: kept weights keep their step-4 values

"Top-k over the router's own scores" applies to routers that score every (token, expert) pair independently from a
logit row: `topk` (softmax or sigmoid scores; its loss-free / BIP selection bias and its group limit are kept in the
ranking, so with `n_group` a token takes at most the experts of its `topk_group` kept groups, forced ones aside),
`top_p` without null or fixed experts, and `cosine`. Other routers (expert choice, Sinkhorn, hash, random, k-means,
recurrent, similarity, null experts) decide in ways for which "the token's top k" is not defined by a logit row
alone, and `override_routing` refuses them with an error naming the layer and the router. A top-k router
with a capacity is overridden dropless (capacity is a training device; under an override nothing is dropped).

The decision keeps the router's aux losses and its original (unedited) logits in `router_logits`. Overrides are
meant for inference; in training mode the router's own statistics (loss-free loads, BIP duals) still accumulate from
its own selection, not the overridden one.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn
from torch.utils.hooks import RemovableHandle

from routelab.layers.moe import MoELayer
from routelab.routing._util import flatten_choices, top_indices
from routelab.routing.base import Router, RoutingContext, RoutingDecision

__all__ = ["LayerOverride", "RoutingOverride", "ScoreRule", "moe_layers", "override_routing", "redecide", "score_rule"]


def moe_layers(model: nn.Module) -> list[MoELayer]:
    """The model's MoE layers in module order (bottom-up in a decoder); index i is "layer i" everywhere in
    `routelab.inference`. For a routelab LM this is `model.moe_layers` and each layer's `RoutingContext.layer_index`."""
    layers = [m for m in model.modules() if isinstance(m, MoELayer)]
    if not layers:
        raise ValueError(
            f"model ({type(model).__name__}) has no MoE layers (routelab MoELayer); for a Hugging Face model call "
            "routelab.interop.hf.patch_model(model) first"
        )
    return layers


# -- what a router offers the override -------------------------------------------------------------------------


@dataclass(frozen=True)
class ScoreRule:
    """How a router turns a logit row into scores, ranks experts, counts them and weights them.

    scores:     logits [T, E] → scores [T, E] (the router's score function)
    rank:       scores [T, E] → the router's selection score [T, E] (scores plus its balancing bias; −inf for experts
                its group limit excludes), or None when it selects by the scores themselves
    own_count:  scores [T, E] → LongTensor [T], how many experts the router itself gives each token
    k:          that count when it is the same for every token (top-k routers), else None
    normalizes: the router divides its selected scores by their sum
    scaling:    the factor on every weight
    """

    scores: Callable[[Tensor], Tensor]
    rank: Callable[[Tensor], Tensor] | None
    own_count: Callable[[Tensor], Tensor]
    normalizes: bool
    scaling: float
    k: int | None = None


def _constant(k: int) -> Callable[[Tensor], Tensor]:
    return lambda scores_TE: torch.full((scores_TE.shape[0],), k, dtype=torch.long, device=scores_TE.device)


def score_rule(router: Router, *, where: str = "router") -> ScoreRule:
    """The `ScoreRule` of a supported router; a ValueError naming `where` and the router otherwise."""
    from routelab.routing.cosine import CosineRouter
    from routelab.routing.top_p import TopPRouter, entropy, prefix_lengths
    from routelab.routing.topk import TopKRouter

    if isinstance(router, TopKRouter):
        score = (lambda z: z.softmax(-1)) if router.score == "softmax" else (lambda z: z.sigmoid())
        rank = None
        if router.balance != "none" or router.n_group is not None:
            rank = router.selection_scores
        return ScoreRule(score, rank, _constant(router.k), router.normalize == "selected", router.scaling, router.k)
    if isinstance(router, TopPRouter) and not router.num_null_experts and not router.num_fixed:

        def own_count(probs_TE: Tensor) -> Tensor:
            count_T = prefix_lengths(probs_TE, router.p, router.rule)
            if router.entropy_threshold is not None:
                hot_T = entropy(probs_TE, router.entropy, router.tsallis_q) > router.entropy_threshold
                count_T = torch.where(hot_T, probs_TE.shape[-1], count_T)
            return count_T.clamp(router.min_k, router.max_k)

        return ScoreRule(lambda z: z.softmax(-1), None, own_count, router.normalize == "selected", 1.0)
    if isinstance(router, CosineRouter):
        return ScoreRule(lambda z: z.softmax(-1), None, _constant(router.k), router.k > 1, 1.0, router.k)
    what = type(router).__name__
    if isinstance(router, TopPRouter):
        what += " with null or fixed experts"
    raise ValueError(
        f"{where} is a {what}: routing overrides need a router that scores each token's experts from one logit row "
        "(topk, top_p without null or fixed experts, cosine)"
    )


# -- one layer's options ----------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LayerOverride:
    """The validated options of one layer (see the module docstring for their meaning and order).

    mask / force: BoolTensor [E] or None; logit_bias: Tensor [E] or None.
    """

    num_experts: int
    k: int | None = None
    top_p: float | None = None
    min_weight_ratio: float | None = None
    min_weight: float | None = None
    mask: Tensor | None = None
    force: Tensor | None = None
    logit_bias: Tensor | None = None
    renormalize: bool | None = None

    def is_identity(self) -> bool:
        return all(
            getattr(self, f.name) is None for f in dataclasses.fields(self) if f.name != "num_experts"
        )


def redecide(
    decision: RoutingDecision, rule: ScoreRule, spec: LayerOverride, real_T: Tensor | None = None
) -> RoutingDecision:
    """Steps 1-6 of the module docstring on one router decision; returns the new decision.

    decision: the router's own decision (its `router_logits` [T, E] are required); real_T: BoolTensor [T], False
    for padding (which gets no assignment); default all True. Shape legend: N ranked slots (N ≤ E).
    """
    if spec.is_identity():
        return decision
    logits_TE = decision.router_logits
    if logits_TE is None or logits_TE.shape[-1] != decision.num_experts:
        raise ValueError("routing overrides need the router's logits over its experts in RoutingDecision.router_logits")
    T, E = logits_TE.shape
    device = logits_TE.device
    n_masked = 0 if spec.mask is None else int(spec.mask.sum())
    n_forced = 0 if spec.force is None else int(spec.force.sum())
    mask_E = None if spec.mask is None else spec.mask.to(device)
    force_E = None if spec.force is None else spec.force.to(device)

    # 1-2: logits → scores.
    z_TE = logits_TE
    if spec.logit_bias is not None:
        z_TE = z_TE + spec.logit_bias.to(device=device, dtype=z_TE.dtype)
    if mask_E is not None:
        z_TE = z_TE.masked_fill(mask_E, float("-inf"))
    scores_TE = rule.scores(z_TE)

    # 3: ranking (forced first, masked never) and how many each token takes.
    count = spec.k if spec.top_p is None else None  # a count shared by every token, when there is one
    if count is None and spec.top_p is None and spec.k is None:
        count = rule.k
    with torch.no_grad():
        rank_TE = scores_TE.detach() if rule.rank is None else rule.rank(scores_TE.detach())
        if force_E is not None:
            rank_TE = rank_TE.masked_fill(force_E, float("inf"))
        if mask_E is not None:
            rank_TE = rank_TE.masked_fill(mask_E, float("-inf"))
        if count is not None:
            # NOTE: a fixed count needs only the first N of the ranking; top_indices breaks ties like the stable sort.
            N = min(max(count, n_forced), E - n_masked)
            order_TN = top_indices(rank_TE, N)
            picked_TN = torch.ones(T, N, dtype=torch.bool, device=device)
        else:
            order_TN = torch.sort(rank_TE, dim=-1, descending=True, stable=True).indices
            if spec.top_p is not None:
                mass_TE = scores_TE.detach() if mask_E is None else scores_TE.detach().masked_fill(mask_E, 0.0)
                mass_TE = mass_TE / mass_TE.sum(-1, keepdim=True).clamp_min(torch.finfo(mass_TE.dtype).tiny)
                count_T = (mass_TE.gather(1, order_TN).cumsum(-1) < spec.top_p).sum(-1) + 1
                if spec.k is not None:
                    count_T = count_T.clamp_max(spec.k)
            else:
                count_T = rule.own_count(scores_TE.detach())
            count_T = count_T.clamp(min=n_forced, max=E - n_masked)
            picked_TN = torch.arange(E, device=device) < count_T[:, None]
        if rule.rank is not None or mask_E is not None:  # never an expert the ranking excludes (−inf)
            picked_TN = picked_TN & (rank_TE.gather(1, order_TN) > float("-inf"))
        if real_T is not None:
            picked_TN = picked_TN & real_T[:, None]

    # 4: the router's weighting of the selected set.
    s_TN = scores_TE.gather(1, order_TN)  # scores in ranking order; keeps the graph to the router
    tiny = torch.finfo(s_TN.dtype).tiny
    if rule.normalizes:
        w_TN = s_TN / (s_TN * picked_TN).sum(-1, keepdim=True).clamp_min(tiny) * rule.scaling
    else:
        w_TN = s_TN * rule.scaling

    # 5: drops.
    keep_TN = picked_TN
    drops = spec.min_weight_ratio is not None or spec.min_weight is not None
    if drops:
        with torch.no_grad():
            w_det_TN = w_TN.detach()
            forced_TN = force_E[order_TN] if force_E is not None else torch.zeros_like(picked_TN)
            if spec.min_weight_ratio is not None:
                top_T = w_det_TN.masked_fill(~picked_TN, float("-inf")).amax(-1, keepdim=True)
                keep_TN = keep_TN & ((w_det_TN >= spec.min_weight_ratio * top_T) | forced_TN)
            if spec.min_weight is not None:
                keep_TN = keep_TN & ((w_det_TN >= spec.min_weight) | forced_TN)

    # 6: renormalisation.
    if spec.renormalize is None and rule.normalizes and drops:
        w_TN = s_TN / (s_TN * keep_TN).sum(-1, keepdim=True).clamp_min(tiny) * rule.scaling
    elif spec.renormalize:
        mass_T = w_TN.new_zeros(T).index_add(0, decision.token_index, decision.weight.to(w_TN.dtype))
        w_TN = w_TN / (w_TN * keep_TN).sum(-1, keepdim=True).clamp_min(tiny) * mass_T[:, None]

    token_S, expert_S, weight_S = flatten_choices(order_TN, w_TN, keep_TN)
    return dataclasses.replace(
        decision, token_index=token_S, expert_index=expert_S, weight=weight_S, num_dropped=0
    )


# -- the wrapper and its handle -----------------------------------------------------------------------------------


class _OverrideHook:
    """The wrapper's body, run after the router's forward: its decision → the overridden decision."""

    def __init__(self, rule: ScoreRule, spec: LayerOverride) -> None:
        self.rule, self.spec = rule, spec

    def __call__(self, router: nn.Module, args: tuple, kwargs: dict, decision: RoutingDecision) -> RoutingDecision:
        ctx = args[1] if len(args) > 1 else kwargs.get("ctx")
        pad_T = ctx.flat_padding_mask(decision.num_tokens) if isinstance(ctx, RoutingContext) else None
        real_T = None if pad_T is None else ~pad_T.to(decision.token_index.device)
        return redecide(decision, self.rule, self.spec, real_T)


class RoutingOverride:
    """The handle `override_routing` returns: `remove()` restores the original routing exactly; also a context
    manager (`with override_routing(model, k=1): ...`).

    layers: the overridden MoE layer indices; options: {layer index: LayerOverride}; info: what produced it (e.g.
    `calibrate_skipping`'s thresholds), empty otherwise.
    """

    def __init__(self, layers: list[int], options: dict[int, LayerOverride], hooks: list[RemovableHandle]) -> None:
        self.layers = layers
        self.options = options
        self.info: dict[str, Any] = {}
        self._hooks = hooks

    @property
    def active(self) -> bool:
        return bool(self._hooks)

    def remove(self) -> None:
        """Take the wrappers off (idempotent)."""
        for hook in self._hooks:
            hook.remove()
        self._hooks = []

    def __enter__(self) -> RoutingOverride:
        return self

    def __exit__(self, *exc: object) -> None:
        self.remove()

    def __repr__(self) -> str:
        state = "active" if self.active else "removed"
        return f"RoutingOverride(layers={self.layers}, {state})"


def _has_override(router: nn.Module) -> bool:
    return any(isinstance(h, _OverrideHook) for h in router._forward_hooks.values())


def override_routing(
    model: nn.Module,
    *,
    layers: Iterable[int] | None = None,
    k: int | Mapping[int, int] | None = None,
    top_p: float | Mapping[int, float] | None = None,
    min_weight_ratio: float | Mapping[int, float] | None = None,
    min_weight: float | Mapping[int, float] | None = None,
    mask: Any = None,
    force: Any = None,
    logit_bias: Any = None,
    renormalize: bool | None = None,
) -> RoutingOverride:
    """Change the routing of every MoE layer of `model` (or those in `layers`) until `handle.remove()`.

    Each option is one value for every chosen layer, or a dict {layer index: value} for some of them:
        k:                 int in [1, E], top-k over the router's own scores
        top_p:             float in (0, 1], the shortest prefix (by score) whose normalised mass reaches p
        min_weight_ratio:  β in [0, 1], drop an assignment whose weight is below β × the token's largest (NAEE)
        min_weight:        τ ≥ 0, drop an assignment whose weight is below τ (MoDES; see `calibrate_skipping`)
        mask:              experts never chosen: a list of expert ids or a BoolTensor [E]
        force:             experts always chosen: a list of expert ids or a BoolTensor [E]
        logit_bias:        Tensor [E] (or a list of E numbers) added to the router's logits (a steering vector)
        renormalize:       None (as the router does), True (kept weights sum to the original mass) or False
    Layer indices count MoE layers in module order (`moe_layers(model)`). Everything is validated before any layer is
    wrapped; a layer already under an override is refused (remove that one first).
    """
    all_layers = moe_layers(model)
    n = len(all_layers)
    if layers is None:
        chosen = list(range(n))
    else:
        if isinstance(layers, (int, str)) or not isinstance(layers, Iterable):
            raise ValueError(f"layers must be a list of MoE layer indices in [0, {n}), got {layers!r}")
        chosen = list(layers)
        for i in chosen:
            if not isinstance(i, int) or isinstance(i, bool) or not 0 <= i < n:
                raise ValueError(f"layers must hold MoE layer indices in [0, {n}) (the model has {n}), got {i!r}")
        if len(set(chosen)) != len(chosen):
            raise ValueError(f"layers lists an index twice: {chosen}")
    if renormalize is not None and not isinstance(renormalize, bool):
        raise ValueError(f"renormalize must be one of None, True, False; got {renormalize!r}")

    options: dict[int, LayerOverride] = {}
    rules: dict[int, ScoreRule] = {}
    for i in chosen:
        layer = all_layers[i]
        E = layer.router.num_experts
        spec = LayerOverride(
            num_experts=E,
            k=_value("k", k, i, chosen, lambda v, name: _check_k(name, v, E)),
            top_p=_value("top_p", top_p, i, chosen, _check_top_p),
            min_weight_ratio=_value("min_weight_ratio", min_weight_ratio, i, chosen, _check_ratio),
            min_weight=_value("min_weight", min_weight, i, chosen, _check_min_weight),
            mask=_value("mask", mask, i, chosen, lambda v, name: _expert_set(name, v, E), plain_types=(Tensor,)),
            force=_value("force", force, i, chosen, lambda v, name: _expert_set(name, v, E), plain_types=(Tensor,)),
            logit_bias=_value("logit_bias", logit_bias, i, chosen, lambda v, name: _bias(name, v, E),
                              plain_types=(Tensor,)),
            renormalize=renormalize,
        )
        if spec.mask is not None:
            if bool(spec.mask.all()):
                raise ValueError(f"mask for layer {i} masks all {E} experts; at least one must stay")
            if spec.force is not None and bool((spec.mask & spec.force).any()):
                both = torch.nonzero(spec.mask & spec.force).flatten().tolist()
                raise ValueError(f"mask and force both name expert(s) {both} in layer {i}")
        if not spec.is_identity():
            rules[i] = score_rule(layer.router, where=f"layer {i}'s router")
            if _has_override(layer.router):
                raise ValueError(f"layer {i} already has a routing override; remove it (handle.remove()) first")
        options[i] = spec

    hooks = [
        all_layers[i].router.register_forward_hook(_OverrideHook(rules[i], options[i]), with_kwargs=True)
        for i in chosen
        if i in rules
    ]
    return RoutingOverride(chosen, options, hooks)


# -- validation -------------------------------------------------------------------------------------------------


def _value(
    name: str,
    value: Any,
    layer: int,
    chosen: list[int],
    check: Callable[[Any, str], Any],
    plain_types: tuple[type, ...] = (),
) -> Any:
    """The option's value for `layer` (validated), from one value for all layers or a {layer: value} dict."""
    if value is None:
        return None
    if isinstance(value, Mapping) and not isinstance(value, plain_types):
        for key in value:
            if key not in chosen:
                raise ValueError(
                    f"{name} names layer {key!r}, which is not among the overridden MoE layers {chosen}"
                )
        if layer not in value or value[layer] is None:
            return None
        return check(value[layer], f"{name}[{layer}]")
    return check(value, name)


def _check_k(name: str, value: Any, E: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= E:
        raise ValueError(f"{name} must be an integer in [1, num_experts={E}], got {value!r}")
    return value


def _check_top_p(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 < value <= 1
    if not ok:
        raise ValueError(f"{name} must be a number in (0, 1], got {value!r}")
    return float(value)


def _check_ratio(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and 0 <= value <= 1
    if not ok:
        raise ValueError(f"{name} must be a number in [0, 1], got {value!r}")
    return float(value)


def _check_min_weight(value: Any, name: str) -> float:
    ok = isinstance(value, (int, float)) and not isinstance(value, bool) and not math.isnan(value) and value >= 0
    if not ok:
        raise ValueError(f"{name} must be a number >= 0 (inf drops every assignment), got {value!r}")
    return float(value)


def _expert_set(name: str, value: Any, E: int) -> Tensor:
    """BoolTensor [E] from a bool tensor [E] or a list of expert ids in [0, E)."""
    if isinstance(value, Tensor) and value.dtype == torch.bool:
        if value.shape != (E,):
            raise ValueError(f"{name} as a bool tensor must have shape [num_experts={E}], got {tuple(value.shape)}")
        return value.detach().clone()
    ids = value.tolist() if isinstance(value, Tensor) else value
    if isinstance(ids, (int, str)) or not isinstance(ids, Iterable):
        raise ValueError(f"{name} must be a list of expert ids in [0, {E}) or a bool tensor [{E}], got {value!r}")
    ids = list(ids)
    for e in ids:
        if not isinstance(e, int) or isinstance(e, bool) or not 0 <= e < E:
            raise ValueError(f"{name} must hold expert ids in [0, num_experts={E}), got {e!r}")
    out = torch.zeros(E, dtype=torch.bool)
    out[ids] = True
    return out


def _bias(name: str, value: Any, E: int) -> Tensor:
    try:
        bias = value.detach().clone() if isinstance(value, Tensor) else torch.tensor(value, dtype=torch.float64)
    except (TypeError, ValueError, RuntimeError):
        raise ValueError(f"{name} must be a tensor of {E} numbers (one per expert), got {value!r}") from None
    if not bias.is_floating_point():
        bias = bias.double()
    if bias.shape != (E,):
        raise ValueError(f"{name} must have shape [num_experts={E}], got {tuple(bias.shape)}")
    if not bool(torch.isfinite(bias).all()):
        raise ValueError(f"{name} must be finite (use mask to exclude an expert)")
    return bias
