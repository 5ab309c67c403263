"""Inputs a hostile or careless user gives, and what must hold: no source is ever modified, no run
(interrupted or not) leaves a directory that loads half-written, and every bad input is one line
(exit 1 or 2), never a traceback or a hang.

Most cases call the reference, the MLX loader or the command line's main() in-process (the same code
path as the installed command); a few run real subprocesses for exit codes, signals and pipes."""

from __future__ import annotations

import hashlib
import json
import math
import os
import shutil
import signal
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import phiflash_mlx
import reference
from conftest import golden_path
from phiflash_mlx import checkpoints
from phiflash_mlx.cli import main
from phiflash_mlx.convert import MARKER, convert
from phiflash_mlx.errors import PhiflashError

ROOT = Path(__file__).resolve().parent.parent
DEMO = ROOT / "phiflash_mlx" / "demo" / "model"
IS_ROOT = hasattr(os, "geteuid") and os.geteuid() == 0


# ---------------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------------

def copy_checkpoint(src: Path, dst: Path) -> Path:
    """A writable copy (the shared golden files are read-only)."""
    dst.mkdir(parents=True)
    for f in src.iterdir():
        if f.is_file():
            shutil.copyfile(f, dst / f.name)
    return dst


@pytest.fixture
def tiny(tmp_path) -> Path:
    return copy_checkpoint(golden_path("tiny"), tmp_path / "tiny")


@pytest.fixture
def demo(tmp_path) -> Path:
    return copy_checkpoint(DEMO, tmp_path / "demo")


def tree_digest(path: Path) -> str:
    """sha256 over every file name and content below `path` (the 'source unchanged' oracle)."""
    h = hashlib.sha256()
    for f in sorted(Path(path).rglob("*")):
        h.update(str(f.relative_to(path)).encode())
        if f.is_file() and not f.is_symlink():
            h.update(f.read_bytes())
    return h.hexdigest()


def read_st(path: Path):
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_st(path: Path, header, body: bytes) -> None:
    blob = header if isinstance(header, bytes) else json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + body)


def edit_config(d: Path, **changes) -> None:
    cfg = json.loads((d / "config.json").read_text())
    for k, v in changes.items():
        if v is DELETE:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    (d / "config.json").write_text(json.dumps(cfg))


DELETE = object()


@pytest.fixture
def no_hang():
    """Turn a hang into a failure (a FIFO opened for reading blocks forever)."""
    def alarm(signum, frame):
        raise TimeoutError("hung")
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(30)
    yield
    signal.alarm(0)
    signal.signal(signal.SIGALRM, old)


def one_line(exc) -> str:
    msg = str(exc)
    assert msg and "\n" not in msg, msg
    return msg


def both_refuse(d: Path, *needles: str) -> None:
    """The reference and the MLX loader refuse the checkpoint with the same kind of one-line message."""
    with pytest.raises(reference.CheckpointError) as ref_err:
        reference.load(str(d))
    with pytest.raises(PhiflashError) as mlx_err:
        phiflash_mlx.load(str(d), tokenizer=False)
    for err in (ref_err.value, mlx_err.value):
        msg = one_line(err)
        for needle in needles:
            assert needle in msg, msg


def run_cli(capsys, *argv) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    assert "Traceback" not in err
    return code, out, err


def cli_error(capsys, *argv, code=1) -> str:
    got, out, err = run_cli(capsys, *argv)
    assert got == code, (got, err)
    lines = [line for line in err.splitlines() if line.startswith("phiflash")]
    assert len(lines) == 1, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# config.json: one validator, the same answer from the reference and the MLX loader
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("changes,needles", [
    ({"num_attention_heads": 0}, ["num_attention_heads", "0"]),
    ({"num_key_value_heads": 0}, ["num_key_value_heads"]),
    ({"mb_per_layer": 0}, ["mb_per_layer"]),
    ({"mamba_d_conv": 0}, ["mamba_d_conv"]),
    ({"hidden_size": "64"}, ["hidden_size must be an integer"]),
    ({"vocab_size": 2.5}, ["vocab_size must be an integer"]),
    ({"num_hidden_layers": True}, ["num_hidden_layers must be an integer"]),
    ({"vocab_size": 10**30}, ["vocab_size", "must be in"]),
    ({"intermediate_size": -4}, ["intermediate_size"]),
    ({"sliding_window": 0}, ["sliding_window is 0"]),
    ({"sliding_window": -3}, ["sliding_window is -3"]),
    ({"sliding_window": DELETE}, ["sliding_window is missing"]),
    ({"sliding_window": "8"}, ["sliding_window must be an integer"]),
    ({"layer_types": ["full_attention"] * 8}, ["layer_types[1]"]),
    ({"layer_types": "sliding_attention"}, ["layer_types must be a list"]),
    ({"layer_types": ["sliding_attention"] * 3}, ["layer_types has 3 entries"]),
    ({"layer_norm_eps": float("nan")}, ["layer_norm_eps"]),
    ({"tie_word_embeddings": "yes"}, ["tie_word_embeddings"]),
    ({"num_hidden_layers": 6}, ["multiple of 4"]),
    ({"quantization": {"group_size": 0, "bits": 4}}, ["group_size is 0"]),
    ({"quantization": {"group_size": 64, "bits": 7}}, ["bits is 7"]),
    ({"quantization": [4]}, ["quantization must be an object"]),
    ({"model_type": "llama"}, ["not 'phi4flash'"]),
])
def test_bad_config_values_are_refused_by_both_loaders(tiny, changes, needles):
    edit_config(tiny, **changes)
    both_refuse(tiny, "config.json", *needles)


