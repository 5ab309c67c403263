"""One validator for what a checkpoint directory holds: config.json, safetensors headers, the shard index.

Shared by the NumPy reference and the MLX loader (which imports it from here: `reference` imports
nothing from `phiflash_mlx`). Every check raises CheckpointError with one line that names the file, the
field, what is wrong and what to do. Nothing here reads without a bound: JSON files are read only when
they are regular files (a FIFO would block, /dev/zero never ends) and only up to a size limit.
"""

from __future__ import annotations

import json
import math
import os
import stat

from .errors import CheckpointError

# Limits on what is read into memory. The largest real files: tokenizer.json (~15 MB for o200k), the
# index of a sharded 3.8B checkpoint (~30 KB), a safetensors header (~40 KB; the safetensors package
# refuses headers over 100 MB).
MAX_CONFIG_BYTES = 1 << 20
MAX_INDEX_BYTES = 64 << 20
MAX_HEADER_BYTES = 100_000_000

# Bytes per element of every dtype the readers understand. Quantized MLX checkpoints store packed
# weights as U32 and mxfp scales as U8.
DTYPE_SIZES = {"BF16": 2, "F16": 2, "F32": 4, "F64": 8, "I8": 1, "I16": 2, "I32": 4, "I64": 8,
               "U8": 1, "U16": 2, "U32": 4, "U64": 8, "BOOL": 1}

# `quantization` in config.json (mlx-lm layout): what MLX can dequantize.
QUANT_BITS = (2, 3, 4, 5, 6, 8)
QUANT_GROUP_SIZES = (32, 64, 128)
QUANT_MODES = {"affine": None, "mxfp4": (4, 32), "mxfp8": (8, 32)}   # mode -> fixed (bits, group)

_CONFIG_HINT = "fix config.json or download the checkpoint again"


# ---------------------------------------------------------------------------------------------
# Bounded reads
# ---------------------------------------------------------------------------------------------

def regular_file_size(path: str, what: str = "") -> int:
    """The size of `path`, which must be a regular file (following symlinks). FIFOs, devices and
    sockets are refused before they are opened: opening a FIFO blocks, /dev/zero never ends."""
    label = what or os.path.basename(path)
    try:
        st = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"{path} does not exist ({label}); the checkpoint is incomplete, "
                              "download it again") from None
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check the path and its "
                              "permissions") from None
    if stat.S_ISDIR(st.st_mode):
        raise CheckpointError(f"{path} is a directory, not a file ({label}); point at the checkpoint "
                              "directory that holds it")
    if not stat.S_ISREG(st.st_mode):
        kind = ("a FIFO" if stat.S_ISFIFO(st.st_mode) else "a device" if stat.S_ISCHR(st.st_mode)
                or stat.S_ISBLK(st.st_mode) else "a socket" if stat.S_ISSOCK(st.st_mode) else "not a regular file")
        raise CheckpointError(f"{path} is {kind}, not a regular file ({label}); replace it with the real "
                              "file")
    return st.st_size


def read_json_file(path: str, limit: int = MAX_CONFIG_BYTES, what: str = ""):
    """Parse a JSON file of at most `limit` bytes; any failure is one CheckpointError line."""
    size = regular_file_size(path, what)
    if size > limit:
        raise CheckpointError(f"{path} is {size} bytes, more than the {limit} a {what or 'JSON file'} can "
                              "plausibly be; it is not the right file, download it again")
    try:
        with open(path, "rb") as f:
            data = f.read(limit + 1)
    except OSError as exc:
        raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check its permissions") from None
    if len(data) > limit:
        raise CheckpointError(f"{path} grew past {limit} bytes while being read; it is not a JSON file")
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError:
        raise CheckpointError(f"{path} is not UTF-8 text, so not JSON; download it again") from None
    except RecursionError:
        raise CheckpointError(f"{path} nests too deeply to be a {what or 'JSON file'}; download it again") from None
    except ValueError as exc:
        raise CheckpointError(f"{path} is not valid JSON ({exc}); download it again") from None


# ---------------------------------------------------------------------------------------------
# config.json
# ---------------------------------------------------------------------------------------------

_MISSING = object()


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _int_field(raw: dict, key: str, lo: int, hi: int, default=_MISSING, source="config.json") -> int:
    v = raw.get(key, _MISSING)
    if v is _MISSING:
        if default is _MISSING:
            raise CheckpointError(f"{source} lacks {key}; {_CONFIG_HINT}")
        return default
    if not _is_int(v):
        raise CheckpointError(f"{source}: {key} must be an integer, got {_short(v)}; {_CONFIG_HINT}")
    if not lo <= v <= hi:
        raise CheckpointError(f"{source}: {key} is {v}; it must be in {lo}..{hi}; {_CONFIG_HINT}")
    return v


