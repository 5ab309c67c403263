"""Checking another implementation of Phi-4-mini-flash-reasoning against the NumPy reference.

Two tools, both driven by the key set of the golden ``vectors.npz`` files (golden README, "vectors.npz"):

* ``make_golden`` writes a random-weight checkpoint in the released model's format (or takes an existing
  one) and the reference's outputs for a fixed set of inputs, so a port can be tested on any shape.
* ``verify`` reruns the reference on the inputs of such a set, compares another implementation's outputs
  quantity by quantity and layer by layer, and, when something differs, reruns the reference with
  deliberate mistakes (a window one key too wide, swapped MLP halves, ...) to say which mistake
  reproduces the port's numbers best.

The reference itself is not modified: the variants are built here, from a changed config or by
replacing one function of ``reference.ops`` for the duration of a ``with`` block.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import io
import json
import math
import os
import zipfile

import numpy as np

import reference
from reference import ops as ref_ops
from reference.checkpoint import FP32_IN_ORIGINAL
from reference.weights import SafetensorsFile

from .errors import PhiflashError
from .outdir import atomic_directory, check_destination

# ---------------------------------------------------------------------------------------------
# Key set of a golden vectors.npz (golden README, "vectors.npz")
# ---------------------------------------------------------------------------------------------

ID_KEYS = ("input_ids_short", "input_ids_long", "decode_prompt_ids", "decode_greedy_ids", "decode_full_ids",
           "quirk_prompt_ids", "quirk_greedy_ids")
FLOAT_KEYS = ("logits_short", "logits_long", "hidden_embeddings_long", "hidden_layer_outputs_long",
              "hidden_final_norm_long", "gmu_memory_long", "decode_prefill_logits", "decode_step_logits",
              "decode_full_logits", "quirk_step_logits", "quirk_full_logits")
# Token ids that are themselves results of the implementation (greedy decoding); checked exactly.
GREEDY_KEYS = ("decode_greedy_ids", "generate_ids", "quirk_greedy_ids")
ALL_KEYS = ("input_ids_short", "logits_short", "input_ids_long", "logits_long", "hidden_embeddings_long",
            "hidden_layer_outputs_long", "hidden_final_norm_long", "gmu_memory_long", "decode_prompt_ids",
            "decode_prefill_logits", "decode_greedy_ids", "decode_step_logits", "decode_full_ids",
            "decode_full_logits", "generate_ids", "quirk_prompt_ids", "quirk_greedy_ids", "quirk_step_logits",
            "quirk_full_logits")

MEANINGS = {
    "input_ids_short": "int64 prompt shorter than the sliding window",
    "logits_short": "float32 logits of one no-cache forward over `input_ids_short`",
    "input_ids_long": "int64 prompt longer than the sliding window",
    "logits_long": "float32 logits of one no-cache forward over `input_ids_long`",
    "hidden_embeddings_long": "token embeddings of `input_ids_long` (input of decoder layer 0)",
    "hidden_layer_outputs_long": "[i] = output of decoder layer i (after both residual adds), no-cache forward of "
                                 "`input_ids_long`",
    "hidden_final_norm_long": "output of the final LayerNorm (what the tied lm_head consumes)",
    "gmu_memory_long": "GMU memory of layer num_hidden_layers//2: selective-scan output y = C.h + D*u before the "
                       "silu(z) gate",
    "decode_prompt_ids": "prompt used for cached decoding (same as `input_ids_long`)",
    "decode_prefill_logits": "logits of the cached prefill call",
    "decode_greedy_ids": "greedy tokens g_0..g_{n-1}; g_0 = argmax of the last prefill logit, g_t = argmax of "
                         "decode_step_logits[:, t-1]",
    "decode_step_logits": "[:, t] = logits returned when feeding g_t alone at position P+t with the cache",
    "decode_full_ids": "prompt followed by the greedy tokens",
    "decode_full_logits": "no-cache forward over `decode_full_ids`; decode_step_logits[:, t] should equal "
                          "decode_full_logits[:, P+t]",
    "generate_ids": "greedy generation: prompt + n tokens (the same tokens as `decode_greedy_ids`)",
    "quirk_prompt_ids": "short prompt (P < sliding window) that exposes the original's sliding-cache off-by-one",
    "quirk_greedy_ids": "greedy tokens of the cached decode with the original's off-by-one from `quirk_prompt_ids`",
    "quirk_step_logits": "cached-decode logits with the original's off-by-one (differ from the consistent values "
                         "from the step that writes position S-1, S = min(W, P + n))",
    "quirk_full_logits": "no-cache forward over quirk_prompt_ids + quirk_greedy_ids (the consistent values)",
}

SHORT_LEN = 5            # as in the golden sets: shorter than any window >= 6
DECODE_STEPS = 16


# ---------------------------------------------------------------------------------------------
# Running the reference on a set of inputs
# ---------------------------------------------------------------------------------------------

def _greedy_run(model, prompt, tokens=None, steps=DECODE_STEPS, quirk=False, layers=False):
    """Prefill `prompt` with a cache, then feed `tokens` one at a time (teacher forcing), or the
    model's own greedy tokens when `tokens` is None. Returns a dict with the prefill logits, the step
    logits (b, n, V), the tokens fed (b, n), the model's own argmax chain along that path (b, n) and,
    with `layers`, the per-layer outputs of the steps (N, b, n, d)."""
    b, p = prompt.shape
    n = steps if tokens is None else tokens.shape[1]
    cache = model.new_cache(b, hf_sliding_quirk=quirk, max_cache_len=p + n if quirk else None)
    prefill = model.forward(prompt, cache)
    choice = prefill[:, -1].argmax(-1)                                     # (b,)
    gaps, fed, own, step_logits, step_layers = [], [], [], [], []
    for t in range(n):
        token = choice if tokens is None else tokens[:, t]
        own.append(choice)
        gaps.append(_top2_gap(prefill[:, -1] if t == 0 else step_logits[-1][:, 0]))
        fed.append(token)
        logits, inter = model.forward_with_intermediates(token[:, None].astype(np.int64), cache)
        step_logits.append(logits)
        if layers:
            step_layers.append(np.stack(inter["layer_outputs"]))          # (N, b, 1, d)
        choice = logits[:, 0].argmax(-1)
    out = {"prefill": prefill, "steps": np.concatenate(step_logits, axis=1), "fed": np.stack(fed, 1),
           "own": np.stack(own, 1), "gaps": np.stack(gaps, 1)}
    if layers:
        out["layers"] = np.concatenate(step_layers, axis=2)
    return out


def _top2_gap(logits):
    top = np.sort(logits, -1)[..., -2:]
    return top[..., 1] - top[..., 0]


def run_reference(model, inputs: dict, wanted, layers=False) -> dict:
    """The reference's values of the keys in `wanted` for the given ids (keys of ID_KEYS).

    Internal extras (not vector keys) start with "_": per-layer outputs of decode steps, the model's
    own greedy chain along the teacher-forced path and its top-2 gaps, used for reports."""
    wanted = set(wanted)
    out = {}
    if "logits_short" in wanted:
        out["logits_short"] = model.forward(inputs["input_ids_short"])
    if wanted & {"logits_long", "hidden_embeddings_long", "hidden_layer_outputs_long", "hidden_final_norm_long",
                 "gmu_memory_long"}:
        logits, inter = model.forward_with_intermediates(inputs["input_ids_long"])
        out.update(logits_long=logits, hidden_embeddings_long=inter["embeddings"],
                   hidden_layer_outputs_long=np.stack(inter["layer_outputs"]),
                   hidden_final_norm_long=inter["final_norm"], gmu_memory_long=inter["gmu_memory"])
        out["_long_layers"] = out["hidden_layer_outputs_long"]
    for group, quirk in (("decode", False), ("quirk", True)):
        if not wanted & {f"{group}_prefill_logits", f"{group}_step_logits", f"{group}_greedy_ids",
                         "generate_ids" if group == "decode" else "-"}:
            continue
        run = _greedy_run(model, inputs[f"{group}_prompt_ids"], inputs.get(f"{group}_greedy_ids"),
                          quirk=quirk, layers=layers)
        out[f"{group}_prefill_logits"] = run["prefill"]
        out[f"{group}_step_logits"] = run["steps"]
        out[f"{group}_greedy_ids"] = run["fed"]
        out[f"_{group}_own"], out[f"_{group}_gaps"] = run["own"], run["gaps"]
        if layers:
            out[f"_{group}_layers"] = run["layers"]
        if group == "decode":
            out["generate_ids"] = np.concatenate([inputs["decode_prompt_ids"], run["fed"]], axis=1)
    if "decode_full_logits" in wanted:
        out["decode_full_logits"] = model.forward(inputs["decode_full_ids"])
    if "quirk_full_logits" in wanted:
        ids = np.concatenate([inputs["quirk_prompt_ids"], inputs["quirk_greedy_ids"]], axis=1)
        out["quirk_full_logits"] = model.forward(ids)
    out.pop("quirk_prefill_logits", None)                                  # not a vector key
    return {k: v for k, v in out.items() if k in wanted or k.startswith("_")}


# ---------------------------------------------------------------------------------------------
# Golden sets: config presets, random weights, vectors, README
# ---------------------------------------------------------------------------------------------

def _released_config(**sizes) -> dict:
    """config.json in the format of the released checkpoint (SAMBAY.md 1.1; golden README "Configuration")."""
    cfg = {
        "architectures": ["Phi4FlashForCausalLM"],
        "attention_dropout": 0.0,
        "auto_map": {"AutoConfig": "configuration_phi4flash.Phi4FlashConfig",
                     "AutoModelForCausalLM": "modeling_phi4flash.Phi4FlashForCausalLM"},
        "bos_token_id": 1, "embd_pdrop": 0.0, "eos_token_id": 2, "hidden_act": "silu",
        "initializer_range": 0.02, "layer_norm_eps": 1e-05, "mamba_conv_bias": True, "mamba_d_conv": 4,
        "mamba_d_state": 16, "mamba_expand": 2, "mamba_proj_bias": False, "max_position_embeddings": 4096,
        "mb_per_layer": 2, "model_type": "phi4flash", "pad_token_id": 0, "resid_pdrop": 0.0,
        "rope_theta": 10000.0, "tie_word_embeddings": True, "torch_dtype": "float32",
        "transformers_version": "4.46.1", "use_cache": True,
    }
    cfg.update(sizes)
    cfg["mamba_dt_rank"] = math.ceil(cfg["hidden_size"] / 16)
    return cfg


PRESETS = {
    "tiny": dict(hidden_size=64, intermediate_size=128, num_attention_heads=4, num_hidden_layers=8,
                 num_key_value_heads=2, sliding_window=8, vocab_size=256),
    "small": dict(hidden_size=128, intermediate_size=192, num_attention_heads=8, num_hidden_layers=12,
                  num_key_value_heads=4, sliding_window=16, vocab_size=512),
    # the released shape (SAMBAY.md 1.1); --layers cuts the depth
    "full": dict(hidden_size=2560, intermediate_size=10240, num_attention_heads=40, num_hidden_layers=32,
                 num_key_value_heads=20, sliding_window=512, vocab_size=200064, bos_token_id=199999,
                 eos_token_id=199999, pad_token_id=199999, max_position_embeddings=262144),
}


def preset_config(name_or_path: str, layers: int | None = None) -> dict:
    """A preset name (tiny, small, full) or a config.json file / checkpoint directory, as a raw dict."""
    if name_or_path in PRESETS:
        raw = _released_config(**PRESETS[name_or_path])
    else:
        file = os.path.join(name_or_path, "config.json") if os.path.isdir(name_or_path) else name_or_path
        if not os.path.exists(file):
            raise PhiflashError(f"--config {name_or_path!r} is neither a preset ({', '.join(PRESETS)}) nor a "
                                "config.json file or a directory holding one")
        try:
            raw = reference.read_config_json(file)
        except reference.CheckpointError as exc:
            raise PhiflashError(str(exc)) from None
    if layers is not None:
        if layers < 4 or layers % 4:
            raise PhiflashError(f"--layers {layers}: the layer count must be a multiple of 4 (at least 4)")
        raw = dict(raw, num_hidden_layers=layers)
    try:
        reference.config_from_dict(raw)
    except reference.CheckpointError as exc:
        raise PhiflashError(str(exc)) from None
    return raw


def random_weights(cfg, seed: int) -> dict[str, np.ndarray]:
    """Random float32 weights with the scales of the golden sets (golden README, "Weights"), drawn in
    sorted-name order from one generator, so a seed fixes every value."""
    rng = np.random.default_rng(seed)
    ds, K, R = cfg.mamba_d_state, cfg.mamba_d_conv, cfg.dt_rank

    def normal(shape, std, mean=0.0):
        return (rng.standard_normal(shape, dtype=np.float32) * np.float32(std) + np.float32(mean))

    def uniform(shape, bound):
        return rng.uniform(-bound, bound, shape).astype(np.float32)

    out = {}
    for name, shape in sorted(reference.expected_tensors(cfg).items()):
        leaf = name.split(".")
        kind, attr = leaf[-2], leaf[-1]
        if name == "model.embed_tokens.weight" or name == "lm_head.weight":
            w = normal(shape, 0.1)
        elif attr == "A_log":
            w = np.log(np.arange(1, ds + 1, dtype=np.float32))[None, :] + normal(shape, 0.05)
        elif attr == "D":
            w = normal(shape, 0.1, 1.0)
        elif attr.startswith("lambda_"):
            w = normal(shape, 0.1)
        elif kind == "conv1d":
            w = uniform(shape, 1 / math.sqrt(K))
        elif kind == "dt_proj" and attr == "weight":
            w = uniform(shape, R ** -0.5)
        elif kind == "dt_proj":
            dt = np.exp(rng.uniform(math.log(1e-3), math.log(1e-1), shape))
            w = (dt + np.log(-np.expm1(-dt))).astype(np.float32)          # inverse softplus
        elif attr == "weight" and ("layernorm" in kind or kind == "subln"):
            w = normal(shape, 0.1, 1.0)
        elif attr == "bias" and "layernorm" in kind:
            w = normal(shape, 0.05)
        elif attr == "bias":                                                # Wqkv / attention out_proj bias
            w = normal(shape, 0.02)
        elif kind in ("out_proj", "fc2"):
            w = normal(shape, 0.02)
        else:                                                               # Wqkv, in_proj, fc1, x_proj
            w = normal(shape, 1 / math.sqrt(shape[-1]))
        out[name] = np.ascontiguousarray(w, dtype=np.float32)
    return out


def _bf16_names(names):
    return {n for n in names if n.rsplit(".", 1)[-1] not in FP32_IN_ORIGINAL}


def golden_inputs(vocab_size: int, window: int, seed: int) -> dict:
    """Prompts: a short one (shorter than the window) and a long one (longer than the window)."""
    rng = np.random.default_rng([seed, 1])
    long_len = max(40, window + 8)
    short = rng.integers(0, vocab_size, (1, min(SHORT_LEN, max(1, window - 1))), dtype=np.int64)
    long = rng.integers(0, vocab_size, (1, long_len), dtype=np.int64)
    return {"input_ids_short": short, "input_ids_long": long}


def make_vectors(model, inputs: dict) -> dict:
    """Every key of a golden vectors.npz, computed by the reference (greedy tokens are its own)."""
    out = {"input_ids_short": inputs["input_ids_short"], "input_ids_long": inputs["input_ids_long"],
           "decode_prompt_ids": inputs["input_ids_long"], "quirk_prompt_ids": inputs["input_ids_short"]}
    out.update(run_reference(model, out, set(FLOAT_KEYS) - {"decode_full_logits", "quirk_full_logits"}
                             | {"decode_greedy_ids", "quirk_greedy_ids", "generate_ids"}))
    out["decode_full_ids"] = out["generate_ids"]
    out.update(run_reference(model, out, {"decode_full_logits", "quirk_full_logits"}))
    for k in list(out):
        if k.startswith("_"):
            del out[k]
    return {k: (np.asarray(out[k], np.int64) if k in ID_KEYS or k == "generate_ids"
                else np.asarray(out[k], np.float32)) for k in ALL_KEYS}


def write_npz(path: str, arrays: dict) -> None:
    """Like np.savez, but byte-identical for identical arrays (fixed zip timestamps)."""
    with zipfile.ZipFile(path, "w", compression=zipfile.ZIP_STORED) as zf:
        for name, arr in arrays.items():
            buf = io.BytesIO()
            np.lib.format.write_array(buf, np.ascontiguousarray(arr), allow_pickle=False)
            info = zipfile.ZipInfo(name + ".npy", date_time=(1980, 1, 1, 0, 0, 0))
            info.external_attr = 0o644 << 16
            zf.writestr(info, buf.getvalue())


def _sha256(path):
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def make_golden(out_dir: str, config: str | None = None, model_dir: str | None = None, seed: int = 0,
                dtype: str = "float32", layers: int | None = None, log=print) -> dict:
    """Write a golden set to `out_dir`: with `config`, a random-weight checkpoint (config.json,
    model.safetensors) plus vectors.npz and README.md; with `model_dir`, only vectors.npz and README.md
    for that checkpoint. Returns the vectors."""
    if (config is None) == (model_dir is None):
        raise PhiflashError("give exactly one of --config (random weights) and --model (an existing checkpoint)")
    if dtype not in ("float32", "bfloat16"):
        raise PhiflashError(f"--dtype {dtype!r}: use float32 or bfloat16")
    bf16 = dtype == "bfloat16"
    if config is not None:
        raw = preset_config(config, layers)
        raw["torch_dtype"] = dtype
        cfg = reference.config_from_dict(raw)
        sources = [] if config in PRESETS else [config]
    elif layers is not None:
        raise PhiflashError("--layers only applies to random weights (--config), not to --model")
    else:
        if not os.path.isdir(model_dir):
            raise PhiflashError(f"--model {model_dir} is not a directory; point it at a checkpoint directory")
        sources = [model_dir]
    # Checked before anything is written; written into a sibling and renamed into place when complete.
    out_path = check_destination(out_dir, sources, is_golden_set, "phiflash golden", force=None, option="--out")
    with atomic_directory(out_path) as tmp:
        if config is not None:
            log(f"drawing random weights (seed {seed}) for {_describe(cfg)}")
            tensors = random_weights(cfg, seed)
            reference.write_safetensors(os.path.join(tmp, "model.safetensors"), tensors,
                                        bf16_names=_bf16_names(tensors) if bf16 else (), metadata={"format": "pt"})
            del tensors
            with open(os.path.join(tmp, "config.json"), "w", encoding="utf-8") as f:
                json.dump(raw, f, indent=2, sort_keys=True)
                f.write("\n")
            model = load_model(str(tmp), bf16)
        else:
            model = load_model(model_dir, bf16)
        log(f"computing vectors with the reference ({dtype})")
        vectors = make_vectors(model, golden_inputs(model.cfg.vocab_size, model.cfg.sliding_window, seed))
        write_npz(os.path.join(tmp, "vectors.npz"), vectors)
        readme = _golden_readme(model, vectors, str(tmp), seed if config is not None else None, dtype, config,
                                model_dir)
        with open(os.path.join(tmp, "README.md"), "w", encoding="utf-8") as f:
            f.write(readme)
    return vectors


def is_golden_set(path) -> bool:
    """A directory `phiflash golden` wrote (the only kind it replaces): vectors.npz and its README."""
    try:
        with open(os.path.join(path, "README.md"), encoding="utf-8") as f:
            head = f.read(64)
    except (OSError, UnicodeDecodeError):
        return False
    return head.startswith("# Golden vectors") and os.path.isfile(os.path.join(path, "vectors.npz"))


def _describe(cfg) -> str:
    return (f"hidden {cfg.hidden_size}, heads {cfg.num_attention_heads} (head_dim {cfg.head_dim}), kv heads "
            f"{cfg.num_key_value_heads}, layers {cfg.num_hidden_layers}, vocab {cfg.vocab_size}, intermediate "
            f"{cfg.intermediate_size}, sliding_window {cfg.sliding_window}, mamba d_state {cfg.mamba_d_state}, "
            f"d_conv {cfg.mamba_d_conv}, expand {cfg.mamba_expand} (d_inner {cfg.d_inner}), dt_rank {cfg.dt_rank}")


def _golden_readme(model, vectors, out_dir, seed, dtype, config, model_dir) -> str:
    cfg = model.cfg
    kinds = ", ".join(f"{i}: {k}" for i, k in enumerate(cfg.layer_kinds))
    lines = [f"# Golden vectors for a phi4flash (SambaY) model: {dtype}", ""]
    if seed is not None:
        lines += [
            f"Random-weight checkpoint in the released model's format (config `{config}`, seed {seed}) and the "
            "outputs of the NumPy reference of phiflash-mlx for it. Made by "
            f"`phiflash golden --config {config} --seed {seed} --dtype {dtype}`"
            + (f" --layers {cfg.num_hidden_layers}" if config == "full" else "") + "; the same command gives "
            "byte-identical files.", "",
            "Weights are drawn with numpy's `default_rng(seed)`, tensor by tensor in sorted-name order, with "
            "the scales of the golden sets: embeddings N(0, 0.1); Wqkv, Mamba in_proj, GMU in_proj, fc1 and "
            "x_proj N(0, 1/sqrt(fan_in)); out_proj and fc2 N(0, 0.02); attention biases N(0, 0.02); LayerNorm "
            "weight 1 + N(0, 0.1), bias N(0, 0.05); subln weight 1 + N(0, 0.1); lambdas N(0, 0.1); "
            "A_log = log(1..d_state) + N(0, 0.05); D = 1 + N(0, 0.1); conv1d weight and bias "
            "U(+-1/sqrt(d_conv)); dt_proj.weight U(+-dt_rank^-0.5); dt_proj.bias = inverse softplus of "
            "dt ~ logU(1e-3, 1e-1). `lm_head` is tied to the embedding and not stored."
            + (" Stored as bfloat16 except A_log and the lambdas, which stay float32 as in the release."
               if dtype == "bfloat16" else " Stored as float32."), ""]
    else:
        lines += [f"Outputs of the NumPy reference of phiflash-mlx for the checkpoint `{model_dir}` (weights not "
                  f"copied here), made by `phiflash golden --model {model_dir} --dtype {dtype}`.", ""]
    lines += [
        f"Sizes: {_describe(cfg)}.", "", f"Layer schedule: {kinds}.", "",
        "## How the vectors were made", "",
        "* Everything by the reference (`reference/`), "
        + ("in its bf16-emulation mode: weights rounded to bf16 and activations rounded where the original "
           "CUDA model rounds (SAMBAY.md 4.0); values are still stored as float32."
           if dtype == "bfloat16" else "in float32."),
        "* No-cache forward: `model.forward(ids)`. Per-layer states and the GMU memory: "
        "`model.forward_with_intermediates(input_ids_long)`.",
        "* Cached decode: a fresh cache, prefill with the prompt, then 16 greedy steps feeding one token at a "
        "time. The sliding window holds exactly W keys (the clean semantics).",
        "* `quirk_*`: the same with the reference's `hf_sliding_quirk=True` cache (max_cache_len = P + 16), "
        "which reproduces the original's ring-buffer off-by-one (golden README quirk 2, SAMBAY.md 5.3); "
        "`quirk_full_logits` is the no-cache forward over prompt + those tokens.",
        "* `generate_ids` = prompt + the greedy tokens (the reference has no separate generate loop).", "",
        "Suggested tolerance: " + ("about 1e-4 absolute on logits and hidden states for a float32 port"
                                   if dtype == "float32" else
                                   "see `phiflash verify --dtype bfloat16`, which uses a bf16 tolerance profile")
        + "; greedy ids exactly. Check a port with `phiflash verify --model DIR --outputs FILE`.", "",
        "## vectors.npz", "",
        "| key | shape | meaning |", "|---|---|---|",
    ]
    for k in ALL_KEYS:
        lines.append(f"| `{k}` | {tuple(vectors[k].shape)} | {MEANINGS[k]} |")
    lines += ["", "## Checksums (sha256)", ""]
    for name in ("config.json", "model.safetensors", "vectors.npz"):
        path = os.path.join(out_dir, name)
        if os.path.exists(path):
            lines.append(f"* `{name}`: `{_sha256(path)}`")
    return "\n".join(lines) + "\n"


def load_model(path: str, bf16: bool = False):
    try:
        return reference.load(str(path), bf16=bf16)
    except reference.CheckpointError as exc:
        raise PhiflashError(str(exc)) from None


# ---------------------------------------------------------------------------------------------
# Reading another implementation's outputs
# ---------------------------------------------------------------------------------------------

def read_arrays(path: str) -> dict[str, np.ndarray]:
    """An .npz or .safetensors file as {key: array}; bf16/fp16 become float32, integers int64."""
    path = str(path)
    if not os.path.exists(path):
        raise PhiflashError(f"{path} does not exist")
    if not os.path.isfile(path):
        raise PhiflashError(f"{path} is not a regular file; give an .npz or .safetensors file")
    try:
        with open(path, "rb") as f:
            magic = f.read(4)
    except OSError as exc:
        raise PhiflashError(f"cannot read {path}: {exc.strerror or exc}") from None
    if magic.startswith(b"PK"):
        try:
            with np.load(path, allow_pickle=False) as z:
                return {k: z[k] for k in z.files}
        except (OSError, ValueError, EOFError, zipfile.BadZipFile, zipfile.LargeZipFile, KeyError) as exc:
            raise PhiflashError(f"cannot read {path} as .npz ({exc}); write it with numpy.savez") from None
    try:
        st = SafetensorsFile(path)
    except reference.CheckpointError as exc:
        raise PhiflashError(f"{path} is neither an .npz nor a .safetensors file ({exc})") from None
    out = {}
    for k in st.keys():
        if st.dtype(k).startswith(("I", "U")):
            out[k] = np.asarray(st.raw(k)).astype(np.int64)
        else:
            out[k] = st.get(k)
    return out


# ---------------------------------------------------------------------------------------------
# Tolerances
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Tolerance:
    """max |port - reference| <= atol + rtol * max |reference|, per compared tensor (one quantity, or one
    layer of the per-layer states). Scaling by the tensor's largest value rather than elementwise keeps
    near-zero entries of a tensor from demanding more precision than the format has."""
    atol: float
    rtol: float

    def allowed(self, ref):
        return self.atol + self.rtol * (float(np.abs(ref).max()) if np.size(ref) else 0.0)


# float32: the golden README suggests about 1e-4 absolute for a float32 re-implementation (the reference
# itself agrees with the original within 2.2e-5); rtol lets the released model's larger hidden states
# through. bfloat16: a bf16 port rounds the same tensors as the bf16-emulating reference, but in another
# order, and every disagreement is a bf16 ulp (2^-8 relative) that later layers carry along. Measured on
# the golden models tiny and small (docs/verifying.md, "Tolerances"): bf16 weights with float32
# activations, or bf16 with 30% of the rounding points skipped, differ from the bf16 reference by at most
# 3.7% of the tensor's largest value (0.16 absolute on logits). rtol is twice that. The mistakes the
# diagnosis knows change the outputs by 10% to 130% of that scale, so they still fail.
PROFILES = {
    "float32": Tolerance(atol=1e-4, rtol=1e-5),
    "bfloat16": Tolerance(atol=1e-2, rtol=7.5e-2),
}


# ---------------------------------------------------------------------------------------------
# Deliberate variants of the reference, for diagnosis
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def _patched(module, name, func):
    old = getattr(module, name)
    setattr(module, name, func)
    try:
        yield
    finally:
        setattr(module, name, old)


def _patch_mlp_swapped():
    orig = ref_ops.mlp

    def mlp(x, fc1, fc2, bf16=False):
        half = fc1.shape[0] // 2
        return orig(x, np.concatenate([fc1[half:], fc1[:half]]), fc2, bf16)   # value first, gate second
    return _patched(ref_ops, "mlp", mlp)


def _patch_heads_not_striped():
    orig = ref_ops.differential_attention

    def differential_attention(q, k, v, mask, lambdas, subln_weight, lambda_init, bf16=False):
        def perm(n):                       # branch 1 = first half of the heads, branch 2 = second half
            p = np.empty(n, np.int64)
            p[0::2], p[1::2] = np.arange(n // 2), np.arange(n // 2, n)
            return p
        pq, pk = perm(q.shape[2]), perm(k.shape[2])
        o = orig(q[:, :, pq], k[:, :, pk], v[:, :, pk], mask, lambdas, subln_weight, lambda_init, bf16)
        out = np.empty_like(o)
        out[:, :, pq] = o
        return out
    return _patched(ref_ops, "differential_attention", differential_attention)


def _patch_conv_state_short():
    orig = ref_ops.causal_conv1d

    def causal_conv1d(x, weight, bias, conv_state=None):
        if conv_state is not None:
            # a state of d_conv-1 inputs that is shifted before it is read: the oldest tap sees zero
            conv_state = conv_state.copy()
            conv_state[:, :, 1] = 0.0
        return orig(x, weight, bias, conv_state)
    return _patched(ref_ops, "causal_conv1d", causal_conv1d)


@contextlib.contextmanager
def _patch_memory_without_d():
    scan, mixer = ref_ops.selective_scan, ref_ops.mamba_mixer
    skip = {}

    def selective_scan(u, delta, A, B, C, D, z=None, delta_bias=None, state=None):
        if z is None:
            skip["Du"] = D * u
        return scan(u, delta, A, B, C, D, z, delta_bias, state)

    def mamba_mixer(a, w, prefix, cfg, state=None, produce_memory=False, bf16=False):
        out, memory, new_state = mixer(a, w, prefix, cfg, state, produce_memory, bf16)
        if produce_memory:
            memory = memory - skip.pop("Du")       # the layer's own output keeps D*u; the memory lacks it
        return out, memory, new_state
    with _patched(ref_ops, "selective_scan", selective_scan), _patched(ref_ops, "mamba_mixer", mamba_mixer):
        yield


@dataclasses.dataclass
class Variant:
    name: str
    cause: str
    window: int = 0                   # added to the sliding window
    patch: object = None              # () -> context manager
    quirk_cache: bool | None = None   # every cache with (True) or without (False) the off-by-one
    other_dtype: bool = False


VARIANTS = [
    Variant("window+1", "sliding window one key too wide: W+1 keys instead of W including the query itself "
            "(e.g. FlashAttention window_size=(W, 0), or a mask q - k <= W)", window=1),
    Variant("window-1", "sliding window one key too narrow: W-1 keys instead of W including the query itself",
            window=-1),
    Variant("quirk-missing", "quirk_* decode without the original's sliding-cache off-by-one: these keys hold "
            "the original's (buggy) cached values (golden README quirk 2, SAMBAY.md 5.3); emulate its ring "
            "buffer for them, or leave the quirk_* keys out if the port only does the clean cache",
            quirk_cache=False),
    Variant("quirk-in-decode", "sliding KV cache shifts one step early (the original's ring-buffer off-by-one) "
            "where the clean cache of exactly the last W keys is expected", quirk_cache=True),
    Variant("memory-no-D", "GMU memory without the D*u skip term: the memory is the scan output y = C.h + D*u "
            "before the silu(z) gate", patch=_patch_memory_without_d),
    Variant("conv-state", "Mamba conv state of d_conv-1 inputs that loses the oldest tap in cached decode (the "
            "conv needs the d_conv-1 previous raw inputs plus the current one)", patch=_patch_conv_state_short),
    Variant("mlp-gate-order", "MLP halves swapped: fc1's output is [gate | value], the gate (silu) is the first "
            "half", patch=_patch_mlp_swapped),
    Variant("heads-not-striped", "differential attention heads split into contiguous halves; the original "
            "stripes them (even heads = branch 1, odd heads = branch 2, the same for K and V)",
            patch=_patch_heads_not_striped),
    Variant("dtype", "the outputs match the reference in the other precision mode: rerun verify with the other "
            "--dtype", other_dtype=True),
]


def run_variant(model, variant: Variant, inputs, wanted, model_dir=None, layers=False):
    if variant.other_dtype:
        model = load_model(model_dir, not model.bf16)
    elif variant.window:
        cfg = dataclasses.replace(model.cfg, sliding_window=model.cfg.sliding_window + variant.window)
        if cfg.sliding_window < 1:
            return None
        model = reference.Model(cfg, model.w, model.bf16)
    if variant.quirk_cache is not None:
        model = _FixedQuirk(model, variant.quirk_cache)
    with (variant.patch() if variant.patch else contextlib.nullcontext()):
        return run_reference(model, inputs, wanted, layers=layers)


class _FixedQuirk:
    """A model whose caches all use (or all skip) the original's off-by-one ring buffer."""

    def __init__(self, model, quirk):
        self.m, self.quirk = model, quirk

    def new_cache(self, batch, hf_sliding_quirk=False, max_cache_len=None):
        return self.m.new_cache(batch, self.quirk, max_cache_len)

    def __getattr__(self, name):
        return getattr(self.m, name)


