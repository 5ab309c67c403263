"""Phi-4-mini-flash-reasoning (SambaY, Hugging Face ``phi4flash``) in MLX.

An mlx-lm model file: it imports only mlx, ``.base``, ``.cache`` and its kernel module
``phi4flash_kernels`` beside it, so it can be dropped into ``mlx_lm/models/`` unchanged. The
specification is SAMBAY.md; section numbers below refer to it.

Layer schedule for N layers, h = N // 2 (2.1):
    i < h, i % mb_per_layer == 0: Mamba     other i < h: sliding-window differential attention (SWA)
    i == h:     Mamba whose ungated scan output is the GMU "memory"
    i == h + 1: full differential attention whose K/V every cross layer reads
    i > h + 1:  Gated Memory Unit where i % mb_per_layer == 0, else cross differential attention
Only layers 0..h+1 keep a cache; the cross-decoder reads the memory and the shared K/V.

Dtypes: activations follow the weights (float32, float16 or bfloat16); the scan state, the softmax
and the norms are computed in float32 inside and cast back. ``cast_predicate`` keeps ``A_log``,
``D`` and the lambda vectors in float32 when a checkpoint is converted.

K/V layout: keys and values of the attention caches are (b, n_kv/2, s, 2 * head_dim): entry j
holds KV heads 2j and 2j+1 side by side. The differential attention needs, for every query head,
softmax(q k^T) over one head of a pair applied to the values of both heads of that pair; with this
layout that is one attention call over the pair, the query padded with zeros on the other half, and
the shared cache is read once per layer.
"""

import math
from dataclasses import dataclass
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from .base import (
    BaseModelArgs,
    create_attention_mask,
    create_causal_mask,
    create_ssm_mask,
    scaled_dot_product_attention,
)
from .cache import ArraysCache, KVCache, RotatingKVCache
from .phi4flash_kernels import gmu_gate, selective_scan, selective_state_update

MAMBA, SWA, MAMBA_MEM = "mamba", "swa", "mamba_mem"
GLOBAL, GMU, CROSS = "global", "gmu", "cross"

# Without Metal, attention over at most this many queries (decode steps, short turns) is computed
# with two batched matmuls that read the cache once (DiffAttention._attend_few).
FEW_QUERIES = 16


@dataclass
class ModelArgs(BaseModelArgs):
    model_type: str = "phi4flash"
    vocab_size: int = 200064
    hidden_size: int = 2560
    intermediate_size: int = 10240
    num_hidden_layers: int = 32
    num_attention_heads: int = 40
    num_key_value_heads: int = 20
    sliding_window: Any = 512
    layer_norm_eps: float = 1e-5
    mamba_d_state: int = 16
    mamba_d_conv: int = 4
    mamba_expand: int = 2
    mb_per_layer: int = 2
    tie_word_embeddings: bool = True

    def __post_init__(self):
        if isinstance(self.sliding_window, list):  # per-layer form (1.6)
            sizes = {int(w) for w in self.sliding_window if w is not None}
            if len(sizes) != 1:
                raise ValueError(
                    "sliding_window list must hold one window size, "
                    f"got {sorted(sizes)}"
                )
            self.sliding_window = sizes.pop()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return math.ceil(
            self.hidden_size / 16
        )  # the original ignores mamba_dt_rank (1.2)

    @property
    def layer_kinds(self) -> list:
        h = self.num_hidden_layers // 2
        kinds = []
        for i in range(self.num_hidden_layers):
            mamba = i % self.mb_per_layer == 0
            if i < h:
                kinds.append(MAMBA if mamba else SWA)
            elif i == h:
                kinds.append(MAMBA_MEM)
            elif i == h + 1:
                kinds.append(GLOBAL)
            else:
                kinds.append(GMU if mamba else CROSS)
        return kinds


