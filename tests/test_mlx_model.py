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
                shared = (*layer.attn.stripe(mx.array(k).transpose(0, 2, 1, 3), mx.array(v).transpose(0, 2, 1, 3)),
                          0, None)
            else:
                q, k, v = ops.split_qkv(qkv, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)
                mask = ops.attention_mask(q_pos, q_pos, cfg.sliding_window if kind == reference.SWA else None)
                kv = (k, v)
                shared = None
            o_ref = ops.attention_output(
                ops.differential_attention(q, k, v, mask, ops.lambdas_of(w, p + "attn."),
                                           w[p + "attn.inner_cross_attn.subln.weight"], cfg.lambda_init(i)),
                w, p + "attn.")
            o, _ = layer.attn(mx.array(a_ref), None, shared, 0, None)
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
    from phiflash_mlx.models.cache import MambaCache
    cache = MambaCache()
    cache.conv_state = mx.array(past.transpose(0, 2, 1))
    u_mlx = blk._conv(mx.array(x), cache, None)
    assert_close(u_mlx, ops.silu(out_ref), what="conv + SiLU")
    assert_close(np_(cache.conv_state).transpose(0, 2, 1), st_ref, what="conv state")


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
    mask = np.concatenate([np.zeros((1, pad)), np.ones((1, length))], axis=1)
    batch = np.concatenate([padded, longer])
    batch_mask = np.concatenate([mask, np.ones((1, length + pad))])
    cache = m.make_cache()
    out = np_(m(mx.array(batch), cache=cache, padding_mask=mx.array(batch_mask)))
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
        sizes.append([c.nbytes for c in cache])
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


def test_ids_outside_vocabulary_are_refused():
    m, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    V = m.args.vocab_size
    for bad in ([[1, V]], [[-1, 2]]):
        with pytest.raises(ValueError, match="outside the vocabulary"):
            m(mx.array(bad))
