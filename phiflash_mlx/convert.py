"""Convert a Hugging Face phi4flash checkpoint into an MLX checkpoint: another float dtype, or quantized.

Streams tensor by tensor: each input tensor is read from its memory-mapped shard, converted, and
appended to the output shard being filled, which is written once it reaches `max_shard_size`. Peak
memory is therefore about one output shard plus the input pages in use, whatever the model size.

The output follows mlx-lm's layout: quantized modules store `weight` (packed), `scales` and, for
affine quantization, `biases`; `config.json` gets a `quantization` entry with the defaults and, per
module path, any override (a dict) or `false` for a module kept in full precision.

Affine scales and biases are computed in float32 by mx.quantize and stored rounded once to
`scales_dtype` (float16 by default, as mlx-lm stores them in a model's 16-bit dtype): a 4-bit group of
64 then costs 0.5 + 4/64 bytes per weight instead of 0.5 + 8/64. float16 keeps 11 significant bits
(bfloat16 8); its range covers real scales (normal from 6.1e-5; mx.quantize never gives a scale below
1e-7, and a group that small, 8-bit with a range under ~0.016 or 4-bit under ~0.001, keeps an absolute
error below 1e-5 per weight in float16's subnormals). mxfp4/mxfp8 scales are 8-bit exponents, kept.
"""

from __future__ import annotations

import fnmatch
import json
import math
import os
import shutil
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np

from . import checkpoints
from .errors import PhiflashError
from .loader import DTYPES, load_config, resolve_model_path
from .outdir import atomic_directory, check_destination
from .progress import progress

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
GROUP_SIZES = (32, 64, 128)
MX_MODES = {"mxfp4": (4, 32), "mxfp8": (8, 32)}          # mode -> (bits, group size), fixed by the format
SCALES_DTYPES = ("float16", "bfloat16", "float32")          # affine scales / biases as stored; first: default
# Parameters the original keeps in float32 (SAMBAY.md 3.7) and that we never round further.
KEEP_FP32 = ("A_log", "D", "lambda_q1", "lambda_k1", "lambda_q2", "lambda_k2")
# Copied unchanged from the source directory.
SIDE_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "added_tokens.json",
              "vocab.json", "merges.txt", "tokenizer.model", "generation_config.json", "chat_template.jinja")


@dataclass
class QuantSpec:
    bits: int
    group_size: int
    mode: str = "affine"

    def as_dict(self):
        return {"group_size": self.group_size, "bits": self.bits, "mode": self.mode}


@dataclass
class Recipe:
    """Which modules are quantized how. `overrides` maps a glob over module paths (e.g.
    `model.embed_tokens`, `model.layers.17.*`) to a QuantSpec, or to None for full precision."""
    default: QuantSpec | None
    overrides: list = field(default_factory=list)      # [(pattern, QuantSpec | None)]

    def spec_for(self, module_path: str) -> QuantSpec | None:
        spec = self.default
        for pattern, override in self.overrides:
            if fnmatch.fnmatchcase(module_path, pattern):
                spec = override
        return spec


def make_spec(bits: int | None, group_size: int | None, mode: str = "affine") -> QuantSpec:
    if mode in MX_MODES:
        fixed_bits, fixed_group = MX_MODES[mode]
        if bits not in (None, fixed_bits) or group_size not in (None, fixed_group):
            raise PhiflashError(f"{mode} always uses {fixed_bits} bits in groups of {fixed_group}")
        return QuantSpec(fixed_bits, fixed_group, mode)
    if mode != "affine":
        raise PhiflashError(f"unknown quantization mode {mode!r}; use affine, mxfp4 or mxfp8")
    bits = 4 if bits is None else bits
    group_size = 64 if group_size is None else group_size
    if bits not in AFFINE_BITS:
        raise PhiflashError(f"unsupported --q-bits {bits}; choose one of {', '.join(map(str, AFFINE_BITS))}")
    if group_size not in GROUP_SIZES:
        raise PhiflashError(f"unsupported --q-group-size {group_size}; choose one of "
                            f"{', '.join(map(str, GROUP_SIZES))}")
    return QuantSpec(bits, group_size, mode)


def mixed_recipe(default: QuantSpec, num_layers: int) -> list:
    """The 'mixed' preset: embeddings/tied head and the one full-attention layer (whose K/V every
    cross-attention layer reads) at 8 bits, everything else at the default."""
    high = QuantSpec(8, default.group_size if default.mode == "affine" else 64, "affine")
    return [("model.embed_tokens", high), ("lm_head", high), (f"model.layers.{num_layers // 2 + 1}.*", high)]


