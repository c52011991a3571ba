"""The router registry: routers are found by name.

`register_router("name")` decorates a `Router` subclass; `create_router(name, d_model=..., num_experts=...,
**options)` builds one, rejecting unknown names and options with the list of valid ones.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import Any, TypeVar

from routelab.routing.base import Router

R = TypeVar("R", bound=type[Router])

_ROUTERS: dict[str, type[Router]] = {}


def register_router(name: str) -> Callable[[R], R]:
    """Class decorator registering a router under `name`; a name may be registered once."""

    def decorate(cls: R) -> R:
        if not (isinstance(cls, type) and issubclass(cls, Router)):
            raise TypeError(f"register_router({name!r}) expects a Router subclass, got {cls!r}")
        if name in _ROUTERS and _ROUTERS[name] is not cls:
            raise ValueError(f"router name {name!r} is already registered to {_ROUTERS[name].__qualname__}")
        _ROUTERS[name] = cls
        cls.registry_name = name
        return cls

    return decorate


def list_routers() -> list[str]:
    """Registered router names, sorted."""
    return sorted(_ROUTERS)


def router_class(name: str) -> type[Router]:
    """The class registered under `name`."""
    try:
        return _ROUTERS[name]
    except KeyError:
        raise ValueError(f"unknown router {name!r}; valid names: {', '.join(list_routers())}") from None


def router_options(name: str) -> dict[str, Any]:
    """The keyword options of router `name` (beyond d_model and num_experts) with their defaults."""
    params = inspect.signature(router_class(name).__init__).parameters
    return {
        p.name: p.default
        for p in params.values()
        if p.kind is inspect.Parameter.KEYWORD_ONLY and p.name not in ("d_model", "num_experts")
    }


def create_router(name: str, *, d_model: int, num_experts: int, **options: Any) -> Router:
    """Build the router registered as `name`, e.g. `create_router("topk", d_model=512, num_experts=8, k=2)`."""
    cls = router_class(name)
    valid = router_options(name)
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ValueError(
            f"router {name!r} has no option(s) {', '.join(unknown)}; valid options: {', '.join(sorted(valid))}"
        )
    return cls(d_model=d_model, num_experts=num_experts, **options)