# ---------------------------------------------------------------------------------------------
# Comparison and report
# ---------------------------------------------------------------------------------------------

@dataclasses.dataclass
class Row:
    name: str                         # what is compared ("logits_long", "layer 3 (swa)", ...)
    key: str                          # the vectors key it comes from
    max_abs: float
    rel: float                        # max |diff| / max |reference|
    score: float                      # max |diff| / allowed (<= 1 passes)
    ok: bool
    where: str = ""                   # worst position / first bad step
    note: str = ""


@dataclasses.dataclass
class Report:
    rows: list
    dtype: str
    tolerance: Tolerance
    first_layer: str | None = None
    first_key: str | None = None
    causes: list = dataclasses.field(default_factory=list)
    ignored: list = dataclasses.field(default_factory=list)
    inputs_from: dict = dataclasses.field(default_factory=dict)

    @property
    def ok(self):
        return all(r.ok for r in self.rows)


def _compare(name, key, got, ref, tol, axis_names=None):
    diff = np.abs(got.astype(np.float64) - ref)
    diff = np.where(np.isnan(diff), np.inf, diff)                         # NaN in the port's numbers fails
    worst = np.unravel_index(int(np.argmax(diff)), diff.shape) if diff.size else ()
    max_abs = float(diff.max()) if diff.size else 0.0
    score = max_abs / tol.allowed(ref)
    scale = float(np.abs(ref).max()) if ref.size else 0.0
    where = ""
    if axis_names and worst and max_abs > 0:
        where = ", ".join(f"{a} {i}" for a, i in zip(axis_names, worst) if a)
    return Row(name, key, max_abs, max_abs / scale if scale else 0.0, score, bool(score <= 1.0), where)


