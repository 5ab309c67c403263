"""Fused decode steps (phiflash_mlx/cpu/csrc/fused.c) against the model's own MLX code."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phiflash_mlx.cpu import kernels as cpu_kernels
from phiflash_mlx.models.cache import ArraysCache
from phiflash_mlx.models.phi4flash import Mamba, ModelArgs

needs_fused = pytest.mark.skipif(
    cpu_kernels._fused_library() is None,
    reason="the C kernels are built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/cpu/_cpu_kernels*.so was not built (see setup.py)")


@pytest.fixture(autouse=True)
def exact_products(monkeypatch):
    """Float activations in the quantized products (int8 activations, where built, differ by more than
    the tolerances here); float32 K/V caches (the 16-bit shared cache: tests/test_cpu_kv16.py)."""
    monkeypatch.setenv("PHIFLASH_CPU_INT8", "0")
    monkeypatch.setenv("PHIFLASH_CPU_KV16", "0")


def _args(hidden, expand, d_state, d_conv):
    return ModelArgs.from_dict(dict(model_type="phi4flash", vocab_size=64, hidden_size=hidden, intermediate_size=64,
                                    num_hidden_layers=4, num_attention_heads=4, num_key_value_heads=2,
                                    sliding_window=8, mamba_d_state=d_state, mamba_d_conv=d_conv,
                                    mamba_expand=expand, mb_per_layer=2))


def _mixer(hidden, expand, d_state, d_conv, dt_rank, conv_bias, dt_bias, memory, bits, seed):
    """A quantized Mamba mixer with random parameters; dt_proj stays float (its input width is not a
    multiple of the group size in the real model)."""
    mx.random.seed(seed)
    args = _args(hidden, expand, d_state, d_conv)
    m = Mamba(args, produces_memory=memory)
    Di = m.d_inner
    m.dt_rank = dt_rank
    m.x_proj = nn.Linear(Di, dt_rank + 2 * d_state, bias=False)
    m.dt_proj = nn.Linear(dt_rank, Di, bias=dt_bias)
    m.conv1d = nn.Conv1d(Di, Di, d_conv, groups=Di, bias=conv_bias)
    if conv_bias:
        m.conv1d.bias = mx.random.normal((Di,)) * 0.3
    if dt_bias:
        m.dt_proj.bias = mx.random.normal((Di,)) - 1.0
    m.conv1d.weight = mx.random.normal(m.conv1d.weight.shape) * 0.5
    m.A_log = mx.random.normal((Di, d_state)) * 0.5
    m.D = mx.random.normal((Di,))
    nn.quantize(m, group_size=32, bits=bits,
                class_predicate=lambda p, x: isinstance(x, nn.Linear) and x.weight.shape[-1] % 32 == 0)
    mx.eval(m.parameters())
    assert isinstance(m.x_proj, nn.QuantizedLinear) and type(m.dt_proj) is nn.Linear
    return m


def _steps(mixer, xs, conv0, ssm0, mask=None):
    cache = ArraysCache(2)
    cache[0], cache[1] = conv0, ssm0
    out = []
    for x in xs:
        y, memory = mixer(x, mask, cache)
        out.append((y, memory, cache[0], cache[1]))
    return out


def _assert_close(got, want, tol=1e-4):
    for g_step, w_step in zip(got, want, strict=True):
        for g, w in zip(g_step, w_step, strict=True):
            if w is None:
                assert g is None
                continue
            assert g.shape == w.shape and g.dtype == w.dtype
            np.testing.assert_allclose(np.asarray(g.astype(mx.float32)), np.asarray(w.astype(mx.float32)),
                                       rtol=tol, atol=tol)


@needs_fused
@settings(max_examples=25, deadline=None)
@given(hidden=st.sampled_from([32, 64]), expand=st.sampled_from([1, 2]), d_state=st.integers(1, 20),
       d_conv=st.integers(2, 5), dt_rank=st.integers(1, 12), conv_bias=st.booleans(), dt_bias=st.booleans(),
       memory=st.booleans(), bits=st.sampled_from([4, 8]), threads=st.integers(1, 4), fresh=st.booleans(),
       simd=st.booleans(), seed=st.integers(0, 2**16))
def test_mamba_step_equals_the_model(hidden, expand, d_state, d_conv, dt_rank, conv_bias, dt_bias, memory, bits,
                                     threads, fresh, simd, seed):
    """Three consecutive one-token steps (states carried in the cache) of the fused mixer equal the
    model's Mamba.__call__ on the same quantized layers: output, memory, conv and scan states."""
    mixer = _mixer(hidden, expand, d_state, d_conv, dt_rank, conv_bias, dt_bias, memory, bits, seed)
    Di = mixer.d_inner
    k = mx.random.split(mx.random.key(seed + 1), 3)
    conv0 = None if fresh else mx.random.normal((1, d_conv - 1, Di), key=k[0])
    ssm0 = None if fresh else mx.random.normal((1, Di, d_state), key=k[1])
    xs = [mx.random.normal((1, 1, hidden), key=kk) for kk in mx.random.split(k[2], 3)]
    want = _steps(mixer, xs, conv0, ssm0)
    cpu_kernels.use_cpu_kernels(mixer)
    assert type(mixer) is not Mamba
    import os
    old = os.environ.get(cpu_kernels.ENV_THREADS)
    os.environ[cpu_kernels.ENV_THREADS] = str(threads)
    lib = cpu_kernels._fused_library()
    old_simd = lib.phf_fused_simd(int(simd))                    # 0: the portable loops (CPUs without AVX2)
    try:
        got = _steps(mixer, xs, conv0, ssm0)
    finally:
        lib.phf_fused_simd(old_simd)
        if old is None:
            del os.environ[cpu_kernels.ENV_THREADS]
        else:
            os.environ[cpu_kernels.ENV_THREADS] = old
    assert "_phf_host" in mixer.__dict__, "the fused step did not run"
    _assert_close(got, want)