def _short(v) -> str:
    text = json.dumps(v) if not isinstance(v, float) or math.isfinite(v) else repr(v)
    return text if len(text) <= 40 else text[:37] + "..."


def validate_config(raw, source: str = "config.json"):
    """The reference Config of a raw config.json dict, or one CheckpointError line naming the field.

    Checks types (integers are JSON integers, not floats or booleans), ranges (every size at least 1
    and at most a bound far above the released model, so a typo cannot ask for exabytes), the layer
    schedule (SAMBAY.md 2.1: layers a multiple of 4, mb_per_layer 2, layer_types agreeing) and, when
    present, the `quantization` entry of an MLX checkpoint."""
    from .config import ATTENTION_KINDS, SWA, Config, layer_schedule

    if not isinstance(raw, dict):
        raise CheckpointError(f"{source} holds a JSON {type(raw).__name__ if raw is not None else 'null'}, "
                              f"not an object; {_CONFIG_HINT}")
    model_type = raw.get("model_type")
    if model_type != "phi4flash":
        raise CheckpointError(
            f"{source} has model_type {model_type!r:.40}, not "
            "'phi4flash': this is not a Phi-4-mini-flash-reasoning (SambaY) checkpoint")
    required = ["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                "num_attention_heads", "num_key_value_heads"]
    missing = [k for k in required if k not in raw]
    if missing:
        raise CheckpointError(f"{source} lacks {', '.join(missing)}; {_CONFIG_HINT}")
    f = lambda key, lo, hi, default=_MISSING: _int_field(raw, key, lo, hi, default, source)  # noqa: E731
    vocab = f("vocab_size", 1, 1 << 22)
    hidden = f("hidden_size", 1, 1 << 16)
    inter = f("intermediate_size", 1, 1 << 18)
    n = f("num_hidden_layers", 4, 1024)
    nh = f("num_attention_heads", 2, 4096)
    nkv = f("num_key_value_heads", 2, 4096)
    d_state = f("mamba_d_state", 1, 4096, 16)
    d_conv = f("mamba_d_conv", 1, 1024, 4)
    expand = f("mamba_expand", 1, 64, 2)
    mb = f("mb_per_layer", 1, 1024, 2)
    eps = raw.get("layer_norm_eps", 1e-5)
    if not isinstance(eps, (int, float)) or isinstance(eps, bool) or not (math.isfinite(eps) and 0 < eps < 1):
        raise CheckpointError(f"{source}: layer_norm_eps must be a number in (0, 1), got {_short(eps)}; "
                              f"{_CONFIG_HINT}")
    tie = raw.get("tie_word_embeddings", True)
    if not isinstance(tie, bool):
        raise CheckpointError(f"{source}: tie_word_embeddings must be true or false, got {_short(tie)}; "
                              f"{_CONFIG_HINT}")
    problems = []
    if mb != 2:
        problems.append(f"mb_per_layer is {mb}; phi4flash requires 2")
    if n % 4:
        problems.append(f"num_hidden_layers is {n}; it must be a multiple of 4 (at least 4)")
    if nh % 2 or nkv % 2:
        problems.append(f"num_attention_heads ({nh}) and num_key_value_heads ({nkv}) must both be even")
    if nh % nkv:
        problems.append(f"num_attention_heads ({nh}) must be a multiple of num_key_value_heads ({nkv})")
    if hidden % nh:
        problems.append(f"hidden_size ({hidden}) must be a multiple of num_attention_heads ({nh})")
    if problems:
        raise CheckpointError(f"{source} is not a valid phi4flash config: " + "; ".join(problems))
    window = _window(raw, n, source)
    layer_types = raw.get("layer_types")
    if layer_types is not None:
        if not isinstance(layer_types, list) or not all(isinstance(t, str) for t in layer_types):
            raise CheckpointError(f"{source}: layer_types must be a list of strings, got {_short(layer_types)}; "
                                  f"{_CONFIG_HINT}")
        if len(layer_types) != n:
            raise CheckpointError(f"{source}: layer_types has {len(layer_types)} entries for {n} layers; "
                                  f"{_CONFIG_HINT}")
        for i, (kind, given) in enumerate(zip(layer_schedule(n, mb), layer_types)):
            if kind in ATTENTION_KINDS and (given == "sliding_attention") != (kind == SWA):
                raise CheckpointError(
                    f"{source}: layer_types[{i}] is {given!r}, but the phi4flash schedule makes layer {i} "
                    f"{'sliding-window' if kind == SWA else 'full'} attention; {_CONFIG_HINT}")
    if "quantization" in raw:
        validate_quantization(raw["quantization"], source)
    return Config(vocab_size=vocab, hidden_size=hidden, intermediate_size=inter, num_hidden_layers=n,
                  num_attention_heads=nh, num_key_value_heads=nkv, sliding_window=window,
                  layer_norm_eps=float(eps), mamba_d_state=d_state, mamba_d_conv=d_conv, mamba_expand=expand,
                  mb_per_layer=mb, tie_word_embeddings=tie, extra=raw)


def _window(raw: dict, num_layers: int, source: str) -> int:
    """`sliding_window` as an integer or a per-layer list of one size and nulls (SAMBAY.md 1.6)."""
    sw = raw.get("sliding_window")
    if sw is None:
        raise CheckpointError(f"{source}: sliding_window is missing; phi4flash needs it (512 in the released "
                              "model); add it to config.json")
    if isinstance(sw, list):
        if len(sw) != num_layers or not all(v is None or _is_int(v) for v in sw):
            raise CheckpointError(f"{source}: sliding_window as a list must hold one integer or null per layer "
                                  f"({num_layers}), got {_short(sw)}; {_CONFIG_HINT}")
        values = {v for v in sw if v is not None}
        if len(values) != 1:
            raise CheckpointError(f"{source}: sliding_window list must hold one window size (besides nulls), "
                                  f"got {sorted(values)}; {_CONFIG_HINT}")
        sw = values.pop()
    if not _is_int(sw):
        raise CheckpointError(f"{source}: sliding_window must be an integer, got {_short(sw)}; {_CONFIG_HINT}")
    if not 1 <= sw <= (1 << 31) - 1:
        raise CheckpointError(f"{source}: sliding_window is {sw}; it must be at least 1 (512 in the released "
                              f"model); {_CONFIG_HINT}")
    return sw


def validate_quantization(q, source: str = "config.json") -> None:
    """The `quantization` entry of an MLX checkpoint: defaults {group_size, bits[, mode]} plus per-module
    overrides (a dict of the same, or false for a module kept in full precision)."""
    hint = "convert the checkpoint again with `phiflash convert SRC DST -q`"
    if not isinstance(q, dict):
        raise CheckpointError(f"{source}: quantization must be an object, got {_short(q)}; {hint}")

    def spec(entry: dict, where: str) -> None:
        mode = entry.get("mode", "affine")
        if mode not in QUANT_MODES:
            raise CheckpointError(f"{source}: {where}mode is {_short(mode)}; use one of "
                                  f"{', '.join(QUANT_MODES)}; {hint}")
        for key, allowed in (("bits", QUANT_BITS), ("group_size", QUANT_GROUP_SIZES)):
            if key not in entry:
                raise CheckpointError(f"{source}: {where}{key} is missing; {hint}")
            v = entry[key]
            fixed = QUANT_MODES[mode]
            ok = _is_int(v) and (v in allowed if fixed is None else v == fixed[0 if key == "bits" else 1])
            if not ok:
                want = ", ".join(map(str, allowed)) if fixed is None else str(fixed[0 if key == "bits" else 1])
                raise CheckpointError(f"{source}: {where}{key} is {_short(v)}; {mode} needs {want}; {hint}")

    spec(q, "quantization.")
    for key, value in q.items():
        if key in ("group_size", "bits", "mode"):
            continue
        if isinstance(value, dict):
            spec(value, f"quantization[{key!r}].")
        elif not isinstance(value, bool):
            raise CheckpointError(f"{source}: quantization[{key!r}] must be an object or false, got "
                                  f"{_short(value)}; {hint}")


# ---------------------------------------------------------------------------------------------
# safetensors headers and the shard index
# ---------------------------------------------------------------------------------------------

def unsupported_dtype_message(path: str, name: str, dtype) -> str:
    if isinstance(dtype, str) and (dtype.startswith(("F8", "F6", "F4", "E")) or dtype in ("C64",)):
        return (f"{path}: tensor {name} has dtype {dtype}, which phiflash cannot read (it reads "
                f"{', '.join(DTYPE_SIZES)}); convert the checkpoint to bfloat16 or float32 first")
    return (f"{path}: tensor {name} has unknown dtype {_short(dtype)} (known: {', '.join(DTYPE_SIZES)}); the "
            "file is corrupt or from another tool, download or convert it again")


FLOAT_DTYPES = ("BF16", "F16", "F32")


def tensor_dtype_error(name: str, dtype: str) -> str | None:
    """Why `name` cannot have `dtype` in a phi4flash checkpoint, or None. Every tensor of the model is
    floating point (bfloat16, float16 or float32); the only integers are the packed codes of a quantized
    weight (uint32 ``*.weight``) and mxfp scales (uint8 ``*.scales``). A float tensor stored as an
    integer type would otherwise load as garbage."""
    if dtype in FLOAT_DTYPES:
        return None
    if (dtype == "U32" and name.endswith(".weight")) or (dtype == "U8" and name.endswith(".scales")):
        return None
    if dtype == "F64":
        return (f"tensor {name} is float64, which MLX cannot load; convert the checkpoint to float32 or "
                "bfloat16 first (e.g. with safetensors and numpy)")
    return (f"tensor {name} is stored as {dtype}, but the model's tensors are floating point (bfloat16, float16 "
            "or float32) or packed quantized codes (uint32 weights, uint8 mxfp scales); the file is corrupt or "
            "was written for another model, download or convert it again")


def validate_safetensors_header(header, path: str, data_bytes: int) -> dict:
    """Check a parsed safetensors header against the `data_bytes` that follow it; returns the tensor
    entries (without `__metadata__`). Each tensor needs a known dtype, a shape of non-negative integers,
    and data_offsets [begin, end] inside the data, with end - begin = elements x bytes per element, and
    no two tensors overlapping."""
    again = "the file is corrupt or not a safetensors file; download or convert it again"
    if not isinstance(header, dict):
        raise CheckpointError(f"{path}: the safetensors header is a JSON {type(header).__name__}, not an "
                              f"object; {again}")
    entries = {k: v for k, v in header.items() if k != "__metadata__"}
    meta = header.get("__metadata__")
    if meta is not None and not (isinstance(meta, dict) and all(isinstance(v, str) for v in meta.values())):
        raise CheckpointError(f"{path}: __metadata__ must be an object of strings; {again}")
    spans = []
    for name, e in entries.items():
        if not isinstance(e, dict):
            raise CheckpointError(f"{path}: tensor {name} has no dtype/shape/data_offsets entry; {again}")
        for key in ("dtype", "shape", "data_offsets"):
            if key not in e:
                raise CheckpointError(f"{path}: tensor {name} lacks {key}; {again}")
        dtype, shape, offsets = e["dtype"], e["shape"], e["data_offsets"]
        if not isinstance(dtype, str) or dtype not in DTYPE_SIZES:
            raise CheckpointError(unsupported_dtype_message(path, name, dtype))
        if not isinstance(shape, list) or len(shape) > 8 or not all(_is_int(d) and 0 <= d < 1 << 40 for d in shape):
            raise CheckpointError(f"{path}: tensor {name} has shape {_short(shape)}; a shape is a list of "
                                  f"non-negative integers; {again}")
        if not (isinstance(offsets, list) and len(offsets) == 2 and all(_is_int(o) for o in offsets)
                and 0 <= offsets[0] <= offsets[1]):
            raise CheckpointError(f"{path}: tensor {name} has data_offsets {_short(offsets)}; they must be "
                                  f"[begin, end] with 0 <= begin <= end; {again}")
        begin, end = offsets
        if end > data_bytes:
            raise CheckpointError(
                f"{path} is truncated: tensor {name} ends at byte {end} of the data, but the file holds only "
                f"{data_bytes}; the download or copy did not finish, fetch it again")
        role_error = tensor_dtype_error(name, dtype)
        if role_error:
            raise CheckpointError(f"{path}: {role_error}")
        want = math.prod(shape) * DTYPE_SIZES[dtype]
        if end - begin != want:
            raise CheckpointError(f"{path}: tensor {name} is {dtype} {tuple(shape)}, which is {want} bytes, but "
                                  f"its data_offsets span {end - begin}; {again}")
        spans.append((begin, end, name))
    spans.sort()
    for (b0, e0, n0), (b1, e1, n1) in zip(spans, spans[1:]):
        if b1 < e0 and e1 > b1:
            raise CheckpointError(f"{path}: tensors {n0} and {n1} overlap in the data; {again}")
    return entries


def validate_index(data, path: str) -> dict:
    """`model.safetensors.index.json`: {"weight_map": {tensor name: shard file name}}; shard names are
    plain file names in the same directory."""
    again = "download model.safetensors.index.json again (or delete it for a single-file checkpoint)"
    if not isinstance(data, dict) or not isinstance(data.get("weight_map"), dict):
        raise CheckpointError(f"{path} must be an object with a weight_map object; {again}")
    weight_map = data["weight_map"]
    for tensor, shard in weight_map.items():
        if not isinstance(shard, str) or not shard.endswith(".safetensors") or "/" in shard or "\\" in shard \
                or shard.startswith("."):
            raise CheckpointError(f"{path}: weight_map[{tensor!r}] is {_short(shard)}, not the file name of a "
                                  f".safetensors shard in the same directory; {again}")
    if not weight_map:
        raise CheckpointError(f"{path}: weight_map is empty; {again}")
    return weight_map


def read_index(path: str) -> dict:
    return validate_index(read_json_file(path, MAX_INDEX_BYTES, "model.safetensors.index.json"), path)
