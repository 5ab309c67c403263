"""Old name of ``phiflash_mlx.cpu.kernels`` (the same module object, so attributes set here are its)."""
import sys

from .cpu import kernels as _module

sys.modules[__name__] = _module
