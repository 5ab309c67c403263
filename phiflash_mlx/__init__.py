"""phiflash-mlx: Phi-4-mini-flash-reasoning (SambaY) on MLX.

On Linux the fast-BLAS route must be set up *before* ``mlx.core`` is first
imported, so it is the first thing this package does. The public names are
imported on first use, so ``import phiflash_mlx.cli`` does not load MLX yet:
the command line imports it inside its error handling (a Ctrl-C during that
import exits quietly).
"""

import importlib
import sys
import types

from .cpu import blas as _blas

_blas.enable()

__version__ = "0.1.0"

_PUBLIC = {
    "PhiflashError": ".errors",
    "load": ".loader",
    "ChatSession": ".generate",
    "GenerationResponse": ".generate",
    "generate": ".generate",
    "stream_generate": ".generate",
}
__all__ = ["__version__", *_PUBLIC]


def __getattr__(name):
    if name in _PUBLIC:
        value = getattr(importlib.import_module(_PUBLIC[name], __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__():
    return sorted(set(globals()) | set(_PUBLIC))


class _Package(types.ModuleType):
    """Keeps `phiflash_mlx.generate` the function: importing the submodule of the same name would
    otherwise put the module there (with eager imports the later `from .generate import generate`
    undid that; lazily nothing would)."""

    def __setattr__(self, name, value):
        if name in _PUBLIC and isinstance(value, types.ModuleType):
            return
        super().__setattr__(name, value)


sys.modules[__name__].__class__ = _Package
