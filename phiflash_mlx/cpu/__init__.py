"""Everything that makes MLX fast on CPUs without Metal, attached from outside the model:

* ``blas.py`` — routes MLX's float32 GEMMs to numpy's OpenBLAS on Linux (imported by
  ``phiflash_mlx/__init__.py`` before ``mlx.core``); C shim ``csrc/blas_shim.c``.
* ``kernels.py`` — the Python side of the C kernels in ``csrc/cpu_kernels.c`` (quantized products
  for decode and prefill, few-query differential attention, the Mamba decode step) and
  ``use_cpu_kernels(model)``, which the loader calls on CPUs.

The C libraries are compiled by ``setup.py`` next to these files (``_blas_shim*.so``,
``_cpu_kernels*.so``); without them everything runs on MLX's own ops. Nothing here imports
``mlx.core`` at package import time.
"""