@needs_fused
@pytest.mark.parametrize("d_state", [16, 64])
def test_mamba_step_real_proportions(d_state):
    """Widths like the released model's (d_state 16, dt_rank = hidden / 16), several threads, the
    vectorised scan lanes (d_state a multiple of 8)."""
    mixer = _mixer(256, 2, d_state, 4, 16, True, True, False, 4, seed=d_state)
    k = mx.random.split(mx.random.key(7), 3)
    conv0 = mx.random.normal((1, 3, 512), key=k[0])
    ssm0 = mx.random.normal((1, 512, d_state), key=k[1])
    xs = [mx.random.normal((1, 1, 256), key=kk) for kk in mx.random.split(k[2], 4)]
    want = _steps(mixer, xs, conv0, ssm0)
    cpu_kernels.use_cpu_kernels(mixer)
    _assert_close(_steps(mixer, xs, conv0, ssm0), want)


@needs_fused
def test_mamba_step_in_16_bits():
    """bfloat16 activations: the fused step computes in float32 and returns the caller's dtypes; it
    agrees with the model's code to bfloat16 precision."""
    mixer = _mixer(64, 2, 16, 4, 4, True, True, True, 4, seed=3)
    A_log, D = mixer.A_log, mixer.D
    mixer.set_dtype(mx.bfloat16)
    mixer.A_log, mixer.D = A_log, D                               # the model keeps these in float32
    xs = [mx.random.normal((1, 1, 64)).astype(mx.bfloat16) for _ in range(2)]
    conv0 = mx.random.normal((1, 3, 128)).astype(mx.bfloat16)
    ssm0 = mx.random.normal((1, 128, 16))
    want = _steps(mixer, xs, conv0, ssm0)
    cpu_kernels.use_cpu_kernels(mixer)
    got = _steps(mixer, xs, conv0, ssm0)
    assert "_phf_host" in mixer.__dict__
    _assert_close(got, want, tol=6e-2)


