"""Phi-4-mini-flash-reasoning (SambaY, Hugging Face ``phi4flash``) in MLX.

Follows mlx-lm's model-file contract: ``ModelArgs.from_dict``, ``Model.__call__(inputs, cache=None)``,
``make_cache()``, ``sanitize(weights)``, ``layers`` and ``quant_predicate``, so mlx-lm's own tools can
drive it. The specification is SAMBAY.md; section numbers below refer to it.

Layer schedule for N layers, h = N // 2 (2.1):
    i < h even: Mamba        i < h odd: sliding-window differential attention (SWA)
    i == h:     Mamba whose ungated scan output is the GMU "memory"
    i == h + 1: full differential attention whose K/V every cross layer reads
    i > h + 1:  even: Gated Memory Unit, odd: cross differential attention (queries only)
Only layers 0..h+1 keep a cache; the cross-decoder reads the memory and the shared K/V.
"""

from __future__ import annotations

import inspect
import math
from dataclasses import dataclass, field
from typing import Any, Optional

import mlx.core as mx
import mlx.nn as nn

from . import phi4flash_kernels as kernels
from .cache import FullKVCache, MambaCache, SlidingWindowCache

MAMBA, SWA, MAMBA_MEM, GLOBAL, GMU, CROSS = "mamba", "swa", "mamba_mem", "global", "gmu", "cross"
_NEG = -1e9        # additive mask value: finite, so a query that sees nothing gives no NaN


@dataclass
class ModelArgs:
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
    layer_types: Optional[list] = None
    quantization: Optional[dict] = None
    extra: dict = field(default_factory=dict)

    @classmethod
    def from_dict(cls, params: dict) -> "ModelArgs":
        names = inspect.signature(cls).parameters
        known = {k: v for k, v in params.items() if k in names and k != "extra"}
        return cls(**known, extra={k: v for k, v in params.items() if k not in names})

    def __post_init__(self):
        if isinstance(self.sliding_window, list):            # per-layer form (SAMBAY.md 1.6)
            sizes = {int(w) for w in self.sliding_window if w is not None}
            if len(sizes) != 1:
                raise ValueError(f"sliding_window list must hold one window size, got {sorted(sizes)}")
            self.sliding_window = sizes.pop()

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def d_inner(self) -> int:
        return self.mamba_expand * self.hidden_size

    @property
    def dt_rank(self) -> int:
        return math.ceil(self.hidden_size / 16)              # the original ignores mamba_dt_rank (1.2)

    @property
    def layer_kinds(self) -> list[str]:
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


# ---------------------------------------------------------------------------------------------
# Masks
# ---------------------------------------------------------------------------------------------

# Without Metal, attention over at most this many queries (decode steps, short turns) uses
# DiffAttention._attend_few.
FEW_QUERIES = 16


def attention_bias(offset: int, length: int, key_start: int, num_keys: int, window: Optional[int],
                   key_valid: Optional[mx.array]) -> mx.array:
    """Additive mask (l, s) or (b, 1, l, s): query at offset+i sees key key_start+j when causal, within
    `window` keys including itself, and (with padding) when the key is a real token."""
    q_pos = mx.arange(offset, offset + length)[:, None]
    k_pos = mx.arange(key_start, key_start + num_keys)[None, :]
    allowed = k_pos <= q_pos
    if window is not None:
        allowed = allowed & (q_pos - k_pos < window)
    if key_valid is not None:                                # (b, s) -> (b, 1, l, s)
        allowed = allowed[None, None] & key_valid[:, None, None, :]
    return mx.where(allowed, 0.0, _NEG).astype(mx.float32)


