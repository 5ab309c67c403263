"""Sub-commands of ``phiflash``.

Each module in ``COMMANDS`` defines ``register(subparsers)``, which adds its parser and sets
``func=run`` on it; ``run(args)`` returns the process exit status.
"""

COMMANDS = [
    "chat",
    "generate",
    "convert",
    "quality",
    "golden",
    "verify",
    "info",
    "eval_demo",
    "serve",
]
