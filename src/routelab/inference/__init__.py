"""Working with a trained MoE model's routing: inference-time overrides, skipping calibration, expert pruning and
merging, routing analysis (with local routing consistency, SRP/SCH) and quality-compute sweeps.

Submodules import nothing heavy; `routelab.inference` is imported explicitly, never by `import routelab`.
"""

from routelab.inference.calibrate import calibrate_skipping
from routelab.inference.consistency import sch, srp, usage_from_decision, usage_from_indices
from routelab.inference.merge import merge_experts
from routelab.inference.override import LayerOverride, RoutingOverride, moe_layers, override_routing
from routelab.inference.prune import prune_experts

__all__ = [
    "LayerOverride",
    "RoutingOverride",
    "calibrate_skipping",
    "merge_experts",
    "moe_layers",
    "override_routing",
    "prune_experts",
    "sch",
    "srp",
    "usage_from_decision",
    "usage_from_indices",
]
