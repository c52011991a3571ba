"""`add_lora_experts`: wrap a model's linear layers in routed-LoRA linears (PEFT-style `target_modules`)."""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from torch import nn

from routelab._checks import check_bool, check_choice
from routelab.adapters.flylora import FlyLoRA
from routelab.adapters.hydra import HydraLoRA
from routelab.adapters.linear import LoRAExperts, RoutedLoRALinear, capture_token_ids, routed_lora_layers
from routelab.adapters.lora import PlainLoRA
from routelab.adapters.mhr import MHRLoRA
from routelab.adapters.molora import MoLoRA
from routelab.adapters.remix import ReMixLoRA
from routelab.adapters.smora import SMoRA
from routelab.routing.base import Router

METHODS: dict[str, type[LoRAExperts]] = {
    "lora": PlainLoRA,
    "molora": MoLoRA,
    "hydra": HydraLoRA,
    "smora": SMoRA,
    "flylora": FlyLoRA,
    "remix": ReMixLoRA,
    "mhr": MHRLoRA,
}
# Method options beyond the shared ones, per method (the `method_options` keys each accepts).
METHOD_OPTIONS: dict[str, tuple[str, ...]] = {"flylora": ("k", "sparsity", "bias_update_rate"), "mhr": ("n_splits",)}


@dataclass(frozen=True)
class AdapterSpec:
    """Everything that builds one method's adapter on any linear; saved as JSON beside the adapter weights."""

    method: str = "molora"
    num_experts: int = 8
    r: int = 8
    alpha: float = 16
    dropout: float = 0.0
    router: str = "topk"
    router_options: dict[str, Any] = field(default_factory=dict)
    execution: str = "auto"
    method_options: dict[str, Any] = field(default_factory=dict)

    def build(self, in_features: int, out_features: int) -> LoRAExperts:
        check_choice("method", self.method, tuple(METHODS))
        if not isinstance(self.method_options, dict):
            raise ValueError(f"method_options must be a mapping, got {self.method_options!r}")
        valid = METHOD_OPTIONS.get(self.method, ())
        unknown = sorted(set(self.method_options) - set(valid))
        if unknown:
            raise ValueError(f"method {self.method!r} has no method option(s) {', '.join(unknown)}; valid: "
                             f"{', '.join(valid) or 'none'}")
        return METHODS[self.method](
            in_features, out_features, num_experts=self.num_experts, r=self.r, alpha=self.alpha,
            dropout=self.dropout, router=self.router, router_options=dict(self.router_options),
            execution=self.execution, **self.method_options)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def add_lora_experts(
    model: nn.Module,
    *,
    target_modules: Sequence[str] | str,
    method: str = "molora",
    num_experts: int = 8,
    r: int = 8,
    alpha: float = 16,
    router: str = "topk",
    router_options: dict[str, Any] | None = None,
    dropout: float = 0.0,
    execution: str = "auto",
    method_options: dict[str, Any] | None = None,
    verbose: bool = True,
) -> nn.Module:
    """Wrap every `nn.Linear` of `model` whose qualified name matches `target_modules` in a `RoutedLoRALinear`
    (in place; returns `model`). Every parameter of the model is frozen; only the adapters train.

    target_modules: PEFT's convention — a list of names, each matching a module whose qualified name equals it or
        ends with "." + it (e.g. ["q_proj", "v_proj"]), or a string, a regex the whole qualified name must match.
        Linear layers inside a routelab Router (its gate) are never wrapped.
    method: one of METHODS — "molora", "hydra", "smora", "flylora", "remix", "mhr", or "lora" (unrouted baseline).
    num_experts, r, alpha: E LoRA experts of rank r each, scaled by alpha/r (smora and flylora: r·E rank-1 experts).
    router, router_options: any registered token router (`routelab.list_routers()`), built per layer with
        d_model = in_features; a method fills in defaults where the user gives none (see each method's docstring).
    execution: "auto", "stacked" or "grouped" (see routelab.adapters.linear).
    method_options: flylora {k, sparsity, bias_update_rate}; mhr {n_splits}.
    verbose: print the trainable-parameter count.
    """
    check_bool("verbose", verbose)
    spec = AdapterSpec(method=method, num_experts=num_experts, r=r, alpha=alpha, dropout=dropout, router=router,
                       router_options=dict(router_options or {}), execution=execution,
                       method_options=dict(method_options or {}))
    names = matching_linears(model, target_modules)
    wrap_layers(model, names, spec)
    if verbose:
        print(trainable_summary(model, method=method, layers=len(names)))
    return model