class MLP(nn.Module):
    """SwiGLU (4.4): fc1 -> [gate | value], SiLU(gate) * value, fc2."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.fc1 = nn.Linear(args.hidden_size, 2 * args.intermediate_size, bias=False)
        self.fc2 = nn.Linear(args.intermediate_size, args.hidden_size, bias=False)

    def __call__(self, x):
        gate, value = mx.split(self.fc1(x), 2, axis=-1)
        return self.fc2(nn.silu(gate) * value)


class Mamba(nn.Module):
    """Mamba-1 mixer (4.5); with ``produces_memory`` the layer-h variant that also returns the
    GMU memory, its ungated scan output including D*u (4.6).

    Cache: ``ArraysCache(2)`` = [conv_state (b, K-1, Di): the last K-1 raw inputs of the
    convolution, ssm_state (b, Di, n) float32]. A padding ``mask`` (b, l) feeds zeros to the
    convolution and makes the scan skip the step, so padded batches give the same states as
    unpadded sequences."""

    def __init__(self, args: ModelArgs, produces_memory: bool):
        super().__init__()
        H, Di, n = args.hidden_size, args.d_inner, args.mamba_d_state
        K, R = args.mamba_d_conv, args.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = Di, n, R, K
        self.produces_memory = produces_memory
        self.in_proj = nn.Linear(H, 2 * Di, bias=False)
        self.conv1d = nn.Conv1d(Di, Di, K, groups=Di, bias=True)  # weight (Di, K, 1)
        self.x_proj = nn.Linear(Di, R + 2 * n, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        self.A_log = mx.zeros((Di, n))
        self.D = mx.ones((Di,))
        self.out_proj = nn.Linear(Di, H, bias=False)

    def _conv(self, x, mask, cache):
        """Causal depthwise conv over [stored inputs | x], then SiLU. x: (b, l, Di)."""
        keep = self.d_conv - 1
        if mask is not None:
            x = mx.where(mask[..., None], x, 0)
        if cache is None:
            window = mx.pad(x, [(0, 0), (keep, 0), (0, 0)])  # (b, K-1+l, Di)
        else:
            past = cache[0]
            if past is None:
                past = mx.zeros((x.shape[0], keep, self.d_inner), dtype=x.dtype)
            window = mx.concatenate([past, x], axis=1)  # (b, K-1+l, Di)
            if (
                cache.lengths is not None
            ):  # right padding: keep the inputs before the pads
                ends = mx.clip(cache.lengths, 0, window.shape[1] - keep)
                rows = (ends[:, None] + mx.arange(keep))[..., None]
                cache[0] = mx.take_along_axis(window, rows, axis=1)
            else:
                cache[0] = window[:, window.shape[1] - keep :]
        return nn.silu(self.conv1d(window))  # (b, l, Di)

    def __call__(self, a, mask=None, cache=None):
        xz = self.in_proj(a)
        x, z = xz[..., : self.d_inner], xz[..., self.d_inner :]
        u = self._conv(x, mask, cache)
        dt, B, C = mx.split(
            self.x_proj(u), [self.dt_rank, self.dt_rank + self.d_state], axis=-1
        )
        delta = self.dt_proj(dt)  # bias included here
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = None if cache is None else cache[1]
        gate = None if self.produces_memory else z
        if a.shape[1] == 1 and state is not None and mask is None:
            y, state = selective_state_update(
                state,
                u[:, 0],
                delta[:, 0],
                A,
                B[:, 0],
                C[:, 0],
                self.D,
                None if gate is None else gate[:, 0],
            )
            y = y[:, None]
        else:
            y, state = selective_scan(
                u, delta, A, B, C, self.D, gate, None, state, mask=mask
            )
        if cache is not None:
            cache[1] = state
            cache.advance(a.shape[1])
        memory = None
        if self.produces_memory:
            memory = y
            y = gmu_gate(z, memory)  # SiLU(z) * y, outside the scan
        return self.out_proj(y), memory


class GatedMemoryUnit(nn.Module):
    """Gated Memory Unit (4.7): out_proj(SiLU(in_proj a) * memory)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.in_proj = nn.Linear(args.hidden_size, args.d_inner, bias=False)
        self.out_proj = nn.Linear(args.d_inner, args.hidden_size, bias=False)

    def __call__(self, a, memory):
        return self.out_proj(gmu_gate(self.in_proj(a), memory))


