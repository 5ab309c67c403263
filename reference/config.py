"""Configuration of a ``phi4flash`` checkpoint and the layer schedule it implies.

Implements SAMBAY.md section 1 (config fields, defaults, "auto" dt rank) and section 2 (layer schedule).
"""

from __future__ import annotations

import json
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
        n, nh, nkv, hs = self.num_hidden_layers, self.num_attention_heads, self.num_key_value_heads, self.hidden_size
        problems = []
        if self.mb_per_layer != 2:
            problems.append(f"mb_per_layer is {self.mb_per_layer}; phi4flash requires 2")
        if n < 4 or n % 4:
            problems.append(f"num_hidden_layers is {n}; it must be a multiple of 4 (at least 4)")
        if nh % 2 or nkv % 2:
            problems.append(f"num_attention_heads ({nh}) and num_key_value_heads ({nkv}) must both be even")
        if nkv == 0 or nh % nkv:
            problems.append(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
        if nh == 0 or hs % nh:
            problems.append(f"hidden_size ({hs}) must be a multiple of num_attention_heads ({nh})")
        if self.sliding_window < 1:
            problems.append(f"sliding_window is {self.sliding_window}; it must be at least 1")
        if problems:
            raise CheckpointError("invalid phi4flash config: " + "; ".join(problems))


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


def _window_from(raw: dict, num_layers: int) -> int:
    """`sliding_window` as a scalar, a per-layer list, or with `layer_types` (SAMBAY.md 1.6)."""
    sw = raw.get("sliding_window")
    if isinstance(sw, list):
        values = {int(v) for v in sw if v is not None}
        if len(values) != 1:
            raise CheckpointError(
                f"config.json: sliding_window list must hold one window size (besides nulls), got {sorted(values)}")
        sw = values.pop()
    if sw is None:
        raise CheckpointError("config.json: sliding_window is missing; phi4flash needs it (512 in the released model)")
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if len(layer_types) != num_layers:
            raise CheckpointError(
                f"config.json: layer_types has {len(layer_types)} entries for {num_layers} layers")
        kinds = layer_schedule(num_layers, raw.get("mb_per_layer", 2))
        for i, (kind, given) in enumerate(zip(kinds, layer_types)):
            if kind in ATTENTION_KINDS and (given == "sliding_attention") != (kind == SWA):
                raise CheckpointError(
                    f"config.json: layer_types[{i}] is {given!r}, but the phi4flash schedule makes layer {i} "
                    f"{'sliding-window' if kind == SWA else 'full'} attention")
    return int(sw)


def config_from_dict(raw: dict) -> Config:
    model_type = raw.get("model_type")
    if model_type != "phi4flash":
        raise CheckpointError(
            f"config.json has model_type {model_type!r}, not 'phi4flash': this is not a "
            "Phi-4-mini-flash-reasoning (SambaY) checkpoint")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"config.json lacks {', '.join(missing)}")
    num_layers = int(raw["num_hidden_layers"])
    cfg = Config(
        vocab_size=int(raw["vocab_size"]),
        hidden_size=int(raw["hidden_size"]),
        intermediate_size=int(raw["intermediate_size"]),
        num_hidden_layers=num_layers,
        num_attention_heads=int(raw["num_attention_heads"]),
        num_key_value_heads=int(raw["num_key_value_heads"]),
        sliding_window=_window_from(raw, num_layers),
        layer_norm_eps=float(raw.get("layer_norm_eps", 1e-5)),
        mamba_d_state=int(raw.get("mamba_d_state", 16)),
        mamba_d_conv=int(raw.get("mamba_d_conv", 4)),
        mamba_expand=int(raw.get("mamba_expand", 2)),
        mb_per_layer=int(raw.get("mb_per_layer", 2)),
        tie_word_embeddings=bool(raw.get("tie_word_embeddings", True)),
        extra=raw,
    )
    cfg.validate()
    return cfg


def load_config(path: str) -> Config:
    """Read ``config.json`` from a checkpoint directory (or the file itself)."""
    return config_from_dict(read_config_json(path))


def read_config_json(path: str) -> dict:
    """The raw ``config.json`` of a checkpoint directory (or the file itself), unchecked."""
    file = os.path.join(path, "config.json") if os.path.isdir(path) else path
    if not os.path.exists(file):
        raise CheckpointError(
            f"no config.json at {file}: point at a Hugging Face Phi4Flash checkpoint directory "
            "(config.json + *.safetensors)")
    try:
        with open(file, encoding="utf-8") as f:
            raw = json.load(f)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot read {file}: {exc}") from None
    return raw
