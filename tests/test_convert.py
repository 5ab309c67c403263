"""Conversion and quantization: round trips, recipes, sharding, the quality report, errors."""

import json

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest

import phiflash_mlx
from phiflash_mlx.convert import convert, quality_report, quality_sequences
from phiflash_mlx.errors import PhiflashError
from conftest import GOLDEN_MODELS, golden_path

SRC = str(golden_path(GOLDEN_MODELS[0])) if GOLDEN_MODELS else None


@pytest.fixture(scope="module")
def source():
    model, _ = phiflash_mlx.load(SRC)
    ids = mx.array(np.load(golden_path(GOLDEN_MODELS[0]) / "vectors.npz")["input_ids_long"])
    return model, ids, np.array(model(ids))


def test_float32_round_trip_is_exact(tmp_path, source):
    _, ids, want = source
    out = convert(SRC, str(tmp_path / "f32"), dtype="float32")
    model, _ = phiflash_mlx.load(str(out))
    np.testing.assert_allclose(np.array(model(ids)), want, atol=1e-5, rtol=0)


def test_bf16_and_sharded_output(tmp_path, source):
    _, ids, want = source
    out = convert(SRC, str(tmp_path / "bf16"), dtype="bfloat16", max_shard_size_gb=0.0002)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    assert len(set(index["weight_map"].values())) > 1
    raw = {}
    for f in out.glob("*.safetensors"):
        raw.update(mx.load(str(f)))
    assert raw["model.layers.0.attn.A_log"].dtype == mx.float32          # kept in full precision
    assert raw["model.layers.1.attn.inner_cross_attn.lambda_q1"].dtype == mx.float32
    assert raw["model.layers.0.mlp.fc1.weight"].dtype == mx.bfloat16
    model, _ = phiflash_mlx.load(str(out))
    got = np.array(model(ids))
    assert np.abs(got - want).max() < 0.05 * np.abs(want).max()           # bf16 weights: small, not zero
    assert np.abs(got - want).max() > 0


@pytest.mark.parametrize("bits,group", [(8, 64), (4, 64), (4, 32)])
def test_quantized_checkpoint_loads_with_its_recipe(tmp_path, source, bits, group):
    ref, ids, want = source
    out = convert(SRC, str(tmp_path / "q"), quantize=True, q_bits=bits, q_group_size=group)
    config = json.loads((out / "config.json").read_text())
    assert config["quantization"]["bits"] == bits and config["quantization"]["group_size"] == group
    model, _ = phiflash_mlx.load(str(out))
    fc1 = model.layers[0].mlp.fc1
    assert isinstance(fc1, nn.QuantizedLinear) and fc1.bits == bits and fc1.group_size == group
    assert isinstance(model.layers[0].input_layernorm, nn.LayerNorm)
    report = quality_report(ref, model, [np.array(ids)[0].tolist()])
    assert 0 < report["mean_kl"] < (0.01 if bits == 8 else 0.5)


