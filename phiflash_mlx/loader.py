"""Loading a checkpoint directory (or a Hugging Face hub id) into the MLX model."""

from __future__ import annotations

import glob
import logging
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from . import checkpoints
from .errors import PhiflashError
from .models.phi4flash import Model, ModelArgs
from .progress import progress

log = logging.getLogger("phiflash_mlx")


def resolve_model_path(path_or_id: str) -> Path:
    """A local directory as is; otherwise a hub id downloaded with huggingface_hub (optional extra)."""
    path = Path(path_or_id).expanduser()
    if path.is_dir():
        return path
    if path.exists():
        raise PhiflashError(f"{path_or_id} is a file; point --model at a checkpoint directory "
                            "(config.json + *.safetensors)")
    if str(path_or_id).count("/") != 1 or str(path_or_id).startswith((".", "/", "~")):
        raise PhiflashError(f"model directory {path_or_id} does not exist; give a checkpoint directory "
                            "or a Hugging Face id like microsoft/Phi-4-mini-flash-reasoning")
    try:
        from huggingface_hub import snapshot_download
    except ImportError:
        raise PhiflashError(f"{path_or_id} is not a local directory, and downloading from the Hugging Face hub "
                            "needs huggingface_hub: pip install 'phiflash-mlx[hub]'") from None
    try:
        return Path(snapshot_download(
            path_or_id, allow_patterns=["*.json", "*.safetensors", "*.model", "*.txt", "*.tiktoken"]))
    except Exception as exc:  # network, authentication, missing repo: all end the same way for the user
        raise PhiflashError(f"could not download {path_or_id} from the Hugging Face hub: {exc}") from None


def load_config(path: Path) -> dict:
    """config.json, read with a size bound and checked by the validator the reference uses."""
    return checkpoints.read_config(path)


def _check_safetensors(file: str):
    """mx.load on a truncated or corrupt file fails obscurely (or reads F8 as uint8); the shared validator
    checks the header against the file size, dtypes and offsets first (nothing is mapped yet)."""
    return checkpoints.open_shard(file)


def _weight_files(path: Path) -> list:
    files = sorted(glob.glob(str(path / "*.safetensors")))
    index = path / "model.safetensors.index.json"
    if index.exists() or index.is_symlink():
        shard_names = sorted(set(checkpoints.read_index(index).values()))
        missing = [s for s in shard_names if not (path / s).exists()]
        if missing:
            raise PhiflashError(f"weight shard {missing[0]} listed in {index.name} is missing from {path}; download it")
        files = [str(path / s) for s in shard_names]
    if not files:
        raise PhiflashError(f"no *.safetensors weights in {path}: the checkpoint is incomplete; download the "
                            "model files again")
    return files


def _target_itemsize(dtype) -> int | None:
    """Bytes per float element after the dtype policy (activation_dtype; None: kept as stored)."""
    target = activation_dtype(dtype)
    return None if target is None else target.size


def load_weights(path: Path, dtype=None, preflight: bool = False) -> dict:
    files = _weight_files(path)
    shards = [_check_safetensors(f) for f in files]
    if preflight:
        target = activation_dtype(dtype)
        where = ("in the stored dtypes" if target is None else
                 "float32 on this CPU" if dtype is None else f"as {str(target).replace('mlx.core.', '')}")
        checkpoints.memory_preflight(path, shards, _target_itemsize(dtype), where)
    weights = {}
    for file in progress(files, desc="loading weights", unit="shard", min_items=2):
        weights.update(mx.load(file))
    return weights


DTYPES = {"float32": mx.float32, "float16": mx.float16, "bfloat16": mx.bfloat16}


def activation_dtype(requested=None):
    """The dtype policy: the model computes in the dtype of its (floating) weights, so this is the dtype
    they are loaded in. `requested` (an mx dtype or its name) wins. Otherwise, with Metal the stored
    dtype is kept (None: bf16/f16 checkpoints run in bf16/f16); without Metal (x86 and other CPUs)
    float32, because 16-bit arithmetic there is many times slower (PLATFORM.md). A_log, D and the
    lambda vectors stay float32 whatever is chosen (the model's cast_predicate)."""
    if isinstance(requested, str):
        if requested not in DTYPES:
            raise PhiflashError(f"unknown dtype {requested!r}; choose one of {', '.join(DTYPES)}")
        return DTYPES[requested]
    if requested is not None:
        return requested
    return None if mx.metal.is_available() else mx.float32


