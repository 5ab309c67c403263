"""16-bit K/V caches on CPUs (PHIFLASH_CPU_KV16): the attention kernels read float16 keys and values
as stored (phf_attend, phf_attend_rows, phf_attend_many) and compute float32 attention over those
values; the oracle is differential attention written out in NumPy float64 on the same float16
values (tests/test_cpu_attention.py's `reference`). The whole model: where the shared full-attention
cache is float16, what changes against float32 caches is bounded, and every CPU path (one host call
per step, per-layer host calls, the model's MLX ops) agrees with the others."""

import ctypes
import sys

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from mlx_lm.models.base import create_causal_mask

from conftest import GOLDEN_MODELS, golden_path
from phiflash_mlx.cpu import attention
from phiflash_mlx.cpu import kernels as cpu_kernels
from test_cpu_attention import allowed_keys, reference

needs_kernel = pytest.mark.skipif(
    cpu_kernels._fused_library() is None or attention._lib() is None,
    reason="the C kernels are built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/cpu/_cpu_kernels*.so was not built (see setup.py)")

# float32 attention over float16 values against the float64 definition over the same values
RTOL, ATOL = 1e-5, 2e-6


@pytest.fixture(autouse=True)
def float_activations():
    """Float activations in the quantized products, so that only the K/V storage differs."""
    previous = cpu_kernels.set_int8(False)
    yield
    cpu_kernels.set_int8(previous)


def _f16_cache(key, b, pairs, s, hd, spare):
    """float16 keys and values as a cache holds them: the first s rows of a longer buffer (strided)."""
    k1, k2 = mx.random.split(key)
    kbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k1).astype(mx.float16)
    vbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k2).astype(mx.float16)
    return kbuf[:, :, :s], vbuf[:, :, :s]


def _close(got, want):
    got = np.asarray(got)
    assert got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=RTOL, atol=ATOL)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), pairs=st.integers(1, 3), g=st.integers(1, 3), l=st.integers(1, 4),
       s=st.integers(1, 300), hd=st.sampled_from([8, 12, 16, 20, 64]), spare=st.integers(0, 5),
       mask=st.sampled_from(["none", "causal", "padded"]), simd=st.booleans(),
       threads=st.sampled_from([1, 2, 3, 4]), seed=st.integers(0, 2**16))
def test_attend_few_reads_float16(b, pairs, g, l, s, hd, spare, mask, simd, threads, seed):
    """phf_attend (the decode kernel) over float16 K/V, AVX2+F16C and portable C, 1-4 threads."""
    nh = 2 * g * pairs
    kq, kc, kv = mx.random.split(mx.random.key(seed), 3)
    q = mx.random.normal((b, nh, l, hd), key=kq)
    keys, values = _f16_cache(kc, b, pairs, s, hd, spare)
    allowed = None
    if mask != "none":
        allowed = create_causal_mask(l, s - l) if s >= l else mx.ones((l, s), dtype=mx.bool_)
        if mask == "padded":
            valid = mx.random.uniform(shape=(b, s), key=kv) > 0.3
            valid[:, max(s - l, 0)] = True    # a key every query row sees (row 0: keys up to s - l)
            allowed = allowed[None, None] & valid[:, None, None, :]
    dense = allowed_keys(allowed, b, l, s, max(s - l, 0))
    scale = hd ** -0.5
    got = cpu_kernels.attend_few(q, keys, values, allowed, scale, simd=simd, n_threads=threads)
    assert got is not None
    want = reference(q, keys.astype(mx.float32), values.astype(mx.float32), dense, scale)
    for part in range(2):
        _close(got[part], want[part])


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(b=st.integers(1, 2), pairs=st.integers(1, 3), g=st.integers(1, 3), l=st.integers(1, 40),
       offset=st.integers(0, 300), hd=st.sampled_from([4, 8, 12, 16]), spare=st.integers(0, 3),
       mask=st.sampled_from(["none", "causal", "window", "window padded"]), window=st.integers(1, 12),
       simd=st.booleans(), threads=st.integers(1, 4), block=st.integers(0, 5), seed=st.integers(0, 2**16))
