"""Building the registered token router of a routed-LoRA method, with method defaults under the user's options."""

from __future__ import annotations

from typing import Any

from routelab.routing.base import Router
from routelab.routing.registry import create_router, router_options


def build_router(name: str, *, d_model: int, num_experts: int, options: dict[str, Any] | None,
                 defaults: dict[str, Any] | None = None) -> tuple[Router, dict[str, Any]]:
    """(router, effective options): `create_router(name, d_model=in_features, num_experts=...)` with the method's
    `defaults` filled in where the router has that option and the user gave none."""
    if options is not None and not isinstance(options, dict):
        raise ValueError(f"router_options must be a mapping of option names to values, got {options!r}")
    effective = dict(options or {})
    valid = router_options(name)  # unknown router name → ValueError listing the valid ones
    for key, value in (defaults or {}).items():
        if key in valid and key not in effective:
            effective[key] = value
    return create_router(name, d_model=d_model, num_experts=num_experts, **effective), effective
