"""The CPU quantized decode kernel (phiflash_mlx/cpu/csrc/cpu_kernels.c) against MLX's own quantized_matmul and dequantize."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phiflash_mlx.cpu import kernels as cpu_kernels

needs_kernel = pytest.mark.skipif(
    cpu_kernels._library() is None,
    reason="the C kernel is built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/cpu/_cpu_kernels*.so was not built (see setup.py)")


@pytest.fixture(autouse=True)
def float_activations():
    """These tests hold the kernels to MLX's float results: int8 activations (tests/test_cpu_q8.py) and
    the 16-bit shared K/V cache (tests/test_cpu_kv16.py) off."""
    previous, previous_kv = cpu_kernels.set_int8(False), cpu_kernels.set_kv16(False)
    yield
    cpu_kernels.set_int8(previous)
    cpu_kernels.set_kv16(previous_kv)


def test_kernel_is_built_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("compiled on Linux only")
    assert cpu_kernels.library_path("_cpu_kernels") is not None, "pip install -e . should have compiled it"
    assert cpu_kernels.kernel_info()["active"]


@needs_kernel
@settings(max_examples=40)
@given(bits=st.sampled_from([2, 4, 8]), group_size=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 20), out=st.integers(1, 300), groups=st.integers(1, 4),
       simd=st.booleans(), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_cpu_kernels_equals_quantized_matmul(bits, group_size, rows, out, groups, simd, threads, seed):
    _check_qmatvec(bits, group_size, rows, out, groups, simd, threads, seed)


@needs_kernel
@pytest.mark.parametrize("group_size,groups,out,threads", [(64, 1, 7, 1), (64, 40, 300, 2), (128, 3, 33, 3)])
def test_one_row_4_bit_path(group_size, groups, out, threads):
    """The decode case (one row, 4 bits, groups of 64 or 128) has its own AVX2 path that reads 32 bytes
    of codes at a time against an even/odd split copy of x."""
    _check_qmatvec(4, group_size, 1, out, groups, True, threads, seed=group_size + out)


def _check_qmatvec(bits, group_size, rows, out, groups, simd, threads, seed):
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    k = group_size * groups
    w = mx.random.normal((out, k), key=k1) * mx.exp(mx.random.normal((out, 1), key=k2))
    x = mx.random.normal((rows, k), key=k3)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    got = cpu_kernels.qmatvec(x, wq, scales, biases, group_size, bits, simd=simd, n_threads=threads)
    # independent of both: the dequantized matrix times x in float64; float32 rounding error is bounded
    # by the sum of the terms' magnitudes, so that is the scale of the tolerance
    xd = np.asarray(x, dtype=np.float64)
    wd = np.asarray(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
    exact, magnitude = xd @ wd.T, np.abs(xd) @ np.abs(wd).T
    assert got.shape == (rows, out)
    assert (np.abs(np.asarray(got) - exact) <= 1e-5 * magnitude + 1e-6).all()
    assert (np.abs(np.asarray(got) - np.asarray(want)) <= 2e-5 * magnitude + 1e-6).all()


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(bits=st.sampled_from([2, 4, 8]), group_size=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 40), out=st.integers(1, 150), groups=st.integers(1, 12),
       simd=st.booleans(), threads=st.integers(1, 4), strided=st.booleans(), seed=st.integers(0, 2**16))
def test_block_kernel_equals_dequantized_product(bits, group_size, rows, out, groups, simd, threads, strided, seed):
    """phf_qmatmul (prefill blocks): tiles of 64 weight rows x ~256 columns, 3 x 4 register blocks,
    so row / column counts that are not multiples of either (the padding of the last tile), inputs
    that are strided views, and several column tiles are all drawn."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    k = group_size * groups
    w = mx.random.normal((out, k), key=k1) * mx.exp(mx.random.normal((out, 1), key=k2))
    x = mx.random.normal((rows, 2 * k if strided else k), key=k3)
    if strided:
        x = x[:, ::2]                                                   # a view with stride 2
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    got = cpu_kernels.qmatvec(x, wq, scales, biases, group_size, bits, simd=simd, n_threads=threads, block=True)
    xd = np.asarray(x, dtype=np.float64)
    wd = np.asarray(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
    exact, magnitude = xd @ wd.T, np.abs(xd) @ np.abs(wd).T
    assert got.shape == (rows, out)
    assert (np.abs(np.asarray(got) - exact) <= 1e-5 * magnitude + 1e-6).all()


@needs_kernel
def test_prefill_blocks_use_the_block_kernel(monkeypatch):
    """A prompt-sized block through a CPU quantized layer reads the packed codes (no dequantize)."""
    layer = nn.QuantizedLinear(256, 512, bias=False, group_size=64, bits=4)
    mx.eval(layer.parameters())
    cpu_kernels.use_cpu_kernels(layer)
    x = mx.random.normal((1, 40, 256))
    want = x @ mx.dequantize(layer.weight, layer.scales, layer.biases, group_size=64, bits=4).T
    monkeypatch.setattr(mx, "dequantize", lambda *a, **kw: pytest.fail("dequantized the whole matrix"))
    got = layer(x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)


@needs_kernel
def test_bf16_scales_and_batch_shape():
    w = mx.random.normal((96, 128))
    wq, scales, biases = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=4)
    x = mx.random.normal((2, 3, 128))
    want = mx.quantized_matmul(x, wq, scales.astype(mx.float32), biases.astype(mx.float32),
                               transpose=True, group_size=64, bits=4)
    got = cpu_kernels.qmatvec(x, wq, scales, biases, 64, 4)
    assert got.shape == (2, 3, 96) and got.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_layers_follow_weight_updates_and_fall_back(monkeypatch):
    real = cpu_kernels.qmatvec
    layer = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=4)
    cpu_kernels.use_cpu_kernels(layer)
    monkeypatch.setattr(cpu_kernels, "KERNEL_MIN_WEIGHTS", 0)          # small layers normally skip it
    calls = []
    monkeypatch.setattr(cpu_kernels, "qmatvec", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert isinstance(layer, cpu_kernels.CPUQuantizedLinear)
    x = mx.random.normal((1, 128))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(nn.QuantizedLinear.__call__(layer, x)),
                               rtol=1e-5, atol=1e-5)
    new = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=4)     # replaced weights are seen
    layer.update(new.parameters())
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(nn.QuantizedLinear.__call__(new, x)),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2                                              # both went through the kernel
    odd = nn.QuantizedLinear(128, 64, group_size=64, bits=3)                 # not covered: MLX's path
    cpu_kernels.use_cpu_kernels(odd)
    np.testing.assert_allclose(np.asarray(odd(x)), np.asarray(nn.QuantizedLinear.__call__(odd, x)),
                               rtol=1e-6, atol=1e-6)