def test_attend_many_reads_float16(b, pairs, g, l, offset, hd, spare, mask, window, simd, threads, block, seed):
    """phf_attend_many (prompts) over float16 K/V: several key blocks, windows, left padding."""
    nh = 2 * g * pairs
    s = l + offset
    kq, kc = mx.random.split(mx.random.key(seed))
    q = mx.random.normal((b, nh, l, hd), key=kq) * 2.0
    keys, values = _f16_cache(kc, b, pairs, s, hd, spare)
    pad = [int(x) for x in np.random.default_rng(seed).integers(0, s + 1, size=b)]
    given_mask = {
        "none": None,
        "causal": "causal",
        "window": create_causal_mask(l, offset, window_size=window),
        "window padded": create_causal_mask(l, offset, window_size=window, left_padding=mx.array(pad)),
    }[mask]
    allowed = allowed_keys(given_mask, b, l, s, offset)
    scale = hd ** -0.5
    got = attention.attend_many(q, keys, values, given_mask, scale, simd=simd, n_threads=threads, block=block)
    assert got is not None
    want = reference(q, keys.astype(mx.float32), values.astype(mx.float32), allowed, scale)
    for part in range(2):
        _close(got[part], want[part])


@needs_kernel
@settings(max_examples=40, deadline=None)
@given(pairs=st.integers(1, 4), r=st.integers(1, 4), hd=st.sampled_from([4, 8, 12, 16, 64]),
       length=st.integers(1, 200), spare=st.integers(0, 4), new_at=st.integers(0, 10**6),
       path=st.sampled_from(["best", "avx2", "portable"]), threads=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_attend_rows_reads_float16(pairs, r, hd, length, spare, new_at, path, threads, seed):
    """phf_attend_rows (the one-call decode step) over a float16 cache plus this step's new row, the
    rows in the order a rotating cache would hand them out. Paths: the best this CPU has (the 512-bit
    kernel of csrc/attn_decode.c where it applies), that one forbidden (AVX2), all SIMD off."""
    lib = cpu_kernels._fused_library()
    rng = np.random.default_rng(seed)
    kbuf = rng.standard_normal((pairs, length + spare, 2 * hd)).astype(np.float16)
    vbuf = rng.standard_normal((pairs, length + spare, 2 * hd)).astype(np.float16)
    k, v = kbuf[:, :length], vbuf[:, :length]                     # a prefix of the buffer: strided
    rows = rng.permutation(length).astype(np.int32)
    rows[new_at % length] = -1                                     # this step's row
    k_new = rng.standard_normal((pairs, 2 * hd)).astype(np.float16)
    v_new = rng.standard_normal((pairs, 2 * hd)).astype(np.float16)
    q = rng.standard_normal((2, pairs, r, hd)).astype(np.float32) * hd ** -0.5
    out = np.empty((pairs, 2 * r, 2 * hd), np.float32)
    old = lib.phf_fused_simd(int(path != "portable"))
    old_ad = lib.phf_set_attend_decode(int(path == "best"))
    try:
        rc = lib.phf_attend_rows(q.ctypes.data, k.ctypes.data, k.strides[0] // 2, k.strides[1] // 2, v.ctypes.data,
                                 v.strides[0] // 2, v.strides[1] // 2, rows.ctypes.data, k_new.ctypes.data,
                                 v_new.ctypes.data, out.ctypes.data, pairs, r, hd, 2 * hd, length, threads,
                                 cpu_kernels.SD_F16)
    finally:
        lib.phf_fused_simd(old)
        lib.phf_set_attend_decode(old_ad)
    assert rc == 0
    K = np.where((rows < 0)[None, :, None], k_new[:, None].astype(np.float64), k.astype(np.float64)[:, rows])
    V = np.where((rows < 0)[None, :, None], v_new[:, None].astype(np.float64), v.astype(np.float64)[:, rows])
    for part in range(2):
        scores = np.einsum("prd,ptd->prt", q[part].astype(np.float64), K[:, :, part * hd:(part + 1) * hd])
        p = np.exp(scores - scores.max(-1, keepdims=True))
        p /= p.sum(-1, keepdims=True)
        np.testing.assert_allclose(out[:, part * r:(part + 1) * r], p @ V, rtol=RTOL, atol=ATOL)


@needs_kernel
def test_kernels_refuse_other_dtype_codes_and_the_twins_widen():
    """A dtype code other than float32 / float16 is refused (-1), bfloat16 caches go to MLX's ops, and
    inside mx.compile (where the host calls cannot run) the MLX twins give the same float32 math."""
    lib = cpu_kernels._fused_library()
    q = np.zeros((2, 1, 1, 8), np.float32)
    kv = np.zeros((1, 3, 16), np.float16)
    rows = np.arange(3, dtype=np.int32)
    out = np.empty((1, 2, 16), np.float32)
    assert lib.phf_attend_rows(q.ctypes.data, kv.ctypes.data, 48, 16, kv.ctypes.data, 48, 16, rows.ctypes.data,
                               None, None, out.ctypes.data, 1, 1, 8, 16, 3, 1, cpu_kernels.SD_BF16) == -1
    qm = mx.random.normal((1, 4, 3, 8), key=mx.random.key(1))
    keys, values = _f16_cache(mx.random.key(2), 1, 2, 20, 8, 2)
    assert cpu_kernels.attend_few(qm, keys.astype(mx.bfloat16), values.astype(mx.bfloat16), None, 0.3) is None
    assert cpu_kernels.attend_few(qm, keys, values.astype(mx.float32), None, 0.3) is None     # mixed dtypes
    assert attention.attend_many(qm, keys.astype(mx.bfloat16), values.astype(mx.bfloat16), None, 0.3) is None
    want = reference(qm, keys.astype(mx.float32), values.astype(mx.float32), np.ones((1, 3, 20), bool), 0.3)
    few = mx.compile(lambda q, k, v: cpu_kernels.attend_few(q, k, v, None, 0.3))(qm, keys, values)
    many = mx.compile(lambda q, k, v: attention.attend_many(q, k, v, None, 0.3))(qm, keys, values)
    for part in range(2):
        _close(few[part], want[part])
        _close(many[part], want[part])


def test_switch_follows_the_environment_and_set_kv16(monkeypatch):
    previous = cpu_kernels.set_kv16(None)
    try:
        monkeypatch.setenv(cpu_kernels.ENV_KV16, "0")
        assert not cpu_kernels.kv16_enabled()
        monkeypatch.setenv(cpu_kernels.ENV_KV16, "1")
        assert cpu_kernels.kv16_enabled()
        monkeypatch.delenv(cpu_kernels.ENV_KV16)
        assert cpu_kernels.kv16_enabled()                                    # on by default
        assert cpu_kernels.set_kv16(False) is None
        assert not cpu_kernels.kv16_enabled()
        assert cpu_kernels.set_kv16(True) is False
    finally:
        cpu_kernels.set_kv16(previous)


# ---- the whole model ---------------------------------------------------------------------------

def _run(model, ids, steps=6):
    """Logits of a prompt (all but the last 3 ids), 3 teacher-forced steps, then `steps` greedy steps;
    and the cache."""
    cache = model.make_cache()
    n = ids.shape[1]
    out = [np.asarray(model(ids[:, :n - 3], cache=cache))]
    out += [np.asarray(model(ids[:, t:t + 1], cache=cache)) for t in range(n - 3, n)]
    tok = int(np.argmax(out[-1][0, -1]))
    for _ in range(steps):
        out.append(np.asarray(model(mx.array([[tok]]), cache=cache)))
        tok = int(np.argmax(out[-1][0, -1]))
    return np.concatenate(out, axis=1), cache


def _kinds(model, cache):
    return {kind: cache[i] for i, kind in enumerate(model.args.layer_kinds[:len(cache)])}


def _ids(name):
    return mx.array(np.load(golden_path(name) / "vectors.npz")["input_ids_long"])


def _fast_model(name):
    """A golden model quantized to 4 bits (so that decode steps take the one-call step) with the CPU
    kernels attached."""
    from test_cpu_fused import _quantized_golden

    model = _quantized_golden(name)
    cpu_kernels.use_cpu_kernels(model)
    return model


@needs_kernel
@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_golden_logits_with_16_bit_kv(name):
    """KV16 on vs off on the golden models, 4-bit, through the CPU paths (prompt kernel, one-call
    decode steps): the shared cache holds float16 and the sliding-window caches float32; the logits
    move only by the rounding of the stored keys and values.

    Measured (this test's prompt, 3 teacher-forced and 6 greedy steps, int8 activations off): the
    largest logit difference is 3.6e-4 ("small") and 4.3e-4 ("tiny"), 7.8e-5 and 1.3e-4 of the
    largest |logit|. float16 keeps 11 significant bits (relative rounding <= 2**-11 = 4.9e-4 per
    stored value) and attention averages such errors rather than adding them. The bound, 1e-3 of the
    largest |logit|, leaves ~8x room over the measured value yet catches a wrong cache (zeros, a
    missing row, float16 bits read as float32 move the logits by far more)."""
    ids = _ids(name)
    model = _fast_model(name)
    previous = cpu_kernels.set_kv16(False)
    try:
        off, cache_off = _run(model, ids)
        cpu_kernels.set_kv16(True)
        on, cache_on = _run(model, ids)
    finally:
        cpu_kernels.set_kv16(previous)
    kinds_on, kinds_off = _kinds(model, cache_on), _kinds(model, cache_off)
    assert kinds_on["global"].keys.dtype == mx.float16 and kinds_on["global"].values.dtype == mx.float16
    assert kinds_on["swa"].keys.dtype == mx.float32
    assert kinds_off["global"].keys.dtype == mx.float32
    assert on.dtype == np.float32
    diff = np.abs(on - off).max()
    print(f"{name}: max |logit diff| {diff:.3g}, relative to max |logit| {diff / np.abs(off).max():.3g}")
    assert 0 < diff <= 1e-3 * np.abs(off).max(), diff


@needs_kernel
@pytest.mark.parametrize("name,path", [(n, p) for n in GOLDEN_MODELS for p in ("step", "units")])
def test_cpu_paths_agree_with_16_bit_kv(name, path, monkeypatch):
    """With KV16 on, the CPU paths (the one-call decode step or the per-layer host calls, the kernels
    for prompts) give the logits of the plain MLX model whose full-attention layer stores float16
    (DiffAttention.kv_dtype) within 1e-4: each rounds the new rows the same way and attends over the
    same stored values."""
    from test_cpu_fused import _quantized_golden

    ids = _ids(name)
    plain = _quantized_golden(name)
    for _, m in plain.named_modules():
        if hasattr(m, "few_query_kernel"):
            m.few_query_kernel = m.many_query_kernel = None
            if m.kind == "global":
                m.kv_dtype = mx.float16
    fast = _fast_model(name)
    previous = cpu_kernels.set_kv16(True)
    try:
        calls = []
        real = cpu_kernels._whole_step
        monkeypatch.setattr(cpu_kernels, "_whole_step", lambda *a: calls.append(1) or real(*a))
        if path == "units":
            monkeypatch.setattr(cpu_kernels, "_step_plan", lambda *a: None)
        got, cache = _run(fast, ids)
        assert bool(calls) == (path == "step")
        assert _kinds(fast, cache)["global"].keys.dtype == mx.float16
        want, cache = _run(plain, ids)
        assert _kinds(plain, cache)["global"].keys.dtype == mx.float16
    finally:
        cpu_kernels.set_kv16(previous)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)


