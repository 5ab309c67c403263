"""The LM head on CPUs: one position per sequence (decoding, a prompt's last token) takes the C
kernels; more positions stay a lazy MLX product, so a prefill that evaluates only the caches computes no logits,
unless `all_logits()` says every position's logits will be read."""

import sys

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

from model_factory import mlx_model, random_weights
from phiflash_mlx.cpu import kernels as cpu_kernels
from phiflash_mlx.generate import prefill

needs_kernels = pytest.mark.skipif(
    cpu_kernels._library() is None,
    reason="the C kernels are built on Linux only" if not sys.platform.startswith("linux")
    else "phiflash_mlx/cpu/_cpu_kernels*.so was not built (see setup.py)")

# vocab x hidden = 131072 weights: the smallest head the C kernels take (KERNEL_MIN_WEIGHTS)
CONFIG = {"model_type": "phi4flash", "vocab_size": 2048, "hidden_size": 64, "intermediate_size": 64,
          "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 8,
          "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_expand": 2, "tie_word_embeddings": True}


@pytest.fixture(autouse=True)
def exact_products(monkeypatch):
    monkeypatch.setenv("PHIFLASH_CPU_INT8", "0")


def _spy(monkeypatch):
    """Rows of every C-kernel product the head asks for."""
    rows = []
    real = cpu_kernels._cpu_product

    def spy(module, x):
        if isinstance(module, (cpu_kernels.CPUQuantizedEmbedding, cpu_kernels.CPUQuantizedHead)):
            rows.append(x.size // x.shape[-1])
        return real(module, x)

    monkeypatch.setattr(cpu_kernels, "_cpu_product", spy)
    return rows


def _quantized(config):
    model = mlx_model(config, random_weights(config, 3))
    nn.quantize(model, group_size=32, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 32 == 0)
    mx.eval(model.parameters())
    return model


@needs_kernels
def test_prefill_chunks_compute_no_logits_and_the_last_token_uses_the_kernel(monkeypatch):
    model = _quantized(CONFIG)
    ids = np.random.default_rng(0).integers(0, CONFIG["vocab_size"], 40).tolist()
    want = np.array(prefill(model, ids, model.make_cache(), step_size=16))     # plain MLX modules
    assert cpu_kernels.use_cpu_kernels(model) > 0
    rows = _spy(monkeypatch)
    got = np.array(prefill(model, ids, model.make_cache(), step_size=16))
    assert rows == [1], rows            # chunks of 16, 16 and 7 positions: no kernel call; the last token: one
    np.testing.assert_allclose(got, want, atol=1e-4, rtol=0)


@needs_kernels
def test_all_logits_uses_the_kernel_for_blocks_and_matches_mlx(monkeypatch):
    model = _quantized(CONFIG)
    x = mx.array(np.random.default_rng(1).integers(0, CONFIG["vocab_size"], (1, 24)))
    want = np.array(model(x))
    cpu_kernels.use_cpu_kernels(model)
    rows = _spy(monkeypatch)
    lazy = np.array(model(x))
    assert rows == []
    with cpu_kernels.all_logits():
        eager = np.array(model(x))
    assert rows and rows[-1] == 24
    np.testing.assert_allclose(lazy, want, atol=1e-4, rtol=0)
    np.testing.assert_allclose(eager, want, atol=1e-4, rtol=0)


@needs_kernels
def test_an_untied_quantized_lm_head_gets_the_head_class():
    config = dict(CONFIG, tie_word_embeddings=False)
    model = _quantized(config)
    cpu_kernels.use_cpu_kernels(model)
    assert type(model.lm_head) is cpu_kernels.CPUQuantizedHead
    others = [m for n, m in model.named_modules() if isinstance(m, nn.QuantizedLinear) and not n.endswith("lm_head")]
    assert others and all(type(m) is not cpu_kernels.CPUQuantizedHead for m in others)
    x = mx.array([[5, 9, 11]])
    with cpu_kernels.all_logits():
        a = np.array(model(x))
    b = np.array(model(x))
    np.testing.assert_allclose(a, b, atol=1e-4, rtol=0)


@needs_kernels
def test_batched_decode_rows_use_the_kernel(monkeypatch):
    model = _quantized(CONFIG)
    cpu_kernels.use_cpu_kernels(model)
    rows = _spy(monkeypatch)
    h = mx.random.normal((3, 1, CONFIG["hidden_size"]))
    out = model.model.embed_tokens.as_linear(h)
    assert rows == [3] and out.shape == (3, 1, CONFIG["vocab_size"])


def test_all_logits_nests_and_restores():
    with cpu_kernels.all_logits():
        with cpu_kernels.all_logits():
            assert cpu_kernels._ALL_LOGITS.on
        assert cpu_kernels._ALL_LOGITS.on
    assert not cpu_kernels._ALL_LOGITS.on


@needs_kernels
def test_float16_exact_float32_scales_are_read_as_float16_with_the_same_numbers():
    """An embedding whose float32 scales and biases float16 holds exactly (a checkpoint written with
    float16 scales, widened by the loader for the lookups): the tied head's kernel reads a float16 copy
    and gives the same logits as with the float32 values (the oracle: MLX's quantized_matmul); other
    float32 values stay float32."""
    model = _quantized(CONFIG)
    emb = model.model.embed_tokens
    for leaf in ("scales", "biases"):                            # what a float16 checkpoint gives
        emb[leaf] = emb[leaf].astype(mx.float16).astype(mx.float32)
    mx.eval(model.parameters())
    cpu_kernels.use_cpu_kernels(model)
    x = mx.random.normal((1, 1, CONFIG["hidden_size"]), key=mx.random.key(4))
    got = np.asarray(emb.as_linear(x))
    assert cpu_kernels._packed(emb).sdtype == cpu_kernels.SD_F16
    assert emb["scales"].dtype == mx.float32                     # the module itself is unchanged
    want = np.asarray(nn.QuantizedEmbedding.as_linear(emb, x))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-5)

    other = _quantized(CONFIG)                                   # float32 values with more bits: kept
    cpu_kernels.use_cpu_kernels(other)
    other.model.embed_tokens.as_linear(x)
    assert cpu_kernels._packed(other.model.embed_tokens).sdtype == cpu_kernels.SD_F32
