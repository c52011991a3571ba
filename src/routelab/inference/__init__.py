"""Working with a trained MoE model's routing: inference-time overrides, skipping calibration, expert pruning and
merging, routing analysis (with local routing consistency, SRP/SCH) and quality-compute sweeps.

Submodules import nothing heavy; `routelab.inference` is imported explicitly, never by `import routelab`.
"""

from routelab.inference.override import LayerOverride, RoutingOverride, moe_layers, override_routing

__all__ = [
    "LayerOverride",
    "RoutingOverride",
    "moe_layers",
    "override_routing",
]