@needs_kernel
def test_tied_embedding_projection():
    emb = nn.QuantizedEmbedding(2048, 128, group_size=64, bits=4)      # 256K weights: the kernel's path
    cpu_kernels.use_cpu_kernels(emb)
    assert isinstance(emb, cpu_kernels.CPUQuantizedEmbedding)
    h = mx.random.normal((1, 1, 128))
    np.testing.assert_allclose(np.asarray(emb.as_linear(h)),
                               np.asarray(nn.QuantizedEmbedding.as_linear(emb, h)), rtol=1e-5, atol=1e-5)


def _pair_cache(key, b, pairs, s, hd, spare):
    """Keys and values as the caches hold them (pair layout, (b, nkv/2, s, 2hd)): a prefix of a longer
    buffer (strided, not copied)."""
    k1, k2 = mx.random.split(key)
    kbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k1)
    vbuf = mx.random.normal((b, pairs, s + spare, 2 * hd), key=k2)
    return kbuf[:, :, :s], vbuf[:, :, :s]


@needs_kernel
@settings(max_examples=40)
@given(b=st.integers(1, 2), pairs=st.integers(1, 3), g=st.integers(1, 3), l=st.integers(1, 4),
       s=st.integers(1, 300), hd=st.sampled_from([8, 16, 20, 64]), spare=st.integers(0, 5),
       mask=st.sampled_from(["none", "causal", "padded"]), simd=st.booleans(),
       threads=st.sampled_from([1, 2, 4]), seed=st.integers(0, 2**16))
