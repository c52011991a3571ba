"""Models built from routelab layers: a small decoder-only MoE language model and DynaMoE k schedules."""

from routelab.models.schedules import SHAPES as K_SCHEDULE_SHAPES
from routelab.models.schedules import k_schedule
from routelab.models.transformer import ModelConfig, MoETransformerLM

__all__ = ["K_SCHEDULE_SHAPES", "ModelConfig", "MoETransformerLM", "k_schedule"]