class DiffLambdas(nn.Module):
    """``inner_cross_attn``: the lambda vectors and the sub-LN of one differential attention
    layer (4.8)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.lambda_q1 = mx.zeros((head_dim,))
        self.lambda_k1 = mx.zeros((head_dim,))
        self.lambda_q2 = mx.zeros((head_dim,))
        self.lambda_k2 = mx.zeros((head_dim,))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)


def _bool_mask(mask, l, s):
    """None, "causal" or a mask array -> None or a bool array that broadcasts to (b, 1, l, s)."""
    if isinstance(mask, str):
        return create_causal_mask(l, s - l)
    return mask


class DiffAttention(nn.Module):
    """Differential attention (4.8-4.11) in its three kinds: SWA, GLOBAL and CROSS (queries
    only)."""

    # Optional replacement of _attend_few, called as few_query_kernel(q, keys, values, mask, scale)
    # with the mask None or a bool array; returns (attn1, attn2) or None to decline. Platform code
    # outside this file may set it (e.g. a CPU kernel).
    few_query_kernel = None
    # The same for blocks of more queries (prompts), called as
    # many_query_kernel(q, keys, values, mask, scale) with the mask as the model got it: None,
    # "causal" or a bool array.
    many_query_kernel = None
    # When set, new keys and values are stored in this dtype (e.g. 16-bit caches on a CPU); a
    # quantized cache (mlx-lm's QuantizedKVCache) quantizes them from the activations instead.
    kv_dtype = None

    def __init__(self, args: ModelArgs, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.nh, self.nkv = args.num_attention_heads, args.num_key_value_heads
        self.hd = args.head_dim
        rows = self.nh * self.hd
        if kind != CROSS:
            rows += 2 * self.nkv * self.hd
        self.Wqkv = nn.Linear(args.hidden_size, rows, bias=True)
        self.out_proj = nn.Linear(self.nh * self.hd, args.hidden_size, bias=True)
        self.inner_cross_attn = DiffLambdas(self.hd)
        # by the absolute layer index
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)
        self.scale = self.hd**-0.5

    def _pairs(self, x):
        """(b, l, n_kv * hd) -> (b, n_kv/2, l, 2hd): KV heads 2j and 2j+1 side by side."""
        b, l, _ = x.shape
        return x.reshape(b, l, self.nkv // 2, 2 * self.hd).transpose(0, 2, 1, 3)

    def _attend_few(self, qq, keys, values, mask):
        """Attention for a few queries as two batched matmuls that read the cache once (CPU).
        qq (b, P, 2g, l, 2hd); keys, values (b, P, s, 2hd). Returns (b, P, 2g, l, 2hd).
        """
        b, P, g2, l, d2 = qq.shape
        s = keys.shape[2]
        scores = (qq * self.scale).reshape(b, P, g2 * l, d2) @ keys.swapaxes(-1, -2)
        if mask is not None:
            if mask.ndim == 4:
                mask = mask[:, :, None]  # (b, 1, 1, l, s): over the 2g query heads
            scores = scores.reshape(b, P, g2, l, s)
            scores = mx.where(mask, scores, mx.finfo(scores.dtype).min)
            scores = scores.reshape(b, P, g2 * l, s)
        probs = mx.softmax(scores, axis=-1, precise=True)
        return (probs @ values).reshape(b, P, g2, l, d2)

    def _core(self, q, keys, values, mask, cache):
        """q (b, nh, l, hd); keys, values in the pair layout (or quantized by the cache).
        Returns (attn1, attn2), each (b, nh/2, l, 2hd), for the query heads of stripes 1 and 2.
        """
        b, nh, l, hd = q.shape
        quantized = hasattr(cache, "bits")
        P = (keys[0] if quantized else keys).shape[1]
        s = (keys[0] if quantized else keys).shape[2]
        cpu = not quantized and not mx.metal.is_available()
        few = l <= FEW_QUERIES and cpu
        kernel = self.few_query_kernel if few else self.many_query_kernel
        if cpu and kernel is not None:
            out = kernel(
                q, keys, values, _bool_mask(mask, l, s) if few else mask, self.scale
            )
            if out is not None:
                return out
        # 16-bit caches under float32 activations: attend in q's dtype
        if not quantized and keys.dtype != q.dtype:
            keys, values = keys.astype(q.dtype), values.astype(q.dtype)
        g = nh // (2 * P)  # query heads of one stripe per KV pair
        # stripe 1 (even query heads) reads the first head of a pair, stripe 2 the second
        q1 = q[:, 0::2].reshape(b, P, g, l, hd)
        q2 = q[:, 1::2].reshape(b, P, g, l, hd)
        zeros = mx.zeros_like(q1)
        qq = mx.concatenate(
            [mx.concatenate([q1, zeros], -1), mx.concatenate([zeros, q2], -1)], axis=2
        )  # (b, P, 2g, l, 2hd)
        if few:
            o = self._attend_few(qq, keys, values, _bool_mask(mask, l, s))
        else:
            o = scaled_dot_product_attention(
                qq.reshape(b, nh, l, 2 * hd),
                keys,
                values,
                cache=cache,
                scale=self.scale,
                mask=mask,
            ).reshape(b, P, 2 * g, l, 2 * hd)
        attn1 = o[:, :, :g].reshape(b, nh // 2, l, 2 * hd)
        attn2 = o[:, :, g:].reshape(b, nh // 2, l, 2 * hd)
        return attn1, attn2

    def __call__(self, a, mask=None, cache=None, shared=None):
        """Returns (output, shared) where shared = (keys, values, cache) of this layer when its
        kind is GLOBAL; a CROSS layer reads it instead of keys of its own."""
        b, l, _ = a.shape
        qkv = self.Wqkv(a)
        q = qkv[..., : self.nh * self.hd]
        q = q.reshape(b, l, self.nh, self.hd).transpose(0, 2, 1, 3)
        if self.kind == CROSS:
            keys, values, cache = shared
        else:
            split = (self.nh + self.nkv) * self.hd
            keys = self._pairs(qkv[..., self.nh * self.hd : split])
            values = self._pairs(qkv[..., split:])
            if cache is not None:
                kv_dtype = None if hasattr(cache, "bits") else self.kv_dtype
                if kv_dtype is not None:
                    keys, values = keys.astype(kv_dtype), values.astype(kv_dtype)
                keys, values = cache.update_and_fetch(keys, values)
        attn1, attn2 = self._core(q, keys, values, mask, cache)
        p = self.inner_cross_attn
        lam = (
            mx.exp(mx.sum(p.lambda_q1 * p.lambda_k1))
            - mx.exp(mx.sum(p.lambda_q2 * p.lambda_k2))
            + self.lambda_init
        )
        d = attn1 - lam.astype(attn1.dtype) * attn2
        d = p.subln(d) * (1.0 - self.lambda_init)  # (b, nh/2, l, 2hd)
        # stripe index i's first half is query head 2i's output, its second half head 2i+1's
        d = d.transpose(0, 2, 1, 3).reshape(b, l, self.nh * self.hd)
        out = self.out_proj(d.astype(a.dtype))
        return out, ((keys, values, cache) if self.kind == GLOBAL else None)


class DecoderLayer(nn.Module):
    """Pre-norm block (4.2): h += mixer(LN(h)); h += MLP(LN(h))."""

    def __init__(self, args: ModelArgs, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        eps = args.layer_norm_eps
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=eps)
        self.mlp = MLP(args)
        if kind in (MAMBA, MAMBA_MEM):
            self.attn = Mamba(args, produces_memory=kind == MAMBA_MEM)
        elif kind == GMU:
            self.attn = GatedMemoryUnit(args)
        else:
            self.attn = DiffAttention(args, layer_idx, kind)


class SambaYModel(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.embed_tokens = nn.Embedding(args.vocab_size, args.hidden_size)
        self.layers = [
            DecoderLayer(args, i, kind) for i, kind in enumerate(args.layer_kinds)
        ]
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.num_cached = args.num_hidden_layers // 2 + 2
        kinds = args.layer_kinds
        self.first = {k: kinds.index(k) for k in (MAMBA, SWA, GLOBAL) if k in kinds}

    def _masks(self, h, cache):
        def cache_of(kind):
            return cache[self.first[kind]] if kind in self.first else None

        return {
            MAMBA: create_ssm_mask(h, cache_of(MAMBA)),
            SWA: create_attention_mask(
                h, cache_of(SWA), window_size=self.args.sliding_window
            ),
            GLOBAL: create_attention_mask(h, cache_of(GLOBAL)),
        }

    def __call__(self, inputs, cache=None, input_embeddings=None, capture=None):
        if input_embeddings is not None:
            h = input_embeddings
        else:
            h = self.embed_tokens(inputs)
        if cache is None:
            cache = [None] * self.num_cached
        masks = self._masks(h, cache)
        memory = shared = None
        for i, layer in enumerate(self.layers):
            c = cache[i] if i < self.num_cached else None
            a = layer.input_layernorm(h)
            if layer.kind in (MAMBA, MAMBA_MEM):
                o, mem = layer.attn(a, masks[MAMBA], c)
                if mem is not None:
                    memory = mem
                    if capture is not None:
                        capture["gmu_memory"] = mem
            elif layer.kind == GMU:
                o = layer.attn(a, memory)
            elif layer.kind == SWA:
                o, _ = layer.attn(a, masks[SWA], c)
            elif layer.kind == GLOBAL:
                o, shared = layer.attn(a, masks[GLOBAL], c)
            else:
                o, _ = layer.attn(a, masks[GLOBAL], shared=shared)
            h = h + o
            h = h + layer.mlp(layer.post_attention_layernorm(h))
            if capture is not None:
                capture.setdefault("layer_outputs", []).append(h)
        h = self.final_layernorm(h)
        if capture is not None:
            capture["final_norm"] = h
        return h


class Model(nn.Module):
    def __init__(self, args: ModelArgs):
        super().__init__()
        self.args = args
        self.model_type = args.model_type
        self.model = SambaYModel(args)
        if not args.tie_word_embeddings:
            self.lm_head = nn.Linear(args.hidden_size, args.vocab_size, bias=False)

    def __call__(
        self,
        inputs: mx.array,
        cache=None,
        input_embeddings: Optional[mx.array] = None,
        capture: Optional[dict] = None,
    ):
        """Logits (b, l, V) in the activation dtype. `cache` is ``make_cache()``'s list, or
        mlx-lm's batched versions of it, continued and updated in place. `capture`, a dict,
        receives the per-layer outputs, the final norm and the GMU memory. Token ids are not
        checked here (that would need a host sync); callers validate ids where they enter.
        """
        h = self.model(inputs, cache, input_embeddings, capture)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        """One cache per layer 0..h+1 (5.1); the cross-decoder (layers > h+1) keeps nothing."""
        caches = []
        for kind in self.args.layer_kinds[: self.model.num_cached]:
            if kind in (MAMBA, MAMBA_MEM):
                caches.append(ArraysCache(size=2))
            elif kind == SWA:
                caches.append(RotatingKVCache(max_size=self.args.sliding_window))
            else:
                caches.append(KVCache())
        return caches

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face layouts -> ours: conv1d weight (Di, 1, K) -> (Di, K, 1); a tied lm_head
        is dropped."""
        out = {}
        for name, w in weights.items():
            if self.args.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name.endswith("conv1d.weight") and w.ndim == 3 and w.shape[1] == 1:
                if w.shape[2] != 1:
                    w = w.transpose(0, 2, 1)
            out[name] = w
        return out

    @property
    def cast_predicate(self):
        """A_log, D and the lambda vectors stay float32 when the rest is cast to 16 bits."""

        def predicate(name: str) -> bool:
            return not (name.endswith(("A_log", ".D")) or ".lambda_" in name)

        return predicate

    @property
    def quant_predicate(self):
        """Every linear and embedding whose input width the chosen group size divides (mlx-lm
        checks the divisibility); norms, the convolution, A_log, D and the lambda vectors are not
        quantizable modules and stay as they are."""

        def predicate(path: str, module: nn.Module):
            return hasattr(module, "to_quantized")

        return predicate
