"""Inference-side tools that read routed models: routing traces, cache simulation, offloaded execution, batching."""

from routelab.inference.trace import RoutingTrace, TraceError, TraceRecorder, load_trace, record_trace, save_trace

__all__ = [
    "RoutingTrace",
    "TraceError",
    "TraceRecorder",
    "load_trace",
    "record_trace",
    "save_trace",
]
