"""The OpenAI-compatible server; kept for imports written against the first layout.

The engine (queue, continuous batching, checkpoints) lives in :mod:`phiflash_mlx.serving.engine`
and the HTTP layer in :mod:`phiflash_mlx.serving.http`.
"""

from .serving.engine import Engine, Job, Request  # noqa: F401
from .serving.http import APIError, create_app, serve  # noqa: F401

__all__ = ["Engine", "Job", "Request", "APIError", "create_app", "serve"]
