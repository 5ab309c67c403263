"""The Linux fast-BLAS route (phiflash_mlx/cpu/blas.py + cpu/csrc/blas_shim.c).

The route is fixed when ``mlx.core`` is first imported, so every check that
depends on it runs in a fresh interpreter. Each subprocess prints one JSON
line that the test reads back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import numpy as np
import pytest

pytestmark = pytest.mark.skipif(
    not sys.platform.startswith("linux"),
    reason="the fast-BLAS route exists only on Linux (macOS MLX already uses Accelerate)",
)

import phiflash_mlx  # noqa: E402  (imported after the skip marker on purpose)
from phiflash_mlx.cpu import blas as _blas  # noqa: E402

# The directory that holds the phiflash_mlx under test, so that subprocesses
# import the same copy (source tree with an in-place shim, or site-packages).
PKG_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(phiflash_mlx.__file__)))

REL_TOL = 1e-5


def run_py(code: str, tmp_path, **env_overrides) -> tuple[dict, str]:
    """Run ``code`` in a fresh interpreter; return (its last stdout line as JSON, stderr)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PHIFLASH_")}
    env["PYTHONPATH"] = os.pathsep.join(
        [PKG_ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else [])
    )
    env.update(env_overrides)
    proc = subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        cwd=tmp_path,
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, f"subprocess failed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1]), proc.stderr


# Prints where the process-global lookup of cblas_sgemm lands (the library MLX
# bound to), whether the shim is mapped at all, and blas_info().
PROBE = """
import ctypes, json, os

class DlInfo(ctypes.Structure):
    _fields_ = [("fname", ctypes.c_char_p), ("fbase", ctypes.c_void_p),
                ("sname", ctypes.c_char_p), ("saddr", ctypes.c_void_p)]

def provider(symbol):
    try:
        addr = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except AttributeError:
        return None
    info = DlInfo()
    ctypes.CDLL(None).dladdr(ctypes.c_void_p(addr), ctypes.byref(info))
    return os.path.realpath(info.fname.decode())

def shim_mapped():
    with open("/proc/self/maps") as maps:
        return "_blas_shim" in maps.read()

def probe(**extra):
    from phiflash_mlx.cpu.blas import blas_info
    out = dict(info=blas_info(), mapped=shim_mapped(),
               providers={s: provider(s) for s in ("cblas_sgemm", "cblas_dgemm", "cblas_cgemm")})
    out.update(extra)
    print(json.dumps(out))
"""


@pytest.fixture(scope="module")
def shim_built():
    if _blas._shim_path() is None:
        pytest.fail(
            "phiflash_mlx/cpu/_blas_shim*.so was not built: reinstall with a C compiler "
            "(pip install -e .) so that MLX can use OpenBLAS"
        )
    return _blas._shim_path()


def test_route_is_active_and_mlx_calls_the_shim(tmp_path, shim_built):
    code = PROBE + """
import phiflash_mlx
import mlx.core as mx
from phiflash_mlx.cpu.blas import blas_info
before = blas_info()["calls"]
a = mx.ones((64, 32)); b = mx.ones((32, 16))
mx.eval(a @ b)                                             # cblas_sgemm
mx.eval(mx.matmul(a.astype(mx.float64), b.astype(mx.float64), stream=mx.cpu))  # cblas_dgemm
mx.eval(a.astype(mx.complex64) @ b.astype(mx.complex64))  # cblas_cgemm
probe(forwarded=blas_info()["calls"] - before)
"""
    out, stderr = run_py(code, tmp_path)
    info = out["info"]
    assert info["active"], info["reason"]
    assert info["reason"] is None
    assert os.path.realpath(info["shim"]) == os.path.realpath(shim_built)
    assert os.path.isfile(info["library"])
    assert "sgemm" in info["symbol"]
    # The dynamic linker resolves all three names to our shim ...
    for symbol, where in out["providers"].items():
        assert where == os.path.realpath(shim_built), (symbol, where)
    # ... and MLX's matmuls really go through it.
    assert out["forwarded"] == 3
    assert "fast CPU BLAS not enabled" not in stderr