def test_attend_few_equals_mlx(b, pairs, g, l, s, hd, spare, mask, simd, threads, seed):
    """The C few-query attention against MLX's scaled_dot_product_attention per stripe, and against
    the model's own MLX path (DiffAttention without the kernel)."""
    from mlx_lm.models.base import create_causal_mask
    from phiflash_mlx.models.phi4flash import DiffAttention

    nh = 2 * g * pairs                                        # query heads; g per KV head of a stripe
    key = mx.random.key(seed)
    kq, kc, kv = mx.random.split(key, 3)
    q = mx.random.normal((b, nh, l, hd), key=kq)
    keys, values = _pair_cache(kc, b, pairs, s, hd, spare)
    if mask == "none":
        allowed = None
    else:
        allowed = create_causal_mask(l, s - l) if s >= l else mx.ones((l, s), dtype=mx.bool_)
        if mask == "padded":
            valid = mx.random.uniform(shape=(b, s), key=kv) > 0.3
            valid[:, -1] = True
            allowed = allowed[None, None] & valid[:, None, None, :]
    scale = hd ** -0.5
    got = cpu_kernels.attend_few(q, keys, values, allowed, scale, simd=simd, n_threads=threads)
    assert got is not None
    for o in got:
        assert o.shape == (b, nh // 2, l, 2 * hd)
    # MLX's fused attention, stripe by stripe (GQA: g query heads per KV pair)
    sd1 = mx.fast.scaled_dot_product_attention(q[:, 0::2], keys[..., :hd], values, scale=scale, mask=allowed)
    sd2 = mx.fast.scaled_dot_product_attention(q[:, 1::2], keys[..., hd:], values, scale=scale, mask=allowed)
    np.testing.assert_allclose(np.asarray(got[0]), np.asarray(sd1), rtol=1e-4, atol=1e-5)
    np.testing.assert_allclose(np.asarray(got[1]), np.asarray(sd2), rtol=1e-4, atol=1e-5)
    # the model's MLX-op path for the same inputs
    layer = DiffAttention.__new__(DiffAttention)
    layer.scale = scale
    layer.few_query_kernel = None
    want = DiffAttention._core(layer, q, keys, values, allowed, None)
    for w, o in zip(want, got):
        np.testing.assert_allclose(np.asarray(o), np.asarray(w), rtol=1e-4, atol=1e-5)


@needs_kernel
def test_attend_few_declines_what_it_does_not_cover():
    q = mx.random.normal((1, 2, 1, 16)).astype(mx.bfloat16)
    kv = mx.random.normal((1, 1, 5, 32)).astype(mx.bfloat16)
    assert cpu_kernels.attend_few(q, kv, kv, None, 0.25) is None            # not float32: MLX ops


@needs_kernel
@pytest.mark.parametrize("golden", range(2))
def test_loaded_models_use_the_kernels_and_match_without_them(golden):
    """phiflash_mlx.load gives CPU models the attention kernel and the Mamba decode step; prompt and
    decode logits equal the MLX-op path within 1e-4 (float32) and the greedy ids are the same."""
    import phiflash_mlx
    from conftest import GOLDEN_MODELS, golden_path
    from phiflash_mlx.models.phi4flash import Mamba

    model, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[golden % len(GOLDEN_MODELS)])))
    layers = [m for _, m in model.named_modules() if hasattr(m, "few_query_kernel")]
    assert layers and all(m.few_query_kernel is cpu_kernels.attend_few for m in layers)
    mambas = [m for _, m in model.named_modules() if isinstance(m, Mamba)]
    assert mambas and all(type(m) is not Mamba for m in mambas)

    def run():
        cache = model.make_cache()
        out = [np.asarray(model(mx.array([[5, 9, 2, 7, 1, 3]]), cache=cache))]
        for t in (4, 8, 15, 16, 23, 42):
            out.append(np.asarray(model(mx.array([[t]]), cache=cache)))
        tok = int(np.argmax(out[-1][0, -1]))
        greedy = []
        for _ in range(8):
            logits = np.asarray(model(mx.array([[tok]]), cache=cache))
            tok = int(np.argmax(logits[0, -1]))
            greedy.append(tok)
            out.append(logits)
        return out, greedy

    fast, fast_ids = run()
    for m in layers:
        m.few_query_kernel = None
    for m in mambas:
        m.__class__ = Mamba
    plain, plain_ids = run()
    for a, b in zip(fast, plain):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
    assert fast_ids == plain_ids


