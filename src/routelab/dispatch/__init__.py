"""Permute token rows into expert order and combine expert outputs back (no state between the two)."""

from routelab.dispatch.permute import DispatchPlan, combine, make_plan, permute

__all__ = ["DispatchPlan", "combine", "make_plan", "permute"]
