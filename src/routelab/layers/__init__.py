"""Routed layers."""

from routelab.layers.moe import MoELayer, total_aux_loss

__all__ = ["MoELayer", "total_aux_loss"]
