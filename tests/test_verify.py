"""`phiflash golden` / `phiflash verify`: golden sets made by the reference, and checking another
implementation's outputs against it, including the diagnosis of known mistakes."""

import dataclasses
import json
import subprocess
import sys

import numpy as np
import pytest

import reference
from conftest import GOLDEN_MODELS, ROOT, golden_path
from phiflash_mlx import verify as V
from phiflash_mlx.errors import PhiflashError

TINY = "tiny" if "tiny" in GOLDEN_MODELS else GOLDEN_MODELS[0]
LONG_KEYS = ("logits_long", "hidden_embeddings_long", "hidden_layer_outputs_long", "hidden_final_norm_long",
             "gmu_memory_long")


@pytest.fixture(scope="module")
def tiny():
    path = golden_path(TINY)
    return path, reference.load(str(path)), dict(np.load(path / "vectors.npz"))


def _save(tmp_path, arrays, name="port.npz"):
    out = tmp_path / name
    np.savez(out, **arrays)
    return str(out)


def _cli(*args):
    return subprocess.run([sys.executable, "cli.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=120)


# --- the original's own outputs pass ----------------------------------------------------------

def test_golden_vectors_pass(golden_name):
    path = golden_path(golden_name)
    report = V.verify(path, path / "vectors.npz")
    assert report.ok, V.format_report(report)
    names = [r.name for r in report.rows]
    assert "decode_step_logits" in names and "quirk_step_logits" in names and "generate_ids" in names
    n_layers = json.loads((path / "config.json").read_text())["num_hidden_layers"]
    assert sum(r.key == "hidden_layer_outputs_long" for r in report.rows) == n_layers


def test_safetensors_outputs_and_ids_from_inputs(tiny, tmp_path):
    """A subset of keys, as safetensors, ids taken from the golden vectors.npz (the default --inputs)."""
    path, _, g = tiny
    out = tmp_path / "port.safetensors"
    reference.write_safetensors(str(out), {k: g[k] for k in ("logits_short", "decode_full_logits")})
    report = V.verify(path, out)
    assert report.ok and [r.name for r in report.rows] == ["logits_short", "decode_full_logits"]
    assert report.inputs_from["input_ids_short"] == str(path / "vectors.npz")


# --- mistakes are found, located and explained ------------------------------------------------

def test_one_layer_perturbed_names_that_layer(tiny, tmp_path):
    path, model, g = tiny
    layers = g["hidden_layer_outputs_long"].copy()
    layers[3, 0, 20] += 0.05
    report = V.verify(path, _save(tmp_path, {"input_ids_long": g["input_ids_long"], "logits_long": g["logits_long"],
                                             "hidden_layer_outputs_long": layers}))
    assert not report.ok
    assert report.first_layer == f"layer 3 ({model.cfg.layer_kinds[3]})"
    bad = [r.name for r in report.rows if not r.ok]
    assert bad == [report.first_layer]
    text = V.format_report(report)
    assert "first diverging layer: layer 3" in text and "FAIL" in text
    assert "none of the known mistakes" in text       # a lone perturbation is no known mistake


def test_window_one_key_too_wide(tiny, tmp_path):
    """A port whose sliding window sees W+1 keys: fails at the first SWA layer, cause named."""
    path, model, g = tiny
    cfg = model.cfg
    wide = reference.Model(dataclasses.replace(cfg, sliding_window=cfg.sliding_window + 1), model.w)
    logits, inter = wide.forward_with_intermediates(g["input_ids_long"])
    port = {"input_ids_long": g["input_ids_long"], "logits_long": logits,
            "hidden_layer_outputs_long": np.stack(inter["layer_outputs"]), "gmu_memory_long": inter["gmu_memory"]}
    report = V.verify(path, _save(tmp_path, port))
    first_swa = cfg.layer_kinds.index(reference.SWA)
    assert report.first_layer == f"layer {first_swa} (swa)"
    assert all(r.ok for r in report.rows if r.name.startswith(("layer 0 ",)))
    assert report.causes and report.causes[0][0].name == "window+1" and report.causes[0][1]
    assert report.causes[0][3] == first_swa
    assert "one key too wide" in V.format_report(report)


def test_conv_state_one_short_in_decode(tiny, tmp_path, monkeypatch):
    """A port whose Mamba conv state keeps d_conv-1 inputs and loses the oldest tap in cached decode."""
    path, model, g = tiny
    orig = reference.ops.causal_conv1d

    def short_state_conv(x, weight, bias, conv_state=None):
        if conv_state is not None:                 # only d_conv-1 inputs survive, one of them too old
            k = weight.shape[1]
            kept = conv_state[:, :, 2:]
            conv_state = np.concatenate([np.zeros_like(conv_state[:, :, :k - kept.shape[2]]), kept], axis=2)
        return orig(x, weight, bias, conv_state)

    steps = g["decode_greedy_ids"][:, :6]
    with monkeypatch.context() as m:
        m.setattr(reference.ops, "causal_conv1d", short_state_conv)
        cache = model.new_cache(1)
        prefill = model.forward(g["decode_prompt_ids"], cache)
        step_logits = np.concatenate([model.forward(steps[:, t:t + 1], cache) for t in range(steps.shape[1])], 1)
    port = {"decode_prompt_ids": g["decode_prompt_ids"], "decode_greedy_ids": steps,
            "decode_prefill_logits": prefill, "decode_step_logits": step_logits}
    report = V.verify(path, _save(tmp_path, port))
    assert [r.name for r in report.rows if not r.ok] == ["decode_step_logits"]
    assert report.first_key == "decode_step_logits"
    variant, explained, _, first = report.causes[0]
    assert variant.name == "conv-state" and explained
    assert first == model.cfg.layer_kinds.index(reference.MAMBA) == 0


# --- golden sets --------------------------------------------------------------------------------

def test_golden_is_deterministic_and_loads(tmp_path):
    a, b, c = tmp_path / "a", tmp_path / "b", tmp_path / "c"
    for d, seed in ((a, 7), (b, 7), (c, 8)):
        V.make_golden(str(d), config="tiny", seed=seed, log=lambda *_: None)
    for name in ("config.json", "model.safetensors", "vectors.npz", "README.md"):
        assert (a / name).read_bytes() == (b / name).read_bytes(), name
    assert (a / "vectors.npz").read_bytes() != (c / "vectors.npz").read_bytes()
    cfg = json.loads((a / "config.json").read_text())
    assert cfg["model_type"] == "phi4flash" and cfg["architectures"] == ["Phi4FlashForCausalLM"]
    vec = np.load(a / "vectors.npz")
    assert sorted(vec.files) == sorted(V.ALL_KEYS)
    g = np.load(golden_path(TINY) / "vectors.npz")
    for k in V.ALL_KEYS:                                   # same layout as the original's golden set
        assert vec[k].shape == g[k].shape and vec[k].dtype == g[k].dtype, k
    # the quirk vectors really show the off-by-one; the clean decode matches the no-cache forward
    P = vec["quirk_prompt_ids"].shape[1]
    assert np.abs(vec["quirk_step_logits"][0] - vec["quirk_full_logits"][0, P:]).max() > 1e-2
    P = vec["decode_prompt_ids"].shape[1]
    assert np.abs(vec["decode_step_logits"][0] - vec["decode_full_logits"][0, P:]).max() < 1e-4
    assert "vectors.npz" in (a / "README.md").read_text()


def test_golden_bf16_and_model_option(tmp_path):
    out = tmp_path / "bf16"
    V.make_golden(str(out), config="tiny", seed=1, dtype="bfloat16", log=lambda *_: None)
    st = reference.weights.SafetensorsFile(str(out / "model.safetensors"))
    dtypes = {n: st.dtype(n) for n in st.keys()}
    assert all(dt == "F32" for n, dt in dtypes.items() if n.rsplit(".", 1)[-1] in reference.checkpoint.FP32_IN_ORIGINAL)
    assert {dt for n, dt in dtypes.items() if n.rsplit(".", 1)[-1] not in reference.checkpoint.FP32_IN_ORIGINAL} == {"BF16"}
    vec = dict(np.load(out / "vectors.npz"))
    assert np.array_equal(vec["logits_short"], reference.round_to_bf16(vec["logits_short"]))   # bf16 mode
    keys = {k: vec[k] for k in ("input_ids_long", "logits_long", "hidden_layer_outputs_long")}
    assert V.verify(out, _save(tmp_path, keys), dtype="bfloat16").ok
    # --model: vectors + README for an existing checkpoint, nothing else
    only = tmp_path / "only"
    V.make_golden(str(only), model_dir=str(out), seed=1, dtype="bfloat16", log=lambda *_: None)
    assert sorted(p.name for p in only.iterdir()) == ["README.md", "vectors.npz"]
    assert np.array_equal(np.load(only / "vectors.npz")["logits_long"], vec["logits_long"])


def test_presets():
    full = V.preset_config("full", layers=4)
    cfg = reference.config_from_dict(full)
    assert (cfg.hidden_size, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.intermediate_size,
            cfg.vocab_size, cfg.sliding_window, cfg.num_hidden_layers) == (2560, 40, 20, 10240, 200064, 512, 4)
    assert V.preset_config("full")["num_hidden_layers"] == 32
    for name in ("tiny", "small"):
        if name in GOLDEN_MODELS:
            want = json.loads((golden_path(name) / "config.json").read_text())
            assert V.preset_config(name) == want
    with pytest.raises(PhiflashError, match="multiple of 4"):
        V.preset_config("full", layers=6)
    with pytest.raises(PhiflashError, match="neither a preset"):
        V.preset_config("huge")


# --- errors -------------------------------------------------------------------------------------

def test_clear_errors(tiny, tmp_path):
    path, _, g = tiny
    with pytest.raises(PhiflashError, match="none of the output keys"):
        V.verify(path, _save(tmp_path, {"input_ids_long": g["input_ids_long"], "foo": np.zeros(3)}))
    with pytest.raises(PhiflashError, match="need the input input_ids_long"):
        V.verify(path, _save(tmp_path, {"logits_long": g["logits_long"]}), inputs_path=str(tmp_path / "nope.npz"))
    with pytest.raises(PhiflashError, match=r"logits_long has shape \(1, 39, 256\), expected \(1, 40, 256\)"):
        V.verify(path, _save(tmp_path, {"logits_long": g["logits_long"][:, :39]}))
    other = next((n for n in GOLDEN_MODELS if n != TINY), None)
    if other:
        og = np.load(golden_path(other) / "vectors.npz")
        with pytest.raises(PhiflashError, match="another config"):
            V.verify(path, _save(tmp_path, {k: og[k] for k in ("input_ids_short", "logits_short")}))
    with pytest.raises(PhiflashError, match="no config.json"):
        V.verify(tmp_path, _save(tmp_path, {"logits_long": g["logits_long"]}))
    with pytest.raises(PhiflashError, match="does not exist"):
        V.verify(path, tmp_path / "missing.npz")


def test_cli_exit_codes_and_one_line_errors(tiny, tmp_path):
    path, _, g = tiny
    ok = _save(tmp_path, {k: g[k] for k in ("input_ids_short", "logits_short")}, "ok.npz")
    bad_logits = g["logits_short"].copy()
    bad_logits[0, 2, 5] += 1.0
    bad = _save(tmp_path, {"input_ids_short": g["input_ids_short"], "logits_short": bad_logits}, "bad.npz")
    wrong = _save(tmp_path, {"logits_short": g["logits_short"][..., :10]}, "wrong.npz")
    r = _cli("verify", "--model", str(path), "--outputs", ok)
    assert r.returncode == 0 and "PASS" in r.stdout, r.stderr
    r = _cli("verify", "--model", str(path), "--outputs", bad)
    assert r.returncode == 1 and "FAIL" in r.stdout and "logits_short" in r.stdout
    r = _cli("verify", "--model", str(path), "--outputs", wrong)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("phiflash verify: error: ")
    assert "last dimension 10" in r.stderr and "Traceback" not in r.stderr
    r = _cli("golden", "--config", "tiny", "--layers", "6", "--out", str(tmp_path / "x"))
    assert r.returncode == 1 and r.stderr.startswith("phiflash golden: error: ") and "Traceback" not in r.stderr


def test_cli_golden_then_verify(tmp_path):
    out = tmp_path / "g"
    r = _cli("golden", "--config", "tiny", "--seed", "11", "--out", str(out))
    assert r.returncode == 0, r.stderr
    r = _cli("verify", "--model", str(out), "--outputs", str(out / "vectors.npz"))
    assert r.returncode == 0 and "PASS" in r.stdout, r.stdout + r.stderr
