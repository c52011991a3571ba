"""Dispatchers move token rows to experts and expert outputs back (no state between the two).

`LocalDispatcher` (every expert in this process, the default) lives here; the all-to-all dispatcher of expert
parallelism is `routelab.distributed.AllToAllDispatcher`.
"""

from routelab.dispatch.base import Dispatcher
from routelab.dispatch.local import LocalDispatcher
from routelab.dispatch.permute import DispatchPlan, combine, make_plan, permute

__all__ = ["DispatchPlan", "Dispatcher", "LocalDispatcher", "combine", "make_plan", "permute"]
