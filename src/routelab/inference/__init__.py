"""Inference-side tools that read routed models: routing traces, cache simulation, offloaded execution, batching."""

from routelab.inference.batching import BatchPlan, request_experts, schedule_batches
from routelab.inference.cache import CacheResult, CapacityError, plot_hit_rates, simulate_cache, sweep_cache
from routelab.inference.offload import OffloadExecutor, StoreError, offload_experts
from routelab.inference.trace import RoutingTrace, TraceError, TraceRecorder, load_trace, record_trace, save_trace

__all__ = [
    "BatchPlan",
    "CacheResult",
    "CapacityError",
    "OffloadExecutor",
    "RoutingTrace",
    "StoreError",
    "TraceError",
    "TraceRecorder",
    "load_trace",
    "offload_experts",
    "plot_hit_rates",
    "record_trace",
    "request_experts",
    "save_trace",
    "schedule_batches",
    "simulate_cache",
    "sweep_cache",
]