# ---------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------

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
    """Mamba-1 mixer (4.5); with ``produces_memory`` the layer-h variant that also returns the GMU
    memory, its ungated scan output including D·u (4.6)."""

    def __init__(self, args: ModelArgs, produces_memory: bool):
        super().__init__()
        H, Di, n, K, R = args.hidden_size, args.d_inner, args.mamba_d_state, args.mamba_d_conv, args.dt_rank
        self.d_inner, self.d_state, self.dt_rank, self.d_conv = Di, n, R, K
        self.produces_memory = produces_memory
        self.in_proj = nn.Linear(H, 2 * Di, bias=False)
        self.conv1d = nn.Conv1d(Di, Di, K, groups=Di, bias=True)     # weight (Di, K, 1)
        self.x_proj = nn.Linear(Di, R + 2 * n, bias=False)
        self.dt_proj = nn.Linear(R, Di, bias=True)
        self.A_log = mx.zeros((Di, n))
        self.D = mx.ones((Di,))
        self.out_proj = nn.Linear(Di, H, bias=False)

    def _conv(self, x, cache: Optional[MambaCache], valid):
        """Causal depthwise conv over [stored raw inputs | x], then SiLU. x: (b, l, Di)."""
        b, l, _ = x.shape
        K = self.d_conv
        past = cache.conv_state if cache is not None and cache.conv_state is not None else None
        if past is None:
            past = mx.zeros((b, K, self.d_inner), dtype=x.dtype)            # (b, K, Di), time on axis 1
        window = mx.concatenate([past, x], axis=1)                          # (b, K + l, Di)
        if cache is not None:
            cache.conv_state = window[:, -K:]
        out = mx.conv1d(window[:, 1:], self.conv1d.weight, groups=self.d_inner) + self.conv1d.bias
        u = nn.silu(out)                                                    # (b, l, Di)
        return u if valid is None else u * valid[..., None]

    def __call__(self, a, cache: Optional[MambaCache] = None, valid=None):
        xz = self.in_proj(a)
        x, z = xz[..., :self.d_inner], xz[..., self.d_inner:]
        if valid is not None:                                               # left padding: zero inputs
            x = x * valid[..., None]
        u = self._conv(x, cache, valid)
        xdbl = self.x_proj(u)
        dt, B, C = mx.split(xdbl, [self.dt_rank, self.dt_rank + self.d_state], axis=-1)
        delta = self.dt_proj(dt)                                            # bias included here
        A = -mx.exp(self.A_log.astype(mx.float32))
        state = cache.ssm_state if cache is not None else None
        gate = None if self.produces_memory else z
        if a.shape[1] == 1 and state is not None:
            y, state = kernels.selective_state_update(state, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0],
                                                      self.D, None if gate is None else gate[:, 0])
            y = y[:, None]
        else:
            y, state = kernels.selective_scan(u, delta, A, B, C, self.D, gate, None, state)
        if cache is not None:
            cache.ssm_state = state
        memory = None
        if self.produces_memory:
            memory = y
            y = kernels.gmu_gate(z, memory)                                 # SiLU(z) ⊙ y, outside the scan
        return self.out_proj(y), memory


class GatedMemoryUnit(nn.Module):
    """Gated Memory Unit (4.7): out_proj(SiLU(in_proj a) ⊙ memory)."""

    def __init__(self, args: ModelArgs):
        super().__init__()
        self.in_proj = nn.Linear(args.hidden_size, args.d_inner, bias=False)
        self.out_proj = nn.Linear(args.d_inner, args.hidden_size, bias=False)

    def __call__(self, a, memory):
        return self.out_proj(kernels.gmu_gate(self.in_proj(a), memory))


class DiffLambdas(nn.Module):
    """``inner_cross_attn``: the λ vectors and the sub-LN of one differential attention layer (4.8)."""

    def __init__(self, head_dim: int):
        super().__init__()
        self.lambda_q1 = mx.zeros((head_dim,))
        self.lambda_k1 = mx.zeros((head_dim,))
        self.lambda_q2 = mx.zeros((head_dim,))
        self.lambda_k2 = mx.zeros((head_dim,))
        self.subln = nn.RMSNorm(2 * head_dim, eps=1e-5)