@needs_kernel
@settings(max_examples=25, deadline=None)
@given(b=st.integers(1, 3), di=st.integers(1, 200), r=st.integers(1, 12), n=st.integers(1, 20),
       gated=st.booleans(), bias=st.booleans(), threads=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ssm_step_equals_mlx_ops(b, di, r, n, gated, bias, threads, seed):
    """The C Mamba step (dt_proj, softplus, state update, D*u, gate) against the model's MLX ops."""
    from phiflash_mlx.models.phi4flash_kernels import selective_state_update_ops

    ks = mx.random.split(mx.random.key(seed), 8)
    u = mx.random.normal((b, di), key=ks[0])
    dbc = mx.random.normal((b, r + 2 * n), key=ks[1])
    z = mx.random.normal((b, di), key=ks[2]) if gated else None
    w = mx.random.normal((di, r), key=ks[3]) * 2.0               # pre-activations past softplus's 20 too
    bdt = mx.random.normal((di,), key=ks[4]) if bias else None
    A_log = mx.random.normal((di, n), key=ks[5]) * 0.5
    D = mx.random.normal((di,), key=ks[6])
    state = mx.random.normal((b, di, n), key=ks[7])
    y, s = cpu_kernels.ssm_step(u, dbc, z, w, bdt, A_log, D, state, n_threads=threads)
    delta = dbc[:, :r] @ w.T + (bdt if bias else 0)
    wy, ws = selective_state_update_ops(state, u, delta, -mx.exp(A_log), dbc[:, r:r + n], dbc[:, r + n:], D, z)
    np.testing.assert_allclose(np.asarray(s), np.asarray(ws), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(wy), rtol=1e-5, atol=1e-5)


@needs_kernel
@settings(max_examples=20, deadline=None)
@given(b=st.integers(1, 2), l=st.integers(1, 7), di=st.integers(1, 70), r=st.integers(1, 8), n=st.integers(1, 16),
       gated=st.booleans(), fresh=st.booleans(), threads=st.integers(1, 4), seed=st.integers(0, 2**16))
def test_ssm_scan_equals_mlx_ops(b, l, di, r, n, gated, fresh, threads, seed):
    """The C scan over a prompt (from a given state or from zeros) against the model's scan ops."""
    from phiflash_mlx.models.phi4flash_kernels import selective_scan_ops

    ks = mx.random.split(mx.random.key(seed), 7)
    u = mx.random.normal((b, l, di), key=ks[0])
    dbc = mx.random.normal((b, l, r + 2 * n), key=ks[1])
    z = mx.random.normal((b, l, di), key=ks[2]) if gated else None
    w = mx.random.normal((di, r), key=ks[3])
    A_log = mx.random.normal((di, n), key=ks[4]) * 0.5
    D = mx.random.normal((di,), key=ks[5])
    state = None if fresh else mx.random.normal((b, di, n), key=ks[6])
    y, s = cpu_kernels.ssm_scan(u, dbc, z, w, None, A_log, D, state, n_threads=threads)
    wy, ws = selective_scan_ops(u, dbc[..., :r] @ w.T, -mx.exp(A_log), dbc[..., r:r + n], dbc[..., r + n:], D, z,
                                None, state)
    np.testing.assert_allclose(np.asarray(s), np.asarray(ws), rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(y), np.asarray(wy), rtol=1e-5, atol=1e-5)


@needs_kernel
@settings(max_examples=30, deadline=None)
@given(m=st.integers(0, 40), n=st.integers(0, 300), g_pad=st.integers(0, 9), v_pad=st.integers(0, 9),
       threads=st.integers(1, 4), simd=st.booleans(), seed=st.integers(0, 2**16))
def test_silu_mul_rows_against_numpy(m, n, g_pad, v_pad, threads, simd, seed):
    """phf_silu_mul_rows (the gates of a prompt block's MLP and GMU): SiLU(g) * v row by row over
    strided rows, any thread count, AVX2 and portable, against float64 NumPy; large |g| saturates
    without NaN."""
    lib = cpu_kernels._library()
    rng = np.random.default_rng(seed)
    gbuf = (rng.standard_normal((m, n + g_pad)) * 6).astype(np.float32)
    vbuf = rng.standard_normal((m, n + v_pad)).astype(np.float32)
    if m and n:
        gbuf[0, 0], vbuf[0, 0] = 200.0, 1.5                 # exp(-200) underflows, exp(200) overflows
        gbuf[-1, -1 - g_pad] = -200.0
    g, v = gbuf[:, :n], vbuf[:, :n]
    out = np.full((m, n), np.nan, dtype=np.float32)
    old = lib.phf_fused_simd(int(simd))
    try:
        rc = lib.phf_silu_mul_rows(out.ctypes.data, n, gbuf.ctypes.data, n + g_pad, vbuf.ctypes.data, n + v_pad, m, n,
                                   threads)
    finally:
        lib.phf_fused_simd(old)
    assert rc == 0
    g64 = g.astype(np.float64)
    want = g64 / (1.0 + np.exp(-g64)) * v
    np.testing.assert_allclose(out, want, rtol=2e-6, atol=1e-6)


@needs_kernel
@pytest.mark.parametrize("rows", [1, 3, 20])
def test_fused_mlp_and_gmu_equal_mlx_ops(rows, monkeypatch):
    """The MLP (fc1, SiLU gate, fc2) and GMU (in_proj, SiLU * memory, out_proj) in one host call, for a
    decode step's rows and a prompt block's, equal the model's MLX code on plain quantized layers."""
    from phiflash_mlx.models.phi4flash import MLP, GatedMemoryUnit, ModelArgs

    monkeypatch.setattr(cpu_kernels, "KERNEL_MIN_WEIGHTS", 0)
    lib, gates = cpu_kernels._library(), []
    real = lib.phf_silu_mul_rows
    monkeypatch.setattr(lib, "phf_silu_mul_rows", lambda *a: gates.append(a[6]) or real(*a))
    args = ModelArgs.from_dict(dict(model_type="phi4flash", vocab_size=64, hidden_size=128, intermediate_size=192,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    sliding_window=8, mamba_d_state=4, mamba_d_conv=4, mamba_expand=2,
                                    mb_per_layer=2))
    for cls in (MLP, GatedMemoryUnit):
        block = cls(args)
        nn.quantize(block, group_size=32, bits=4)
        mx.eval(block.parameters())
        x = mx.random.normal((1, rows, args.hidden_size))
        memory = mx.random.normal((1, rows, args.d_inner))
        call = (lambda b: b(x)) if cls is MLP else (lambda b: b(x, memory))
        want = np.asarray(call(block))
        assert cpu_kernels.use_cpu_kernels(block) > 0 and type(block) is not cls
        gates.clear()
        got = np.asarray(call(block))
        assert gates == [rows]                                          # the host path ran
        np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-5)