_AXES = {
    "hidden_layer_outputs_long": (None, "batch", "pos", None),
    "decode_step_logits": ("batch", "step", None),
    "quirk_step_logits": ("batch", "step", None),
}


def _greedy_row(key, port_ids, ref, prompt_len, group, tol):
    """Port's greedy tokens against the reference's argmax along the same (teacher-forced) path."""
    own, gaps = ref[f"_{group}_own"], ref[f"_{group}_gaps"]
    tokens = port_ids[:, prompt_len:] if key == "generate_ids" else port_ids
    n = min(tokens.shape[1], own.shape[1])
    bad = np.nonzero((tokens[:, :n] != own[:, :n]).any(0))[0]
    if not len(bad):
        return Row(key, key, float("nan"), float("nan"), 0.0, True, note="identical tokens")
    t = int(bad[0])
    row = int(np.nonzero(tokens[:, t] != own[:, t])[0][0])
    gap = float(gaps[row, t])
    tie = gap <= 2 * tol.allowed(ref[f"{group}_step_logits"])
    note = (f"step {t}: {int(tokens[row, t])} vs reference {int(own[row, t])}, reference top-2 gap {gap:.2g}"
            + (" (a near tie: accepted)" if tie else ""))
    return Row(key, key, float("nan"), float("nan"), 0.0 if tie else float("inf"), tie, f"step {t}", note)


