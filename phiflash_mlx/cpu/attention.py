"""Differential attention of many queries (prompt processing) with the C kernel `phf_attend_many`.

``attend_many`` is what ``DiffAttention.many_query_kernel`` of the model calls for blocks of more
than a few queries on a CPU: the same (attn1, attn2) as ``DiffAttention._core``, computed over each
query's range of keys (causal, sliding window, padding) instead of MLX's CPU attention over
zero-padded queries of width 2 * head_dim. It declines (returns None, and the model computes the
result with MLX ops) where the kernel does not apply: library not built, queries not float32 or
keys / values neither float32 nor float16 (16-bit caches are widened as they are read), quantized
caches, shapes outside the pair layout, or a mask whose allowed keys are not one contiguous range
per query.
"""

from __future__ import annotations

import ctypes

import mlx.core as mx
import numpy as np

from .kernels import _as_f32_kv, _host_call, _kv_code, _library, _strides, threads

_ready: dict = {}


def _lib():
    """The kernel library with phf_attend_many's signature set, or None."""
    lib = _library()
    if lib is None:
        return None
    key = id(lib)
    if key not in _ready:
        ptr, lng, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        try:
            fn = lib.phf_attend_many
        except AttributeError:  # a library built from older sources
            _ready[key] = None
            return None
        fn.argtypes = ([ptr, lng, lng, lng, ptr, lng, lng, lng, ptr, lng, lng, lng, ptr, ptr, lng, ptr]
                       + [lng] * 7 + [ctypes.c_float, lng, i32, i32, i32])
        fn.restype = i32
        _ready[key] = lib
    return _ready[key]


def key_ranges(mask, b: int, l: int, s: int):
    """Per-query key ranges [lo, hi) for a mask as the model passes it: None (every key), "causal"
    (query i sees keys 0 .. s - l + i) or a bool array broadcastable to (b, 1, l, s). Returns
    (lo, hi) as int64 arrays of shape (1, l) or (b, l), or None where the mask is something else or
    some query's allowed keys are not contiguous. A query that may see no key gets lo = hi = 0."""
    if mask is None:
        return np.zeros((1, l), np.int64), np.full((1, l), s, np.int64)
    if isinstance(mask, str):
        if mask != "causal":
            return None
        hi = np.clip(np.arange(s - l + 1, s + 1, dtype=np.int64), 0, s)[None]
        return np.zeros((1, l), np.int64), hi
    if not isinstance(mask, mx.array) or mask.dtype != mx.bool_ or mask.ndim > 4:
        return None
    shape = (1,) * (4 - mask.ndim) + tuple(mask.shape)
    if shape[0] not in (1, b) or shape[1] != 1:
        return None
    try:
        m = np.broadcast_to(np.asarray(mask).reshape(shape), (shape[0], 1, l, s))[:, 0]
    except ValueError:
        return None
    count = m.sum(-1, dtype=np.int64)
    lo = np.argmax(m, axis=-1).astype(np.int64)
    hi = s - np.argmax(m[..., ::-1], axis=-1).astype(np.int64)
    empty = count == 0
    lo[empty] = 0
    hi[empty] = 0
    if np.any(hi - lo != count):  # holes inside a query's range
        return None
    return lo, hi


def attend_many(q: mx.array, keys, values, mask, scale: float, simd: bool = True,
                n_threads: int | None = None, block: int = 0):
    """Both stripes of differential attention for many queries with the C kernel, the result of
    ``DiffAttention._core``: q (b, nh, l, hd) in natural head order; keys, values (b, nkv/2, s, 2hd)
    in the pair layout (stripe 1 uses the first hd columns of the keys, stripe 2 the last; the values
    serve both), float32 or float16 (q float32); mask None, "causal" or a bool array broadcastable to
    (b, 1, l, s). Returns (attn1, attn2), each (b, nh/2, l, 2hd) float32, or None to leave it to MLX
    ops. Queries that may see no key get zeros (MLX's attention gives NaN there). `block`: query
    positions per unit of work (0: the kernel's default)."""
    lib = _lib()
    if lib is None or not all(isinstance(x, mx.array) for x in (q, keys, values)):
        return None
    if q.dtype != mx.float32 or _kv_code(keys, values) is None or q.ndim != 4 or keys.ndim != 4 or values.ndim != 4:
        return None
    b, nh, l, hd = q.shape
    pairs, s = keys.shape[1], keys.shape[2]
    if (nh % 2 or pairs == 0 or (nh // 2) % pairs or keys.shape[0] != b or keys.shape[-1] != 2 * hd
            or values.shape[:3] != (b, pairs, s)):
        return None
    try:
        ranges = key_ranges(mask, b, l, s)
    except ValueError:  # the mask cannot be read here (inside mx.compile or vmap)
        ranges = None
    if ranges is None:
        return None
    lo, hi = (np.ascontiguousarray(x) for x in ranges)

    def slow(q, keys, values):                         # MLX's attention, stripe by stripe
        sdpa = mx.fast.scaled_dot_product_attention
        keys, values = _as_f32_kv(keys, values)
        return (sdpa(q[:, 0::2], keys[..., :hd], values, scale=scale, mask=mask),
                sdpa(q[:, 1::2], keys[..., hd:], values, scale=scale, mask=mask))

    def fast(q, keys, values):
        return _attend_many_c(lib, q, keys, values, lo, hi, scale, simd, n_threads, block)

    return _host_call(fast, slow, q, keys, values)


def _unit_stride(a: np.ndarray) -> np.ndarray:
    return a if a.strides[-1] == a.itemsize else np.ascontiguousarray(a)


def _attend_many_c(lib, q, keys, values, lo, hi, scale, simd, n_threads, block):
    mx.eval(q, keys, values)
    qn, kn, vn = (_unit_stride(np.asarray(x)) for x in (q, keys, values))
    b, nh, l, hd = qn.shape
    pairs, s, dv = kn.shape[1], kn.shape[2], vn.shape[-1]
    g = nh // 2 // pairs
    qs, ks, vs = _strides(qn), _strides(kn), _strides(vn)
    out = np.empty((2, b, nh // 2, l, dv), dtype=np.float32)
    rc = lib.phf_attend_many(qn.ctypes.data, qs[0], qs[1], qs[2], kn.ctypes.data, ks[0], ks[1], ks[2],
                             vn.ctypes.data, vs[0], vs[1], vs[2], lo.ctypes.data, hi.ctypes.data,
                             l if lo.shape[0] > 1 else 0, out.ctypes.data, b, pairs, g, l, hd, dv, s,
                             float(scale), int(block), n_threads or threads(), int(simd), _kv_code(keys, values))
    if rc != 0:
        return None
    both = mx.array(out)
    return both[0], both[1]
