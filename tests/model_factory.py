"""Random phi4flash configurations and weights, loaded into both the reference and the MLX model.

The hypothesis strategy varies every size the architecture allows, so the layer schedule, the GQA
grouping, the window and the Mamba sizes all change between examples.
"""

from __future__ import annotations

import numpy as np
from hypothesis import strategies as st

import reference


@st.composite
def configs(draw, max_layers=8):
    pairs_kv = draw(st.integers(1, 2))                     # KV heads = 2 * pairs_kv
    group = draw(st.integers(1, 3))                        # query heads per KV head
    nkv = 2 * pairs_kv
    nh = nkv * group
    head_dim = draw(st.sampled_from([2, 4, 8]))
    return {
        "model_type": "phi4flash",
        "vocab_size": draw(st.integers(8, 48)),
        "hidden_size": nh * head_dim,
        "intermediate_size": draw(st.integers(2, 24)),
        "num_hidden_layers": draw(st.sampled_from([n for n in (4, 8, 12) if n <= max_layers])),
        "num_attention_heads": nh,
        "num_key_value_heads": nkv,
        "sliding_window": draw(st.integers(1, 9)),
        "mamba_d_state": draw(st.integers(1, 6)),
        "mamba_d_conv": draw(st.integers(1, 4)),
        "mamba_expand": draw(st.integers(1, 2)),
        "mb_per_layer": 2,
        "layer_norm_eps": 1e-5,
        "tie_word_embeddings": True,
    }


def random_weights(config: dict, seed: int) -> dict[str, np.ndarray]:
    """float32 weights with the golden sets' scales (the same generator as `phiflash golden`)."""
    from phiflash_mlx.verify import random_weights as golden_weights
    return golden_weights(reference.config_from_dict(config), seed)


class DictStore:
    """The part of reference.WeightStore that Model uses, over an in-memory dict."""

    def __init__(self, tensors):
        self.tensors = tensors

    def __getitem__(self, name):
        return self.tensors[name]

    def __contains__(self, name):
        return name in self.tensors

    def rows(self, name, index):
        return self.tensors[name][index]

    def shape(self, name):
        return self.tensors[name].shape

    def names(self):
        return self.tensors.keys()


def reference_model(config: dict, weights: dict) -> reference.Model:
    return reference.Model(reference.config_from_dict(config), DictStore(weights))


def mlx_model(config: dict, weights: dict):
    import mlx.core as mx
    from phiflash_mlx.loader import build_model
    return build_model(config, {k: mx.array(v) for k, v in weights.items()})


def model_pair(config: dict, seed: int = 0):
    weights = random_weights(config, seed)
    return reference_model(config, weights), mlx_model(config, weights), weights