def test_library_from_older_sources_is_declined(monkeypatch):
    """A _cpu_kernels library built before a kernel was added (a stale in-place build) is not used:
    one warning, MLX's own ops, no AttributeError at the first quantized product."""
    other = cpu_kernels.library_path("_blas_shim")
    if other is None:
        pytest.skip("needs some other compiled library to stand in for a stale one")
    monkeypatch.setattr(cpu_kernels, "library_path", lambda stem: other)
    monkeypatch.setattr(cpu_kernels, "_lib", None)
    monkeypatch.setattr(cpu_kernels, "_lib_tried", False)
    assert cpu_kernels._library() is None
    layer = nn.QuantizedLinear(256, 512, bias=False, group_size=64, bits=4)
    cpu_kernels.use_cpu_kernels(layer)
    x = mx.random.normal((1, 2, 256))
    want = mx.quantized_matmul(x, layer.weight, layer.scales, layer.biases, transpose=True, group_size=64, bits=4)
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(want), rtol=1e-5, atol=1e-5)


def test_switch_off_by_environment():
    """PHIFLASH_CPU_KERNELS=0: nothing is loaded, `phiflash info` says why, models still run."""
    import os
    import subprocess

    code = ("import phiflash_mlx, mlx.core as mx\n"
            "from phiflash_mlx.cpu import kernels as cpu_kernels\n"
            "from phiflash_mlx.demo import demo_model_path\n"
            "m, _ = phiflash_mlx.load(str(demo_model_path()))\n"
            "mx.eval(m(mx.array([[1, 2, 3]])))\n"
            "print(cpu_kernels.kernel_info())\n")
    env = dict(os.environ, PHIFLASH_CPU_KERNELS="0")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert "'active': False" in out.stdout and "PHIFLASH_CPU_KERNELS=0" in out.stdout


