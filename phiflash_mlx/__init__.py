"""phiflash-mlx: Phi-4-mini-flash-reasoning (SambaY) on MLX.

On Linux the fast-BLAS route must be set up *before* ``mlx.core`` is first
imported, so it is the first thing this package does.
"""

from .cpu import blas as _blas

_blas.enable()

__version__ = "0.1.0"

from .errors import PhiflashError  # noqa: E402
from .loader import load  # noqa: E402

__all__ = ["PhiflashError", "load", "__version__"]
from .generate import ChatSession, GenerationResponse, generate, stream_generate  # noqa: E402

__all__ += ["ChatSession", "GenerationResponse", "generate", "stream_generate"]