@needs_kernel
def test_prompt_cache_files_and_trimming_keep_16_bit_kv(tmp_path):
    """mlx-lm's prompt-cache files and trimming with the float16 shared cache: a saved and loaded cache
    is float16 and continues exactly like the original; the shared cache trimmed by 2 (mlx-lm's
    KVCache.trim; the Mamba states cannot be rewound, so the model's cache as a whole is not trimmable)
    holds the rows of the shorter prompt and keeps writing float16 rows after them."""
    from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

    name = GOLDEN_MODELS[0]
    ids = _ids(name)
    model = _fast_model(name)
    n = ids.shape[1]
    previous = cpu_kernels.set_kv16(True)
    try:
        cache = model.make_cache()
        mx.eval(model(ids[:, :n - 1], cache=cache))
        save_prompt_cache(str(tmp_path / "c.safetensors"), cache)
        loaded = load_prompt_cache(str(tmp_path / "c.safetensors"))
        assert _kinds(model, loaded)["global"].keys.dtype == mx.float16
        want = np.asarray(model(ids[:, n - 1:], cache=cache))
        got = np.asarray(model(ids[:, n - 1:], cache=loaded))
        np.testing.assert_array_equal(got, want)
        w = model.args.sliding_window                   # a rotating cache trims while it holds < w positions
        cache, short = model.make_cache(), model.make_cache()
        mx.eval(model(ids[:, :w - 1], cache=cache), model(ids[:, :w - 3], cache=short))
        g, gs = _kinds(model, cache)["global"], _kinds(model, short)["global"]
        assert g.is_trimmable() and g.trim(2) == 2 and g.offset == gs.offset == w - 3
        for a, b in ((g.keys, gs.keys), (g.values, gs.values)):
            a, b = a[..., :w - 3, :], b[..., :w - 3, :]
            assert a.dtype == b.dtype == mx.float16
            np.testing.assert_allclose(np.asarray(a.astype(mx.float32)), np.asarray(b.astype(mx.float32)),
                                       rtol=2e-3, atol=1e-3)
        mx.eval(model(ids[:, w - 3:w - 2], cache=cache))
        assert g.offset == w - 2 and g.keys.dtype == g.values.dtype == mx.float16
    finally:
        cpu_kernels.set_kv16(previous)


