"""Serving: the engine (a request queue, continuous batching, checkpoints, thinking budgets), usable
from Python without FastAPI, and the HTTP layer in :mod:`phiflash_mlx.serving.http` (needs the
``server`` extra)."""

from .checkpoints import CheckpointStore, copy_cache, message_cuts
from .engine import Engine, Job, QueueFull, Request, ShuttingDown, default_max_batch
from .thinking import ThinkingBudget, close_ids

__all__ = ["CheckpointStore", "Engine", "Job", "QueueFull", "Request", "ShuttingDown", "ThinkingBudget",
           "close_ids", "copy_cache", "default_max_batch", "message_cuts"]