MATMULS = """
import json, sys
import numpy as np
import phiflash_mlx
import mlx.core as mx

rng = np.random.default_rng(1234)
def r(*shape):
    return rng.standard_normal(shape).astype(np.float32)

cases = {
    "square": (r(128, 128), r(128, 128), False, False),
    "odd": (r(67, 301), r(301, 45), False, False),
    "matvec": (r(1, 768), r(768, 1024), False, False),
    "a_t": (r(96, 40), r(96, 72), True, False),
    "b_t": (r(40, 96), r(72, 96), False, True),
    "both_t": (r(96, 40), r(72, 96), True, True),
    "batched": (r(3, 33, 64), r(3, 64, 17), False, False),
}
saved = {}
for name, (a, b, ta, tb) in cases.items():
    A = mx.array(a); B = mx.array(b)
    if ta: A = A.swapaxes(-1, -2)
    if tb: B = B.swapaxes(-1, -2)
    out = A @ B
    mx.eval(out)
    saved[name] = np.array(out)
    saved[name + "_ref"] = (a.swapaxes(-1, -2) if ta else a).astype(np.float64) @ (
        b.swapaxes(-1, -2) if tb else b).astype(np.float64)
# a slice view (non-contiguous, offset) and addmm
big = mx.array(r(80, 90))
view = big[5:69, 3:83]
w = r(80, 24)
out = view @ mx.array(w)
bias = r(64, 24)
am = mx.addmm(mx.array(bias), view, mx.array(w), alpha=0.5, beta=2.0)
mx.eval(out, am)
ref = np.array(big)[5:69, 3:83].astype(np.float64) @ w.astype(np.float64)
saved["view"] = np.array(out); saved["view_ref"] = ref
saved["addmm"] = np.array(am); saved["addmm_ref"] = 2.0 * bias.astype(np.float64) + 0.5 * ref
np.savez(sys.argv[-1] if len(sys.argv) > 1 else "out.npz", **saved)
from phiflash_mlx.cpu.blas import blas_info
print(json.dumps({"active": blas_info()["active"]}))
"""


def _rel(x, ref):
    return float(np.linalg.norm(x.astype(np.float64) - ref) / np.linalg.norm(ref))


def test_fp32_matmuls_agree_with_and_without_fast_blas(tmp_path, shim_built):
    (tmp_path / "fast").mkdir()
    (tmp_path / "slow").mkdir()
    fast, _ = run_py(MATMULS, tmp_path / "fast")
    slow, _ = run_py(MATMULS, tmp_path / "slow", PHIFLASH_CPU_BLAS="0")
    assert fast["active"] and not slow["active"]
    f = np.load(tmp_path / "fast" / "out.npz")
    s = np.load(tmp_path / "slow" / "out.npz")
    names = [n for n in f.files if not n.endswith("_ref")]
    assert len(names) == 9
    for name in names:
        ref = f[name + "_ref"]
        assert f[name].shape == ref.shape == s[name].shape, name
        assert _rel(f[name], ref) < REL_TOL, (name, "fast vs float64", _rel(f[name], ref))
        assert _rel(s[name], ref) < REL_TOL, (name, "mlx blas vs float64", _rel(s[name], ref))
        assert _rel(f[name], s[name].astype(np.float64)) < REL_TOL, (name, "fast vs mlx blas")


def test_concurrent_streams(tmp_path, shim_built):
    # MLX runs CPU work on per-stream threads; two of them call cblas_sgemm at once.
    code = """
import json, threading
import numpy as np
import phiflash_mlx
import mlx.core as mx
rng = np.random.default_rng(0)
a = rng.standard_normal((192, 160)).astype(np.float32)
b = rng.standard_normal((160, 176)).astype(np.float32)
ref = a.astype(np.float64) @ b.astype(np.float64)
errs = []
def work():
    s = mx.new_stream(mx.cpu)
    for _ in range(20):
        out = mx.matmul(mx.array(a), mx.array(b), stream=s)
        mx.eval(out)
        errs.append(float(np.linalg.norm(np.array(out) - ref) / np.linalg.norm(ref)))
ts = [threading.Thread(target=work) for _ in range(3)]
for t in ts: t.start()
for t in ts: t.join()
from phiflash_mlx.cpu.blas import blas_info
print(json.dumps({"max_err": max(errs), "n": len(errs), "active": blas_info()["active"]}))
"""
    out, _ = run_py(code, tmp_path)
    assert out["active"]
    assert out["n"] == 60
    assert out["max_err"] < REL_TOL