def parse_override(text: str, default: QuantSpec | None) -> tuple:
    """PATTERN=BITS[:GROUP] or PATTERN=none (full precision), e.g. 'model.embed_tokens=8'."""
    pattern, sep, value = text.partition("=")
    if not sep or not pattern:
        raise PhiflashError(f"bad --q-override {text!r}; expected PATTERN=BITS[:GROUP] or PATTERN=none")
    if value.lower() in ("none", "fp", "full"):
        return pattern, None
    bits, _, group = value.partition(":")
    try:
        return pattern, make_spec(int(bits), int(group) if group else (default.group_size if default else 64))
    except ValueError:
        raise PhiflashError(f"bad --q-override {text!r}; BITS and GROUP must be integers") from None


def _module_of(name: str) -> str:
    return name.rsplit(".", 1)[0]


def _quantizable(name: str, shape: tuple, spec: QuantSpec | None) -> bool:
    """2-D `.weight` of a linear or embedding module whose input width fits the group size."""
    if spec is None or not name.endswith(".weight") or len(shape) != 2:
        return False
    if "layernorm" in name or "subln" in name or "conv1d" in name:
        return False
    return shape[-1] % spec.group_size == 0


MARKER = "phiflash-convert.json"      # written into every output; only such directories are ever replaced


def is_converted_checkpoint(path: Path) -> bool:
    """An earlier output of convert, unchanged in what it holds: the marker says so and lists every file,
    and the directory has nothing else (a file a user added there is never deleted by --force)."""
    path = Path(path)
    try:
        info = json.loads((path / MARKER).read_text()) if (path / MARKER).is_file() else None
        present = set(os.listdir(path))
    except (OSError, ValueError):
        return False
    if not isinstance(info, dict) or info.get("written_by") != "phiflash convert":
        return False
    listed = info.get("files")
    return isinstance(listed, list) and present <= set(listed)


def _check_options(dtype, quantize, q_bits, q_group_size, q_mode, recipe, overrides, max_shard_size_gb,
                   scales_dtype=None):
    """Every option is checked before the source is read or the destination touched."""
    if dtype is not None and dtype not in DTYPES:
        raise PhiflashError(f"unsupported --dtype {dtype}; choose float32, float16 or bfloat16")
    if scales_dtype is not None and scales_dtype not in SCALES_DTYPES:
        raise PhiflashError(f"unknown --scales-dtype {scales_dtype!r}; choose {', '.join(SCALES_DTYPES[:-1])} "
                            f"or {SCALES_DTYPES[-1]}")
    if not quantize and (q_bits is not None or q_group_size is not None or q_mode != "affine" or overrides
                         or scales_dtype is not None):
        raise PhiflashError("--q-bits, --q-group-size, --q-mode, --q-override and --scales-dtype need "
                            "-q/--quantize")
    default = make_spec(q_bits, q_group_size, q_mode) if quantize else None
    if recipe not in ("uniform", "mixed"):
        raise PhiflashError(f"unknown --recipe {recipe!r}; use uniform or mixed")
    if isinstance(max_shard_size_gb, bool) or not isinstance(max_shard_size_gb, (int, float)) \
            or not math.isfinite(max_shard_size_gb) or not 0 < max_shard_size_gb <= 1024:
        raise PhiflashError(f"--max-shard-size must be a number of GB in (0, 1024], got {max_shard_size_gb}")
    return default, [parse_override(o, default) for o in overrides or []]


def _check_source(src_path: Path, config: dict):
    """The whole source is validated (config, every header against its file, every expected tensor with its
    shape, side files readable) before anything is written."""
    from reference.errors import CheckpointError
    from reference.model import check_weights
    from reference.validate import regular_file_size
    from reference.weights import open_checkpoint
    try:
        store = open_checkpoint(str(src_path), keep=False)
        check_weights(checkpoints.check_config(config, str(src_path / "config.json")), store, str(src_path))
        for side in SIDE_FILES:
            if os.path.lexists(src_path / side):
                regular_file_size(str(src_path / side), side)
    except CheckpointError as exc:
        raise PhiflashError(str(exc)) from None
    return store