def _rows(port, ref, cfg, tol, inputs):
    rows = []
    kinds = cfg.layer_kinds
    for key in ALL_KEYS:
        if key not in port or key in ID_KEYS and key not in GREEDY_KEYS:
            continue
        if key in GREEDY_KEYS:
            group = "quirk" if key.startswith("quirk") else "decode"
            p = inputs[f"{group}_prompt_ids"].shape[1] if key == "generate_ids" else 0
            rows.append(_greedy_row(key, port[key], ref, p, group, tol))
        elif key == "hidden_layer_outputs_long":
            for i, kind in enumerate(kinds):
                r = _compare(f"layer {i} ({kind})", key, port[key][i], ref[key][i], tol, ("batch", "pos", None))
                rows.append(r)
        else:
            rows.append(_compare(key, key, port[key], ref[key], tol, _AXES.get(key, ("batch", "pos", None))))
    return rows


def _expected_shapes(inputs, wanted, cfg):
    V, H, N, Di = cfg.vocab_size, cfg.hidden_size, cfg.num_hidden_layers, cfg.d_inner
    sh = {}
    for key in wanted:
        if key == "logits_short":
            sh[key] = inputs["input_ids_short"].shape + (V,)
        elif key == "logits_long":
            sh[key] = inputs["input_ids_long"].shape + (V,)
        elif key in ("hidden_embeddings_long", "hidden_final_norm_long"):
            sh[key] = inputs["input_ids_long"].shape + (H,)
        elif key == "hidden_layer_outputs_long":
            sh[key] = (N,) + inputs["input_ids_long"].shape + (H,)
        elif key == "gmu_memory_long":
            sh[key] = inputs["input_ids_long"].shape + (Di,)
        elif key == "decode_prefill_logits":
            sh[key] = inputs["decode_prompt_ids"].shape + (V,)
        elif key in ("decode_step_logits", "quirk_step_logits"):
            sh[key] = inputs[key.replace("step_logits", "greedy_ids")].shape + (V,)
        elif key == "decode_full_logits":
            sh[key] = inputs["decode_full_ids"].shape + (V,)
        elif key == "quirk_full_logits":
            b, p = inputs["quirk_prompt_ids"].shape
            sh[key] = (b, p + inputs["quirk_greedy_ids"].shape[1], V)
        elif key in ("decode_greedy_ids", "quirk_greedy_ids"):
            sh[key] = inputs[key.replace("greedy", "prompt")].shape[:1] + (None,)
        elif key == "generate_ids":
            sh[key] = inputs["decode_prompt_ids"].shape[:1] + (None,)
    return sh