def matching_linears(model: nn.Module, target_modules: Sequence[str] | str) -> list[str]:
    """Qualified names of the `nn.Linear` modules that `target_modules` selects; a clear error when none, when the
    model is already wrapped, or when a target names a module that is not an nn.Linear."""
    existing = routed_lora_layers(model)
    if existing:
        raise ValueError(f"the model already has routed LoRA experts on {len(existing)} linear layer(s) (e.g. "
                         f"{next(iter(existing))!r}); wrapping twice is not supported: start from the base model, "
                         "or use load_adapters to replace the adapters' weights")
    if isinstance(target_modules, str):
        try:
            pattern = re.compile(target_modules)
        except re.error as exc:
            raise ValueError(f"target_modules={target_modules!r} is not a valid regex: {exc}") from None
        matches = lambda name: pattern.fullmatch(name) is not None
    elif isinstance(target_modules, (list, tuple, set)) and target_modules and all(
            isinstance(t, str) and t for t in target_modules):
        keys = list(target_modules)
        matches = lambda name: any(name == t or name.endswith("." + t) for t in keys)
    else:
        raise ValueError("target_modules must be a non-empty list of module names (suffixes) or a regex string, "
                         f"got {target_modules!r}")
    inside_router = {name for name, m in model.named_modules() if isinstance(m, Router)}
    names, not_linear = [], []
    for name, module in model.named_modules():
        if not name or not matches(name) or any(name.startswith(r + ".") for r in inside_router):
            continue
        if isinstance(module, nn.Linear):
            names.append(name)
        else:
            not_linear.append(f"{name} ({type(module).__name__})")
    if not_linear:
        raise ValueError(f"target_modules={target_modules!r} matches module(s) that are not nn.Linear: "
                         f"{', '.join(not_linear[:5])}; name the linear layers inside them instead")
    if not names:
        linears = [n for n, m in model.named_modules() if isinstance(m, nn.Linear)]
        sample = ", ".join(linears[:8]) + (", ..." if len(linears) > 8 else "")
        raise ValueError(f"target_modules={target_modules!r} matches no nn.Linear in the model; its linear layers "
                         f"are: {sample or 'none'}")
    return names


def wrap_layers(model: nn.Module, names: list[str], spec: AdapterSpec) -> None:
    """Replace each named linear by a RoutedLoRALinear built from `spec`; every adapter is built (and so validated)
    before the model is touched, then every base parameter is frozen."""
    built = {}
    for name in names:
        linear = model.get_submodule(name)
        built[name] = spec.build(linear.in_features, linear.out_features).to(
            device=linear.weight.device, dtype=linear.weight.dtype)
    for p in model.parameters():
        p.requires_grad_(False)
    for name, adapter in built.items():
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        setattr(parent, child, RoutedLoRALinear(getattr(parent, child), adapter, spec))
    model.register_forward_pre_hook(capture_token_ids, with_kwargs=True)


def count_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts; a parameter shared by several modules counts once."""
    seen = {id(p): p for p in model.parameters()}
    trainable = sum(p.numel() for p in seen.values() if p.requires_grad)
    return trainable, sum(p.numel() for p in seen.values())


def trainable_summary(model: nn.Module, *, method: str, layers: int) -> str:
    trainable, total = count_parameters(model)
    return (f"routelab adapters: {method} on {layers} linear layer(s); trainable params: {trainable:,} || "
            f"all params: {total:,} || trainable%: {100.0 * trainable / max(1, total):.4f}")
