"""The CPU quantized decode kernel (csrc/qmatvec.c) against MLX's own quantized_matmul and dequantize."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from phiflash_mlx import cpu_quant

needs_kernel = pytest.mark.skipif(
    cpu_quant._library() is None,
    reason="the C kernel is built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/_qmatvec*.so was not built (see setup.py)")


def test_kernel_is_built_on_linux():
    if not sys.platform.startswith("linux"):
        pytest.skip("compiled on Linux only")
    assert cpu_quant.library_path("_qmatvec") is not None, "pip install -e . should have compiled it"
    assert cpu_quant.kernel_info()["active"]


@needs_kernel
@settings(max_examples=40)
@given(bits=st.sampled_from([2, 4, 8]), group_size=st.sampled_from([32, 64, 128]),
       rows=st.integers(1, 20), out=st.integers(1, 300), groups=st.integers(1, 4),
       simd=st.booleans(), threads=st.sampled_from([1, 2, 3]), seed=st.integers(0, 2**16))
def test_qmatvec_equals_quantized_matmul(bits, group_size, rows, out, groups, simd, threads, seed):
    key = mx.random.key(seed)
    k1, k2, k3 = mx.random.split(key, 3)
    k = group_size * groups
    w = mx.random.normal((out, k), key=k1) * mx.exp(mx.random.normal((out, 1), key=k2))
    x = mx.random.normal((rows, k), key=k3)
    wq, scales, biases = mx.quantize(w, group_size=group_size, bits=bits)
    want = mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=group_size, bits=bits)
    got = cpu_quant.qmatvec(x, wq, scales, biases, group_size, bits, simd=simd, n_threads=threads)
    # independent of both: the dequantized matrix times x in float64; float32 rounding error is bounded
    # by the sum of the terms' magnitudes, so that is the scale of the tolerance
    xd = np.asarray(x, dtype=np.float64)
    wd = np.asarray(mx.dequantize(wq, scales, biases, group_size=group_size, bits=bits), dtype=np.float64)
    exact, magnitude = xd @ wd.T, np.abs(xd) @ np.abs(wd).T
    assert got.shape == (rows, out)
    assert (np.abs(np.asarray(got) - exact) <= 1e-5 * magnitude + 1e-6).all()
    assert (np.abs(np.asarray(got) - np.asarray(want)) <= 2e-5 * magnitude + 1e-6).all()


@needs_kernel
def test_bf16_scales_and_batch_shape():
    w = mx.random.normal((96, 128))
    wq, scales, biases = mx.quantize(w.astype(mx.bfloat16), group_size=64, bits=4)
    x = mx.random.normal((2, 3, 128))
    want = mx.quantized_matmul(x, wq, scales.astype(mx.float32), biases.astype(mx.float32),
                               transpose=True, group_size=64, bits=4)
    got = cpu_quant.qmatvec(x, wq, scales, biases, 64, 4)
    assert got.shape == (2, 3, 96) and got.dtype == mx.float32
    np.testing.assert_allclose(np.asarray(got), np.asarray(want), rtol=1e-5, atol=1e-4)


@needs_kernel
def test_layers_follow_weight_updates_and_fall_back(monkeypatch):
    real = cpu_quant.qmatvec
    layer = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=4)
    cpu_quant.use_cpu_kernels(layer)
    monkeypatch.setattr(cpu_quant, "KERNEL_MIN_WEIGHTS", 0)          # small layers normally skip it
    calls = []
    monkeypatch.setattr(cpu_quant, "qmatvec", lambda *a, **kw: calls.append(1) or real(*a, **kw))
    assert isinstance(layer, cpu_quant.CPUQuantizedLinear)
    x = mx.random.normal((1, 128))
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(nn.QuantizedLinear.__call__(layer, x)),
                               rtol=1e-5, atol=1e-5)
    new = nn.QuantizedLinear(128, 64, bias=True, group_size=64, bits=4)     # replaced weights are seen
    layer.update(new.parameters())
    np.testing.assert_allclose(np.asarray(layer(x)), np.asarray(nn.QuantizedLinear.__call__(new, x)),
                               rtol=1e-5, atol=1e-5)
    assert len(calls) == 2                                              # both went through the kernel
    odd = nn.QuantizedLinear(128, 64, group_size=64, bits=3)                 # not covered: MLX's path
    cpu_quant.use_cpu_kernels(odd)
    np.testing.assert_allclose(np.asarray(odd(x)), np.asarray(nn.QuantizedLinear.__call__(odd, x)),
                               rtol=1e-6, atol=1e-6)


@needs_kernel
def test_tied_embedding_projection():
    emb = nn.QuantizedEmbedding(2048, 128, group_size=64, bits=4)      # 256K weights: the kernel's path
    cpu_quant.use_cpu_kernels(emb)
    assert isinstance(emb, cpu_quant.CPUQuantizedEmbedding)
    h = mx.random.normal((1, 1, 128))
    np.testing.assert_allclose(np.asarray(emb.as_linear(h)),
                               np.asarray(nn.QuantizedEmbedding.as_linear(emb, h)), rtol=1e-5, atol=1e-5)
