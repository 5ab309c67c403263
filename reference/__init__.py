"""NumPy reference implementation of Phi-4-mini-flash-reasoning (SambaY, `phi4flash`).

Plain, readable, float32 (with an optional bf16-emulation mode). It is the oracle the MLX code is
tested against, and a tool for checking any other port. It imports only numpy and the standard
library. Every function cites the section of the specification (SAMBAY.md) it implements.
"""

from .config import (ATTENTION_KINDS, CROSS, GLOBAL, GMU, MAMBA, MAMBA_KINDS, MAMBA_MEM, SWA, Config,
                     config_from_dict, layer_schedule, load_config, read_config_json)
from .checkpoint import expected_tensors
from .errors import CheckpointError
from .model import Cache, Model, check_weights, load
from .weights import WeightStore, bf16_bits_to_float32, open_checkpoint, round_to_bf16, write_safetensors

__all__ = [
    "ATTENTION_KINDS", "CROSS", "GLOBAL", "GMU", "MAMBA", "MAMBA_KINDS", "MAMBA_MEM", "SWA",
    "Cache", "CheckpointError", "Config", "Model", "WeightStore", "bf16_bits_to_float32", "check_weights",
    "config_from_dict", "expected_tensors", "layer_schedule", "load", "load_config", "open_checkpoint",
    "read_config_json",
    "round_to_bf16", "write_safetensors",
]
