"""Configuration of a ``phi4flash`` checkpoint and the layer schedule it implies.

Implements SAMBAY.md section 1 (config fields, defaults, "auto" dt rank) and section 2 (layer schedule).
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field

from .errors import CheckpointError

# Layer kinds (SAMBAY.md 2.1). The names are used everywhere: in caches, in reports, in tests.
MAMBA = "mamba"          # Mamba-1 block with its own conv/SSM state          (i < N/2, i even)
SWA = "swa"              # sliding-window differential attention               (i < N/2, i odd)
MAMBA_MEM = "mamba_mem"  # Mamba-1 block whose ungated scan output is the GMU memory (i == N/2)
GLOBAL = "global"        # full-attention differential attention, K/V shared   (i == N/2 + 1)
GMU = "gmu"              # gated memory unit, reads the memory                 (i >= N/2 + 2, even)
CROSS = "cross"          # query-only differential attention over shared K/V   (i >= N/2 + 2, odd)

MAMBA_KINDS = (MAMBA, MAMBA_MEM)
ATTENTION_KINDS = (SWA, GLOBAL, CROSS)


@dataclass
class Config:
    """The quantities the forward pass reads (SAMBAY.md 1.1, 1.2). Letters as in the spec's notation."""

    vocab_size: int                # V
    hidden_size: int               # H
    intermediate_size: int         # I
    num_hidden_layers: int         # N
    num_attention_heads: int       # nh
    num_key_value_heads: int       # nkv
    sliding_window: int            # W: keys visible to a query in SWA layers, itself included
    layer_norm_eps: float = 1e-5
    mamba_d_state: int = 16        # ds
    mamba_d_conv: int = 4          # K
    mamba_expand: int = 2
    mb_per_layer: int = 2
    tie_word_embeddings: bool = True
    extra: dict = field(default_factory=dict, repr=False)

    @property
    def head_dim(self) -> int:           # hd = H / nh (there is no head_dim field)
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:            # Di = expand * H
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        # SAMBAY.md 1.2 quirk: the original always uses ceil(H/16), whatever the config says.
        return math.ceil(self.hidden_size / 16)

    @property
    def layer_kinds(self) -> list[str]:
        return layer_schedule(self.num_hidden_layers, self.mb_per_layer)

    def lambda_init(self, layer_idx: int) -> float:
        """SAMBAY.md 4.8: depends on the absolute 0-based layer index."""
        return 0.8 - 0.6 * math.exp(-0.3 * layer_idx)

    def validate(self) -> None:
        """The one validator (reference/validate.py) applied to these values."""
        from dataclasses import fields

        from .validate import validate_config
        raw = {f.name: getattr(self, f.name) for f in fields(self) if f.name != "extra"}
        validate_config(dict(raw, model_type="phi4flash"))


def layer_schedule(num_layers: int, mb_per_layer: int = 2) -> list[str]:
    """The kind of every layer (SAMBAY.md 2.1, `SambaYDecoderLayer.__init__`)."""
    h = num_layers // 2
    kinds = []
    for i in range(num_layers):
        use_mamba = mb_per_layer > 0 and i % mb_per_layer == 0
        if i < h:
            kinds.append(MAMBA if use_mamba else SWA)
        elif i == h:
            kinds.append(MAMBA_MEM)
        elif i == h + 1:
            kinds.append(GLOBAL)
        else:
            kinds.append(GMU if use_mamba else CROSS)
    return kinds


def config_from_dict(raw: dict) -> Config:
    """A checked Config of a raw config dict (types, ranges, schedule: see reference/validate.py)."""
    from .validate import validate_config
    return validate_config(raw)


def load_config(path: str) -> Config:
    """Read and check ``config.json`` of a checkpoint directory (or the file itself)."""
    from .validate import validate_config
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    return validate_config(read_config_json(path), source=file)


def read_config_json(path: str) -> dict:
    """The raw ``config.json`` of a checkpoint directory (or the file itself), read with a size bound
    (a symlink to /dev/zero or a FIFO is refused, not read); its fields are not checked here."""
    from .validate import read_json_file
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.lexists(file):
        raise CheckpointError(
            f"no config.json at {file}: point at a Hugging Face Phi4Flash checkpoint directory "
            "(config.json + *.safetensors)")
    return read_json_file(file, what="config.json")
