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


# --- how scales and biases are stored --------------------------------------------------------------

def _raw(out):
    raw = {}
    for f in out.glob("*.safetensors"):
        raw.update(mx.load(str(f)))
    return raw


def _bf16_round(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 (round to nearest, ties to even) -> float32, in NumPy bit arithmetic."""
    bits = a.astype(np.float32).view(np.uint32).astype(np.uint64)
    rounded = ((bits + 0x7FFF + ((bits >> 16) & 1)) >> 16) << 16
    return rounded.astype(np.uint32).view(np.float32)


@pytest.mark.parametrize("scales_dtype", [None, "float32", "bfloat16"])
def test_scales_and_biases_are_mx_quantize_rounded_once(tmp_path, scales_dtype):
    """Every quantized module (embedding included) stores the codes of mx.quantize on the float32 source
    and its float32 scales and biases rounded to float16 (default), bfloat16 or kept float32."""
    from reference.weights import open_checkpoint

    out = convert(SRC, str(tmp_path / "q"), quantize=True, q_bits=4, scales_dtype=scales_dtype)
    raw, store = _raw(out), open_checkpoint(SRC)
    want_dtype = {None: mx.float16, "float32": mx.float32, "bfloat16": mx.bfloat16}[scales_dtype]
    rounding = {None: lambda a: a.astype(np.float16).astype(np.float32), "float32": lambda a: a,
                "bfloat16": _bf16_round}[scales_dtype]
    modules = [k[: -len(".scales")] for k in raw if k.endswith(".scales")]
    assert "model.embed_tokens" in modules and len(modules) > 10
    for module in modules:
        w = mx.array(np.asarray(store[f"{module}.weight"], dtype=np.float32))
        codes, scales, biases = mx.quantize(w, group_size=64, bits=4)
        for leaf, value in (("scales", scales), ("biases", biases)):
            stored = raw[f"{module}.{leaf}"]
            assert stored.dtype == want_dtype, (module, leaf, stored.dtype)
            np.testing.assert_array_equal(np.asarray(stored.astype(mx.float32)), rounding(np.asarray(value)))
        np.testing.assert_array_equal(np.asarray(raw[f"{module}.weight"]), np.asarray(codes))
    marker = json.loads((out / "phiflash-convert.json").read_text())
    assert marker["scales_dtype"] == str(want_dtype).split(".")[-1]


def test_mx_mode_scales_are_not_rounded(tmp_path):
    raw = _raw(convert(SRC, str(tmp_path / "mx"), quantize=True, q_mode="mxfp4"))
    assert raw["model.layers.0.mlp.fc1.scales"].dtype == mx.uint8
    assert "model.layers.0.mlp.fc1.biases" not in raw


@pytest.fixture(scope="module")
def scale_twins(tmp_path_factory):
    """The golden model at 4 and 8 bits with float16 and with float32 scales and biases, and an oracle
    for the float16 one: the float32 checkpoint with its scales and biases rounded to float16 by NumPy
    and stored back as float32."""
    base = tmp_path_factory.mktemp("scales")
    out = {}
    for bits in (4, 8):
        f16 = convert(SRC, str(base / f"q{bits}-f16"), quantize=True, q_bits=bits)
        f32 = convert(SRC, str(base / f"q{bits}-f32"), quantize=True, q_bits=bits, scales_dtype="float32")
        oracle = convert(SRC, str(base / f"q{bits}-oracle"), quantize=True, q_bits=bits, scales_dtype="float32")
        for f in oracle.glob("*.safetensors"):
            raw = {k: mx.array(np.asarray(v).astype(np.float16).astype(np.float32))
                   if k.endswith((".scales", ".biases")) else v for k, v in mx.load(str(f)).items()}
            mx.save_safetensors(str(f), raw, metadata={"format": "mlx"})
        out[bits] = {"f16": f16, "f32": f32, "oracle": oracle}
    return out


def _prompt_and_steps(model, ids):
    cache = model.make_cache()
    logits = [np.asarray(model(ids, cache=cache))]
    for t in (7, 3, 11):
        logits.append(np.asarray(model(mx.array([[t]]), cache=cache)))
    return logits


@pytest.mark.parametrize("kernels", ["on", "off"])
def test_float16_scales_load_and_compute_as_their_float32_values(scale_twins, source, monkeypatch, kernels):
    """Loaded for float32 (the CPU default), the float16 checkpoint gives the logits of the oracle
    (same values in float32), prompt and cached decode steps, with the C kernels and with plain MLX
    (mx.quantized_matmul, dequantize + GEMM: PHIFLASH_CPU_KERNELS=0)."""
    from phiflash_mlx.cpu import kernels as cpu_kernels

    if kernels == "off":
        monkeypatch.setattr(cpu_kernels, "_library", lambda: None)
    _, ids, _ = source
    for bits, twins in scale_twins.items():
        model, _ = phiflash_mlx.load(str(twins["f16"]), tokenizer=False)
        oracle, _ = phiflash_mlx.load(str(twins["oracle"]), tokenizer=False)
        fc1 = model.layers[0].mlp.fc1
        assert fc1.scales.dtype == mx.float16 and fc1.biases.dtype == mx.float16       # kept as stored
        assert model.model.embed_tokens.scales.dtype == mx.float32                       # the activations' dtype
        for got, want in zip(_prompt_and_steps(model, ids), _prompt_and_steps(oracle, ids)):
            assert got.dtype == np.float32
            np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4, err_msg=f"{bits} bits")


def test_float16_scales_change_logits_little(scale_twins, source):
    """float16 instead of float32 scales: measured on this golden model, max |logit difference| 0.033
    (4 bits) and 0.041 (8 bits), 0.7-0.9% of the largest float logit (4.48), an eighth of what 8-bit
    quantization itself changes (0.33); bfloat16 scales change them 7x more (0.25, 0.28). Bounds: 2% of the
    largest logit, a quarter of the 8-bit quantization's change, and some difference (the rounding is real)."""
    _, ids, want = source
    q8 = np.asarray(phiflash_mlx.load(str(scale_twins[8]["f32"]), tokenizer=False)[0](ids))
    quant8 = np.abs(q8 - want).max()
    for bits, twins in scale_twins.items():
        f16 = np.asarray(phiflash_mlx.load(str(twins["f16"]), tokenizer=False)[0](ids))
        f32 = np.asarray(phiflash_mlx.load(str(twins["f32"]), tokenizer=False)[0](ids))
        diff = np.abs(f16 - f32).max()
        assert 0 < diff <= 0.02 * np.abs(want).max(), (bits, diff)
        assert diff <= 0.25 * quant8, (bits, diff, quant8)


def test_bfloat16_model_keeping_stored_dtypes_gets_its_dtype_for_scales(tmp_path, source, monkeypatch):
    """Keeping the stored dtypes (as with Metal), a bfloat16 checkpoint with float16 scales loads with
    bfloat16 scales, so no product promotes the activations to float32."""
    from phiflash_mlx import loader

    _, ids, want = source
    out = convert(SRC, str(tmp_path / "q"), dtype="bfloat16", quantize=True, q_bits=8)
    assert _raw(out)["model.layers.0.mlp.fc1.scales"].dtype == mx.float16
    monkeypatch.setattr(loader, "activation_dtype", lambda requested=None: None)
    model, _ = phiflash_mlx.load(str(out), tokenizer=False)
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)) and m.mode == "affine":
            assert m.scales.dtype == mx.bfloat16 and m.biases.dtype == mx.bfloat16, path
    assert model.layers[0].input_layernorm.weight.dtype == mx.bfloat16
    logits = model(ids)
    assert logits.dtype == mx.bfloat16
    assert np.abs(np.asarray(logits.astype(mx.float32)) - want).max() < 0.25 * np.abs(want).max()


@pytest.mark.parametrize("argv,needle", [
    (["-q", "--scales-dtype", "fp8"], "unknown --scales-dtype 'fp8'; choose float16, bfloat16 or float32"),
    (["--scales-dtype", "float32"], "need -q/--quantize"),
])
def test_scales_dtype_option_errors(tmp_path, capsys, argv, needle):
    from phiflash_mlx.cli import main

    assert main(["convert", SRC, str(tmp_path / "out"), *argv]) == 1
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and needle in err and "Traceback" not in err
    assert not (tmp_path / "out").exists()


def test_scales_dtype_option_reaches_the_checkpoint(tmp_path, capsys):
    from phiflash_mlx.cli import main

    assert main(["convert", SRC, str(tmp_path / "out"), "-q", "--q-bits", "8", "--scales-dtype", "bfloat16"]) == 0
    raw = _raw(tmp_path / "out")
    assert raw["model.layers.0.mlp.fc1.scales"].dtype == mx.bfloat16
    assert raw["model.embed_tokens.biases"].dtype == mx.bfloat16
