"""Models built from routelab layers: a small decoder-only MoE language model (with a decode cache), DynaMoE k
schedules. Model folders: `routelab.models.io`; generation: `routelab.models.decoding`."""

from routelab.models.schedules import SHAPES as K_SCHEDULE_SHAPES
from routelab.models.schedules import k_schedule
from routelab.models.kv_cache import DecodeCache
from routelab.models.transformer import ModelConfig, MoETransformerLM

__all__ = ["DecodeCache", "K_SCHEDULE_SHAPES", "ModelConfig", "MoETransformerLM", "k_schedule"]
