"""Old name of ``phiflash_mlx.cpu.blas`` (the same module object, so attributes set here are its)."""
import sys

from .cpu import blas as _module

sys.modules[__name__] = _module