@pytest.mark.parametrize("text,needle", [
    ("[1, 2, 3]", "JSON list, not an object"),
    ("null", "not an object"),
    ('"phi4flash"', "not an object"),
    ("{bad json", "not valid JSON"),
    ("[" * 100000 + "]" * 100000, "nests too deeply"),
    (" " * (2 << 20) + "{}", "more than"),
])
def test_config_that_is_not_an_object(tiny, text, needle):
    (tiny / "config.json").write_text(text)
    both_refuse(tiny, needle)


def test_config_bytes_that_are_not_utf8(tiny):
    (tiny / "config.json").write_bytes(b'{"model_type": "phi4\xff"}')
    both_refuse(tiny, "not UTF-8")


def test_config_symlinked_to_dev_zero_is_not_read(tiny, no_hang):
    (tiny / "config.json").unlink()
    os.symlink("/dev/zero", tiny / "config.json")
    both_refuse(tiny, "is a device")


def test_config_that_is_a_fifo_does_not_hang(tiny, no_hang):
    (tiny / "config.json").unlink()
    os.mkfifo(tiny / "config.json")
    both_refuse(tiny, "is a FIFO")


def test_the_mlx_loader_accepts_exactly_what_the_reference_accepts(tiny):
    """Formerly the MLX loader defaulted a missing sliding_window to 512 and ignored layer_types."""
    good = json.loads((tiny / "config.json").read_text())
    n = good["num_hidden_layers"]
    types = ["sliding_attention" if (i < n // 2 and i % 2) else "full_attention" for i in range(n)]
    edit_config(tiny, layer_types=types)
    ref = reference.load(str(tiny))
    model, _ = phiflash_mlx.load(str(tiny), tokenizer=False)
    assert model.args.sliding_window == ref.cfg.sliding_window == good["sliding_window"]


# ---------------------------------------------------------------------------------------------
# safetensors headers and the index
# ---------------------------------------------------------------------------------------------

def _first_tensor(header):
    return next(k for k in sorted(header) if k != "__metadata__")


def test_header_that_is_a_list(tiny):
    _, body = read_st(tiny / "model.safetensors")
    write_st(tiny / "model.safetensors", [1, 2], body)
    both_refuse(tiny, "model.safetensors", "header is a JSON list")


@pytest.mark.parametrize("mutate,needles", [
    (lambda e: e.pop("data_offsets"), ["lacks data_offsets"]),
    (lambda e: e.__setitem__("data_offsets", "0-10"), ["data_offsets"]),
    (lambda e: e.__setitem__("data_offsets", [10, 2]), ["data_offsets"]),
    (lambda e: e.__setitem__("data_offsets", [0, 1 << 40]), ["truncated"]),
    (lambda e: e.__setitem__("shape", [e["shape"][0] + 1] + e["shape"][1:]), ["bytes", "data_offsets span"]),
    (lambda e: e.__setitem__("shape", "big"), ["shape"]),
    (lambda e: e.__setitem__("shape", [-1]), ["shape"]),
    (lambda e: e.__setitem__("dtype", "Q7"), ["unknown dtype"]),
    (lambda e: e.__setitem__("dtype", None), ["unknown dtype"]),
    (lambda e: e.clear(), ["lacks dtype"]),
])
def test_bad_header_entries(tiny, mutate, needles):
    header, body = read_st(tiny / "model.safetensors")
    mutate(header[_first_tensor(header)])
    write_st(tiny / "model.safetensors", header, body)
    both_refuse(tiny, "model.safetensors", *needles)


def test_float8_tensor_is_refused_not_read_as_bytes(tiny):
    """An F8_E4M3 tensor of the same byte count was read as uint8 by mx.load: garbage with exit 0."""
    header, body = read_st(tiny / "model.safetensors")
    name = "model.final_layernorm.weight"
    e = header[name]
    assert e["dtype"] == "F32"
    e["dtype"], e["shape"] = "F8_E4M3", [e["shape"][0] * 4]
    write_st(tiny / "model.safetensors", header, body)
    both_refuse(tiny, "F8_E4M3", "cannot read", "bfloat16 or float32")


def test_overlapping_tensors(tiny):
    header, body = read_st(tiny / "model.safetensors")
    a, b = "model.final_layernorm.bias", "model.final_layernorm.weight"
    header[b]["data_offsets"] = list(header[a]["data_offsets"])
    write_st(tiny / "model.safetensors", header, body)
    both_refuse(tiny, "overlap")


def test_truncated_weights(tiny):
    data = (tiny / "model.safetensors").read_bytes()
    (tiny / "model.safetensors").write_bytes(data[:len(data) // 2])
    both_refuse(tiny, "truncated")


def test_header_length_beyond_the_file(tiny):
    data = (tiny / "model.safetensors").read_bytes()
    (tiny / "model.safetensors").write_bytes(struct.pack("<Q", 1 << 62) + data[8:])
    both_refuse(tiny, "truncated or not a safetensors file")


def test_weights_that_are_a_fifo_do_not_hang(tiny, no_hang):
    (tiny / "model.safetensors").unlink()
    os.mkfifo(tiny / "model.safetensors")
    both_refuse(tiny, "is a FIFO")


@pytest.mark.parametrize("index,needle", [
    ([1, 2], "weight_map object"),
    ({"weight_map": [1]}, "weight_map object"),
    ({"weight_map": {"a": "../../etc/passwd.safetensors"}}, "not the file name"),
    ({"weight_map": {"a": 3}}, "not the file name"),
    ({"weight_map": {}}, "weight_map is empty"),
])
def test_bad_index(tiny, index, needle):
    (tiny / "model.safetensors.index.json").write_text(json.dumps(index))
    both_refuse(tiny, "model.safetensors.index.json", needle)


def test_unreadable_directory_listing(tiny, monkeypatch):
    """(As root a chmod 000 directory stays readable, so the permission error is injected.)"""
    real = os.listdir

    def listdir(path="."):
        if str(path) == str(tiny):
            raise PermissionError(13, "Permission denied")
        return real(path)
    monkeypatch.setattr(os, "listdir", listdir)
    with pytest.raises(reference.CheckpointError, match="Permission denied"):
        reference.open_checkpoint(str(tiny))


@pytest.mark.skipif(IS_ROOT, reason="root reads a chmod 000 file anyway")
def test_unreadable_config(tiny):
    (tiny / "config.json").chmod(0)
    both_refuse(tiny, "Permission denied")


# The general property: any corruption of a header gives one line or a model that runs.

_json_values = st.recursive(st.none() | st.booleans() | st.integers(-2**70, 2**70) | st.floats()
                            | st.text(max_size=6), lambda c: st.lists(c, max_size=3)
                            | st.dictionaries(st.text(max_size=4), c, max_size=3), max_leaves=6)


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(data=st.data())
def test_random_header_corruption_gives_one_line_or_a_working_model(tmp_path_factory, data):
    d = copy_checkpoint(golden_path("tiny"), tmp_path_factory.mktemp("corrupt") / "m")
    header, body = read_st(d / "model.safetensors")
    how = data.draw(st.sampled_from(["field", "entry", "bytes", "drop"]))
    names = sorted(k for k in header if k != "__metadata__")
    name = data.draw(st.sampled_from(names))
    if how == "field":
        header[name][data.draw(st.sampled_from(["dtype", "shape", "data_offsets"]))] = data.draw(_json_values)
        blob = json.dumps(header).encode()
    elif how == "entry":
        header[name] = data.draw(_json_values)
        blob = json.dumps(header).encode()
    elif how == "drop":
        del header[name]
        blob = json.dumps(header).encode()
    else:
        blob = bytearray(json.dumps(header).encode())
        for _ in range(data.draw(st.integers(1, 4))):
            blob[data.draw(st.integers(0, len(blob) - 1))] = data.draw(st.integers(0, 255))
        blob = bytes(blob)
    write_st(d / "model.safetensors", blob, body)
    ids = np.array([[1, 2, 3]])
    try:
        model = reference.load(str(d))
    except reference.CheckpointError as exc:
        one_line(exc)
    else:
        assert model.forward(ids).shape[:2] == (1, 3)
    try:
        mlx_model, _ = phiflash_mlx.load(str(d), tokenizer=False)
    except PhiflashError as exc:
        one_line(exc)
    else:
        assert mlx_model(mx.array(ids)).shape[:2] == (1, 3)
    before = tree_digest(d)
    try:
        convert(str(d), str(d.parent / "converted"))
    except PhiflashError as exc:
        one_line(exc)
        assert sorted(p.name for p in d.parent.iterdir()) == ["m"]
    assert tree_digest(d) == before


@settings(max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture,
                                                                  HealthCheck.too_slow])
@given(key=st.sampled_from(["vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                            "num_attention_heads", "num_key_value_heads", "sliding_window", "mamba_d_state",
                            "mamba_d_conv", "mamba_expand", "mb_per_layer", "layer_norm_eps",
                            "tie_word_embeddings", "layer_types", "quantization"]),
       value=_json_values)
def test_random_config_values_give_one_line_or_the_same_config_in_both(key, value):
    raw = json.loads((golden_path("tiny") / "config.json").read_text())
    raw[key] = value
    try:
        cfg = reference.config_from_dict(raw)
    except reference.CheckpointError as exc:
        one_line(exc)
        with pytest.raises(PhiflashError):
            checkpoints.check_config(raw)
    else:
        assert checkpoints.check_config(raw) == cfg


# ---------------------------------------------------------------------------------------------
# convert and golden never destroy
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("dst", ["{src}", "{src}/", "{src}/sub", "{src}/..", "{src}/sub/deeper"])
def test_convert_refuses_the_source_and_around_it(tiny, capsys, dst):
    before = tree_digest(tiny.parent)
    msg = cli_error(capsys, "convert", tiny, dst.format(src=tiny), "--force")
    assert "source" in msg and "--force" not in msg
    assert tree_digest(tiny.parent) == before


def test_convert_onto_the_source_without_flag_does_not_recommend_force(tiny, capsys):
    before = tree_digest(tiny)
    msg = cli_error(capsys, "convert", tiny, tiny)
    assert "is the source" in msg and "--force" not in msg
    assert tree_digest(tiny) == before


def test_convert_via_a_symlink_to_the_source(tiny, tmp_path, capsys):
    os.symlink(tiny, tmp_path / "alias")
    before = tree_digest(tiny)
    cli_error(capsys, "convert", tmp_path / "alias", tiny, "--force")
    cli_error(capsys, "convert", tiny, tmp_path / "alias", "--force")
    assert tree_digest(tiny) == before


@pytest.fixture
def converted(tiny, tmp_path):
    out = convert(str(tiny), str(tmp_path / "out"), quantize=True, q_bits=8)
    return out


@pytest.mark.parametrize("extra,needle", [
    (["-q", "--q-bits", "7"], "unsupported --q-bits 7"),
    (["--q-bits", "4"], "need -q"),
    (["--max-shard-size", "nan"], "--max-shard-size"),
    (["--max-shard-size", "inf"], "--max-shard-size"),
    (["--max-shard-size", "0"], "--max-shard-size"),
    (["--max-shard-size", "-1"], "--max-shard-size"),
    (["-q", "--q-mode", "nvfp9"], "unknown quantization mode"),
    (["-q", "--q-override", "nonsense"], "bad --q-override"),
])
def test_force_with_bad_options_keeps_the_old_destination(tiny, converted, capsys, extra, needle):
    before, src_before = tree_digest(converted), tree_digest(tiny)
    msg = cli_error(capsys, "convert", tiny, converted, "--force", *extra)
    assert needle in msg
    assert tree_digest(converted) == before and tree_digest(tiny) == src_before


def test_force_with_a_truncated_source_keeps_the_old_destination(tiny, converted, capsys):
    data = (tiny / "model.safetensors").read_bytes()
    (tiny / "model.safetensors").write_bytes(data[:-100])
    before = tree_digest(converted)
    assert "truncated" in cli_error(capsys, "convert", tiny, converted, "--force")
    assert tree_digest(converted) == before


def test_force_with_an_incomplete_source_keeps_the_old_destination(tiny, converted, capsys):
    header, body = read_st(tiny / "model.safetensors")
    del header["model.final_layernorm.bias"]
    write_st(tiny / "model.safetensors", header, body)
    before = tree_digest(converted)
    assert "missing" in cli_error(capsys, "convert", tiny, converted, "--force")
    assert tree_digest(converted) == before


def test_force_never_replaces_a_foreign_directory(tiny, tmp_path, capsys):
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "todo.txt").write_text("my notes")
    before = tree_digest(notes)
    msg = cli_error(capsys, "convert", tiny, notes, "--force")
    assert "not a directory written by phiflash convert" in msg
    assert tree_digest(notes) == before
    # a checkpoint downloaded from elsewhere is foreign too
    other = copy_checkpoint(golden_path("small"), tmp_path / "small")
    before = tree_digest(other)
    cli_error(capsys, "convert", tiny, other, "--force")
    assert tree_digest(other) == before


def test_force_replaces_an_earlier_output_only_when_the_new_one_is_whole(tiny, converted, capsys):
    code, _, _ = run_cli(capsys, "convert", tiny, converted, "--force", "--dtype", "float32")
    assert code == 0
    cfg = json.loads((converted / "config.json").read_text())
    assert "quantization" not in cfg and cfg["torch_dtype"] == "float32"
    assert (converted / MARKER).is_file()
    assert not [p for p in converted.parent.iterdir() if p.name.startswith(".out.")]
    phiflash_mlx.load(str(converted), tokenizer=False)
    # an empty directory is replaced too (with --force), a missing one created
    (converted.parent / "empty").mkdir()
    assert run_cli(capsys, "convert", tiny, converted.parent / "empty", "--force")[0] == 0
    assert run_cli(capsys, "convert", tiny, converted.parent / "new" / "deeper")[0] == 0


@pytest.mark.parametrize("kind", ["file", "symlink", "below_file", "dangling_symlink"])
def test_destinations_that_are_files_or_links(tiny, tmp_path, capsys, kind):
    f = tmp_path / "afile"
    f.write_text("keep me")
    target = {"file": f, "symlink": tmp_path / "link", "below_file": f / "sub" / "out",
              "dangling_symlink": tmp_path / "dangling"}[kind]
    if kind == "symlink":
        os.symlink(tmp_path / "somewhere", target)
        (tmp_path / "somewhere").mkdir()
    if kind == "dangling_symlink":
        os.symlink(tmp_path / "nowhere", target)
    msg = cli_error(capsys, "convert", tiny, target, "--force")
    assert {"file": "is a file", "symlink": "symbolic link", "below_file": "which is a file",
            "dangling_symlink": "symbolic link"}[kind] in msg
    assert f.read_text() == "keep me"


def test_convert_of_an_unknown_dtype_is_one_line(tiny, tmp_path, capsys):
    header, body = read_st(tiny / "model.safetensors")
    header["model.final_layernorm.weight"]["dtype"] = "F8_E5M2"
    header["model.final_layernorm.weight"]["shape"][0] *= 4
    write_st(tiny / "model.safetensors", header, body)
    assert "F8_E5M2" in cli_error(capsys, "convert", tiny, tmp_path / "x")
    assert not (tmp_path / "x").exists()


@pytest.mark.parametrize("point", ["first_shard", "side_files", "config", "place"])
@pytest.mark.parametrize("existing", [False, True])
def test_interrupted_convert_leaves_nothing_that_loads_or_blocks(tiny, tmp_path, monkeypatch, point, existing):
    """Ctrl-C at several points of a conversion: the destination is absent (or still the old, whole one),
    no partial directory is left, and the same command then succeeds."""
    (tiny / "tokenizer_config.json").write_text("{}")
    dst = tmp_path / "out"
    if existing:
        convert(str(tiny), str(dst), dtype="float32")
    before = tree_digest(dst) if existing else None
    src_before = tree_digest(tiny)
    import phiflash_mlx.convert as conv
    import phiflash_mlx.outdir as outdir

    def boom(*a, **k):
        raise KeyboardInterrupt
    with monkeypatch.context() as m:
        if point == "first_shard":
            m.setattr(conv.mx, "save_safetensors", boom)
        elif point == "side_files":
            m.setattr(conv.shutil, "copy", boom)
        elif point == "config":
            real = Path.write_text
            m.setattr(Path, "write_text", lambda self, *a, **k: boom() if self.name == "config.json"
                      else real(self, *a, **k))
        elif not existing:                                     # the final rename of the new directory
            real_rename = os.rename
            m.setattr(outdir.os, "rename", lambda a, b: boom() if Path(b) == dst else real_rename(a, b))
        else:                                                  # the atomic swap with the old one
            m.setattr(outdir, "_exchange", boom)
        with pytest.raises(KeyboardInterrupt):
            convert(str(tiny), str(dst), quantize=True, max_shard_size_gb=0.0001, force=True)
    assert tree_digest(tiny) == src_before
    if existing:
        assert tree_digest(dst) == before
        phiflash_mlx.load(str(dst), tokenizer=False)
    else:
        assert not dst.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == (["out", "tiny"] if existing else ["tiny"])
    convert(str(tiny), str(dst), quantize=True, force=True)
    assert json.loads((dst / "config.json").read_text())["quantization"]["bits"] == 4


def test_replacing_without_an_atomic_swap_rolls_back(tiny, tmp_path, monkeypatch):
    """Where renameat2(RENAME_EXCHANGE) is missing, two renames replace the old output; if the second
    fails the old one is put back."""
    import phiflash_mlx.outdir as outdir
    dst = convert(str(tiny), str(tmp_path / "out"), dtype="float32")
    before = tree_digest(dst)
    monkeypatch.setattr(outdir, "_exchange", lambda a, b: False)
    real_rename = os.rename

    def rename(a, b):
        if Path(b) == dst and ".partial-" in str(a):
            raise OSError(28, "No space left on device")
        return real_rename(a, b)
    monkeypatch.setattr(outdir.os, "rename", rename)
    with pytest.raises(PhiflashError, match="cannot move the finished output"):
        convert(str(tiny), str(dst), quantize=True, force=True)
    assert tree_digest(dst) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]
    monkeypatch.setattr(outdir.os, "rename", real_rename)
    convert(str(tiny), str(dst), quantize=True, force=True)
    assert "quantization" in json.loads((dst / "config.json").read_text())
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "tiny"]