@needs_fused
def test_mamba_fallbacks_give_the_model_results():
    """What the fused step does not cover takes the model's path with the same results: a padding
    mask, batch 2, blocks of tokens, float (not quantized) layers, mx.compile and gradients."""
    mixer = _mixer(64, 2, 16, 4, 4, True, True, True, 4, seed=11)
    Di = mixer.d_inner
    plain = _mixer(64, 2, 16, 4, 4, True, True, True, 4, seed=11)
    cpu_kernels.use_cpu_kernels(mixer)
    conv2 = mx.random.normal((2, 3, Di))
    ssm2 = mx.random.normal((2, Di, 16))
    x2 = mx.random.normal((2, 1, 64))
    _assert_close(_steps(mixer, [x2], conv2, ssm2), _steps(plain, [x2], conv2, ssm2))
    x1 = mx.random.normal((1, 1, 64))
    mask = mx.array([[True]])
    _assert_close(_steps(mixer, [x1], conv2[:1], ssm2[:1], mask), _steps(plain, [x1], conv2[:1], ssm2[:1], mask))
    block = mx.random.normal((1, 5, 64))
    _assert_close(_steps(mixer, [block], conv2[:1], ssm2[:1]), _steps(plain, [block], conv2[:1], ssm2[:1]))
    assert "_phf_host" not in mixer.__dict__                        # none of those used the fused step

    def step(m):
        def f(x, c0, c1):
            cache = ArraysCache(2)
            cache[0], cache[1] = c0, c1
            y, memory = m(x, None, cache)
            return y, memory, cache[0], cache[1]
        return f

    args = (x1, conv2[:1], ssm2[:1])
    _assert_close([mx.compile(step(mixer))(*args)], [step(plain)(*args)])

    def loss(m):
        return lambda x, c1: sum((o * o).sum() for o in step(m)(x, conv2[:1], c1)[:2])

    got = mx.grad(loss(mixer), argnums=(0, 1))(x1, ssm2[:1])
    want = mx.grad(loss(plain), argnums=(0, 1))(x1, ssm2[:1])
    for g, w in zip(got, want):
        assert np.abs(np.asarray(w)).max() > 0
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=1e-4, atol=1e-5)

    floats = Mamba(_args(64, 2, 16, 4), produces_memory=False)
    mx.eval(floats.parameters())
    conv1, ssm1 = conv2[:1], ssm2[:1]
    want = _steps(floats, [x1], conv1, ssm1)
    cpu_kernels.use_cpu_kernels(floats)
    _assert_close(_steps(floats, [x1], conv1, ssm1), want)
    assert "_phf_host" not in floats.__dict__


def _quantized_golden(name):
    import phiflash_mlx
    from conftest import golden_path

    model, _ = phiflash_mlx.load(str(golden_path(name)), tokenizer=False)
    _unattach(model)
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    return model


def _unattach(model):
    """Undo what load() attached on a CPU: the plain model classes, no attention kernel."""
    for _, m in model.named_modules():
        if hasattr(m, "few_query_kernel"):
            m.few_query_kernel = None
        cls = type(m)
        if cls.__name__.startswith("CPU"):
            m.__class__ = cls.__mro__[1]


def _spy(monkeypatch, name, counts):
    real = getattr(cpu_kernels, name)

    def spy(*args, **kwargs):
        counts[name] = counts.get(name, 0) + 1
        return real(*args, **kwargs)

    monkeypatch.setattr(cpu_kernels, name, spy)


@needs_fused
@pytest.mark.parametrize("golden,simd,path", [("tiny", True, "step"), ("small", True, "step"), ("tiny", False, "step"),
                                              ("tiny", True, "units"), ("small", True, "units")])
def test_whole_model_decode_with_and_without_the_fast_path(golden, simd, path, monkeypatch):
    """A 4-bit golden model: prompt and decode logits with the CPU attachment equal the plain MLX model
    within 1e-4 and greedy decoding picks the same ids (also with the portable C loops). A prompt
    shorter and one longer than the sliding window; decoding past the window. path "step": decode
    steps as one host call (a step right after a prompt longer than the window, whose rotating cache
    is trimmed by the update, takes the per-layer units); "units": the per-layer units only."""
    from conftest import GOLDEN_MODELS

    if golden not in GOLDEN_MODELS:
        pytest.skip(f"no golden model {golden}")
    plain = _quantized_golden(golden)
    fast = _quantized_golden(golden)
    cpu_kernels.use_cpu_kernels(fast)
    window = fast.args.sliding_window

    def run(model):
        out, ids = [], []
        for prompt in ([5, 9, 2, 7, 1, 3], list(range(3, 3 + window + 5))):
            cache = model.make_cache()
            out.append(np.asarray(model(mx.array([prompt]), cache=cache)))
            for t in (4, 8, 15, 16, 23, 42):
                out.append(np.asarray(model(mx.array([[t]]), cache=cache)))
            tok = int(np.argmax(out[-1][0, -1]))
            for _ in range(window + 4):                      # past the sliding window
                logits = np.asarray(model(mx.array([[tok]]), cache=cache))
                tok = int(np.argmax(logits[0, -1]))
                ids.append(tok)
                out.append(logits)
        return out, ids

    counts = {}
    for name in ("_whole_step", "_diff_tail_host", "_attention_tail_unit"):
        _spy(monkeypatch, name, counts)
    if path == "units":
        monkeypatch.setattr(cpu_kernels, "_step_plan", lambda *a: None)
    lib = cpu_kernels._fused_library()
    real_layers = lib.phf_decode_layers

    def decode_layers(*args):                                  # counts the whole-stack calls that succeeded
        rc = real_layers(*args)
        counts["phf_decode_layers"] = counts.get("phf_decode_layers", 0) + (rc == 0)
        return rc

    monkeypatch.setattr(lib, "phf_decode_layers", decode_layers)
    old_simd = lib.phf_fused_simd(int(simd))
    try:
        got, got_ids = run(fast)
    finally:
        lib.phf_fused_simd(old_simd)
    steps = 2 * (6 + window + 4)
    n_attn = sum(hasattr(layer.attn, "inner_cross_attn") for layer in fast.layers)
    if path == "step":
        assert counts.get("_whole_step") == steps - 1, counts          # all but the step after the trim
        assert counts.get("_attention_tail_unit") == n_attn, counts      # that step: the units
        assert counts.get("phf_decode_layers") == steps - 1, counts      # the host path ran, not the twin
        assert counts.get("_diff_tail_host") == n_attn, counts
    else:
        assert "_whole_step" not in counts and counts.get("_attention_tail_unit") == steps * n_attn, counts
        assert counts.get("_diff_tail_host") == steps * n_attn, counts    # the host path ran, not the twins
    want, want_ids = run(plain)
    for g, w in zip(got, want):
        np.testing.assert_allclose(g, w, rtol=1e-4, atol=1e-4)
    assert got_ids == want_ids