# ---- the rounding of new rows in the one-call decode step -----------------------------------------

def _f16_round(x: np.ndarray) -> np.ndarray:
    lib = cpu_kernels._fused_library()
    fn = lib.phf_f16_round
    fn.argtypes, fn.restype = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_long], None
    x = np.ascontiguousarray(x, dtype=np.float32)
    out = np.empty(x.shape, dtype=np.uint16)
    fn(x.ctypes.data, out.ctypes.data, x.size)
    return out


def _same_f16(got: np.ndarray, x: np.ndarray):
    with np.errstate(over="ignore"):
        want = x.astype(np.float16).view(np.uint16)
    nan = np.isnan(x)
    bad = np.flatnonzero((got != want) & ~nan)
    assert bad.size == 0, [(float(x[i]), hex(got[i]), hex(want[i])) for i in bad[:5]]
    assert np.isnan(got.view(np.float16)[nan]).all()


@needs_kernel
def test_float16_rounding_of_new_rows_is_numpys_at_every_boundary():
    """phf_decode_layers rounds a 16-bit cache's new rows itself: against NumPy's float16 cast (round to
    nearest, ties to even) at every float16 value, every midpoint between neighbours (the ties), one
    float32 step either side of each midpoint, and past the largest finite value and into the
    subnormals."""
    values = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16).view(np.float16)
    finite = np.sort(values[np.isfinite(values)].astype(np.float32))
    mids = ((finite[:-1].astype(np.float64) + finite[1:]) / 2).astype(np.float32)   # exact in float32
    around = np.concatenate([np.nextafter(mids, np.float32(np.inf)), np.nextafter(mids, np.float32(-np.inf))])
    edges = np.array([65504, 65519.996, 65520, 65536, 1e30, np.inf, -np.inf, np.nan, 2.0 ** -25, 2.0 ** -26,
                      -(2.0 ** -25), 2.0 ** -24 * 1.5, 1e-45, -0.0], dtype=np.float32)
    x = np.concatenate([finite, mids, around, edges])
    _same_f16(_f16_round(x), x)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(xs=st.lists(st.floats(width=32), min_size=1, max_size=64))