def build_model(config: dict, weights: dict, dtype=None) -> Model:
    """Instantiate, (de)quantize as the config says, check names and shapes, and load the weights."""
    checkpoints.check_config(config)          # the reference's rules: types, ranges, schedule, quantization
    try:
        args = ModelArgs.from_dict(config)
    except (TypeError, ValueError) as exc:
        raise PhiflashError(f"config.json is not a valid phi4flash config: {exc}") from None
    model = Model(args)
    weights = model.sanitize(weights)
    quant = config.get("quantization")
    if quant:
        _apply_quantization(model, quant, weights)
    params = tree_flatten(model.parameters())
    expected = {k: v.shape for k, v in params}
    floating = {k for k, v in params if mx.issubdtype(v.dtype, mx.floating)}
    for name, shape in expected.items():
        if name not in weights:
            raise PhiflashError(f"tensor {name} is missing from the checkpoint; it is incomplete or was made for "
                                "another architecture")
        if tuple(weights[name].shape) != tuple(shape):
            raise PhiflashError(f"tensor {name} has shape {tuple(weights[name].shape)}, but config.json implies "
                                f"{tuple(shape)}; the weights do not match the config")
        if (name in floating) != mx.issubdtype(weights[name].dtype, mx.floating):
            want = "floating point" if name in floating else "packed quantized codes"
            stored = str(weights[name].dtype).replace("mlx.core.", "")
            raise PhiflashError(f"tensor {name} is stored as {stored}, but the model needs "
                                f"{want} there; the checkpoint does not match its config.json")
    unexpected = sorted(set(weights) - set(expected))
    if unexpected:
        log.warning("ignoring %d tensors the model does not use (first: %s)", len(unexpected), unexpected[0])
    dtype = activation_dtype(dtype)
    # Computing in float32 (the CPU default), quantized linear layers keep 16-bit scales and biases as
    # stored: their products (mx.quantized_matmul, the CPU kernels) read them at that precision and give
    # the same numbers as from a float32 copy, which would only cost memory and bandwidth. The quantized
    # embedding's are cast: its output is the activations. Keeping the stored dtypes (dtype None, Metal),
    # scales stored in another dtype than the model's other weights (float16 ones, as phiflash convert
    # writes by default, in a bfloat16 model) are cast to the model's: MLX would otherwise promote the
    # products, and every activation after them, to float32.
    linear_scales, all_scales = set(), set()
    for path, m in model.named_modules():
        if isinstance(m, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            names = {f"{path}.{leaf}" for leaf in ("scales", "biases")}
            all_scales |= names
            if isinstance(m, nn.QuantizedLinear):
                linear_scales |= names
    compute = dtype if dtype is not None else _stored_float_dtype(model, weights, expected, floating, all_scales)
    items = []
    for name in expected:
        w = weights[name]
        keep_fp32 = not model.cast_predicate(name)
        is_float = mx.issubdtype(w.dtype, mx.floating)
        if name in linear_scales and compute == mx.float32 and w.dtype in (mx.float16, mx.bfloat16):
            pass
        elif name in all_scales and compute is not None and is_float:
            w = w.astype(compute)
        elif is_float and (keep_fp32 or dtype is not None):
            w = w.astype(mx.float32 if keep_fp32 else dtype)
        items.append((name, w))
    model.load_weights(items, strict=True)
    mx.eval(model.parameters())
    if not mx.metal.is_available():
        from .cpu.kernels import use_cpu_kernels
        use_cpu_kernels(model)
    return model


def _stored_float_dtype(model, weights: dict, expected, floating: set, scales: set):
    """The one dtype the model's floating weights (other than quantization scales and the float32-kept
    parameters) are stored in; None when there are several or none."""
    found = {weights[n].dtype for n in expected
             if n in floating and n not in scales and model.cast_predicate(n) and n in weights}
    return found.pop() if len(found) == 1 else None


def _apply_quantization(model: Model, quant: dict, weights: dict) -> None:
    """Turn the modules that the checkpoint stores quantized into quantized modules (mlx-lm layout:
    `quantization` = {group_size, bits[, mode]} plus optional per-module overrides by path)."""
    defaults = {k: quant[k] for k in ("group_size", "bits", "mode") if k in quant}

    def predicate(path, module):
        if not hasattr(module, "to_quantized") or f"{path}.scales" not in weights:
            return False
        override = quant.get(path)
        return override if isinstance(override, dict) else True

    nn.quantize(model, **defaults, class_predicate=predicate)


def load(path_or_id: str, dtype=None, tokenizer: bool = True):
    """Load a phi4flash checkpoint: returns (model, tokenizer). The tokenizer is None when the checkpoint
    carries no tokenizer files (or `tokenizer=False`). `dtype` (mx dtype or "float32", "float16",
    "bfloat16") is the activation dtype; the default follows `activation_dtype`."""
    path = resolve_model_path(str(path_or_id))
    config = load_config(path)
    model = build_model(config, load_weights(path, dtype, preflight=True), dtype)
    tok = None
    if tokenizer:
        from .tokenizer import load_tokenizer
        tok = load_tokenizer(path)
    model.path = path
    return model, tok