def _prefilled_pair(golden="tiny"):
    """The plain 4-bit golden model and its CPU-attached twin, each with a cache after the same prompt."""
    from conftest import GOLDEN_MODELS

    if golden not in GOLDEN_MODELS:
        pytest.skip(f"no golden model {golden}")
    plain = _quantized_golden(golden)
    fast = _quantized_golden(golden)
    cpu_kernels.use_cpu_kernels(fast)
    caches = []
    for model in (plain, fast):
        cache = model.make_cache()
        mx.eval(model(mx.array([[5, 9, 2, 7, 1, 3, 11, 4, 8, 6, 10]]), cache=cache))
        caches.append(cache)
    return plain, fast, caches


@needs_fused
def test_decode_units_step_aside_for_compile_and_give_gradients():
    """A decode step inside mx.compile equals the plain model's; gradients through a decode step (with
    a cache) with respect to the input embeddings equal the plain model's and are not zero."""
    plain, fast, (cache_p, cache_f) = _prefilled_pair()
    emb = plain.model.embed_tokens(mx.array([[12]]))

    def copy(cache):
        from mlx.utils import tree_map

        c = [type(x)(*([2] if type(x).__name__ == "ArraysCache" else
                       [x.max_size] if hasattr(x, "max_size") else [])) for x in cache]
        for new, old in zip(c, cache):
            new.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, old.state)
            if getattr(old, "meta_state", None):
                new.meta_state = old.meta_state
        mx.eval([x.state for x in c])
        return c

    def step(model, cache):
        c = copy(cache)
        return lambda e: model(None, cache=c, input_embeddings=e)

    want = step(plain, cache_p)(emb)
    got = mx.compile(step(fast, cache_f))(emb)
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-4, atol=1e-4)
    g_want = mx.grad(lambda e: (step(plain, cache_p)(e) ** 2).sum())(emb)
    g_got = mx.grad(lambda e: (step(fast, cache_f)(e) ** 2).sum())(emb)
    assert np.abs(np.asarray(g_want)).max() > 0
    np.testing.assert_allclose(np.asarray(g_got), np.asarray(g_want), rtol=1e-3, atol=1e-4)


@needs_fused
def test_decode_units_fall_back_for_batches_and_blocks():
    """Batch 2 and a block of several tokens take the model's own loop and give its results."""
    plain, fast, _ = _prefilled_pair()
    for tokens in ([[5, 9], [2, 7]], [[1, 2, 3]]):
        outs = []
        for model in (plain, fast):
            cache = model.make_cache()
            outs.append(np.asarray(model(mx.array(tokens)[:, :1], cache=cache)))
            outs.append(np.asarray(model(mx.array(tokens)[:, 1:], cache=cache)))
        np.testing.assert_allclose(outs[2], outs[0], rtol=1e-4, atol=1e-4)
        np.testing.assert_allclose(outs[3], outs[1], rtol=1e-4, atol=1e-4)