# The ids each output needs.
NEEDS = {
    "logits_short": ("input_ids_short",),
    "logits_long": ("input_ids_long",), "hidden_embeddings_long": ("input_ids_long",),
    "hidden_layer_outputs_long": ("input_ids_long",), "hidden_final_norm_long": ("input_ids_long",),
    "gmu_memory_long": ("input_ids_long",),
    "decode_prefill_logits": ("decode_prompt_ids",),
    "decode_step_logits": ("decode_prompt_ids", "decode_greedy_ids"),
    "decode_greedy_ids": ("decode_prompt_ids",),
    "generate_ids": ("decode_prompt_ids",),
    "decode_full_logits": ("decode_full_ids",),
    "quirk_step_logits": ("quirk_prompt_ids", "quirk_greedy_ids"),
    "quirk_greedy_ids": ("quirk_prompt_ids",),
    "quirk_full_logits": ("quirk_prompt_ids", "quirk_greedy_ids"),
}


def _gather_inputs(port, fallback, fallback_path, outputs_path, wanted):
    inputs, origin = {}, {}
    for key in sorted({i for k in wanted for i in NEEDS[k]}):
        if key in port:
            inputs[key], origin[key] = port[key], outputs_path
        elif fallback is not None and key in fallback:
            inputs[key], origin[key] = fallback[key], fallback_path
        elif key == "decode_greedy_ids" and "generate_ids" in port and "decode_prompt_ids" in inputs:
            inputs[key] = port["generate_ids"][:, inputs["decode_prompt_ids"].shape[1]:]
            origin[key] = f"{outputs_path} (generate_ids)"
        else:
            users = sorted(k for k in wanted if key in NEEDS[k])
            where = f"{outputs_path}" + (f" nor in {fallback_path}" if fallback is not None else
                                         f" and {fallback_path} does not exist")
            raise PhiflashError(f"{', '.join(users)} need the input {key}, which is neither in {where}: add it to "
                                "the outputs file or point --inputs at the vectors.npz the outputs were made from")
    # greedy ids in the outputs are the port's own results; the reference is fed the same ones
    if "generate_ids" in port and "decode_greedy_ids" not in inputs and "decode_prompt_ids" in inputs:
        inputs["decode_greedy_ids"] = port["generate_ids"][:, inputs["decode_prompt_ids"].shape[1]:]
    if "decode_greedy_ids" in port and "decode_prompt_ids" in inputs:
        inputs["decode_greedy_ids"] = port["decode_greedy_ids"]
    for key, arr in inputs.items():
        arr = np.asarray(arr)
        if arr.ndim != 2 or not np.issubdtype(arr.dtype, np.integer):
            if arr.ndim == 2 and np.issubdtype(arr.dtype, np.floating) and np.all(arr == np.round(arr)):
                arr = arr.astype(np.int64)
            else:
                raise PhiflashError(f"{key} from {origin.get(key, outputs_path)} must be integer token ids of "
                                    f"shape (batch, length); got {arr.shape} {arr.dtype}")
        inputs[key] = arr.astype(np.int64)
    if "quirk_greedy_ids" in port and "quirk_prompt_ids" in inputs:
        inputs["quirk_greedy_ids"] = np.asarray(port["quirk_greedy_ids"]).astype(np.int64)
    return inputs, origin


