"""Working with a trained MoE model's routing: inference-time overrides, skipping calibration, expert pruning and
merging, routing analysis (with local routing consistency, SRP/SCH) and quality-compute sweeps.

Submodules import nothing heavy; `routelab.inference` is imported explicitly, never by `import routelab`.
"""

from routelab.inference.analysis import analyze, write_analysis
from routelab.inference.calibrate import calibrate_skipping
from routelab.inference.consistency import sch, srp, usage_from_decision, usage_from_indices
from routelab.inference.merge import merge_experts
from routelab.inference.override import LayerOverride, RoutingOverride, moe_layers, override_routing
from routelab.inference.prune import prune_experts
from routelab.inference.sweep import evaluate_routing, sweep, write_sweep

__all__ = [
    "LayerOverride",
    "RoutingOverride",
    "analyze",
    "calibrate_skipping",
    "evaluate_routing",
    "merge_experts",
    "moe_layers",
    "override_routing",
    "prune_experts",
    "sch",
    "srp",
    "sweep",
    "usage_from_decision",
    "usage_from_indices",
    "write_analysis",
    "write_sweep",
]
