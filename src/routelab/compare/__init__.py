"""`routelab compare`: train router variants of one model under one budget and report them side by side."""

from routelab.compare.config import PRESETS, ConfigError, load_preset, resolve, validate
from routelab.compare.runner import load_data, run_compare

__all__ = ["PRESETS", "ConfigError", "load_data", "load_preset", "resolve", "run_compare", "validate"]
