"""Lazy, memory-mapped safetensors reading with exact bf16 -> fp32 conversion (SAMBAY.md 3, 4.0).

A small reader of our own rather than the `safetensors` package: numpy has no bfloat16, and we want
each tensor converted only when it is used, so a 3.8B-parameter bf16 checkpoint (7.7 GB) can run on a
machine that could not hold it in fp32 twice.

File format: 8-byte little-endian header length n, n bytes of JSON {name: {dtype, shape,
data_offsets: [begin, end]}, "__metadata__": {...}}, then the raw little-endian tensor bytes.
"""

from __future__ import annotations

import json
import os
import struct

import numpy as np

from .errors import CheckpointError
from .validate import (DTYPE_SIZES, MAX_HEADER_BYTES, read_index, regular_file_size, unsupported_dtype_message,
                       validate_safetensors_header)

_NUMPY_DTYPES = {
    "F32": np.float32, "F16": np.float16, "F64": np.float64,
    "I64": np.int64, "I32": np.int32, "I16": np.int16, "I8": np.int8, "U8": np.uint8, "BOOL": np.bool_,
    "U16": np.uint16, "U32": np.uint32, "U64": np.uint64,
}
_ITEMSIZE = DTYPE_SIZES


def bf16_bits_to_float32(bits: np.ndarray) -> np.ndarray:
    """Exact: a bf16 value is the top half of the float32 with the same bits (SAMBAY.md 4.0)."""
    return (bits.astype(np.uint32) << 16).view(np.float32)


def round_to_bf16(x: np.ndarray) -> np.ndarray:
    """Round float32 to the nearest bf16 value (ties to even), returned as float32 (SAMBAY.md 4.0)."""
    x = np.asarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = (bits + (np.uint32(0x7FFF) + ((bits >> 16) & np.uint32(1)))) & np.uint32(0xFFFF0000)
    return rounded.view(np.float32)


class SafetensorsFile:
    """One ``.safetensors`` file, memory-mapped; ``get(name)`` converts one tensor to float32."""

    def __init__(self, path: str):
        self.path = path
        size = regular_file_size(path, "safetensors weights")      # a FIFO or device is refused, not opened
        try:
            with open(path, "rb") as f:
                head = f.read(8)
                if len(head) < 8:
                    raise CheckpointError(f"{path} is truncated (shorter than a safetensors header); "
                                          "download or convert it again")
                (n,) = struct.unpack("<Q", head)
                if n > size - 8:
                    raise CheckpointError(f"{path} is truncated or not a safetensors file "
                                          f"(header says {n} bytes, file has {size}); download it again")
                if n > MAX_HEADER_BYTES:
                    raise CheckpointError(f"{path}: its header claims {n} bytes, more than a safetensors header "
                                          "may have; it is not a safetensors file, download it again")
                header = json.loads(f.read(n))
        except CheckpointError:
            raise
        except OSError as exc:
            raise CheckpointError(f"cannot read {path}: {exc.strerror or exc}; check the file and its "
                                  "permissions") from None
        except (ValueError, RecursionError):
            raise CheckpointError(f"{path} is not a valid safetensors file (bad header); download it again") from None
        self.data_start = 8 + n
        self.entries = validate_safetensors_header(header, path, size - self.data_start)
        self._map = np.memmap(path, dtype=np.uint8, mode="r") if size else None

    def keys(self):
        return self.entries.keys()

    def shape(self, name: str) -> tuple:
        return tuple(self.entries[name]["shape"])

    def dtype(self, name: str) -> str:
        return self.entries[name]["dtype"]

    def raw(self, name: str) -> np.ndarray:
        """The stored bytes of a tensor as a read-only numpy view (bf16 as uint16)."""
        e = self.entries[name]
        begin, end = e["data_offsets"]
        dt = e["dtype"]
        if dt not in _ITEMSIZE:
            raise CheckpointError(unsupported_dtype_message(self.path, name, dt))
        buf = self._map[self.data_start + begin:self.data_start + end]
        np_dtype = np.uint16 if dt == "BF16" else _NUMPY_DTYPES[dt]
        return buf.view(np_dtype).reshape(e["shape"])

    def get(self, name: str, rows=None) -> np.ndarray:
        """float32 copy of a tensor (or of some rows of it: `rows` indexes the first axis)."""
        raw = self.raw(name)
        if rows is not None:
            raw = raw[rows]
        if self.dtype(name) == "BF16":
            return bf16_bits_to_float32(raw)
        return np.asarray(raw, dtype=np.float32)


