"""The whole SambaY model and its caches (SAMBAY.md 4.2, 4.12, 4.13 and section 5).

    model = reference.load("path/to/checkpoint")          # float32; bf16=True emulates the original
    logits = model.forward(ids)                            # (b, l, V), no cache
    cache = model.new_cache(batch=1)
    logits = model.forward(prompt, cache)                  # prefill (any length, any number of chunks)
    logits = model.forward(next_ids, cache)                # decode
    logits, inter = model.forward_with_intermediates(ids)  # per-layer outputs, GMU memory, ...
"""

from __future__ import annotations

import numpy as np

from . import ops
from .checkpoint import FP32_IN_ORIGINAL, expected_tensors
from .config import (CROSS, GLOBAL, GMU, MAMBA, MAMBA_KINDS, MAMBA_MEM, SWA, Config, load_config)
from .errors import CheckpointError
from .weights import WeightStore, open_checkpoint, round_to_bf16


# ---------------------------------------------------------------------------------------------
# Caches (SAMBAY.md 5.1 - 5.4, with the clean sliding window of DESIGN.md)
# ---------------------------------------------------------------------------------------------

class MambaState:
    """MAMBA / MAMBA-MEM layers: conv_state (b, d_in, k) raw inputs, ssm_state (b, d_in, n). Fixed size."""

    def __init__(self):
        self.conv = None
        self.ssm = None

    def nbytes(self):
        return sum(x.nbytes for x in (self.conv, self.ssm) if x is not None)


class SlidingKV:
    """SWA layers: exactly the last `window` keys/values and their positions."""

    def __init__(self, window: int):
        self.window = window
        self.keys = self.values = None         # (b, s <= window, nkv, hd)
        self.positions = np.zeros(0, np.int64)

    def update(self, k, v, q_pos):
        """Add this call's keys; return the keys/values the queries may see and their mask."""
        if self.keys is not None:
            k = np.concatenate([self.keys, k], axis=1)
            v = np.concatenate([self.values, v], axis=1)
        k_pos = np.concatenate([self.positions, q_pos])
        self.keys, self.values, self.positions = k[:, -self.window:], v[:, -self.window:], k_pos[-self.window:]
        return k, v, ops.attention_mask(q_pos, k_pos, self.window)

    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class QuirkySlidingKV:
    """The original's ring buffer, off-by-one included (SAMBAY.md 5.3; golden README quirk 2).

    Only for comparing against the original's cached `generate()`; use `SlidingKV` otherwise.
    Slots are kept in the original's order; never-written slots hold zero keys and values.
    """

    def __init__(self, window: int, max_cache_len: int | None):
        self.window = window
        self.slots = window if max_cache_len is None else min(window, max_cache_len)   # Wc
        self.keys = self.values = None         # (b, Wc, nkv, hd)

    def update(self, k, v, q_pos):
        b, t, nkv, hd = k.shape
        if self.keys is None:
            self.keys = np.zeros((b, self.slots, nkv, hd), np.float32)
            self.values = np.zeros_like(self.keys)
        total = int(q_pos[-1]) + 1
        if t > self.slots:                     # long prefill: keep the last Wc, attend the prompt itself
            self.keys, self.values = k[:, -self.slots:].copy(), v[:, -self.slots:].copy()
            return k, v, ops.attention_mask(q_pos, q_pos, self.window)
        cp = np.clip(q_pos, 0, self.slots - 1)
        shift = int(cp[-1] >= self.slots - 1)
        idx = (np.arange(1, self.slots + 1) + shift - 1) % self.slots
        self.keys, self.values = self.keys[:, idx].copy(), self.values[:, idx].copy()
        self.keys[:, cp], self.values[:, cp] = k, v
        # The decoder layer slices the 2-D mask to its last W columns in decode only.
        mask_len = min(self.window, total) if t == 1 else total
        q_aligned = np.arange(t) + mask_len - t             # FlashAttention's bottom-right alignment
        j = np.arange(mask_len)
        mask = (j[None, :] <= q_aligned[:, None]) & (q_aligned[:, None] - j[None, :] <= self.window - 1)
        return self.keys[:, :mask_len], self.values[:, :mask_len], mask

    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class FullKV:
    """The GLOBAL layer's K/V: every position so far. The cross layers read it; they store nothing."""

    def __init__(self):
        self.keys = self.values = None
        self.positions = np.zeros(0, np.int64)

    def update(self, k, v, q_pos):
        if self.keys is not None:
            k = np.concatenate([self.keys, k], axis=1)
            v = np.concatenate([self.values, v], axis=1)
        self.keys, self.values = k, v
        self.positions = np.concatenate([self.positions, q_pos])
        return k, v, self.positions

    def nbytes(self):
        return 0 if self.keys is None else self.keys.nbytes + self.values.nbytes