def convert(src: str, dst: str, dtype: str | None = None, quantize: bool = False, q_bits: int | None = None,
            q_group_size: int | None = None, q_mode: str = "affine", recipe: str = "uniform",
            overrides: list[str] | None = None, max_shard_size_gb: float = 5.0, force: bool = False,
            scales_dtype: str | None = None) -> Path:
    """Convert `src` (directory or hub id) to `dst`. Returns the output directory.

    `scales_dtype`: how quantized modules store their affine scales and biases, "float16" (default),
    "bfloat16" or "float32"; computed in float32 and rounded once.

    Options, then the source, then the destination are checked before anything is written; the output
    is built in a temporary sibling of `dst` and renamed into place when complete (phiflash_mlx/outdir.py:
    a destination that is, contains or lies inside the source is refused, and an existing one is
    replaced only when it is empty or an earlier output of convert, with force=True)."""
    default, rules = _check_options(dtype, quantize, q_bits, q_group_size, q_mode, recipe, overrides,
                                    max_shard_size_gb, scales_dtype)
    scales_mx = DTYPES[scales_dtype or SCALES_DTYPES[0]]
    src_path = resolve_model_path(src)
    config = load_config(src_path)
    if "quantization" in config:
        raise PhiflashError(f"{src} is already quantized; convert from the unquantized checkpoint")
    if quantize and recipe == "mixed":
        rules = mixed_recipe(default, int(config["num_hidden_layers"])) + rules
    plan = Recipe(default, rules)
    store = _check_source(src_path, config)
    dst_path = check_destination(dst, [str(src_path)], is_converted_checkpoint, "phiflash convert", force)
    with atomic_directory(dst_path) as tmp:
        _write(tmp, src_path, config, store, plan, dtype, quantize, default, max_shard_size_gb, scales_mx)
    return dst_path


def _store_scales(a: mx.array, dtype) -> mx.array:
    """Affine scales or biases (float32 from mx.quantize) rounded once to `dtype`; the mx modes' 8-bit
    exponent scales are not floating and stay as they are."""
    return a.astype(dtype) if mx.issubdtype(a.dtype, mx.floating) else a


def _write(out: Path, src_path: Path, config: dict, store, plan, dtype, quantize, default, max_shard_size_gb,
           scales_dtype=mx.float16):
    tie = bool(config.get("tie_word_embeddings", True))
    names = sorted(n for n in store.names() if not (tie and n == "lm_head.weight"))
    src_dtypes = {store.files[n].dtype(n) for n in names}
    out_float = DTYPES[dtype] if dtype else (mx.bfloat16 if src_dtypes == {"BF16"} or "BF16" in src_dtypes
                                                    else mx.float16 if "F16" in src_dtypes else mx.float32)
    quant_config = dict(default.as_dict()) if default else None
    shard, shard_bytes, shards = {}, 0, []
    limit = int(max_shard_size_gb * 2**30)

    def flush():
        nonlocal shard, shard_bytes
        if shard:
            file = out / f"model-{len(shards) + 1:05d}.safetensors"
            mx.save_safetensors(str(file), shard, metadata={"format": "mlx"})
            shards.append((file, list(shard)))
            shard, shard_bytes = {}, 0

    for name in progress(names, desc="converting", unit="tensor", min_items=50):
        w = mx.array(store[name])                                  # float32, exact
        leaf = name.rsplit(".", 1)[-1]
        spec = plan.spec_for(_module_of(name)) if quantize else None
        if _quantizable(name, w.shape, spec):
            parts = mx.quantize(w, group_size=spec.group_size, bits=spec.bits, mode=spec.mode)
            module = _module_of(name)
            written = {name: parts[0], f"{module}.scales": _store_scales(parts[1], scales_dtype)}
            if len(parts) > 2 and parts[2] is not None:
                written[f"{module}.biases"] = _store_scales(parts[2], scales_dtype)
            if spec != default:
                quant_config[module] = spec.as_dict()
        else:
            if quantize and name.endswith(".weight") and len(w.shape) == 2 and default is not None:
                quant_config[_module_of(name)] = False          # kept in full precision
            target = mx.float32 if leaf in KEEP_FP32 else out_float
            written = {name: w.astype(target)}
        mx.eval(written)
        for k, v in written.items():
            shard[k] = v
            shard_bytes += v.nbytes
        if shard_bytes >= limit:
            flush()
    flush()

    if len(shards) == 1:
        shards[0][0].rename(out / "model.safetensors")
    else:
        weight_map = {}
        for i, (file, tensor_names) in enumerate(shards):
            final = out / f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            file.rename(final)
            weight_map.update({t: final.name for t in tensor_names})
        total = sum((out / f).stat().st_size for f in set(weight_map.values()))
        (out / "model.safetensors.index.json").write_text(
            json.dumps({"metadata": {"total_size": total}, "weight_map": weight_map}, indent=2))
    for side in SIDE_FILES:
        if (src_path / side).exists():
            shutil.copy(src_path / side, out / side)
    new_config = dict(config)
    new_config["torch_dtype"] = {mx.float32: "float32", mx.float16: "float16", mx.bfloat16: "bfloat16"}[out_float]
    if quant_config is not None:
        new_config["quantization"] = quant_config
        new_config["quantization_config"] = quant_config
    files = sorted({p.name for p in out.iterdir()} | {MARKER, "config.json"})
    (out / MARKER).write_text(json.dumps({"written_by": "phiflash convert", "source": str(src_path),
                                          "torch_dtype": new_config["torch_dtype"],
                                          "quantization": quant_config,
                                          "scales_dtype": str(scales_dtype).split(".")[-1] if quant_config else None,
                                          "files": files}, indent=2) + "\n")
    (out / "config.json").write_text(json.dumps(new_config, indent=2))      # last: a partial output has none