def _check_shapes(port, inputs, wanted, cfg, model_dir):
    dims = {"logits": ("vocab_size", cfg.vocab_size), "hidden": ("hidden_size", cfg.hidden_size),
            "gmu": ("d_inner = mamba_expand * hidden_size", cfg.d_inner)}
    for key, shape in _expected_shapes(inputs, wanted, cfg).items():
        got = tuple(np.shape(port[key]))
        if None in shape:
            if len(got) != 2 or got[0] != shape[0]:
                raise PhiflashError(f"{key} has shape {got}; expected (batch={shape[0]}, steps)")
            if key == "generate_ids" and got[1] <= inputs["decode_prompt_ids"].shape[1]:
                raise PhiflashError(f"generate_ids has shape {got}: it should hold the prompt "
                                    f"({inputs['decode_prompt_ids'].shape[1]} tokens) followed by the generated ones")
            continue
        if got == shape:
            continue
        what = "logits" if "logits" in key else "gmu" if key.startswith("gmu") else "hidden"
        name, size = dims[what]
        if len(got) == len(shape) and got[-1] != size:
            raise PhiflashError(f"{key} has last dimension {got[-1]}, but the model in {model_dir} has {name} "
                                f"{size}: the outputs were made with another config or model")
        if key == "hidden_layer_outputs_long" and len(got) == 4 and got[0] != shape[0]:
            raise PhiflashError(f"hidden_layer_outputs_long holds {got[0]} layers, but the model in {model_dir} "
                                f"has num_hidden_layers {shape[0]}: the outputs were made with another config")
        raise PhiflashError(f"{key} has shape {got}, expected {shape} for the inputs used "
                            f"({', '.join(f'{k} {inputs[k].shape}' for k in NEEDS[key])})")
    for key, arr in inputs.items():
        bad = (arr < 0) | (arr >= cfg.vocab_size)
        if bad.any():
            raise PhiflashError(f"{key} holds token id {int(arr[bad][0])}, outside the vocabulary of the model in "
                                f"{model_dir} (0..{cfg.vocab_size - 1}): the outputs were made for another config")


