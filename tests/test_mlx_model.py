"""The MLX model against the NumPy reference: components, whole model, caches, golden vectors."""

import json
import shutil

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import phiflash_mlx
import reference
from reference import ops
from conftest import GOLDEN_MODELS, golden_path
from model_factory import configs, model_pair


# these checks hold the model to 1e-4: float32 K/V caches (conftest.py)
pytestmark = pytest.mark.usefixtures("float32_kv_caches")


RTOL = 1e-4


def assert_close(got, want, rtol=RTOL, what=""):
    """Relative to the magnitude of the expected values (1e-4 of their max), elementwise."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, (what, got.shape, want.shape)
    scale = max(np.abs(want).max(), 1e-3)
    err = np.abs(got - want).max()
    assert err <= rtol * scale, f"{what}: max |diff| {err:.3g} > {rtol} * {scale:.3g}"


def np_(x):
    return np.array(x)


def pair_layout(x):
    """(b, l, n_kv, hd) from the reference -> the model's cache layout (b, n_kv/2, l, 2hd)."""
    b, l, nkv, hd = x.shape
    return mx.array(x.reshape(b, l, nkv // 2, 2 * hd).transpose(0, 2, 1, 3))


def batch_cache(model, left_padding):
    """mlx-lm's batched caches for `model`, rows left-padded by the given counts."""
    from phiflash_mlx.models.cache import ArraysCache, BatchKVCache, BatchRotatingKVCache, RotatingKVCache
    out = []
    for c in model.make_cache():
        if isinstance(c, ArraysCache):
            out.append(ArraysCache(len(c.cache), left_padding=left_padding))
        elif isinstance(c, RotatingKVCache):
            out.append(BatchRotatingKVCache(c.max_size, left_padding))
        else:
            out.append(BatchKVCache(left_padding))
    return out


cases = st.tuples(configs(), st.integers(0, 2**16), st.integers(1, 12))


# --- components ---------------------------------------------------------------------------

@settings(max_examples=25)
@given(case=cases)
def test_each_component_matches_reference(case):
    config, seed, length = case
    ref, mlx_m, w = model_pair(config, seed)
    cfg = ref.cfg
    rng = np.random.default_rng(seed)
    x = rng.normal(0, 1, (2, length, cfg.hidden_size)).astype(np.float32)
    mem = None
    kv = None
    for i, (kind, layer) in enumerate(zip(cfg.layer_kinds, mlx_m.layers)):
        p = f"model.layers.{i}."
        # LayerNorm and MLP
        a_ref = ops.layer_norm(x, w[p + "input_layernorm.weight"], w[p + "input_layernorm.bias"], 1e-5)
        a = layer.input_layernorm(mx.array(x))
        assert_close(a, a_ref, what=f"layer {i} LayerNorm")
        assert_close(layer.mlp(mx.array(a_ref)), ops.mlp(a_ref, w[p + "mlp.fc1.weight"], w[p + "mlp.fc2.weight"]),
                     what=f"layer {i} MLP")
        q_pos = np.arange(length)
        if kind in (reference.MAMBA, reference.MAMBA_MEM):
            o_ref, m_ref, _ = ops.mamba_mixer(a_ref, w, p + "attn.", cfg, None, kind == reference.MAMBA_MEM)
            o, m = layer.attn(mx.array(a_ref))
            assert_close(o, o_ref, what=f"layer {i} {kind}")
            if kind == reference.MAMBA_MEM:
                assert_close(m, m_ref, what="GMU memory")
                mem = m_ref
        elif kind == reference.GMU:
            assert_close(layer.attn(mx.array(a_ref), mx.array(mem)), ops.gmu(a_ref, w, p + "attn.", mem),
                         what=f"layer {i} GMU")
        else:
            qkv = ops.linear(a_ref, w[p + "attn.Wqkv.weight"], w[p + "attn.Wqkv.bias"])
            if kind == reference.CROSS:
                q = qkv.reshape(2, length, cfg.num_attention_heads, cfg.head_dim)
                k, v = kv
                mask = ops.attention_mask(q_pos, q_pos)
                shared = (pair_layout(k), pair_layout(v), None)
            else:
                q, k, v = ops.split_qkv(qkv, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
                mask = ops.attention_mask(q_pos, q_pos, cfg.sliding_window if kind == reference.SWA else None)
                kv = (k, v)
                shared = None
            o_ref = ops.attention_output(
                ops.differential_attention(q, k, v, mask, ops.lambdas_of(w, p + "attn."),
                                           w[p + "attn.inner_cross_attn.subln.weight"], cfg.lambda_init(i)),
                w, p + "attn.")
            o, _ = layer.attn(mx.array(a_ref), mx.array(mask), shared=shared)
            assert_close(o, o_ref, what=f"layer {i} {kind} attention")


@settings(max_examples=40)
@given(seed=st.integers(0, 2**16), b=st.integers(1, 2), l=st.integers(1, 10), d=st.integers(1, 9),
       n=st.integers(1, 6), k=st.integers(1, 4), gated=st.booleans(), with_state=st.booleans())
def test_conv_scan_and_step_match_reference(seed, b, l, d, n, k, gated, with_state):
    from phiflash_mlx.models.phi4flash_kernels import selective_scan_ops, selective_state_update_ops
    rng = np.random.default_rng(seed)
    f = lambda *s: rng.normal(0, 1, s).astype(np.float32)  # noqa: E731
    u, delta, z = f(b, l, d), f(b, l, d), f(b, l, d)
    A = -np.exp(f(d, n))
    B, C, D, bias = f(b, l, n), f(b, l, n), f(d), f(d)
    s0 = f(b, d, n) if with_state else None
    y_ref, s_ref = ops.selective_scan(u, delta, A, B, C, D, z if gated else None, bias, s0)
    args = [mx.array(t) if t is not None else None for t in (u, delta, A, B, C, D, z if gated else None, bias, s0)]
    y, s = selective_scan_ops(*args)
    assert_close(y, y_ref, what="scan y")
    assert_close(s, s_ref, what="scan state")
    state = s0 if with_state else np.zeros((b, d, n), np.float32)
    y1_ref, s1_ref = ops.selective_state_update(state, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D,
                                                z[:, 0] if gated else None, bias)
    y1, s1 = selective_state_update_ops(mx.array(state), mx.array(u[:, 0]), mx.array(delta[:, 0]), mx.array(A),
                                        mx.array(B[:, 0]), mx.array(C[:, 0]), mx.array(D),
                                        mx.array(z[:, 0]) if gated else None, mx.array(bias))
    assert_close(y1, y1_ref, what="step y")
    assert_close(s1, s1_ref, what="step state")
    # causal conv with a carried state, through the model's Mamba block helper
    from phiflash_mlx.models.phi4flash import Mamba, ModelArgs
    x, w_, cb = f(b, l, d), f(d, k), f(d)
    past = f(b, d, k)
    out_ref, st_ref = ops.causal_conv1d(x, w_, cb, past)
    blk = Mamba(ModelArgs(hidden_size=d, mamba_expand=1, mamba_d_conv=k, mamba_d_state=n), False)
    blk.conv1d.weight = mx.array(w_[:, :, None])
    blk.conv1d.bias = mx.array(cb)
    from phiflash_mlx.models.cache import ArraysCache
    cache = ArraysCache(2)
    cache[0] = mx.array(past[:, :, 1:].transpose(0, 2, 1))      # the model keeps the last K-1 inputs
    u_mlx = blk._conv(mx.array(x), None, cache)
    assert_close(u_mlx, ops.silu(out_ref), what="conv + SiLU")
    assert np_(cache[0]).shape == (b, k - 1, d)
    if k > 1:
        assert_close(np_(cache[0]).transpose(0, 2, 1), st_ref[:, :, 1:], what="conv state")


# --- whole model ------------------------------------------------------------------------------

@settings(max_examples=20)
@given(case=cases, split=st.integers(1, 11), steps=st.integers(1, 4))
def test_model_no_cache_prefill_split_and_decode(case, split, steps):
    config, seed, length = case
    ref, m, _ = model_pair(config, seed)
    rng = np.random.default_rng(seed + 1)
    ids = rng.integers(0, config["vocab_size"], (1, length + steps))
    full_ref = ref.forward(ids)
    assert_close(m(mx.array(ids)), full_ref, what="no-cache logits")
    # prefill split at any point, then decode one token at a time: every step equals the no-cache forward
    split = min(split, length)
    cache = m.make_cache()
    parts = [m(mx.array(ids[:, :split]), cache=cache)]
    if split < length:
        parts.append(m(mx.array(ids[:, split:length]), cache=cache))
    for t in range(length, length + steps):
        parts.append(m(mx.array(ids[:, t:t + 1]), cache=cache))
    assert_close(mx.concatenate(parts, axis=1), full_ref, what="prefill + decode")


@settings(max_examples=12)
@given(case=cases, pad=st.integers(1, 6))
def test_batch_rows_independent_and_left_padding(case, pad):
    config, seed, length = case
    ref, m, _ = model_pair(config, seed)
    rng = np.random.default_rng(seed + 2)
    a = rng.integers(0, config["vocab_size"], (1, length))
    b = rng.integers(0, config["vocab_size"], (1, length))
    alone_a, alone_b = np_(m(mx.array(a))), np_(m(mx.array(b)))
    both = np_(m(mx.array(np.concatenate([a, b]))))
    assert_close(both[:1], alone_a, what="row 0")
    assert_close(both[1:], alone_b, what="row 1")
    # left padding: row a padded by `pad` tokens beside an unpadded longer row
    longer = rng.integers(0, config["vocab_size"], (1, length + pad))
    padded = np.concatenate([np.zeros((1, pad), np.int64), a], axis=1)
    batch = np.concatenate([padded, longer])
    cache = batch_cache(m, [pad, 0])
    out = np_(m(mx.array(batch), cache=cache))
    assert_close(out[:1, pad:], alone_a, what="left-padded row")
    assert_close(out[1:], np_(m(mx.array(longer))), what="unpadded neighbour")
    # and the padded row decodes exactly as the row alone
    nxt = rng.integers(0, config["vocab_size"], (2, 1))
    step = np_(m(mx.array(nxt), cache=cache))
    c1 = m.make_cache()
    m(mx.array(a), cache=c1)
    assert_close(step[:1], m(mx.array(nxt[:1]), cache=c1), what="padded row decode")


def test_cache_sizes_bounded():
    config = {"model_type": "phi4flash", "vocab_size": 32, "hidden_size": 16, "intermediate_size": 8,
              "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4,
              "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_expand": 2}
    _, m, _ = model_pair(config)
    cache = m.make_cache()
    assert len(cache) == 8 // 2 + 2                       # the cross-decoder keeps nothing
    m(mx.array([[1, 2, 3, 4, 5, 6, 7]]), cache=cache)
    sizes = []
    for t in range(6):
        m(mx.array([[t]]), cache=cache)
        mx.eval([c.state for c in cache])
        # the full-attention cache preallocates in steps: count what it holds
        sizes.append([sum(x.nbytes for x in c.keys_and_values()) if kind == "global" else c.nbytes
                      for c, kind in zip(cache, m.args.layer_kinds)])
    per_token = 2 * 2 * (16 // 4) * 4                     # K and V, 2 KV heads, head dim 4, float32
    for i, kind in enumerate(m.args.layer_kinds[:len(cache)]):
        col = [s[i] for s in sizes]
        if kind == "global":
            assert np.diff(col).tolist() == [per_token] * 5
        else:
            assert len(set(col)) == 1, (i, kind, col)
    assert cache[1].keys.shape[2] == 4


# --- golden vectors ---------------------------------------------------------------------------

def test_golden_vectors(golden_name):
    g = np.load(golden_path(golden_name) / "vectors.npz")
    m, tok = phiflash_mlx.load(str(golden_path(golden_name)))
    cap = {}
    logits = m(mx.array(g["input_ids_long"]), capture=cap)
    np.testing.assert_allclose(np_(logits), g["logits_long"], atol=1e-4, rtol=0)
    for ours, theirs in zip(cap["layer_outputs"], g["hidden_layer_outputs_long"]):
        np.testing.assert_allclose(np_(ours), theirs, atol=1e-4, rtol=0)
    np.testing.assert_allclose(np_(cap["final_norm"]), g["hidden_final_norm_long"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np_(cap["gmu_memory"]), g["gmu_memory_long"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np_(m(mx.array(g["input_ids_short"]))), g["logits_short"], atol=1e-4, rtol=0)
    np.testing.assert_allclose(np_(m(mx.array(g["decode_full_ids"]))), g["decode_full_logits"], atol=1e-4, rtol=0)
    cache = m.make_cache()
    prefill = np_(m(mx.array(g["decode_prompt_ids"]), cache=cache))
    np.testing.assert_allclose(prefill, g["decode_prefill_logits"], atol=1e-4, rtol=0)
    token, greedy = int(prefill[0, -1].argmax()), []
    for t in range(16):
        greedy.append(token)
        step = np_(m(mx.array([[token]]), cache=cache))[0, 0]
        np.testing.assert_allclose(step, g["decode_step_logits"][0, t], atol=1e-4, rtol=0)
        token = int(step.argmax())
    assert greedy == g["decode_greedy_ids"][0].tolist()


def test_mlx_lm_generation_loop_drives_our_model():
    generate = pytest.importorskip("mlx_lm.generate", reason="mlx-lm not installed (test extra)")
    name = GOLDEN_MODELS[0]
    g = np.load(golden_path(name) / "vectors.npz")
    m, _ = phiflash_mlx.load(str(golden_path(name)))
    prompt = mx.array(g["decode_prompt_ids"][0])
    theirs = [tok for tok, _ in zip(generate.generate_step(prompt, m, max_tokens=16, prefill_step_size=7), range(16))]
    assert [int(t[0]) for t in theirs] == g["decode_greedy_ids"][0].tolist()


# --- errors -----------------------------------------------------------------------------------

def _golden_copy(tmp_path):
    dst = tmp_path / "m"
    shutil.copytree(golden_path(GOLDEN_MODELS[0]), dst)
    for p in dst.iterdir():
        p.chmod(0o644)
    return dst


@pytest.mark.parametrize("damage,message", [
    ("no_config", "no config.json"),
    ("no_weights", "no \\*.safetensors"),
    ("truncated", "truncated"),
    ("model_type", "model_type 'llama'"),
    ("shape", "model.layers.1.attn.Wqkv.weight has shape"),
    ("missing", "model.layers.1.attn.Wqkv.weight is missing"),
    ("nodir", "does not exist"),
])
def test_clear_errors(tmp_path, damage, message):
    from safetensors.numpy import load_file, save_file
    d = _golden_copy(tmp_path)
    st_file = d / "model.safetensors"
    if damage == "no_config":
        (d / "config.json").unlink()
    elif damage == "no_weights":
        st_file.unlink()
    elif damage == "truncated":
        st_file.write_bytes(st_file.read_bytes()[:100000])
    elif damage == "model_type":
        (d / "config.json").write_text(json.dumps(dict(json.loads((d / "config.json").read_text()), model_type="llama")))
    elif damage in ("shape", "missing"):
        t = load_file(str(st_file))
        if damage == "shape":
            t["model.layers.1.attn.Wqkv.weight"] = t["model.layers.1.attn.Wqkv.weight"][:, :-1]
        else:
            del t["model.layers.1.attn.Wqkv.weight"]
        save_file(t, str(st_file))
    elif damage == "nodir":
        d = tmp_path / "nowhere" / "model"
    with pytest.raises(phiflash_mlx.PhiflashError, match=message):
        phiflash_mlx.load(str(d))


def test_ids_outside_vocabulary_are_refused_where_they_enter():
    """The forward pass does not check ids (a host sync would break mx.compile); generate does."""
    m, tok = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    V = m.args.vocab_size
    for bad in ([1, V], [-1, 2]):
        with pytest.raises(phiflash_mlx.PhiflashError, match="outside the model's vocabulary"):
            phiflash_mlx.generate(m, tok, bad, max_tokens=1, temp=0)


# --- dtype policy, compile, gradients ---------------------------------------------------------

def test_bf16_activations_stay_bf16_and_match_reference_bf16_mode(golden_name):
    """The Apple-silicon path (activations in the weights' dtype) run on the CPU: every layer output
    is bfloat16, and the logits differ from the reference's bf16 emulation by no more than bf16
    rounding explains -- measured by how far that emulation itself is from float32."""
    path = str(golden_path(golden_name))
    g = np.load(golden_path(golden_name) / "vectors.npz")
    ids = g["input_ids_long"]
    m, _ = phiflash_mlx.load(path, dtype=mx.bfloat16)
    cap = {}
    logits = m(mx.array(ids), capture=cap)
    assert logits.dtype == mx.bfloat16
    assert [str(h.dtype) for h in cap["layer_outputs"]] == ["mlx.core.bfloat16"] * m.args.num_hidden_layers
    assert cap["gmu_memory"].dtype == mx.bfloat16
    ref32 = reference.load(path).forward(ids)
    ref16 = reference.load(path, bf16=True).forward(ids)
    ours = np_(logits.astype(mx.float32))
    rounding = np.abs(ref32 - ref16).max()               # what bf16 rounding does to this model
    assert rounding > 0
    assert np.abs(ours - ref16).max() <= 2.5 * rounding
    assert np.abs(ours - ref16).mean() <= 2.5 * np.abs(ref32 - ref16).mean()
    # the cached path keeps the dtype too, and agrees with the no-cache bf16 forward
    cache = m.make_cache()
    m(mx.array(ids[:, :-1]), cache=cache)
    step = m(mx.array(ids[:, -1:]), cache=cache)
    assert step.dtype == mx.bfloat16 and cache[0][1].dtype == mx.float32   # the SSM state stays float32
    assert np.abs(np_(step.astype(mx.float32))[0, 0] - ours[0, -1]).max() <= 2.5 * rounding


def test_float16_weights_keep_float16_with_a_padded_batch():
    """Masks are boolean, so half-precision queries never meet a float32 additive mask."""
    config = {"model_type": "phi4flash", "vocab_size": 32, "hidden_size": 32, "intermediate_size": 16,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 3,
              "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_expand": 2}
    _, m, _ = model_pair(config)
    from mlx.utils import tree_map
    m.update(tree_map(lambda p: p.astype(mx.float16), m.parameters()))
    cache = batch_cache(m, [2, 0])
    out = m(mx.array([[0, 0, 3, 4, 5, 6], [1, 2, 3, 4, 5, 6]]), cache=cache)
    assert out.dtype == mx.float16
    assert m(mx.array([[7], [8]]), cache=cache).dtype == mx.float16


def test_forward_compiles_and_differentiates():
    """No host syncs in the forward pass: mx.compile of the forward and of a cached decode step,
    and gradients (what LoRA training needs) all work and agree with the eager model."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    m, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    ids = mx.array(np.load(golden_path(GOLDEN_MODELS[0]) / "vectors.npz")["input_ids_long"])
    eager = m(ids)
    compiled = mx.compile(lambda x: m(x))
    assert_close(compiled(ids), eager, what="compiled forward")
    cache = m.make_cache()
    m(ids[:, :-1], cache=cache)
    step = mx.compile(lambda x: m(x, cache=cache))
    assert_close(step(ids[:, -1:]), eager[:, -1:], what="compiled decode step")

    def loss(model, x):
        logits = model(x[:, :-1])
        return nn.losses.cross_entropy(logits, x[:, 1:]).mean()

    value, grads = nn.value_and_grad(m, loss)(m, ids)
    flat = tree_flatten(grads)
    assert np.isfinite(float(value)) and flat
    assert all(np.isfinite(np_(gr)).all() for _, gr in flat)
    assert any(np.abs(np_(gr)).max() > 0 for name, gr in flat if name.endswith("A_log"))


def test_cast_and_quant_predicates():
    m, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    keep = ["model.layers.0.attn.A_log", "model.layers.0.attn.D", "model.layers.1.attn.inner_cross_attn.lambda_q1"]
    cast = ["model.embed_tokens.weight", "model.layers.0.attn.dt_proj.bias",
            "model.layers.1.attn.inner_cross_attn.subln.weight"]
    assert not any(m.cast_predicate(n) for n in keep)
    assert all(m.cast_predicate(n) for n in cast)
    assert m.quant_predicate("model.layers.0.mlp.fc1", m.layers[0].mlp.fc1)
    assert not m.quant_predicate("model.layers.0.input_layernorm", m.layers[0].input_layernorm)


def test_quantized_shared_kv_cache_matches_float_cache():
    """The growing full-attention K/V can be quantized (mlx-lm's to_quantized): the cross layers
    then read the quantized cache, and 8-bit keys and values change the logits only slightly."""
    from phiflash_mlx.models.cache import KVCache, QuantizedKVCache
    config = {"model_type": "phi4flash", "vocab_size": 64, "hidden_size": 64, "intermediate_size": 32,
              "num_hidden_layers": 4, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": 4,
              "mamba_d_state": 4, "mamba_d_conv": 4, "mamba_expand": 2}
    _, m, _ = model_pair(config)
    ids = mx.array(np.random.default_rng(0).integers(0, 64, (1, 12)))
    want = m(ids)
    cache = m.make_cache()
    m(ids[:, :8], cache=cache)
    g = m.args.layer_kinds.index("global")
    assert isinstance(cache[g], KVCache)
    cache[g] = cache[g].to_quantized(group_size=32, bits=8)
    assert isinstance(cache[g], QuantizedKVCache)
    got = mx.concatenate([m(ids[:, t:t + 1], cache=cache) for t in range(8, 12)], axis=1)
    err = np.abs(np_(got) - np_(want[:, 8:])).max()
    assert 0 < err <= 0.05 * np.abs(np_(want)).max()


# --- the model file as mlx-lm would take it -------------------------------------------------------

MODEL_FILES = ["phi4flash.py", "phi4flash_kernels.py"]


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_import_only_what_mlx_lm_models_have(name):
    """Droppable into mlx_lm/models/ unchanged: mlx, the standard library, .base, .cache and the
    kernel module beside it -- nothing of this package."""
    import ast
    import pathlib
    import sys
    src = pathlib.Path(phiflash_mlx.__file__).parent / "models" / name
    allowed_relative = {"base", "cache", "phi4flash_kernels"}
    for node in ast.walk(ast.parse(src.read_text())):
        if isinstance(node, ast.ImportFrom) and node.level:
            assert node.level == 1 and node.module in allowed_relative, ast.dump(node)
        elif isinstance(node, (ast.Import, ast.ImportFrom)):
            names = [a.name for a in node.names] if isinstance(node, ast.Import) else [node.module]
            for n in names:
                top = n.split(".")[0]
                assert top == "mlx" or top in sys.stdlib_module_names, n


@pytest.mark.parametrize("name", MODEL_FILES)
def test_model_files_are_black_clean(name):
    """mlx-lm's lint formats with black; its default settings apply."""
    import pathlib
    import subprocess
    import sys
    pytest.importorskip("black", reason="black is part of the test extra")
    src = pathlib.Path(phiflash_mlx.__file__).parent / "models" / name
    proc = subprocess.run([sys.executable, "-m", "black", "--check", "--diff", "-q", str(src)],
                          capture_output=True, text=True)
    assert proc.returncode == 0, proc.stdout[-3000:]


def test_kv_dtype_stores_16_bit_caches():
    """DiffAttention.kv_dtype (an attachment point for platforms where the K/V bytes dominate a decode
    step): the caches hold float16, the activations stay float32, and the logits move only by rounding."""
    from phiflash_mlx.models.phi4flash import DiffAttention
    m, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    ids = mx.array(np.load(golden_path(GOLDEN_MODELS[0]) / "vectors.npz")["input_ids_long"])
    want = np_(m(ids))
    try:
        DiffAttention.kv_dtype = mx.float16
        cache = m.make_cache()
        n = ids.shape[1]
        got = [np_(m(ids[:, :n - 3], cache=cache))] + [np_(m(ids[:, t:t + 1], cache=cache)) for t in range(n - 3, n)]
        for i, kind in enumerate(m.args.layer_kinds[:len(cache)]):
            if kind in ("swa", "global"):
                assert cache[i].keys.dtype == mx.float16 and cache[i].values.dtype == mx.float16
    finally:
        DiffAttention.kv_dtype = None
    got = np.concatenate(got, axis=1)
    assert got.dtype == np.float32
    assert 0 < np.abs(got - want).max() <= 0.01 * np.abs(want).max()