@needs_kernel
def test_kernels_are_transparent_to_compile_and_gradients():
    """The C kernels go through NumPy (a host round trip): inside mx.compile they step aside for the
    MLX ops, and gradients through them are those of the MLX ops, not zero."""
    from mlx_lm.models.base import create_causal_mask
    key = mx.random.key(3)
    kq, kk, kv, kx, kw = mx.random.split(key, 5)
    q = mx.random.normal((1, 4, 2, 16), key=kq)
    keys = mx.random.normal((1, 1, 40, 32), key=kk)
    values = mx.random.normal((1, 1, 40, 32), key=kv)
    mask = create_causal_mask(2, 38)

    def via_kernel(q, keys, values):
        a1, a2 = cpu_kernels.attend_few(q, keys, values, mask, 0.25)
        return (a1 * a1).sum() + (a1 * a2).sum()

    def via_mlx(q, keys, values):
        sdpa = mx.fast.scaled_dot_product_attention
        a1 = sdpa(q[:, 0::2], keys[..., :16], values, scale=0.25, mask=mask)
        a2 = sdpa(q[:, 1::2], keys[..., 16:], values, scale=0.25, mask=mask)
        return (a1 * a1).sum() + (a1 * a2).sum()

    np.testing.assert_allclose(float(mx.compile(via_kernel)(q, keys, values)), float(via_mlx(q, keys, values)),
                               rtol=1e-5)
    got = mx.grad(via_kernel, argnums=(0, 1, 2))(q, keys, values)
    want = mx.grad(via_mlx, argnums=(0, 1, 2))(q, keys, values)
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)

    w = mx.random.normal((256, 512), key=kw)
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    x = mx.random.normal((2, 512), key=kx)

    def lin(x, kernel):
        if kernel:
            return (cpu_kernels.qmatvec(x, wq, scales, biases, 64, 4) ** 2).sum()
        return (mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4) ** 2).sum()

    np.testing.assert_allclose(float(mx.compile(lambda x: lin(x, True))(x)), float(lin(x, False)), rtol=1e-4)
    got, want = (np.asarray(mx.grad(lambda x: lin(x, k))(x)) for k in (True, False))
    np.testing.assert_allclose(got, want, rtol=0, atol=1e-4 * np.abs(want).max())   # 2 y W: y from either path
