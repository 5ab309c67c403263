"""The many-query attention kernel (phf_attend_many in phiflash_mlx/cpu/csrc/attn_prefill.c, reached
through phiflash_mlx.cpu.attention.attend_many) against differential attention written out in NumPy
float64, and the model with it against the model without it."""

import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from mlx_lm.models.base import create_causal_mask

from phiflash_mlx.cpu import attention
from phiflash_mlx.models.phi4flash import DiffAttention

needs_kernel = pytest.mark.skipif(
    attention._lib() is None,
    reason="the C kernels are built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/cpu/_cpu_kernels*.so was not built (see setup.py)")


# these checks hold the model to 1e-4: float32 K/V caches (conftest.py)
pytestmark = pytest.mark.usefixtures("float32_kv_caches")


def reference(q, keys, values, allowed, scale):
    """Both stripes by the definition, float64: query head j of stripe j % 2 and pair (j // 2) // g
    scores keys[..., part * hd:(part + 1) * hd] of its pair at the positions `allowed` (b, l, s) lets
    it see, softmax over those, weights the pair's value rows. A query that may see nothing: zeros."""
    q, keys, values = (np.asarray(x, dtype=np.float64) for x in (q, keys, values))
    b, nh, l, hd = q.shape
    pairs = keys.shape[1]
    g = nh // 2 // pairs
    out = np.zeros((2, b, nh // 2, l, values.shape[-1]))
    for part in range(2):
        for i in range(nh // 2):
            h = i // g
            k = keys[:, h, :, part * hd:(part + 1) * hd]                      # (b, s, hd)
            scores = np.einsum("bld,bsd->bls", q[:, 2 * i + part], k) * scale
            scores = np.where(allowed, scores, -np.inf)
            top = scores.max(-1, keepdims=True)
            p = np.where(allowed, np.exp(scores - np.where(np.isfinite(top), top, 0.0)), 0.0)
            total = p.sum(-1, keepdims=True)
            p = p / np.where(total > 0, total, 1.0)
            out[part, :, i] = p @ values[:, h]
    return out


def allowed_keys(given_mask, b, l, s, offset):
    """(b, l, s) booleans: which of s keys each of l queries may see under a mask as the model gets it
    (None, "causal", or a boolean array broadcastable to (b, 1, l, s))."""
    if given_mask is None:
        return np.ones((b, l, s), bool)
    if isinstance(given_mask, str):
        return np.broadcast_to(np.asarray(create_causal_mask(l, offset)), (b, l, s))
    m = np.asarray(given_mask)
    return np.broadcast_to(m.reshape((1,) * (4 - m.ndim) + m.shape)[:, 0], (b, l, s))


def _cache_view(key, b, pairs, s, hd, spare):
    """Keys and values as the caches hold them: the first s rows of a longer buffer (a strided view)."""
    k1, k2 = mx.random.split(key)
    kbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k1)
    vbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k2)
    return kbuf[:, :, :s], vbuf[:, :, :s]


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(b=st.integers(1, 2), pairs=st.integers(1, 3), g=st.integers(1, 3), l=st.integers(1, 40),
       offset=st.integers(0, 30), hd=st.integers(4, 16), spare=st.integers(0, 3),
       mask=st.sampled_from(["none", "causal", "causal array", "window", "left padding", "window padded"]),
       window=st.integers(1, 12), simd=st.booleans(), threads=st.integers(1, 4), block=st.integers(0, 5),
       q_view=st.booleans(), seed=st.integers(0, 2**16))
def test_attend_many_equals_reference(b, pairs, g, l, offset, hd, spare, mask, window, simd, threads, block,
                                      q_view, seed):
    nh = 2 * g * pairs
    s = l + offset                                   # the cache held `offset` keys before these queries
    kq, kc = mx.random.split(mx.random.key(seed))
    if q_view:                                       # as the model makes it: (b, l, nh, hd) transposed
        q = (mx.random.normal((b, l, nh, hd), key=kq) * 2.0).transpose(0, 2, 1, 3)
    else:
        q = mx.random.normal((b, nh, l, hd), key=kq) * 2.0
    keys, values = _cache_view(kc, b, pairs, s, hd, spare)
    pad = [int(x) for x in np.random.default_rng(seed).integers(0, s + 1, size=b)]
    given_mask = {
        "none": None,
        "causal": "causal",
        "causal array": create_causal_mask(l, offset),
        "window": create_causal_mask(l, offset, window_size=window),
        "left padding": create_causal_mask(l, offset, left_padding=mx.array(pad)),
        "window padded": create_causal_mask(l, offset, window_size=window, left_padding=mx.array(pad)),
    }[mask]
    allowed = allowed_keys(given_mask, b, l, s, offset)
    scale = hd ** -0.5
    got = attention.attend_many(q, keys, values, given_mask, scale, simd=simd, n_threads=threads, block=block)
    assert got is not None
    want = reference(q, keys, values, allowed, scale)
    for part in range(2):
        assert got[part].shape == (b, nh // 2, l, 2 * hd)
        np.testing.assert_allclose(np.asarray(got[part]), want[part], rtol=1e-4, atol=2e-5)


@needs_kernel
def test_long_cache_and_padding_at_the_kernel_level():
    """Several key blocks of the kernel (256 keys each) with an online softmax across them, a query
    block that straddles a block boundary, and a right-padded batch (per-sequence ranges)."""
    b, pairs, g, l, s, hd = 2, 2, 2, 37, 700, 16
    kq, kc = mx.random.split(mx.random.key(7))
    q = mx.random.normal((b, 2 * g * pairs, l, hd), key=kq) * 3.0
    keys, values = _cache_view(kc, b, pairs, s, hd, 5)
    right = mx.array([0, 300])
    mask = create_causal_mask(l, s - l, right_padding=right)
    got = attention.attend_many(q, keys, values, mask, 0.25, n_threads=2)
    want = reference(q, keys, values, np.broadcast_to(np.asarray(mask)[:, 0], (b, l, s)), 0.25)
    for part in range(2):
        np.testing.assert_allclose(np.asarray(got[part]), want[part], rtol=1e-4, atol=2e-5)


def test_key_ranges():
    lo, hi = attention.key_ranges("causal", 1, 3, 5)
    assert lo.tolist() == [[0, 0, 0]] and hi.tolist() == [[3, 4, 5]]
    lo, hi = attention.key_ranges(None, 2, 2, 4)
    assert lo.tolist() == [[0, 0]] and hi.tolist() == [[4, 4]]
    lo, hi = attention.key_ranges(create_causal_mask(3, 2, window_size=2), 1, 3, 5)
    assert lo.tolist() == [[1, 2, 3]] and hi.tolist() == [[3, 4, 5]]
    lo, hi = attention.key_ranges(mx.array([[False, False], [True, False]]), 1, 2, 2)
    assert lo.tolist() == [[0, 0]] and hi.tolist() == [[0, 1]]                    # empty row: (0, 0)
    assert attention.key_ranges(mx.array([[True, False, True]]), 1, 1, 3) is None  # a hole
    assert attention.key_ranges(mx.ones((1, 2, 3, 4), dtype=mx.bool_), 1, 3, 4) is None  # per head
    assert attention.key_ranges(mx.zeros((3, 4)), 1, 3, 4) is None                # additive masks
    assert attention.key_ranges("window", 1, 3, 4) is None


@needs_kernel
def test_declines_and_the_model_falls_back():
    kq, kc = mx.random.split(mx.random.key(1))
    q = mx.random.normal((1, 4, 20, 8), key=kq)
    keys, values = _cache_view(kc, 1, 1, 20, 8, 0)
    holes = mx.array(np.tile([True, False], 10)[None, None, None].repeat(20, 2))
    assert attention.attend_many(q, keys, values, holes, 0.3) is None             # not contiguous
    assert attention.attend_many(q.astype(mx.float16), keys.astype(mx.float16), values.astype(mx.float16),
                                 None, 0.3) is None                                # not float32
    layer = DiffAttention.__new__(DiffAttention)
    layer.scale = 0.3
    layer.few_query_kernel = None
    layer.many_query_kernel = None
    plain = DiffAttention._core(layer, q, keys, values, holes, None)
    layer.many_query_kernel = attention.attend_many
    got = DiffAttention._core(layer, q, keys, values, holes, None)
    for a, w in zip(got, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@needs_kernel
def test_quantized_cache_keeps_the_mlx_path():
    from mlx_lm.models.cache import QuantizedKVCache

    calls = []
    kq, kc = mx.random.split(mx.random.key(2))
    q = mx.random.normal((1, 4, 20, 32), key=kq)
    keys, values = _cache_view(kc, 1, 1, 20, 32, 0)
    cache = QuantizedKVCache(group_size=32, bits=8)
    qk, qv = cache.update_and_fetch(keys, values)
    layer = DiffAttention.__new__(DiffAttention)
    layer.scale = 0.3
    layer.few_query_kernel = None
    layer.many_query_kernel = None
    plain = DiffAttention._core(layer, q, qk, qv, "causal", cache)
    layer.many_query_kernel = lambda *a: calls.append(a) or attention.attend_many(*a)
    got = DiffAttention._core(layer, q, qk, qv, "causal", cache)
    assert calls == []
    for a, w in zip(got, plain):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(w))


@needs_kernel
def test_transparent_to_compile_and_gradients():
    kq, kc = mx.random.split(mx.random.key(3))
    q = mx.random.normal((1, 4, 24, 16), key=kq)
    keys, values = _cache_view(kc, 1, 1, 30, 16, 0)
    mask = create_causal_mask(24, 6, window_size=9)

    def via_kernel(q, keys, values):
        a1, a2 = attention.attend_many(q, keys, values, mask, 0.25)
        return (a1 * a1).sum() + (a1 * a2).sum()

    def via_mlx(q, keys, values):
        sdpa = mx.fast.scaled_dot_product_attention
        a1 = sdpa(q[:, 0::2], keys[..., :16], values, scale=0.25, mask=mask)
        a2 = sdpa(q[:, 1::2], keys[..., 16:], values, scale=0.25, mask=mask)
        return (a1 * a1).sum() + (a1 * a2).sum()

    want = float(via_mlx(q, keys, values))
    np.testing.assert_allclose(float(via_kernel(q, keys, values)), want, rtol=1e-5)
    np.testing.assert_allclose(float(mx.compile(via_kernel)(q, keys, values)), want, rtol=1e-5)
    got = mx.grad(via_kernel, argnums=(0, 1, 2))(q, keys, values)
    grads = mx.grad(via_mlx, argnums=(0, 1, 2))(q, keys, values)
    for g_, w in zip(got, grads):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g_), np.asarray(w), rtol=1e-4, atol=1e-5)