def _first_layer_changed(a, b, tol, cfg):
    """The first layer whose outputs differ between two reference runs (any group), or None."""
    best = None
    for key in ("_long_layers", "_decode_layers", "_quirk_layers"):
        if key in a and key in b:
            for i in range(cfg.num_hidden_layers):
                if np.abs(a[key][i] - b[key][i]).max() > tol.allowed(a[key][i]):
                    best = i if best is None else min(best, i)
                    break
    return best


def diagnose(model, port, ref, rows, inputs, tol, model_dir):
    """Rerun the reference with each deliberate mistake; return the variants that explain the failures,
    best first, as (variant, explained (bool), ratio, first layer the mistake changes)."""
    failing = {r.key for r in rows if not r.ok}
    def total(rs):
        return sum(min(r.score, 1e6) for r in rs if r.key in failing)
    base = total(rows)
    found = []
    for variant in VARIANTS:
        try:
            out = run_variant(model, variant, inputs, failing, model_dir, layers=True)
        except PhiflashError:
            continue
        if out is None:
            continue
        vrows = _rows({k: v for k, v in port.items() if k in failing}, out, model.cfg, tol, inputs)
        score = total(vrows)
        explained = all(r.ok for r in vrows if r.key in failing)
        ratio = base / score if score > 0 else float("inf")
        if explained or ratio >= 10:
            first = _first_layer_changed(ref, out, tol, model.cfg)
            found.append((variant, explained, ratio, first))
    found.sort(key=lambda f: (not f[1], -f[2]))
    if found and found[0][1]:
        found = [f for f in found if f[1]]        # exact explanations make partial ones moot
    return found