def test_off_switch(tmp_path):
    code = PROBE + """
import phiflash_mlx
import mlx.core as mx
mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
probe()
"""
    for value in ("0", "off"):
        out, stderr = run_py(code, tmp_path, PHIFLASH_CPU_BLAS=value)
        info = out["info"]
        assert not info["active"]
        assert info["mode"] == "off"
        assert "PHIFLASH_CPU_BLAS=0" in info["reason"]
        assert info["library"] is None and info["calls"] is None
        assert not out["mapped"], "the shim must not even be loaded when turned off"
        assert out["providers"]["cblas_sgemm"] is None
        assert "fast CPU BLAS" not in stderr


def test_mlx_imported_first_falls_back(tmp_path, shim_built):
    code = PROBE + """
import mlx.core as mx
import phiflash_mlx
out = mx.ones((8, 8)) @ mx.ones((8, 8))
probe(ok=bool((mx.abs(out - 8.0) < 1e-6).all().item()))
"""
    out, stderr = run_py(code, tmp_path)
    assert out["ok"]
    info = out["info"]
    assert not info["active"]
    assert "mlx.core was imported before phiflash_mlx" in info["reason"]
    assert not out["mapped"]
    assert "fast CPU BLAS" not in stderr  # the default notice is DEBUG-level: silent

    out, stderr = run_py(code, tmp_path, PHIFLASH_CPU_BLAS="1")
    assert not out["info"]["active"] and out["ok"]
    assert "fast CPU BLAS not enabled" in stderr
    assert "mlx.core was imported before phiflash_mlx" in stderr
    assert stderr.count("fast CPU BLAS not enabled") == 1


def test_reload_and_preload_keep_the_route(tmp_path, shim_built):
    # Reloading _blas after mlx.core loaded must see that the route is in place.
    code = PROBE + """
import importlib
import phiflash_mlx
import mlx.core as mx
from phiflash_mlx.cpu import blas as _blas
importlib.reload(_blas)
_blas.enable()
mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
probe()
"""
    out, _ = run_py(code, tmp_path)
    assert out["info"]["active"], out["info"]["reason"]
    assert out["info"]["calls"] >= 1
    # LD_PRELOAD of the shim itself: it gets initialised before MLX calls it.
    out, _ = run_py(code, tmp_path, LD_PRELOAD=shim_built)
    assert out["info"]["active"], out["info"]["reason"]
    assert out["providers"]["cblas_sgemm"] == os.path.realpath(shim_built)


def test_unusable_library_falls_back(tmp_path, shim_built):
    code = PROBE + """
import phiflash_mlx
import mlx.core as mx
out = mx.ones((8, 8)) @ mx.ones((8, 8))
probe(ok=bool((mx.abs(out - 8.0) < 1e-6).all().item()))
"""
    out, stderr = run_py(
        code,
        tmp_path,
        PHIFLASH_CPU_BLAS="1",
        PHIFLASH_CPU_BLAS_LIBRARY=str(tmp_path / "no-such-blas.so"),
    )
    assert out["ok"]
    assert not out["info"]["active"]
    assert "no-such-blas.so" in out["info"]["reason"]
    assert out["providers"]["cblas_sgemm"] is None, "a half-set-up shim must stay invisible"
    assert "fast CPU BLAS not enabled" in stderr


