"""Build configuration beyond pyproject.toml: the Linux BLAS shim.

On Linux the package carries a tiny C library, ``phiflash_mlx/_blas_shim*.so``,
that lets MLX's CPU back-end use numpy's OpenBLAS (see ``phiflash_mlx/_blas.py``).
It is compiled by ``pip install .`` and ``pip install -e .``. It is not a Python
extension module (it is loaded with ctypes), it needs no BLAS headers, and if it
cannot be compiled the install still succeeds and MLX keeps its own BLAS.
Nothing is compiled on other platforms.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "phiflash_mlx._blas_shim",
            sources=["phiflash_mlx/csrc/blas_shim.c"],
            libraries=["dl"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