def test_float16_rounding_of_random_floats_is_numpys(xs):
    x = np.array(xs, dtype=np.float32)
    _same_f16(_f16_round(x), x)


@needs_kernel
def test_float32_cache_given_16_bit_rows(monkeypatch):
    """A shared cache filled while KV16 was off (float32) and decoded with it on: the one-call step
    rounds each new row to float16 and attends over it widened, as MLX's update stores it; the logits
    are the plain model's (same switch at the same step) within 1e-4, and the cache stays float32.
    (Attending over the unrounded new row instead moves these logits by ~1.4e-4; the paths agree to
    ~1.5e-5.)"""
    from test_cpu_fused import _quantized_golden

    name = GOLDEN_MODELS[0]
    ids = _ids(name)
    plain = _quantized_golden(name)
    glob = []
    for _, m in plain.named_modules():
        if hasattr(m, "few_query_kernel"):
            m.few_query_kernel = m.many_query_kernel = None
            if m.kind == "global":
                glob.append(m)
    fast = _fast_model(name)
    lib = cpu_kernels._fused_library()
    real, done = lib.phf_decode_layers, []
    monkeypatch.setattr(lib, "phf_decode_layers", lambda *a: done.append(real(*a) == 0) or done[-1] - 1)

    def run(model, kv16):
        cache = model.make_cache()
        kv16(False)
        out = [np.asarray(model(ids[:, :2], cache=cache))]   # a short prompt: the new rows weigh much
        kv16(True)
        out += [np.asarray(model(ids[:, t:t + 1], cache=cache)) for t in range(2, 8)]
        assert _kinds(model, cache)["global"].keys.dtype == mx.float32
        return np.concatenate(out, axis=1)

    def plain_kv16(on):
        for m in glob:
            m.kv_dtype = mx.float16 if on else None

    previous = cpu_kernels.set_kv16(None)
    try:
        got = run(fast, cpu_kernels.set_kv16)
    finally:
        cpu_kernels.set_kv16(previous)
    assert len(done) >= 2 and all(done), done
    want = run(plain, plain_kv16)
    np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4)
