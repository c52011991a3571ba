"""Deterministic training of routelab models: AdamW, warm-up + cosine, clipping, evaluation, atomic checkpoints."""

from routelab.train.checkpoint import CheckpointError, has_checkpoint, load_checkpoint, save_checkpoint
from routelab.train.loop import TrainConfig, TrainResult, evaluate, lr_at, make_optimizer, steady_tokens_per_second, train

__all__ = [
    "CheckpointError",
    "TrainConfig",
    "TrainResult",
    "evaluate",
    "has_checkpoint",
    "load_checkpoint",
    "lr_at",
    "make_optimizer",
    "save_checkpoint",
    "steady_tokens_per_second",
    "train",
]