class DiffAttention(nn.Module):
    """Differential attention (4.8-4.11) in its three kinds: SWA, GLOBAL and CROSS (queries only)."""

    # Optional replacement of _attend_few with the same signature (plus the scale) that may return
    # None to decline; phiflash_mlx.cpu_kernels.use_cpu_kernels sets its C kernel here on CPUs.
    few_query_kernel = None

    def __init__(self, args: ModelArgs, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.nh, self.nkv, self.hd = args.num_attention_heads, args.num_key_value_heads, args.head_dim
        self.window = args.sliding_window if kind == SWA else None
        rows = self.nh * self.hd if kind == CROSS else (self.nh + 2 * self.nkv) * self.hd
        self.Wqkv = nn.Linear(args.hidden_size, rows, bias=True)
        self.out_proj = nn.Linear(self.nh * self.hd, args.hidden_size, bias=True)
        self.inner_cross_attn = DiffLambdas(self.hd)
        self.lambda_init = 0.8 - 0.6 * math.exp(-0.3 * layer_idx)          # by absolute layer index
        self.scale = self.hd ** -0.5

    @staticmethod
    def stripe(k, v):
        """Cache layout of new keys/values (b, nkv, l, hd): keys with the heads regrouped by stripe
        ([even heads | odd heads], so each stripe is one contiguous block) and values as [v1 | v2]
        per KV pair, (b, nkv/2, l, 2hd), the operand both attention calls of a pair multiply by.
        Done once per token here, so attention never copies the (long) cache."""
        k = mx.concatenate([k[:, 0::2], k[:, 1::2]], axis=1)
        v = mx.concatenate([v[:, 0::2], v[:, 1::2]], axis=-1)
        return k, v

    def _attend_few(self, q1, q2, k, vv, bias):
        """Both stripes' attention for a few queries as two batched matmuls that read the cache once
        (CPU decode). Without Metal, scaled_dot_product_attention makes contiguous copies of the
        sliced cache for each of the two calls; here the keys are read once for all heads and the
        values once for both stripes. Same math: softmax(q k^T * scale + bias) v per head."""
        b, hs, l, hd = q1.shape                                            # hs = nh / 2
        nkv, s = k.shape[1], k.shape[2]
        half, g = nkv // 2, hs // (nkv // 2)                               # g query heads per KV head
        qa = mx.concatenate([q1.reshape(b, half, g * l, hd), q2.reshape(b, half, g * l, hd)], axis=1)
        scores = (qa * self.scale) @ k.swapaxes(-1, -2)                    # (b, nkv, g*l, s)
        if bias is not None:
            bias = bias[:, :, None] if bias.ndim == 4 else bias            # over the g query heads
            scores = (scores.reshape(b, nkv, g, l, s) + bias).reshape(b, nkv, g * l, s)
        probs = mx.softmax(scores, axis=-1, precise=True)
        both = mx.concatenate([probs[:, :half], probs[:, half:]], axis=2) @ vv  # (b, half, 2*g*l, 2hd)
        attn1 = both[:, :, :g * l].reshape(b, hs, l, 2 * hd)
        attn2 = both[:, :, g * l:].reshape(b, hs, l, 2 * hd)
        return attn1, attn2

    def _core(self, q, k, vv, bias):
        """q (b, nh, l, hd); k (b, nkv, s, hd) striped; vv (b, nkv/2, s, 2hd). Returns (b, l, nh*hd)."""
        q1, q2 = q[:, 0::2], q[:, 1::2]                                    # even heads: stripe 1
        if q.shape[2] <= FEW_QUERIES and not mx.metal.is_available():
            few = self.few_query_kernel and self.few_query_kernel(q1, q2, k, vv, bias, self.scale)
            attn1, attn2 = few or self._attend_few(q1, q2, k, vv, bias)
        else:
            half = k.shape[1] // 2
            k1, k2 = k[:, :half], k[:, half:]
            attn1 = mx.fast.scaled_dot_product_attention(q1, k1, vv, scale=self.scale, mask=bias)
            attn2 = mx.fast.scaled_dot_product_attention(q2, k2, vv, scale=self.scale, mask=bias)
        p = self.inner_cross_attn
        lam1 = mx.exp(mx.sum(p.lambda_q1 * p.lambda_k1))
        lam2 = mx.exp(mx.sum(p.lambda_q2 * p.lambda_k2))
        lam = lam1 - lam2 + self.lambda_init
        d = p.subln(attn1 - lam * attn2) * (1.0 - self.lambda_init)        # (b, nh/2, l, 2hd)
        b, pairs, l, two_hd = d.shape
        # pair j's first half is head 2j, second half head 2j+1
        return d.transpose(0, 2, 1, 3).reshape(b, l, pairs * two_hd)

    def __call__(self, a, cache=None, shared=None, offset=0, valid=None):
        """Returns (output, (k, v, key_start, key_valid) for the cross layers when kind is GLOBAL);
        k and v are in the striped layout of `stripe`."""
        b, l, _ = a.shape
        qkv = self.Wqkv(a)
        q = qkv[..., :self.nh * self.hd].reshape(b, l, self.nh, self.hd).transpose(0, 2, 1, 3)
        if self.kind == CROSS:
            k, v, key_start, key_valid = shared
        else:
            k = qkv[..., self.nh * self.hd:(self.nh + self.nkv) * self.hd]
            v = qkv[..., (self.nh + self.nkv) * self.hd:]
            k = k.reshape(b, l, self.nkv, self.hd).transpose(0, 2, 1, 3)
            v = v.reshape(b, l, self.nkv, self.hd).transpose(0, 2, 1, 3)
            k, v = self.stripe(k, v)
            if cache is not None:
                k, v, key_start, key_valid = cache.update_and_fetch(k, v, valid)
            else:
                key_start, key_valid = offset, valid
        bias = attention_bias(offset, l, key_start, k.shape[2], self.window, key_valid)
        out = self.out_proj(self._core(q, k, v, bias))
        return out, ((k, v, key_start, key_valid) if self.kind == GLOBAL else None)


class DecoderLayer(nn.Module):
    """Pre-norm block (4.2): h += mixer(LN(h)); h += MLP(LN(h))."""

    def __init__(self, args: ModelArgs, layer_idx: int, kind: str):
        super().__init__()
        self.kind = kind
        self.input_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
        self.post_attention_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)
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
        self.layers = [DecoderLayer(args, i, kind) for i, kind in enumerate(args.layer_kinds)]
        self.final_layernorm = nn.LayerNorm(args.hidden_size, eps=args.layer_norm_eps)

    def __call__(self, inputs, cache=None, padding_mask=None, capture=None):
        h = self.embed_tokens(inputs)
        if h.dtype != mx.float32 and not mx.metal.is_available():
            h = h.astype(mx.float32)                                         # CPU: float32 activations
        num_cached = self.args.num_hidden_layers // 2 + 2
        if cache is None:
            cache = [None] * num_cached
        offset = cache[0].offset if cache[0] is not None else 0
        valid = None if padding_mask is None else padding_mask.astype(h.dtype)
        memory = shared = None
        for i, layer in enumerate(self.layers):
            c = cache[i] if i < num_cached else None
            a = layer.input_layernorm(h)
            if layer.kind in (MAMBA, MAMBA_MEM):
                o, mem = layer.attn(a, c, valid if (c is None or c.offset == 0) else None)
                if mem is not None:
                    memory = mem
                    if capture is not None:
                        capture["gmu_memory"] = mem
                if c is not None:
                    c.offset += inputs.shape[1]
            elif layer.kind == GMU:
                o = layer.attn(a, memory)
            else:
                o, kv = layer.attn(a, c, shared, offset, padding_mask)
                if kv is not None:
                    shared = kv
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

    def __call__(self, inputs: mx.array, cache=None, padding_mask: Optional[mx.array] = None,
                 capture: Optional[dict] = None):
        """Logits (b, l, V). `cache` is ``make_cache()``'s list (continued and updated in place).
        `padding_mask` (b, l), 1 for real tokens, marks left padding of a first (prefill) call.
        `capture`, a dict, receives per-layer outputs, the final norm and the GMU memory."""
        if inputs.shape[-1] > 1:
            # prompts are checked (an out-of-range id would silently read a wrong embedding row); single
            # decode tokens come from a sampler over the vocabulary, and checking them would stall the pipeline
            low, high = mx.min(inputs).item(), mx.max(inputs).item()
            if low < 0 or high >= self.args.vocab_size:
                raise ValueError(f"token id {low if low < 0 else high} is outside the vocabulary "
                                 f"(0..{self.args.vocab_size - 1})")
        h = self.model(inputs, cache, padding_mask, capture)
        if self.args.tie_word_embeddings:
            return self.model.embed_tokens.as_linear(h)
        return self.lm_head(h)

    @property
    def layers(self):
        return self.model.layers

    def make_cache(self):
        """One cache per layer 0..h+1 (5.1). The cross-decoder (layers > h+1) keeps nothing."""
        caches = []
        for kind in self.args.layer_kinds[: self.args.num_hidden_layers // 2 + 2]:
            if kind in (MAMBA, MAMBA_MEM):
                caches.append(MambaCache())
            elif kind == SWA:
                caches.append(SlidingWindowCache(self.args.sliding_window))
            else:
                caches.append(FullKVCache())
        return caches

    def sanitize(self, weights: dict) -> dict:
        """Hugging Face names/layouts -> ours: conv1d weight (Di, 1, K) -> (Di, K, 1); tied lm_head dropped."""
        out = {}
        for name, w in weights.items():
            if self.args.tie_word_embeddings and name == "lm_head.weight":
                continue
            if name.endswith("conv1d.weight") and w.ndim == 3 and w.shape[1] == 1 and w.shape[2] != 1:
                w = w.transpose(0, 2, 1)
            out[name] = w
        return out

    @property
    def quant_predicate(self):
        """Quantize only linear/embedding weights whose input width fits the group size; norms, the conv,
        A_log, D and the λ vectors are not modules with weights to quantize and stay as they are."""
        def predicate(path: str, module: nn.Module, group_size: int = 64):
            if not hasattr(module, "to_quantized"):
                return False
            return module.weight.shape[-1] % group_size == 0
        return predicate
