"""Quantized products with 16-bit scales and biases (float16 / bfloat16 read as stored by the C kernels).

Oracles: NumPy's own float16 and a bit-shift bfloat16 conversion feeding the float64 emulation of the
int8-activation products (test_cpu_q8's), and MLX's quantized_matmul with the same 16-bit scales for
the float-activation products, the fused decode steps and whole golden models."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phiflash_mlx.cpu import kernels as cpu_kernels
from test_cpu_q8 import emulate, pack, random_case

LIB = cpu_kernels._library()
pytestmark = pytest.mark.skipif(LIB is None, reason="the C kernels were not built (Linux only; see setup.py)")
BEST = LIB.phf_q8_level() if LIB is not None else 0
DTYPES = {"float32": cpu_kernels.SD_F32, "float16": cpu_kernels.SD_F16, "bfloat16": cpu_kernels.SD_BF16}


def to_16(a: np.ndarray, dtype: str):
    """(what the kernel is given, the float64 values it must use): float32 as is, float16 through
    NumPy, bfloat16 rounded to nearest even on the upper 16 bits."""
    a = np.ascontiguousarray(a, np.float32)
    if dtype == "float32":
        return a, a.astype(np.float64)
    if dtype == "float16":
        h = a.astype(np.float16)
        return h.view(np.uint16).copy(), h.astype(np.float64)
    u = a.view(np.uint32).astype(np.uint64)
    bits = ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)
    return bits, (bits.astype(np.uint32) << 16).view(np.float32).astype(np.float64)


def spread(rng, shape):
    """Scale-like values over many magnitudes, float16 subnormals, signed zeros and extremes included."""
    v = rng.standard_normal(shape) * 10.0 ** rng.integers(-7, 2, shape)
    flat = v.reshape(-1)
    special = np.array([0.0, -0.0, 3e-7])[: min(3, flat.size)]
    flat[rng.choice(flat.size, special.size, replace=False)] = special
    return v.astype(np.float32)


def q8_sd(x, w, s16, b16, code, bits, group_size, threads, level):
    m, k = x.shape
    n = w.shape[0]
    y = np.full((m, n), np.nan, np.float32)
    x = np.ascontiguousarray(x, np.float32)
    rc = LIB.phf_q8_matmul_sd(x.ctypes.data, m, k, w.ctypes.data, s16.ctypes.data, b16.ctypes.data, code, n, bits,
                              group_size, y.ctypes.data, threads, level)
    assert rc == 0
    return y


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(list(DTYPES)), bits=st.sampled_from([4, 8]), group_size=st.sampled_from([32, 64, 128]),
       m=st.integers(1, 9), n=st.integers(1, 37), groups=st.integers(1, 17), threads=st.integers(1, 4),
       level=st.integers(0, 2), seed=st.integers(0, 2 ** 16))
def test_int8_products_read_16_bit_scales(dtype, bits, group_size, m, n, groups, threads, level, seed):
    """Every SIMD level (higher ones fall back to the best this CPU has), decode rows and blocks, group
    counts on both sides of the 8-wide bias loop: equal to the integer math on the converted values."""
    rng = np.random.default_rng(seed)
    k = group_size * groups
    x, codes, _, _ = random_case(rng, m, n, k, bits, group_size, None, 0)
    s16, s64 = to_16(spread(rng, (n, groups)), dtype)
    b16, b64 = to_16(spread(rng, (n, groups)), dtype)
    got = q8_sd(x, pack(codes, bits), s16, b16, DTYPES[dtype], bits, group_size, threads, level)
    want, mag = emulate(x, codes, s64, b64, group_size)
    assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), np.max(np.abs(got - want) / (mag + 1e-30))


def test_16_bit_special_values_convert_exactly():
    """Every float16 and every bfloat16 bit pattern as the scale of a one-hot product, and every finite
    one as a bias (8 groups: the SIMD bias sums convert 8 at a time; x in each lane in turn): y is the
    value times 127 exactly (portable and SIMD; subnormals, signed zeros), infinite scales give
    infinities of their sign (portable); a bad dtype code is refused."""
    group_size, n = 32, 4096
    codes = np.zeros((n, group_size), np.int64)
    codes[:, 0] = 1
    w = pack(codes, 8)
    x = np.zeros((1, group_size), np.float32)
    x[0, 0] = 127.0                       # quantizes exactly: d = 1, xq = 127
    patterns = np.arange(65536, dtype=np.uint32)
    with np.errstate(invalid="ignore"):
        cases = (("float16", patterns.astype(np.uint16).view(np.float16).astype(np.float64)),
                 ("bfloat16", (patterns << 16).view(np.float32).astype(np.float64)))
    for dtype, values in cases:
        bits = patterns.astype(np.uint16)
        keep = np.isfinite(values) & (np.abs(values) < 1e30)
        for level in sorted({0, BEST}):
            for start in range(0, 65536, n):
                s16 = np.ascontiguousarray(bits[start:start + n].reshape(n, 1))
                b16 = np.zeros_like(s16)
                got = q8_sd(x, w, s16, b16, DTYPES[dtype], 8, group_size, 1, level)[0].astype(np.float64)
                with np.errstate(invalid="ignore"):
                    want = values[start:start + n] * 127.0
                ok = keep[start:start + n]
                np.testing.assert_array_equal(got[ok], want[ok].astype(np.float32))
                if level:
                    continue                      # SIMD lanes multiply partial sums of 0 by it: NaN
                inf = np.isinf(values[start:start + n])
                assert np.all(np.isinf(got[inf]) & (np.sign(got[inf]) == np.sign(values[start:start + n][inf])))
    # biases: 8 groups, the int8 path's 8-lane conversion; x in one group (lane) at a time
    k8 = 8 * group_size
    w8 = pack(np.zeros((n, k8), np.int64), 8)
    for dtype, values in cases:
        finite = np.where(np.isfinite(values) & (np.abs(values) < 1e30), patterns, 0).astype(np.uint16)
        for level in sorted({0, BEST}):
            for start in range(0, 65536, n):
                lane = (start // n) % 8
                xl = np.zeros((1, k8), np.float32)
                xl[0, lane * group_size] = 127.0
                b16 = np.ascontiguousarray(np.repeat(finite[start:start + n, None], 8, 1))
                s16 = np.zeros_like(b16)
                got = q8_sd(xl, w8, s16, b16, DTYPES[dtype], 8, group_size, 1, level)[0]
                with np.errstate(invalid="ignore"):
                    want = (np.where(finite[start:start + n] == patterns[start:start + n], values[start:start + n], 0)
                            * 127.0).astype(np.float32)
                np.testing.assert_array_equal(got, want)
    y = np.zeros((1, n), np.float32)
    s = np.zeros((n, 1), np.float32)
    assert LIB.phf_qmatvec_sd(x.ctypes.data, 1, group_size, w.ctypes.data, s.ctypes.data, s.ctypes.data, 3, n, 8,
                              group_size, y.ctypes.data, 1, 1) == -1


def _mlx_16(w: mx.array, group_size: int, bits: int, dtype: str):
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    target = getattr(mx, dtype)
    return wq, scales.astype(target), biases.astype(target)


@settings(max_examples=40, deadline=None)
@given(dtype=st.sampled_from(list(DTYPES)), bits=st.sampled_from([2, 4, 8]),
       group_size=st.sampled_from([32, 64, 128]), rows=st.sampled_from([1, 2, 5, 16, 33]), out=st.integers(1, 40),
       groups=st.integers(1, 5), simd=st.booleans(), threads=st.integers(1, 4), block=st.booleans(),
       seed=st.integers(0, 2 ** 16))
def test_float_products_equal_mlx_with_the_same_scales(dtype, bits, group_size, rows, out, groups, simd, threads,
                                                       block, seed):
    """PHIFLASH_CPU_INT8=0: phf_qmatvec (rows) and phf_qmatmul (blocks), portable and AVX2, equal MLX's
    quantized_matmul reading the same 16-bit scales and biases; they are handed over without a float32
    copy."""
    k = group_size * groups
    kx, kw = mx.random.split(mx.random.key(seed))
    x = mx.random.normal((rows, k), key=kx)
    wq, scales, biases = _mlx_16(mx.random.normal((out, k), key=kw) * 0.1, group_size, bits, dtype)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    packed = cpu_kernels._Packed(wq, scales, biases)
    assert packed.sdtype == DTYPES[dtype]
    assert packed.scales.dtype == (np.float32 if dtype == "float32" else np.uint16)
    previous = cpu_kernels.set_int8(False)
    try:
        got = cpu_kernels.qmatvec(x, wq, scales, biases, group_size, bits, packed=packed, simd=simd,
                                  n_threads=threads, block=block)
    finally:
        cpu_kernels.set_int8(previous)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


def _golden_16(name, dtype, upcast=False):
    """A golden model quantized to 4 bits (groups of 32) whose quantized linear layers hold their scales
    and biases in `dtype` (the embedding keeps float32); `upcast`: the same values stored as float32."""
    from test_cpu_fused import _quantized_golden

    model = _quantized_golden(name)
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales = m.scales.astype(dtype)
            m.biases = m.biases.astype(dtype)
            if upcast:
                m.scales = m.scales.astype(mx.float32)
                m.biases = m.biases.astype(mx.float32)
    mx.eval(model.parameters())
    return model


@pytest.mark.parametrize("golden,int8", [("tiny", False), ("small", False), ("small", True)])
def test_whole_model_decode_with_bfloat16_scales(golden, int8, monkeypatch):
    """bfloat16 scales and biases in every quantized linear layer, decode steps as one host call through
    fused.c. Float activations: prompt and decode logits equal the plain MLX model's (same bfloat16
    scales) within 1e-4, greedy ids equal. Int8 activations (which move logits by more than that
    against MLX): equal to the attached model holding the same values as float32."""
    from conftest import GOLDEN_MODELS

    if golden not in GOLDEN_MODELS:
        pytest.skip(f"no golden model {golden}")
    if cpu_kernels._fused_library() is None:
        pytest.skip("the fused steps were not built")
    monkeypatch.setenv(cpu_kernels.ENV_INT8, "1" if int8 else "0")
    monkeypatch.setenv(cpu_kernels.ENV_KV16, "0")                 # float32 K/V, as the plain model's
    fast = _golden_16(golden, mx.bfloat16)
    cpu_kernels.use_cpu_kernels(fast)
    reference = _golden_16(golden, mx.bfloat16, upcast=int8)
    if int8:
        cpu_kernels.use_cpu_kernels(reference)
    calls = []
    real = cpu_kernels._whole_step
    monkeypatch.setattr(cpu_kernels, "_whole_step", lambda *a, **kw: calls.append(1) or real(*a, **kw))

    def run(model):
        cache = model.make_cache()
        out = [np.asarray(model(mx.array([[5, 9, 2, 7, 1, 3]]), cache=cache))]
        tok, ids = int(np.argmax(out[-1][0, -1])), []
        for _ in range(8):
            out.append(np.asarray(model(mx.array([[tok]]), cache=cache)))
            tok = int(np.argmax(out[-1][0, -1]))
            ids.append(tok)
        return out, ids

    got, got_ids = run(fast)
    assert len(calls) == 8
    codes = {q.sdtype for q in (m.__dict__.get("_phf_packed") for _, m in fast.named_modules()) if q is not None}
    assert codes == {cpu_kernels.SD_BF16}, codes
    want, want_ids = run(reference)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert got_ids == want_ids


def test_loader_keeps_16_bit_scales_of_quantized_linear_layers(tmp_path):
    """A 4-bit checkpoint with bfloat16 scales and biases (as mlx-lm writes one from a bfloat16 model)
    loaded for float32 on a CPU: the quantized linear layers keep bfloat16 scales and biases (the
    products read them as stored), the quantized embedding and every other floating tensor are float32,
    and the logits (prompt and cached decode) equal those of the same checkpoint with every scale cast
    to float32."""
    import phiflash_mlx
    from conftest import GOLDEN_MODELS, golden_path
    from phiflash_mlx.convert import convert

    if mx.metal.is_available():
        pytest.skip("the float32 policy applies without Metal")
    out = convert(str(golden_path(GOLDEN_MODELS[0])), str(tmp_path / "q"), dtype="bfloat16", quantize=True,
                  q_bits=4, q_group_size=32)
    for f in out.glob("*.safetensors"):
        raw = mx.load(str(f))
        raw = {k: v.astype(mx.bfloat16) if k.endswith((".scales", ".biases")) else v for k, v in raw.items()}
        mx.save_safetensors(str(f), raw, metadata={"format": "mlx"})
    model, _ = phiflash_mlx.load(str(out), tokenizer=False)
    twin, _ = phiflash_mlx.load(str(out), tokenizer=False)
    seen = set()
    for _, m in model.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            seen.add((str(m.scales.dtype), str(m.biases.dtype)))
        elif isinstance(m, nn.QuantizedEmbedding):
            assert m.scales.dtype == mx.float32 and m.biases.dtype == mx.float32
    assert seen == {("mlx.core.bfloat16", "mlx.core.bfloat16")}, seen
    assert model.layers[0].input_layernorm.weight.dtype == mx.float32
    for _, m in twin.named_modules():
        if isinstance(m, nn.QuantizedLinear):
            m.scales, m.biases = m.scales.astype(mx.float32), m.biases.astype(mx.float32)

    def run(mdl):
        cache = mdl.make_cache()
        logits = [np.asarray(mdl(mx.array([[5, 9, 2, 7, 1, 3] * 4]), cache=cache))]
        for t in (4, 8, 15):
            logits.append(np.asarray(mdl(mx.array([[t]]), cache=cache)))
        return logits

    got, want = run(model), run(twin)
    assert got[0].dtype == np.float32
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-5, atol=1e-5)


def test_block_fallback_dequantizes_16_bit_scales_in_float32():
    """A quantized layer too small for the C kernels, a block of rows (dequantize + GEMM): with bfloat16
    scales it equals mx.quantized_matmul on the same scales (the weight is not rounded to bfloat16)."""
    layer = nn.QuantizedLinear(256, 64, bias=False, group_size=64, bits=4)
    layer.scales = (mx.random.uniform(0.01, 0.02, layer.scales.shape, key=mx.random.key(1))).astype(mx.bfloat16)
    layer.biases = (mx.random.uniform(-0.1, 0.1, layer.biases.shape, key=mx.random.key(2))).astype(mx.bfloat16)
    layer.__class__ = cpu_kernels.CPUQuantizedLinear
    assert not cpu_kernels._kernel_applies(layer)
    x = mx.random.normal((cpu_kernels.MIN_TOKENS + 3, 256), key=mx.random.key(3))
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64, bits=4)
    got = layer(x)
    assert got.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-5)


@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16"]), bits=st.sampled_from([4, 8]),
       group_size=st.sampled_from([32, 64, 128]), m=st.integers(1, 15), n=st.integers(1, 41),
       loads=st.integers(1, 19), threads=st.integers(1, 4), prefetch=st.integers(0, 3), zero_group=st.none() | st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_decode_rows_kernel(dtype, bits, group_size, m, n, loads, threads, prefetch, zero_group, seed):
    """Decode rows of x (1 to 15: one stream, or a batch of streams) against 4- and 8-bit codes (the
    512-bit VNNI mat-vec where the CPU has it, except 4-bit groups of 32; else the block kernel):
    column counts that leave a partial block, odd numbers of weight rows and of x rows (an x row without a partner in its pair), several
    tasks, every prefetch distance, 16-bit scales and biases read as stored."""
    rng = np.random.default_rng(seed)
    k = 128 * loads
    k -= k % group_size
    x, codes, _, _ = random_case(rng, m, n, k, bits, group_size, zero_group, 0)
    s16, s64 = to_16(spread(rng, (n, k // group_size)), dtype)
    b16, b64 = to_16(spread(rng, (n, k // group_size)), dtype)
    old = LIB.phf_set_q8v_prefetch(prefetch)
    try:
        got = q8_sd(x, pack(codes, bits), s16, b16, DTYPES[dtype], bits, group_size, threads, -1)
    finally:
        LIB.phf_set_q8v_prefetch(old)
    want, mag = emulate(x, codes, s64, b64, group_size)
    assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), np.max(np.abs(got - want) / (mag + 1e-30))


@pytest.mark.skipif(BEST < 1, reason="needs AVX2")
@settings(max_examples=30, deadline=None)
@given(dtype=st.sampled_from(["float32", "float16", "bfloat16"]), bits=st.sampled_from([4, 8]),
       group_size=st.sampled_from([32, 64, 128]), m=st.sampled_from([1, 1, 2, 3, 4, 5, 8, 15]),
       n=st.integers(1, 41), blocks=st.integers(1, 6), threads=st.integers(1, 4), prefetch=st.integers(0, 3),
       zero_group=st.none() | st.integers(0, 3), seed=st.integers(0, 2 ** 16))
def test_decode_rows_kernel_avx2(dtype, bits, group_size, m, n, blocks, threads, prefetch, zero_group, seed):
    """The AVX2 mat-vec (what CPUs without AVX-512 run for a decode step; forced here with the level
    cap): one row of x (weight rows in pairs) or 2-15 (a batch of streams, up to four per pass over a
    weight row, the rest in a shorter group); 4-bit codes in groups of 64 / 128, 8-bit in groups of
    32-128 (4-bit groups of 32 take the block kernel), rows of 1-6 blocks of 8 segments, odd numbers
    of weight rows, several tasks, every prefetch distance, 16-bit scales and biases read as stored;
    against the float64 emulation of the int8 product."""
    rng = np.random.default_rng(seed)
    k = blocks * 8 * (64 if bits == 4 else 32)
    k -= k % group_size
    x, codes, _, _ = random_case(rng, m, n, k, bits, group_size, zero_group, 0)
    s16, s64 = to_16(spread(rng, (n, k // group_size)), dtype)
    b16, b64 = to_16(spread(rng, (n, k // group_size)), dtype)
    old_cap, old_pf = LIB.phf_set_q8_level_cap(1), LIB.phf_set_q8v_prefetch(prefetch)
    try:
        got = q8_sd(x, pack(codes, bits), s16, b16, DTYPES[dtype], bits, group_size, threads, -1)
    finally:
        LIB.phf_set_q8_level_cap(old_cap)
        LIB.phf_set_q8v_prefetch(old_pf)
    want, mag = emulate(x, codes, s64, b64, group_size)
    assert np.all(np.abs(got - want) <= 1e-5 * mag + 1e-30), np.max(np.abs(got - want) / (mag + 1e-30))