class Cache:
    """One state object per layer (None for GMU and CROSS layers, which keep nothing)."""

    def __init__(self, cfg: Config, batch: int, hf_sliding_quirk=False, max_cache_len=None):
        self.batch = batch
        self.offset = 0                        # tokens seen so far
        self.layers = []
        for kind in cfg.layer_kinds:
            if kind in MAMBA_KINDS:
                self.layers.append(MambaState())
            elif kind == SWA:
                self.layers.append(QuirkySlidingKV(cfg.sliding_window, max_cache_len) if hf_sliding_quirk
                                   else SlidingKV(cfg.sliding_window))
            elif kind == GLOBAL:
                self.layers.append(FullKV())
            else:
                self.layers.append(None)

    def nbytes(self) -> int:
        return sum(layer.nbytes() for layer in self.layers if layer is not None)


# ---------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------

class Model:
    """SambaY forward pass over a `WeightStore` (SAMBAY.md 4.13). No state besides the weights."""

    def __init__(self, cfg: Config, weights: WeightStore, bf16: bool = False):
        self.cfg = cfg
        self.w = weights
        self.bf16 = bf16

    def new_cache(self, batch: int = 1, hf_sliding_quirk: bool = False, max_cache_len: int | None = None) -> Cache:
        """An empty cache. `hf_sliding_quirk=True` reproduces the original's sliding-cache off-by-one
        (SAMBAY.md 5.3); `max_cache_len` is the original's buffer length (matters only below W)."""
        return Cache(self.cfg, batch, hf_sliding_quirk, max_cache_len)

    def forward(self, ids, cache: Cache | None = None) -> np.ndarray:
        """Logits (b, l, V) float32. With a cache, continues from it and updates it."""
        return self.forward_with_intermediates(ids, cache)[0]

    def forward_with_intermediates(self, ids, cache: Cache | None = None):
        """Logits plus a dict: `embeddings` (b, l, d), `layer_outputs` list of (b, l, d) per layer,
        `final_norm` (b, l, d), `gmu_memory` (b, l, d_in)."""
        cfg, w, bf16 = self.cfg, self.w, self.bf16
        ids = self._check_ids(ids, cache)
        b, l = ids.shape
        offset = cache.offset if cache is not None else 0
        q_pos = offset + np.arange(l)                                      # (l,)
        h = w.rows("model.embed_tokens.weight", ids.reshape(-1)).reshape(b, l, -1)   # (b, l, d)
        inter = {"embeddings": h, "layer_outputs": [], "gmu_memory": None}
        memory = None
        shared_kv = None                                                   # (k, v, positions) of GLOBAL
        nh, nkv, hd = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim
        for i, kind in enumerate(cfg.layer_kinds):
            p = f"model.layers.{i}."
            a_ = p + "attn."
            state = cache.layers[i] if cache is not None else None
            a = ops.layer_norm(h, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"],
                               cfg.layer_norm_eps, bf16)                   # (b, l, d)
            if kind in MAMBA_KINDS:
                prev = (state.conv, state.ssm) if state is not None and state.conv is not None else None
                o, mem, (conv, ssm) = ops.mamba_mixer(a, w, a_, cfg, prev, kind == MAMBA_MEM, bf16)
                if state is not None:
                    state.conv, state.ssm = conv, ssm
                if kind == MAMBA_MEM:
                    memory = inter["gmu_memory"] = mem
            elif kind == GMU:
                o = ops.gmu(a, w, a_, memory, bf16)
            else:
                qkv = ops.linear(a, w[a_ + "Wqkv.weight"], w[a_ + "Wqkv.bias"], bf16)
                if kind == CROSS:
                    q = qkv.reshape(b, l, nh, hd)
                    k, v, k_pos = shared_kv
                    mask = ops.attention_mask(q_pos, k_pos)
                else:
                    q, k, v = ops.split_qkv(qkv, nh, nkv, hd)
                    if kind == SWA:
                        if state is not None:
                            k, v, mask = state.update(k, v, q_pos)
                        else:
                            mask = ops.attention_mask(q_pos, q_pos, cfg.sliding_window)
                    else:                                                  # GLOBAL
                        k_pos = q_pos
                        if state is not None:
                            k, v, k_pos = state.update(k, v, q_pos)
                        shared_kv = (k, v, k_pos)
                        mask = ops.attention_mask(q_pos, k_pos)
                o = ops.differential_attention(q, k, v, mask, ops.lambdas_of(w, a_),
                                               w[a_ + "inner_cross_attn.subln.weight"], cfg.lambda_init(i), bf16)
                o = ops.attention_output(o, w, a_, bf16)
            h = h + o                                                      # fp32 residual stream
            m = ops.layer_norm(h, w[p + "post_attention_layernorm.weight"], w[p + "post_attention_layernorm.bias"],
                               cfg.layer_norm_eps, bf16)
            h = h + ops.mlp(m, w[p + "mlp.fc1.weight"], w[p + "mlp.fc2.weight"], bf16)
            inter["layer_outputs"].append(h)
        hn = ops.layer_norm(h, w["model.final_layernorm.weight"], w["model.final_layernorm.bias"],
                            cfg.layer_norm_eps, bf16)                     # (b, l, d)
        inter["final_norm"] = hn
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        logits = ops.linear(hn, w[head], bf16=bf16)                        # (b, l, V)
        if cache is not None:
            cache.offset += l
        return logits.astype(np.float32), inter

    def _check_ids(self, ids, cache):
        ids = np.asarray(ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.ndim != 2 or ids.shape[1] == 0 or not np.issubdtype(ids.dtype, np.integer):
            raise CheckpointError(f"token ids must be a non-empty integer array (batch, length); got shape "
                                  f"{ids.shape} dtype {ids.dtype}")
        bad = (ids < 0) | (ids >= self.cfg.vocab_size)
        if bad.any():
            raise CheckpointError(f"token id {int(ids[bad][0])} is outside the vocabulary (0..{self.cfg.vocab_size - 1})")
        if cache is not None and cache.batch != ids.shape[0]:
            raise CheckpointError(f"cache was made for batch {cache.batch}, ids have batch {ids.shape[0]}")
        return ids


def check_weights(cfg: Config, weights: WeightStore, path: str = "the checkpoint") -> None:
    """Every expected tensor is present with the expected shape; otherwise name the first problem."""
    expected = expected_tensors(cfg)
    missing = [n for n in expected if n not in weights]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"tensor {missing[0]} is missing from {path}{more}; the checkpoint is incomplete "
                              "or was made for another architecture")
    for name, shape in expected.items():
        got = weights.shape(name)
        if tuple(got) != tuple(shape):
            raise CheckpointError(f"tensor {name} in {path} has shape {tuple(got)}, but config.json implies "
                                  f"{tuple(shape)}; the weights do not match the config")


def _bf16_weights(name: str, arr: np.ndarray) -> np.ndarray:
    """bf16 emulation: weights as the original holds them (A_log and lambdas stay fp32, SAMBAY.md 3.7)."""
    if name.rsplit(".", 1)[-1] in FP32_IN_ORIGINAL:
        return arr
    return round_to_bf16(arr)


def load(path: str, bf16: bool = False, keep_weights: bool | None = None) -> Model:
    """Load a Hugging Face phi4flash checkpoint directory.

    bf16=True emulates the original's bfloat16 numerics (weights rounded to bf16, rounding where the
    CUDA model rounds). keep_weights=None keeps converted tensors only for models under 4 GiB in fp32;
    False converts each tensor when it is used (for the full 3.8B model on a small machine).
    """
    cfg = load_config(path)
    weights = open_checkpoint(path, keep_weights)
    check_weights(cfg, weights, path)
    if bf16:
        weights.transform = _bf16_weights
    return Model(cfg, weights, bf16)