def directory_size(path: Path) -> int:
    return sum(f.stat().st_size for f in Path(path).glob("*.safetensors"))


# ---------------------------------------------------------------------------------------------
# Quality report
# ---------------------------------------------------------------------------------------------

SAMPLE_TEXTS = [
    "The quick brown fox jumps over the lazy dog. A journey of a thousand miles begins with a single step.",
    "Please reason step by step, and put your final answer within \\boxed{}. What is 17 times 23?",
    "def fibonacci(n):\n    a, b = 0, 1\n    for _ in range(n):\n        a, b = b, a + b\n    return a\n",
    "Photosynthesis converts light energy into chemical energy stored in glucose, releasing oxygen.",
]


def _log_softmax(x: np.ndarray) -> np.ndarray:
    x = x.astype(np.float64)
    x = x - x.max(-1, keepdims=True)
    return x - np.log(np.exp(x).sum(-1, keepdims=True))


def quality_report(ref_model, quant_model, sequences: list[list[int]]) -> dict:
    """Teacher-forced over each sequence: mean KL(ref || quant) of the next-token distributions,
    top-1 agreement, and the perplexity of each model on the sequence's own next tokens."""
    from .cpu.kernels import all_logits          # every position's logits are read here

    kl_sum = agree = count = 0.0
    nll = {"ref": 0.0, "quant": 0.0}
    for ids in sequences:
        if len(ids) < 2:
            continue
        x = mx.array([ids])
        with all_logits():
            lp_ref = _log_softmax(np.array(ref_model(x)[0, :-1]))
            lp_q = _log_softmax(np.array(quant_model(x)[0, :-1]))
        target = np.array(ids[1:])
        kl_sum += float((np.exp(lp_ref) * (lp_ref - lp_q)).sum(-1).sum())
        agree += float((lp_ref.argmax(-1) == lp_q.argmax(-1)).sum())
        rows = np.arange(len(target))
        nll["ref"] -= float(lp_ref[rows, target].sum())
        nll["quant"] -= float(lp_q[rows, target].sum())
        count += len(target)
    if not count:
        raise PhiflashError("no sequence of at least two tokens to evaluate")
    return {"positions": int(count), "mean_kl": kl_sum / count, "top1_agreement": agree / count,
            "ppl_ref": float(np.exp(nll["ref"] / count)), "ppl_quant": float(np.exp(nll["quant"] / count))}


def quality_sequences(tokenizer, vocab_size: int, texts: list[str] | None = None, n_random: int = 4,
                      length: int = 64, seed: int = 0) -> list[list[int]]:
    """Token sequences for the report: the given texts (or built-in samples) when there is a tokenizer,
    else random token sequences (a checkpoint without a tokenizer, such as a random test model).
    Special tokens written in a text (``<|user|>``, ``<|end|>``, ...) are read as those tokens, as
    Hugging Face tokenizers do, so a file can hold whole chat transcripts."""
    if tokenizer is not None:
        seqs = [[t for t in tokenizer.encode(text, allow_special=True) if t < vocab_size]
                for text in (texts or SAMPLE_TEXTS)]
        return [s for s in seqs if len(s) >= 2]
    rng = np.random.default_rng(seed)
    return [rng.integers(0, vocab_size, length).tolist() for _ in range(n_random)]