def verify(model_dir: str, outputs: str, dtype: str = "float32", inputs_path: str | None = None,
           atol: float | None = None, rtol: float | None = None, diagnose_causes: bool = True) -> Report:
    """Compare another implementation's outputs (`outputs`: .npz or .safetensors with golden keys) with
    the reference run on the same inputs. See the module docstring."""
    if dtype not in PROFILES:
        raise PhiflashError(f"--dtype {dtype!r}: use float32 or bfloat16")
    base = PROFILES[dtype]
    tol = Tolerance(base.atol if atol is None else atol, base.rtol if rtol is None else rtol)
    port = read_arrays(outputs)
    known = [k for k in port if k in ALL_KEYS]
    ignored = sorted(k for k in port if k not in ALL_KEYS)
    wanted = {k for k in known if k in FLOAT_KEYS or k in GREEDY_KEYS}
    if not wanted:
        raise PhiflashError(f"{outputs} holds none of the output keys of a golden vectors.npz ("
                            f"{', '.join(k for k in ALL_KEYS if k not in ID_KEYS or k in GREEDY_KEYS)}); "
                            f"it has: {', '.join(sorted(port)) or 'nothing'}")
    inputs_path = inputs_path or os.path.join(str(model_dir), "vectors.npz")
    fallback = read_arrays(inputs_path) if os.path.exists(inputs_path) else None
    model = load_model(model_dir, dtype == "bfloat16")
    inputs, origin = _gather_inputs(port, fallback, inputs_path, outputs, wanted)
    _check_shapes(port, inputs, wanted, model.cfg, model_dir)
    port = {k: (np.asarray(v, np.int64) if k in GREEDY_KEYS else np.asarray(v, np.float32)) for k, v in port.items()
            if k in wanted}
    try:
        ref = run_reference(model, inputs, wanted, layers=True)
    except reference.CheckpointError as exc:
        raise PhiflashError(str(exc)) from None
    rows = _rows(port, ref, model.cfg, tol, inputs)
    report = Report(rows, dtype, tol, ignored=ignored, inputs_from=origin)
    bad = [r for r in rows if not r.ok]
    if bad:
        layer_rows = [r for r in bad if r.key == "hidden_layer_outputs_long"]
        report.first_layer = layer_rows[0].name if layer_rows else None
        report.first_key = bad[0].key
        if diagnose_causes:
            report.causes = diagnose(model, port, ref, rows, inputs, tol, model_dir)
    return report


def _fmt(x):
    if x != x:
        return "-"
    if x == float("inf"):
        return "inf"
    return f"{x:.2e}"


def format_report(report: Report) -> str:
    t = report.tolerance
    lines = [f"tolerance ({report.dtype}): max|diff| <= {t.atol:g} + {t.rtol:g} * max|reference|, per row", ""]
    width = max([len(r.name) for r in report.rows] + [8])
    lines.append(f"{'quantity':<{width}}  {'max|diff|':>9}  {'rel':>8}  {'/tol':>8}  result  where")
    for r in report.rows:
        detail = "  ".join(x for x in (r.where, r.note) if x)
        lines.append(f"{r.name:<{width}}  {_fmt(r.max_abs):>9}  {_fmt(r.rel):>8}  {_fmt(r.score):>8}  "
                     f"{'ok' if r.ok else 'FAIL':<6}  {detail}".rstrip())
    lines.append("")
    if report.ignored:
        lines.append(f"ignored keys (not golden outputs): {', '.join(report.ignored)}")
    if report.ok:
        lines.append(f"PASS: {len(report.rows)} comparisons within tolerance")
        return "\n".join(lines)
    nbad = sum(not r.ok for r in report.rows)
    lines.append(f"FAIL: {nbad} of {len(report.rows)} comparisons out of tolerance")
    if report.first_layer:
        lines.append(f"first diverging layer: {report.first_layer}")
    lines.append(f"first diverging quantity: {report.first_key}")
    if report.causes:
        for variant, explained, ratio, first in report.causes:
            how = ("reproduces the outputs within tolerance" if explained else
                   f"explains them {ratio:.0f}x better than the reference")
            at = f"; it first changes layer {first}" if first is not None else ""
            cause = variant.cause
            if variant.other_dtype:
                other = "float32" if report.dtype == "bfloat16" else "bfloat16"
                cause = f"the outputs match the reference in {other} mode: rerun verify with --dtype {other}"
            lines.append(f"likely cause [{variant.name}]: {cause} ({how}{at})")
    else:
        lines.append("likely cause: none of the known mistakes reproduces these outputs (tried: "
                     + ", ".join(v.name for v in VARIANTS) + ")")
    return "\n".join(lines)