@needs_fused
def test_bfloat16_model_decodes_like_the_plain_one(monkeypatch):
    """bfloat16 activations (16-bit K/V caches, which the host attention does not read): the decode
    step does not run as one host call, the layers that can run on the host do, and against the
    float32 model the decode logits are as close as the plain bfloat16 model's."""
    import phiflash_mlx
    from conftest import golden_path

    def build(dtype):
        model, _ = phiflash_mlx.load(str(golden_path("small")), dtype=dtype, tokenizer=False)
        _unattach(model)
        nn.quantize(model, group_size=32, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
        mx.eval(model.parameters())
        return model

    ref, plain, fast = build("float32"), build("bfloat16"), build("bfloat16")
    cpu_kernels.use_cpu_kernels(fast)
    counts = {}
    for name in ("_whole_step", "_mamba_unit"):
        _spy(monkeypatch, name, counts)
    outs = []
    for model in (ref, fast, plain):
        cache = model.make_cache()
        model(mx.array([[5, 9, 2, 7, 1, 3]]), cache=cache)
        outs.append(np.stack([np.asarray(model(mx.array([[t]]), cache=cache).astype(mx.float32))
                              for t in (4, 8, 15, 16)]))
    assert "_whole_step" not in counts and counts.get("_mamba_unit", 0) > 0, counts
    err_fast, err_plain = np.abs(outs[1] - outs[0]).max(), np.abs(outs[2] - outs[0]).max()
    assert err_fast <= 1.5 * err_plain + 0.02, (err_fast, err_plain)


@needs_fused
def test_whole_step_follows_replaced_weights(monkeypatch):
    """The one-call step keeps each layer's host description while the layer's modules and arrays are
    the same objects: after decode steps, new weights for a LayerNorm, a quantized product (new codes,
    scales and biases), the differential sub-LN and lambda, and a swapped-in quantized module are all
    used by the next steps, as the plain model with the same changes computes them (within 1e-4)."""
    plain, fast, (cache_p, cache_f) = _prefilled_pair()
    lib = cpu_kernels._fused_library()
    real, done = lib.phf_decode_layers, []
    monkeypatch.setattr(lib, "phf_decode_layers", lambda *a: done.append(real(*a) == 0) or done[-1] - 1)

    def steps(tokens):
        for tok in tokens:
            got = np.asarray(fast(mx.array([[tok]]), cache=cache_f))
            np.testing.assert_allclose(got, np.asarray(plain(mx.array([[tok]]), cache=cache_p)), rtol=1e-4, atol=1e-4)

    steps([3, 14, 15])                          # (the first step after the prompt trims the window: units)
    assert done[-2:] == [True, True]
    kinds = [layer.kind for layer in plain.layers]
    fc = plain.layers[kinds.index("global")].mlp.fc1
    w = mx.random.normal((fc.weight.shape[0], fc.weight.shape[1] * 32 // fc.bits), key=mx.random.key(5)) * 0.05
    codes = dict(zip(("weight", "scales", "biases"), mx.quantize(w, group_size=fc.group_size, bits=fc.bits)))
    fc2 = plain.layers[-1].mlp.fc2
    w2 = mx.random.normal((fc2.weight.shape[0], fc2.weight.shape[1] * 32 // fc2.bits), key=mx.random.key(6)) * 0.05
    swapped = dict(zip(("weight", "scales", "biases"), mx.quantize(w2, group_size=fc2.group_size, bits=fc2.bits)))
    for model in (plain, fast):
        layers = model.layers
        ln = layers[0].input_layernorm
        ln.weight = ln.weight * 1.3 + 0.1
        inner = layers[kinds.index("swa")].attn.inner_cross_attn
        inner.subln.weight = inner.subln.weight * 1.7
        inner.lambda_q1 = inner.lambda_q1 + 0.3
        layers[kinds.index("global")].mlp.fc1.update(dict(codes))
        new = nn.QuantizedLinear(w2.shape[1], w2.shape[0], bias=False, group_size=fc2.group_size, bits=fc2.bits)
        new.update(dict(swapped))
        layers[-1].mlp.fc2 = new
    done.clear()
    steps([7, 21])
    assert done == [True, True]


@needs_fused
def test_a_deleted_model_is_freed_without_the_garbage_collector():
    """The one-call step's per-layer host descriptions do not hold their layers: after decode steps, a
    deleted model's layers (and with them its weights) go at once, not at the next garbage collection."""
    import gc
    import weakref

    _, fast, (_, cache) = _prefilled_pair()
    for tok in (3, 14, 15):
        mx.eval(fast(mx.array([[tok]]), cache=cache))
    assert all("_phf_layer_host" in layer.__dict__ for layer in fast.layers)
    refs = [weakref.ref(layer) for layer in fast.layers]
    enabled = gc.isenabled()
    gc.disable()
    try:
        del fast, cache
        assert not any(r() is not None for r in refs)
    finally:
        if enabled:
            gc.enable()
