"""Build configuration beyond pyproject.toml: two small C libraries for Linux CPUs.

* ``phiflash_mlx/cpu/_blas_shim*.so`` lets MLX's CPU back-end use numpy's OpenBLAS
  (see ``phiflash_mlx/cpu/blas.py``).
* ``phiflash_mlx/cpu/_cpu_kernels*.so`` is the multi-threaded quantized matrix-vector
  kernel that quantized models decode with on CPUs (see ``phiflash_mlx/cpu/kernels.py``).

Both are compiled by ``pip install .`` and ``pip install -e .``. Neither is a
Python extension module (they are loaded with ctypes) and neither needs headers
beyond libc's. If one cannot be compiled the install still succeeds and MLX's own
routines are used instead. Nothing is compiled on other platforms.
"""

import sys

from setuptools import Extension, setup

ext_modules = []
if sys.platform.startswith("linux"):
    ext_modules.append(
        Extension(
            "phiflash_mlx.cpu._blas_shim",
            sources=["phiflash_mlx/cpu/csrc/blas_shim.c"],
            libraries=["dl"],
            extra_compile_args=["-O2", "-fvisibility=hidden"],
            optional=True,
        )
    )
    ext_modules.append(
        Extension(
            "phiflash_mlx.cpu._cpu_kernels",
            sources=["phiflash_mlx/cpu/csrc/cpu_kernels.c"],
            depends=["phiflash_mlx/cpu/csrc/q8.c", "phiflash_mlx/cpu/csrc/q8_gemm.c", "phiflash_mlx/cpu/csrc/fused.c", "phiflash_mlx/cpu/csrc/attn_prefill.c", "phiflash_mlx/cpu/csrc/attn_decode.c"],
            libraries=["pthread", "m"],
            extra_compile_args=["-O3", "-fvisibility=hidden"],
            optional=True,
        )
    )

setup(ext_modules=ext_modules)