class WeightStore:
    """All tensors of a checkpoint, single-file or sharded, by Hugging Face name.

    ``store[name]`` returns float32, converting on access. With ``keep=True`` converted tensors are kept
    (fast for small models); with ``keep=False`` nothing is kept, so the resident memory is the
    memory map plus the tensors of the layer being computed.
    """

    def __init__(self, files: dict[str, SafetensorsFile], keep: bool):
        self.files = files          # tensor name -> file holding it
        self.keep = keep
        self._kept: dict[str, np.ndarray] = {}
        self.transform = None       # optional function(name, array) -> array (bf16 emulation)

    def __contains__(self, name: str) -> bool:
        return name in self.files

    def names(self):
        return self.files.keys()

    def shape(self, name: str) -> tuple:
        return self.files[name].shape(name)

    def __getitem__(self, name: str) -> np.ndarray:
        if name in self._kept:
            return self._kept[name]
        arr = self.files[name].get(name)
        if self.transform is not None:
            arr = self.transform(name, arr)
        if self.keep:
            self._kept[name] = arr
        return arr

    def rows(self, name: str, index: np.ndarray) -> np.ndarray:
        """Rows of a 2-D tensor (an embedding lookup) without converting the whole tensor."""
        if name in self._kept:
            return self._kept[name][index]
        arr = self.files[name].get(name, rows=index)
        return self.transform(name, arr) if self.transform is not None else arr

    def nbytes_float32(self) -> int:
        return sum(4 * int(np.prod(self.shape(n))) for n in self.files)


def open_checkpoint(path: str, keep: bool | None = None) -> WeightStore:
    """Open ``model.safetensors``, or every shard named by ``model.safetensors.index.json``.

    keep=None keeps converted tensors when the whole model fits in 4 GiB as float32.
    """
    if not os.path.isdir(path):
        raise CheckpointError(f"{path} is not a directory: point at a checkpoint directory "
                              "(config.json + *.safetensors)")
    index = os.path.join(path, "model.safetensors.index.json")
    if os.path.lexists(index):
        weight_map = read_index(index)
        shard_names = sorted(set(weight_map.values()))
    else:
        try:
            shard_names = sorted(n for n in os.listdir(path) if n.endswith(".safetensors"))
        except OSError as exc:
            raise CheckpointError(f"cannot list {path}: {exc.strerror or exc}; check its permissions") from None
        weight_map = None
    if not shard_names:
        raise CheckpointError(f"no *.safetensors weights in {path}: the checkpoint is incomplete; "
                              "download the model files again")
    shards = {}
    for name in shard_names:
        file = os.path.join(path, name)
        if not os.path.lexists(file):
            raise CheckpointError(f"weight shard {name} listed in model.safetensors.index.json is missing "
                                  f"from {path}; download it")
        shards[name] = SafetensorsFile(file)
    files: dict[str, SafetensorsFile] = {}
    for shard in shards.values():
        for tensor in shard.keys():
            files[tensor] = shard
    if weight_map is not None:
        for tensor, shard_name in weight_map.items():
            if tensor not in files:
                raise CheckpointError(f"tensor {tensor} is listed in the index for {shard_name} but that "
                                      "shard does not contain it; the shard is corrupt, download it again")
    store = WeightStore(files, keep=False)
    store.keep = store.nbytes_float32() < 4 * 2**30 if keep is None else keep
    return store


def write_safetensors(path: str, tensors: dict[str, np.ndarray], bf16_names=(), metadata=None) -> None:
    """Write float/int arrays as a safetensors file; names in `bf16_names` are stored as bf16
    (rounded to nearest even). numpy cannot express bf16, hence this small writer."""
    header, chunks, offset = {}, [], 0
    codes = {np.dtype(v): k for k, v in _NUMPY_DTYPES.items()}
    for name in sorted(tensors):
        arr = np.ascontiguousarray(tensors[name])
        if name in bf16_names:
            data = (round_to_bf16(arr.astype(np.float32)).view(np.uint32) >> 16).astype("<u2")
            dtype = "BF16"
        else:
            data, dtype = arr.astype(arr.dtype.newbyteorder("<")), codes[arr.dtype]
        raw = data.tobytes()
        header[name] = {"dtype": dtype, "shape": list(arr.shape), "data_offsets": [offset, offset + len(raw)]}
        chunks.append(raw)
        offset += len(raw)
    header["__metadata__"] = dict(metadata or {"format": "pt"})
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for raw in chunks:
            f.write(raw)
