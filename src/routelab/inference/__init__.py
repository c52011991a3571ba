"""Working with a trained MoE model's routing: inference-time overrides, skipping calibration, expert pruning and
merging, routing analysis (with local routing consistency, SRP/SCH), quality-compute sweeps, routing traces, cache
simulation, offloaded execution and expert-aware batching.

Submodules import nothing heavy; `routelab.inference` is imported explicitly, never by `import routelab`.
"""

from routelab.inference.analysis import analyze, write_analysis
from routelab.inference.batching import BatchPlan, request_experts, schedule_batches
from routelab.inference.cache import CacheResult, CapacityError, plot_hit_rates, simulate_cache, sweep_cache
from routelab.inference.calibrate import calibrate_skipping
from routelab.inference.consistency import sch, srp, usage_from_decision, usage_from_indices
from routelab.inference.merge import merge_experts
from routelab.inference.offload import OffloadExecutor, StoreError, offload_experts
from routelab.inference.override import LayerOverride, RoutingOverride, moe_layers, override_routing
from routelab.inference.prune import prune_experts
from routelab.inference.sweep import evaluate_routing, sweep, write_sweep
from routelab.inference.trace import RoutingTrace, TraceError, TraceRecorder, load_trace, record_trace, save_trace

__all__ = [
    "BatchPlan",
    "CacheResult",
    "CapacityError",
    "LayerOverride",
    "OffloadExecutor",
    "RoutingOverride",
    "RoutingTrace",
    "StoreError",
    "TraceError",
    "TraceRecorder",
    "analyze",
    "calibrate_skipping",
    "evaluate_routing",
    "load_trace",
    "merge_experts",
    "moe_layers",
    "offload_experts",
    "override_routing",
    "plot_hit_rates",
    "prune_experts",
    "record_trace",
    "request_experts",
    "save_trace",
    "sch",
    "schedule_batches",
    "simulate_cache",
    "srp",
    "sweep",
    "sweep_cache",
    "usage_from_decision",
    "usage_from_indices",
    "write_analysis",
    "write_sweep",
]
