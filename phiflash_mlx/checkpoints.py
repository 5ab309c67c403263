"""The MLX side of the one checkpoint validator (reference/validate.py), and the memory preflight.

Everything the loader and `convert` learn about a checkpoint directory before they materialize a tensor
goes through here, so the MLX loader accepts exactly what the reference accepts, and every refusal is one
PhiflashError line naming the file, the field and what to do.
"""

from __future__ import annotations

import math
import os
import sys
from pathlib import Path

from reference import validate as _v
from reference.errors import CheckpointError

from .errors import PhiflashError

# Set to 1 to load even when the preflight says the weights will not fit in the available memory.
ENV_SKIP_MEMORY_CHECK = "PHIFLASH_SKIP_MEMORY_CHECK"


def _one_line(exc: CheckpointError) -> PhiflashError:
    return PhiflashError(str(exc).replace("\n", " "))


def read_config(path: Path) -> dict:
    """The checked raw config.json of a checkpoint directory (bounded read, every field validated)."""
    from reference.config import read_config_json
    file = Path(path) / "config.json"
    try:
        raw = read_config_json(str(path))
        _v.validate_config(raw, source=str(file))
    except CheckpointError as exc:
        raise _one_line(exc) from None
    return raw


def check_config(raw, source: str = "config.json"):
    """Validate a raw config dict (the same rules as the reference); returns the reference Config."""
    try:
        return _v.validate_config(raw, source=source)
    except CheckpointError as exc:
        raise _one_line(exc) from None


def read_index(path: Path) -> dict:
    try:
        return _v.read_index(str(path))
    except CheckpointError as exc:
        raise _one_line(exc) from None


def open_shard(file: str):
    """A validated safetensors file (header against size, dtypes, offsets; nothing mapped yet)."""
    from reference.weights import SafetensorsFile
    try:
        return SafetensorsFile(str(file))
    except CheckpointError as exc:
        raise _one_line(exc) from None


def read_json(path: Path, what: str, limit: int = _v.MAX_INDEX_BYTES):
    """Any JSON side file of a checkpoint (generation_config.json, ...), with a size bound."""
    try:
        return _v.read_json_file(str(path), limit, what)
    except CheckpointError as exc:
        raise _one_line(exc) from None


# ---------------------------------------------------------------------------------------------
# Memory preflight
# ---------------------------------------------------------------------------------------------

_FLOAT_CODES = ("BF16", "F16", "F32", "F64")
_KEEP_FP32 = ("A_log", ".D")


def _resident_itemsize(name: str, code: str, target_itemsize: int | None) -> int:
    """Bytes per element after the loader's dtype policy (loader.build_model): floating tensors become
    `target_itemsize` (float32 on a CPU), A_log / D / lambdas float32, integers (packed quantized
    weights) stay as stored."""
    stored = _v.DTYPE_SIZES[code]
    if code not in _FLOAT_CODES:
        return stored
    if name.endswith(_KEEP_FP32) or "lambda_" in name:
        return 4
    return stored if target_itemsize is None else target_itemsize


def estimate_resident_bytes(shards: list, target_itemsize: int | None) -> tuple[int, int]:
    """(resident bytes of the loaded model, bytes a 4-bit conversion would need) from the shards' headers."""
    total = q4 = 0
    for shard in shards:
        for name, e in shard.entries.items():
            n = math.prod(e["shape"])
            size = _resident_itemsize(name, e["dtype"], target_itemsize)
            total += n * size
            quantizable = (name.endswith(".weight") and len(e["shape"]) == 2 and e["dtype"] in _FLOAT_CODES
                           and not any(s in name for s in ("layernorm", "subln", "conv1d"))
                           and e["shape"][-1] % 64 == 0)
            # 4-bit affine, groups of 64: half a byte per weight, plus a scale and a bias per group
            q4 += n // 2 + 2 * (n // 64) * (target_itemsize or 2) if quantizable else n * size
    return total, q4


def available_memory() -> int | None:
    """Bytes this process can still allocate: MemAvailable, capped by a cgroup limit when there is one;
    the physical memory on macOS; None when unknown (then nothing is checked)."""
    found = []
    try:
        with open("/proc/meminfo", encoding="ascii") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    found.append(int(line.split()[1]) * 1024)
                    break
    except (OSError, ValueError, IndexError):
        pass
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        try:
            limit = Path(limit_file).read_text().strip()
            usage = int(Path(usage_file).read_text().strip())
            if limit.isdigit() and int(limit) < 1 << 60:
                found.append(max(0, int(limit) - usage))
            break
        except (OSError, ValueError):
            continue
    if not found and sys.platform == "darwin":
        try:
            found.append(os.sysconf("SC_PHYS_PAGES") * os.sysconf("SC_PAGE_SIZE"))
        except (OSError, ValueError):
            pass
    return min(found) if found else None


def _gb(n: int) -> str:
    return f"{n / 1e9:.1f} GB"


def memory_preflight(path: Path, shards: list, target_itemsize: int | None, where: str,
                     available: int | None = None) -> int:
    """Refuse, with one line, to load weights whose resident size will not fit in the available memory
    (instead of being killed by the OOM killer halfway). Returns the estimate in bytes."""
    need, q4 = estimate_resident_bytes(shards, target_itemsize)
    # the runtime, the tokenizer and the activations of a short prompt on top of the weights
    need_total = int(need * 1.05) + (256 << 20)
    if os.environ.get(ENV_SKIP_MEMORY_CHECK, "") not in ("", "0"):
        return need_total
    available = available_memory() if available is None else available
    if available is None or need_total <= available:
        return need_total
    if any(e["dtype"] == "U32" for shard in shards for e in shard.entries.values()):   # already quantized
        raise PhiflashError(
            f"{path} needs about {_gb(need_total)} of memory once loaded ({where}), but only {_gb(available)} "
            f"is available; convert the original checkpoint with fewer bits (phiflash convert SRC DST -q "
            f"--q-bits 3), or set {ENV_SKIP_MEMORY_CHECK}=1 to try anyway")
    dst = f"{Path(path).name or 'model'}-4bit"
    raise PhiflashError(
        f"{path} needs about {_gb(need_total)} of memory once loaded ({where}), but only {_gb(available)} is "
        f"available; quantize it to fit (about {_gb(int(q4 * 1.05) + (256 << 20))}): phiflash convert {path} "
        f"{dst} -q, then use --model {dst} (or set {ENV_SKIP_MEMORY_CHECK}=1 to try anyway)")