def test_missing_shim_falls_back(tmp_path):
    # A copy of the package without the compiled shim, as after a failed build.
    import shutil

    copy = tmp_path / "pkg"
    shutil.copytree(
        os.path.join(PKG_ROOT, "phiflash_mlx"),
        copy / "phiflash_mlx",
        ignore=shutil.ignore_patterns("*.so", "__pycache__"),
    )
    code = PROBE + """
import phiflash_mlx
import mlx.core as mx
mx.eval(mx.ones((8, 8)) @ mx.ones((8, 8)))
probe(where=phiflash_mlx.__file__)
"""
    out, stderr = run_py(code, tmp_path, PYTHONPATH=str(copy), PHIFLASH_CPU_BLAS="1")
    assert out["where"].startswith(str(copy))
    assert not out["info"]["active"]
    assert "not compiled" in out["info"]["reason"]
    assert "fast CPU BLAS not enabled" in stderr


def test_info_command(tmp_path, shim_built):
    code = """
import contextlib, io, json
from phiflash_mlx.cli import main
buf = io.StringIO()
with contextlib.redirect_stdout(buf):
    rc = main(["info", "--json"])
data = json.loads(buf.getvalue())
text = io.StringIO()
with contextlib.redirect_stdout(text):
    main(["info"])
data["rc"] = rc
data["text"] = text.getvalue()
print(json.dumps(data))
"""
    out, _ = run_py(code, tmp_path)
    assert out["rc"] == 0
    for key in ("phiflash_mlx", "mlx", "numpy", "python", "platform", "default_device"):
        assert out[key], key
    assert out["metal_available"] is False or out["metal_available"] is True
    assert out["blas"]["active"]
    assert "cpu blas:" in out["text"] and "OpenBLAS" in out["text"]

    off, _ = run_py(code, tmp_path, PHIFLASH_CPU_BLAS="0")
    assert not off["blas"]["active"]
    assert "PHIFLASH_CPU_BLAS=0" in off["text"]


def test_info_help_mentions_switches():
    from phiflash_mlx.cli import build_parser

    parser = build_parser()
    sub = next(a for a in parser._actions if a.dest == "command")
    help_text = sub.choices["info"].format_help()
    assert "PHIFLASH_CPU_BLAS=0" in help_text and "BLAS" in help_text


@pytest.mark.parametrize(
    "value, mode",
    [("", "auto"), ("auto", "auto"), ("0", "off"), ("OFF", "off"), ("1", "on"), ("yes", "on")],
)
def test_mode_parsing(monkeypatch, value, mode):
    monkeypatch.setenv("PHIFLASH_CPU_BLAS", value)
    assert _blas._mode() == mode


def test_blas_info_in_this_process_is_consistent():
    info = _blas.blas_info()
    assert set(info) >= {"active", "blas", "library", "shim", "reason", "threads", "calls"}
    assert info["active"] == (info["reason"] is None)


MODEL_LOGITS = """
import json, sys
import numpy as np
import phiflash_mlx
import mlx.core as mx
model, _ = phiflash_mlx.load(sys.argv[1], tokenizer=False)
ids = np.load(sys.argv[1] + "/vectors.npz")["input_ids_long"]
np.save("logits.npy", np.array(model(mx.array(ids))))
from phiflash_mlx.cpu.blas import blas_info
print(json.dumps({"active": blas_info()["active"]}))
"""


def test_model_logits_agree_with_and_without_fast_blas(tmp_path, shim_built):
    """The golden models' logits with the routed BLAS equal those with MLX's own, within 1e-5 relative."""
    from conftest import GOLDEN_MODELS, golden_path

    for name in GOLDEN_MODELS:
        out = {}
        for variant, env in (("fast", {}), ("slow", {"PHIFLASH_CPU_BLAS": "0"})):
            d = tmp_path / name / variant
            d.mkdir(parents=True)
            info, _ = run_py(MODEL_LOGITS.replace("sys.argv[1]", repr(str(golden_path(name)))), d, **env)
            assert info["active"] == (variant == "fast")
            out[variant] = np.load(d / "logits.npy")
        assert _rel(out["fast"], out["slow"].astype(np.float64)) < REL_TOL, name
        assert np.abs(out["fast"] - out["slow"]).max() <= REL_TOL * np.abs(out["slow"]).max(), name