@needs_kernel
@pytest.mark.parametrize("golden", range(2))
def test_golden_models_with_and_without_the_kernel(golden):
    """Prompts longer than FEW_QUERIES (so the kernel runs) and longer than the sliding window (so the
    window layers get a mask array), in one piece and in chunks (queries over a cache that already
    holds keys): logits with the kernel equal those without within 1e-4 and the golden logits, and
    the greedy continuations are the same."""
    import phiflash_mlx
    from conftest import GOLDEN_MODELS, golden_path

    name = GOLDEN_MODELS[golden % len(GOLDEN_MODELS)]
    model, _ = phiflash_mlx.load(str(golden_path(name)))
    vectors = np.load(golden_path(name) / "vectors.npz")
    prompt = vectors["input_ids_long"]
    assert prompt.shape[1] > model.args.sliding_window
    layers = [m for _, m in model.named_modules() if isinstance(m, DiffAttention)]
    assert layers and all(m.many_query_kernel is attention.attend_many for m in layers)
    used = []

    def spy(q, keys, values, mask, scale):
        out = attention.attend_many(q, keys, values, mask, scale)
        used.append((out is not None, "array" if isinstance(mask, mx.array) else mask))
        return out

    def run(chunks):
        cache = model.make_cache()
        logits, start = [], 0
        for n in chunks:
            logits.append(np.asarray(model(mx.array(prompt[:, start:start + n]), cache=cache)))
            start += n
        tok, ids = int(np.argmax(logits[-1][0, -1])), []
        for _ in range(6):
            tok = int(np.argmax(np.asarray(model(mx.array([[tok]]), cache=cache))[0, -1]))
            ids.append(tok)
        return np.concatenate(logits, axis=1), ids

    results = {}
    for kernel in (spy, None):
        for m in layers:
            m.many_query_kernel = kernel
        results[kernel is None] = [run([prompt.shape[1]]), run([17, prompt.shape[1] - 17])]
    assert (True, "array") in used and all(ok for ok, _ in used)
    for (fast, fast_ids), (plain, plain_ids) in zip(results[False], results[True]):
        np.testing.assert_allclose(fast, plain, rtol=0, atol=1e-4)
        np.testing.assert_allclose(fast, vectors["logits_long"], rtol=0, atol=1e-4)
        assert fast_ids == plain_ids