def test_a_killed_run_leaves_a_partial_that_does_not_load_and_is_cleaned(tiny, tmp_path):
    """SIGKILL cannot be caught: what it leaves is a hidden sibling without config.json; the next run
    removes it (its process is gone) and succeeds."""
    dst = tmp_path / "out"
    script = ("import sys, time, mlx.core as mx\n"
              "from phiflash_mlx import cli\n"
              "real = mx.save_safetensors\n"
              "def slow(*a, **k):\n"
              "    real(*a, **k); print('ready', flush=True); time.sleep(60)\n"
              "mx.save_safetensors = slow\n"
              "sys.exit(cli.main(sys.argv[1:]))\n")
    results = {}
    for sig in (signal.SIGTERM, signal.SIGKILL):
        p = subprocess.Popen([sys.executable, "-c", script, "convert", str(tiny), str(dst), "-q"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        try:
            assert p.stdout.readline().strip() == "ready"
            p.send_signal(sig)
            _, err = p.communicate(timeout=60)
        finally:
            p.kill()
        results[sig] = (p.returncode, err, sorted(x.name for x in tmp_path.iterdir()))
    code, err, left = results[signal.SIGTERM]
    assert code == 143 and "Traceback" not in err
    assert left == ["tiny"]                               # SIGTERM: cleaned up
    code, err, left = results[signal.SIGKILL]
    assert code == -signal.SIGKILL
    partial = [x for x in left if x.startswith(".out.partial-")]
    assert len(partial) == 1 and "out" not in left
    with pytest.raises(PhiflashError, match="no config.json"):
        phiflash_mlx.load(str(tmp_path / partial[0]), tokenizer=False)
    convert(str(tiny), str(dst), quantize=True)
    assert sorted(x.name for x in tmp_path.iterdir()) == ["out", "tiny"]


def test_golden_never_writes_over_a_checkpoint(tiny, demo, tmp_path, capsys):
    before, demo_before = tree_digest(tiny), tree_digest(demo)
    assert "is the source" in cli_error(capsys, "golden", "--config", tiny, "--out", tiny)
    assert "is the source" in cli_error(capsys, "golden", "--model", tiny, "--out", tiny)
    assert "lies inside the source" in cli_error(capsys, "golden", "--model", tiny, "--out", tiny / "g")
    # --out at some other checkpoint (tokenizer files and all): not a golden set, so never replaced
    msg = cli_error(capsys, "golden", "--config", "tiny", "--out", demo)
    assert "not a directory written by phiflash golden" in msg
    assert tree_digest(tiny) == before and tree_digest(demo) == demo_before
    # a golden set is regenerated in place, atomically
    out = tmp_path / "g"
    assert run_cli(capsys, "golden", "--config", "tiny", "--out", out, "--seed", "3")[0] == 0
    first = tree_digest(out)
    assert run_cli(capsys, "golden", "--config", "tiny", "--out", out, "--seed", "3")[0] == 0
    assert tree_digest(out) == first
    assert sorted(p.name for p in tmp_path.iterdir()) == ["demo", "g", "tiny"]
    assert "--seed" in cli_error(capsys, "golden", "--config", "tiny", "--out", tmp_path / "h", "--seed", "-1")


# ---------------------------------------------------------------------------------------------
# sampling and prompt inputs
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("flag,value,needle", [
    ("--temp", "nan", "temperature must be a finite number"),
    ("--temp", "inf", "temperature must be a finite number"),
    ("--temp", "-inf", "temperature must be a finite number"),
    ("--top-p", "nan", "top_p"),
    ("--min-p", "nan", "min_p"),
])
def test_non_finite_sampling_options(demo, capsys, flag, value, needle):
    assert needle in cli_error(capsys, "generate", "--model", demo, "-p", "what is 1 plus 1?", f"{flag}={value}")


@pytest.mark.parametrize("value", ["NaN", "Infinity", "-Infinity", '"hot"', "true"])
def test_non_finite_temperature_in_generation_config(demo, capsys, value):
    cfg = json.loads((demo / "generation_config.json").read_text())
    (demo / "generation_config.json").write_text(json.dumps(cfg)[:-1] + f', "temperature": {value}}}')
    msg = cli_error(capsys, "generate", "--model", demo, "-p", "what is 1 plus 1?")
    assert "generation_config.json: temperature must be a finite number" in msg


def test_generation_config_that_is_a_fifo(demo, capsys, no_hang):
    (demo / "generation_config.json").unlink()
    os.mkfifo(demo / "generation_config.json")
    assert "is a FIFO" in cli_error(capsys, "generate", "--model", demo, "-p", "what is 1 plus 1?")


def test_library_refuses_non_finite_temperature():
    from phiflash_mlx.generate import SamplingParams
    for bad in (float("nan"), float("inf"), "0.5", None):
        with pytest.raises(PhiflashError):
            SamplingParams(temp=bad).validate()
    with pytest.raises(PhiflashError, match="seed must be an integer"):
        SamplingParams(seed=1.5).validate()


def test_seeds_are_reduced_modulo_2_64(demo, capsys):
    """-1 and 2^64 - 1 are the same seed; 2^64 and 0 too; a seed of 2^80 works."""
    from phiflash_mlx.generate import SamplingParams
    p = SamplingParams(seed=-1)
    p.validate()
    assert p.seed == 2**64 - 1
    outs = {}
    for seed in (-1, 2**64 - 1, 2**64, 0, 2**80):
        code, out, _ = run_cli(capsys, "generate", "--model", demo, "-p", "what is 3 plus 4?", "--temp", "1.5",
                               "--seed", seed, "--max-tokens", "12", "--json")
        assert code == 0
        outs[seed] = json.loads(out)["text"]
    assert outs[-1] == outs[2**64 - 1] and outs[2**64] == outs[0]


def test_quality_text_not_utf8(demo, tmp_path, capsys):
    bad = tmp_path / "latin1.txt"
    bad.write_bytes("caf\xe9 au lait".encode("latin-1"))
    assert "not UTF-8" in cli_error(capsys, "quality", demo, demo, "--text", bad)


@pytest.mark.parametrize("content", [b"PK\x03\x04 not really a zip", b"hello, not an array file", b""])
def test_verify_with_a_file_that_is_not_an_array_file(tmp_path, capsys, content):
    f = tmp_path / "outputs.npz"
    f.write_bytes(content)
    cli_error(capsys, "verify", "--model", golden_path("tiny"), "--outputs", f)


def test_empty_tokenizer_model_and_bad_added_token_key(demo, capsys):
    cfg = json.loads((demo / "tokenizer_config.json").read_text())
    decoder = cfg["added_tokens_decoder"]
    key = next(iter(decoder))
    decoder["not-a-number"] = decoder.pop(key)
    (demo / "tokenizer_config.json").write_text(json.dumps(cfg))
    assert "added_tokens_decoder" in cli_error(capsys, "generate", "--model", demo, "-p", "hi")
    (demo / "tokenizer.model").write_bytes(b"")
    assert "tokenizer.model is empty" in cli_error(capsys, "generate", "--model", demo, "-p", "hi")


def test_ctrl_c_while_commands_load(monkeypatch, capsys):
    import importlib

    def interrupted(name, *a, **k):
        raise KeyboardInterrupt
    monkeypatch.setattr(importlib, "import_module", interrupted)
    assert run_cli(capsys, "info")[0] == 130


# ---------------------------------------------------------------------------------------------
# memory preflight
# ---------------------------------------------------------------------------------------------

def test_memory_preflight_estimate_matches_the_float32_size(tiny):
    """On a CPU every float tensor becomes float32: the estimate is the reference's float32 size."""
    if mx.metal.is_available():
        pytest.skip("the CPU dtype policy")
    shard = checkpoints.open_shard(str(tiny / "model.safetensors"))
    need, q4 = checkpoints.estimate_resident_bytes([shard], 4)
    assert need == reference.open_checkpoint(str(tiny)).nbytes_float32()
    assert q4 < need / 3


def test_memory_preflight_bf16_counts_twice_the_stored_bytes(tiny, tmp_path):
    out = convert(str(tiny), str(tmp_path / "bf16"), dtype="bfloat16")
    shard = checkpoints.open_shard(str(out / "model.safetensors"))
    want = sum(math.prod(e["shape"]) * 4 for e in shard.entries.values())
    assert checkpoints.estimate_resident_bytes([shard], 4)[0] == want
    stored = sum(e["data_offsets"][1] - e["data_offsets"][0] for e in shard.entries.values())
    assert stored < 0.6 * want                                      # mostly bf16 on disk


def test_memory_preflight_refuses_with_the_command_that_fits(tiny, monkeypatch, capsys):
    monkeypatch.setattr(checkpoints, "available_memory", lambda: 100_000)
    with pytest.raises(PhiflashError) as err:
        phiflash_mlx.load(str(tiny), tokenizer=False)
    msg = one_line(err.value)
    assert "needs about" in msg and "0.0 GB is available" in msg
    assert f"phiflash convert {tiny} tiny-4bit -q" in msg
    q = convert(str(tiny), str(tiny.parent / "q"), quantize=True)
    with pytest.raises(PhiflashError, match="already|fewer bits"):
        phiflash_mlx.load(str(q), tokenizer=False)
    monkeypatch.setenv(checkpoints.ENV_SKIP_MEMORY_CHECK, "1")
    phiflash_mlx.load(str(tiny), tokenizer=False)


def test_quality_seed_out_of_range(demo, capsys):
    assert "--seed" in cli_error(capsys, "quality", demo, demo, "--seed", "-1")


def test_available_memory_is_known_here():
    avail = checkpoints.available_memory()
    assert avail is None or avail > 0


# ---------------------------------------------------------------------------------------------
# real processes: exit codes, no tracebacks
# ---------------------------------------------------------------------------------------------

def phiflash(*args, stdin=None, **kw):
    return subprocess.run([sys.executable, str(ROOT / "cli.py"), *map(os.fsencode, args)], input=stdin,
                          capture_output=True, timeout=120, cwd=ROOT, **kw)


def test_non_utf8_prompts_argv_stdin_and_chat(demo):
    r = phiflash("generate", "--model", demo, "--prompt", b"what is 2 plus 2?\xff", "--temp", "0",
                 "--max-tokens", "4")
    assert r.returncode == 0 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = phiflash("generate", "--model", demo, "--temp", "0", "--max-tokens", "4", stdin=b"what is \xfe\xff 2?")
    assert r.returncode == 0 and b"not valid UTF-8" in r.stderr and b"Traceback" not in r.stderr
    r = phiflash("chat", "--model", demo, "--temp", "0", "--max-tokens", "4",
                 stdin=b"what is 2 plus 2?\xc3\n\xed\xa0\x80 1 plus 1?\nwhat is 3 plus 3?\n/exit\n")
    assert r.returncode == 0 and b"Traceback" not in r.stderr
    assert r.stdout.count(b"not valid UTF-8") == 2
    assert r.stdout.count(b" tok/s]") == 3                           # all three messages answered


def test_broken_pipe_and_full_disk_and_a_bad_option():
    p = subprocess.Popen([sys.executable, str(ROOT / "cli.py"), "info"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE)
    p.stdout.close()                                   # the reader went away, like `| head -0`
    _, err = p.communicate(timeout=120)
    assert p.returncode == 141 and b"Traceback" not in err and b"Exception ignored" not in err
    if os.path.exists("/dev/full"):
        with open("/dev/full", "w") as full:
            r = subprocess.run([sys.executable, str(ROOT / "cli.py"), "info"], cwd=ROOT, stdout=full,
                               stderr=subprocess.PIPE, timeout=120)
        assert r.returncode == 1 and b"No space left on device" in r.stderr and b"Traceback" not in r.stderr
    r = phiflash("generate", "--temp", "hot")
    assert r.returncode == 2 and b"invalid float value" in r.stderr and b"Traceback" not in r.stderr


def _interrupt_at_start_up(start: str) -> None:
    """Run `start` (python -c) and send SIGINT at several moments after it prints 'up': never a traceback;
    exit 0 (finished first) or 130, and at least one interrupt lands."""
    codes = []
    for delay in (0.02, 0.06, 0.12):
        p = subprocess.Popen([sys.executable, "-c", start], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                             preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
        try:
            assert p.stdout.readline() == b"up\n"
            time.sleep(delay)
            p.send_signal(signal.SIGINT)
            _, err = p.communicate(timeout=120)
        finally:
            p.kill()
        assert b"Traceback" not in err, err
        codes.append(p.returncode)
    assert set(codes) <= {0, 130} and 130 in codes, codes


def test_ctrl_c_while_modules_load():
    """SIGINT at several moments while cli.py imports numpy and MLX (~0.3 s): never a traceback. (Python's
    own start-up, before cli.py runs, is not ours: the child reports when it is past it.)"""
    _interrupt_at_start_up("import sys; sys.argv = ['cli.py', 'info']; "
                           "code = compile(open('cli.py').read(), 'cli.py', 'exec'); "
                           "print('up', flush=True); exec(code, {'__name__': '__main__'})")


def test_ctrl_c_while_modules_load_through_the_installed_entry_point():
    """The `phiflash` script runs `phiflash_mlx.cli:main`; importing that module does not load MLX (the
    package's public names are imported on first use), so MLX's import happens inside main()'s handlers."""
    probe = subprocess.run([sys.executable, "-c", "import sys, phiflash_mlx.cli; print('mlx.core' in sys.modules)"],
                           cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert probe.stdout.strip() == "False", probe.stderr
    _interrupt_at_start_up("import sys; from phiflash_mlx.cli import main; print('up', flush=True); "
                           "sys.exit(main(['info']))")


def test_lone_surrogates_in_library_prompts_become_replacement_characters():
    """A str may hold a lone surrogate (JSON "\\ud800" decodes to one); it has no UTF-8 form, so the
    tokenizer encodes U+FFFD instead, as the command line does for bytes that are not UTF-8."""
    import phiflash_mlx
    from phiflash_mlx.demo import demo_model_path
    model, tok = phiflash_mlx.load(str(demo_model_path()))
    assert tok.encode("ok \ud800 x") == tok.encode("ok \ufffd x")
    assert tok.encode("\udfff") == tok.encode("\ufffd")
    messages = [{"role": "user", "content": "What is 1 + 2?\ud800"}]
    assert tok.apply_chat_template(messages) == tok.apply_chat_template(
        [{"role": "user", "content": "What is 1 + 2?\ufffd"}])
    assert isinstance(phiflash_mlx.generate(model, tok, messages, max_tokens=3, temp=0), str)


@pytest.mark.parametrize("name,dtype,needle", [
    ("model.embed_tokens.weight", "U16", "stored as U16"),            # same byte count as bf16...
    ("model.final_layernorm.bias", "I32", "stored as I32"),           # ... and as float32
    ("model.final_layernorm.bias", "BOOL", "stored as BOOL"),
    ("model.final_layernorm.bias", "F64", "float64, which MLX cannot load"),
])
def test_float_tensors_stored_as_other_dtypes_are_refused(tiny, name, dtype, needle):
    """An integer or bool dtype on a float tensor loaded and generated garbage with exit 0; float64
    passed the header check and then failed inside mx.load with a traceback."""
    header, body = read_st(tiny / "model.safetensors")
    e = header[name]
    assert e["dtype"] == "F32"
    size = {"U16": 2, "I32": 4, "BOOL": 1, "F64": 8}[dtype]
    elements = (e["data_offsets"][1] - e["data_offsets"][0]) // size
    e["dtype"], e["shape"] = dtype, ([elements] if len(e["shape"]) == 1 else [elements // e["shape"][-1] * 4 // size,
                                                                            e["shape"][-1]])
    write_st(tiny / "model.safetensors", header, body)
    both_refuse(tiny, needle)


def test_packed_codes_where_the_model_needs_floats(tiny):
    """uint32 is allowed for packed quantized weights only; on an unquantized model's weight it is refused."""
    header, body = read_st(tiny / "model.safetensors")
    header["model.layers.0.mlp.fc2.weight"]["dtype"] = "U32"
    write_st(tiny / "model.safetensors", header, body)
    with pytest.raises(PhiflashError) as err:
        phiflash_mlx.load(str(tiny), tokenizer=False)
    assert "model.layers.0.mlp.fc2.weight is stored as uint32" in one_line(err.value)


def test_metadata_values_must_be_strings(tiny):
    header, body = read_st(tiny / "model.safetensors")
    header["__metadata__"] = {"format": {"x": 1}}
    write_st(tiny / "model.safetensors", header, body)
    both_refuse(tiny, "__metadata__ must be an object of strings")


def test_force_keeps_files_a_user_put_in_a_directory(tiny, converted, tmp_path, capsys):
    """--force replaces an earlier output only as it was written: a marker alone does not make a folder
    ours, and a file added to an earlier output is never deleted."""
    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "a.txt").write_text("my notes")
    (notes / MARKER).write_text("{}")
    before = tree_digest(notes)
    assert "not a directory written by phiflash convert" in cli_error(capsys, "convert", tiny, notes, "--force")
    assert tree_digest(notes) == before
    (converted / "my_results.txt").write_text("keep me")
    before = tree_digest(converted)
    assert "not a directory written by phiflash convert" in cli_error(capsys, "convert", tiny, converted, "--force")
    assert tree_digest(converted) == before