def test_mixed_recipe_and_overrides_are_restored(tmp_path):
    out = convert(SRC, str(tmp_path / "mixed"), quantize=True, q_bits=4, recipe="mixed",
                  overrides=["model.layers.0.mlp.fc2=none"])
    q = json.loads((out / "config.json").read_text())["quantization"]
    n = json.loads((golden_path(GOLDEN_MODELS[0]) / "config.json").read_text())["num_hidden_layers"]
    assert q["model.embed_tokens"]["bits"] == 8
    assert q["model.layers.0.mlp.fc2"] is False
    model, _ = phiflash_mlx.load(str(out))
    assert model.model.embed_tokens.bits == 8
    assert model.layers[n // 2 + 1].attn.Wqkv.bits == 8
    assert model.layers[0].mlp.fc1.bits == 4
    assert isinstance(model.layers[0].mlp.fc2, nn.Linear) and not isinstance(model.layers[0].mlp.fc2, nn.QuantizedLinear)


def test_mxfp4_mode(tmp_path, source):
    _, ids, want = source
    out = convert(SRC, str(tmp_path / "mx"), quantize=True, q_mode="mxfp4")
    model, _ = phiflash_mlx.load(str(out))
    assert np.isfinite(np.array(model(ids))).all()


def test_quality_report_orders_precisions(tmp_path, source):
    ref, _, _ = source
    seqs = quality_sequences(None, ref.args.vocab_size, seed=1)
    same = quality_report(ref, ref, seqs)
    assert same["mean_kl"] < 1e-9 and same["top1_agreement"] == 1.0
    kl = {}
    for bits in (8, 4):
        out = convert(SRC, str(tmp_path / f"q{bits}"), quantize=True, q_bits=bits)
        kl[bits] = quality_report(ref, phiflash_mlx.load(str(out))[0], seqs)["mean_kl"]
    assert 0 < kl[8] < kl[4]


def test_clear_errors(tmp_path):
    with pytest.raises(PhiflashError, match="unsupported --q-bits 7"):
        convert(SRC, str(tmp_path / "a"), quantize=True, q_bits=7)
    with pytest.raises(PhiflashError, match="unsupported --q-group-size 48"):
        convert(SRC, str(tmp_path / "a"), quantize=True, q_group_size=48)
    (tmp_path / "exists").mkdir()
    with pytest.raises(PhiflashError, match="already exists"):
        convert(SRC, str(tmp_path / "exists"))
    bad = tmp_path / "llama"
    bad.mkdir()
    (bad / "config.json").write_text(json.dumps({"model_type": "llama"}))
    with pytest.raises(PhiflashError, match="not 'phi4flash'"):
        convert(str(bad), str(tmp_path / "b"))
    q = convert(SRC, str(tmp_path / "q"), quantize=True)
    with pytest.raises(PhiflashError, match="already quantized"):
        convert(str(q), str(tmp_path / "c"), quantize=True)
    with pytest.raises(PhiflashError, match="need -q"):
        convert(SRC, str(tmp_path / "d"), q_bits=4)


def test_cpu_kernelsized_paths_equal_quantized_matmul(tmp_path, monkeypatch):
    """On CPUs quantized layers dequantize for long blocks and use the C kernel for decode steps; the
    logits of a prompt and of cached decode steps equal those of plain mx.quantized_matmul layers."""
    from phiflash_mlx import cpu_kernels
    from phiflash_mlx.cpu_kernels import MIN_TOKENS, CPUQuantizedEmbedding, CPUQuantizedLinear
    monkeypatch.setattr(cpu_kernels, "KERNEL_MIN_WEIGHTS", 0)       # the golden matrices are small
    monkeypatch.setenv("PHIFLASH_CPU_INT8", "0")                     # float activations, as MLX's
    out = convert(SRC, str(tmp_path / "q"), quantize=True, q_bits=4)
    model, _ = phiflash_mlx.load(str(out))
    layer = model.layers[0].mlp.fc1
    if mx.metal.is_available():
        pytest.skip("the CPU paths are used only without Metal")
    assert isinstance(layer, CPUQuantizedLinear)
    assert isinstance(model.model.embed_tokens, CPUQuantizedEmbedding)
    x = mx.random.normal((1, MIN_TOKENS + 3, model.args.hidden_size))
    np.testing.assert_allclose(np.array(layer(x)), np.array(nn.QuantizedLinear.__call__(layer, x)),
                               atol=1e-4, rtol=1e-4)

    def run():
        ids = mx.array([list(range(MIN_TOKENS + 5))])
        cache = model.make_cache()
        logits = [np.array(model(ids, cache=cache))]
        for t in (7, 3, 11):                                   # one-token steps: the decode kernel
            logits.append(np.array(model(mx.array([[t]]), cache=cache)))
        return logits

    fast = run()
    for _, m in model.named_modules():
        if isinstance(m, CPUQuantizedLinear):
            m.__class__ = nn.QuantizedLinear
        elif isinstance(m, CPUQuantizedEmbedding):
            m.__class__ = nn.QuantizedEmbedding
    for got, want in zip(fast, run()):
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)
