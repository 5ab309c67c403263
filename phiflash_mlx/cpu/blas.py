"""Route MLX's CPU matrix multiplies to an optimized BLAS on Linux.

MLX's Linux CPU back-end ships the reference (netlib) BLAS, which runs fp32
GEMM at a few GFLOP/s. ``libmlx.so`` looks up only three BLAS routines by
their plain CBLAS names (``cblas_sgemm``, ``cblas_dgemm``, ``cblas_cgemm``),
and the dynamic linker binds them to the first library in the process's global
scope that defines them. So a library that defines them, loaded with
``RTLD_GLOBAL`` *before* ``mlx.core`` is imported, takes over.

The library we load is a small C shim (``csrc/blas_shim.c``, compiled into
``_blas_shim*.so`` when the package is installed) that forwards those three
routines to the OpenBLAS numpy's wheels already bundle. Nothing new is
downloaded and numpy and MLX then share one OpenBLAS (and one thread pool).

:func:`enable` is the first thing ``import phiflash_mlx`` does. It never raises:
whenever the fast route cannot be set up it leaves MLX on its own BLAS and says
why once, through the ``phiflash_mlx.blas`` logger. :func:`blas_info` reports
what happened.

Environment variables:

``PHIFLASH_CPU_BLAS``
    unset or ``auto``: use the fast BLAS when possible, explain a fallback at
    DEBUG level. ``1``/``on``: the same, but a fallback is a WARNING.
    ``0``/``off``: leave MLX's BLAS alone.
``PHIFLASH_CPU_BLAS_LIBRARY``
    path of a BLAS to forward to instead of numpy's OpenBLAS (for example
    MKL's ``libmkl_rt.so.2``). CBLAS names with or without the ``scipy_``
    prefix and the ``64_`` suffix of 64-bit-integer builds are recognised.
``OPENBLAS_NUM_THREADS``
    read by OpenBLAS itself; by default it uses every core.

Nothing here runs on macOS, where MLX uses Apple's Accelerate.
"""

from __future__ import annotations

import ctypes
import glob
import importlib.machinery
import importlib.util
import logging
import os
import sys

__all__ = ["enable", "blas_info"]

ENV_SWITCH = "PHIFLASH_CPU_BLAS"
ENV_LIBRARY = "PHIFLASH_CPU_BLAS_LIBRARY"

_log = logging.getLogger("phiflash_mlx.blas")

_OFF = {"0", "off", "false", "no", "none"}
_ON = {"1", "on", "true", "yes", "force"}
_AUTO = {"", "auto"}

# The state of the one attempt made per process; filled in by enable().
_state: dict | None = None
# Handles kept alive for the life of the process.
_shim: ctypes.CDLL | None = None
_target: ctypes.CDLL | None = None

MLX_BUILTIN = "MLX built-in reference BLAS (netlib)"


def _mode() -> str:
    """``off``, ``auto`` or ``on`` from ``PHIFLASH_CPU_BLAS``."""
    raw = os.environ.get(ENV_SWITCH, "").strip().lower()
    if raw in _OFF:
        return "off"
    if raw in _ON:
        return "on"
    if raw not in _AUTO:
        _log.warning("%s=%r is not one of 0, 1, auto; using auto", ENV_SWITCH, raw)
    return "auto"


def library_path(stem: str) -> str | None:
    """The C library `stem` (compiled by setup.py) next to this file, or None if it was not built.
    Builds made before these files moved into ``phiflash_mlx/cpu/`` lie one level up; they are
    found too (the kernels' loader declines one that lacks a newer kernel)."""
    here = os.path.dirname(os.path.abspath(__file__))
    for where in (here, os.path.dirname(here)):
        for suffix in importlib.machinery.EXTENSION_SUFFIXES:
            path = os.path.join(where, stem + suffix)
            if os.path.isfile(path):
                return path
        found = sorted(glob.glob(os.path.join(where, stem + "*.so")))
        if found:
            return found[0]
    return None


def _shim_path() -> str | None:
    """The compiled shim next to this file, or None if it was not built."""
    return library_path("_blas_shim")


def _package_dir(name: str) -> str | None:
    """Directory of an installed package, found without importing it."""
    try:
        spec = importlib.util.find_spec(name)
    except (ImportError, ValueError):
        return None
    if spec is None or not spec.origin:
        return None
    return os.path.dirname(spec.origin)


def _candidate_libraries() -> list[str]:
    """BLAS libraries to forward to, best first."""
    override = os.environ.get(ENV_LIBRARY, "").strip()
    if override:
        return [override]
    found: list[str] = []
    numpy_dir = _package_dir("numpy")
    if numpy_dir:
        site = os.path.dirname(numpy_dir)
        # numpy >= 2 wheels: numpy.libs/libscipy_openblas64_-<hash>.so;
        # numpy 1.2x wheels: numpy.libs/libopenblas64_p-r0-<hash>.so.
        for pattern in ("libscipy_openblas*.so*", "libopenblas*.so*"):
            found += sorted(glob.glob(os.path.join(site, "numpy.libs", pattern)))
            found += sorted(glob.glob(os.path.join(numpy_dir, ".libs", pattern)))
    # The standalone scipy-openblas wheels, if someone installed them.
    for pkg in ("scipy_openblas32", "scipy_openblas64"):
        pkg_dir = _package_dir(pkg)
        if pkg_dir:
            found += sorted(glob.glob(os.path.join(pkg_dir, "lib", "lib*.so*")))
    seen: set[str] = set()
    return [p for p in found if not (p in seen or seen.add(p))]


class _DlInfo(ctypes.Structure):
    _fields_ = [
        ("dli_fname", ctypes.c_char_p),
        ("dli_fbase", ctypes.c_void_p),
        ("dli_sname", ctypes.c_char_p),
        ("dli_saddr", ctypes.c_void_p),
    ]


def _dladdr():
    for name in (None, "libc.so.6", "libdl.so.2"):
        try:
            fn = ctypes.CDLL(name).dladdr
        except (OSError, AttributeError):
            continue
        fn.argtypes = [ctypes.c_void_p, ctypes.POINTER(_DlInfo)]
        fn.restype = ctypes.c_int
        return fn
    return None


def provider(symbol: str = "cblas_sgemm") -> str | None:
    """Path of the library the global scope resolves ``symbol`` to, or None.

    Before ``import mlx.core`` this is the library ``libmlx.so`` will bind its
    BLAS calls to; None means it will use the netlib BLAS it links against
    (Python loads extension modules and their dependencies with local
    visibility, so that one never shows up here).
    """
    try:
        address = ctypes.cast(getattr(ctypes.CDLL(None), symbol), ctypes.c_void_p).value
    except (AttributeError, OSError):
        return None
    dladdr = _dladdr()
    if not address or dladdr is None:
        return None
    info = _DlInfo()
    if dladdr(address, ctypes.byref(info)) == 0 or not info.dli_fname:
        return None
    return os.path.realpath(os.fsdecode(info.dli_fname))


def _target_call(names: tuple[str, ...], restype, *args):
    """Call the first of ``names`` that the target BLAS exports."""
    if _target is None:
        return None
    for name in names:
        fn = getattr(_target, name, None)
        if fn is None:
            continue
        fn.restype = restype
        try:
            return fn(*args)
        except Exception:  # pragma: no cover - defensive: foreign library
            return None
    return None


def _threads() -> int | None:
    return _target_call(
        (
            "scipy_openblas_get_num_threads64_",
            "openblas_get_num_threads64_",
            "scipy_openblas_get_num_threads",
            "openblas_get_num_threads",
            "MKL_Get_Max_Threads",
        ),
        ctypes.c_int,
    )


def _config() -> str | None:
    raw = _target_call(
        (
            "scipy_openblas_get_config64_",
            "openblas_get_config64_",
            "scipy_openblas_get_config",
            "openblas_get_config",
        ),
        ctypes.c_char_p,
    )
    return raw.decode(errors="replace").strip() if raw else None


def _describe(library: str, config: str | None) -> str:
    base = os.path.basename(library)
    if config and config.lower().startswith("openblas"):
        name = " ".join(config.split()[:2])
    elif "openblas" in base.lower():
        name = "OpenBLAS"
    elif "mkl" in base.lower():
        name = "Intel MKL"
    else:
        name = base
    numpy_dir = _package_dir("numpy")
    if numpy_dir and os.path.dirname(library) in (
        os.path.join(os.path.dirname(numpy_dir), "numpy.libs"),
        os.path.join(numpy_dir, ".libs"),
    ):
        name += " (bundled with numpy)"
    return name


def _fallback(state: dict, reason: str, mode: str) -> dict:
    state["reason"] = reason
    level = logging.WARNING if mode == "on" else logging.DEBUG
    _log.log(
        level,
        "fast CPU BLAS not enabled: %s. MLX keeps its reference BLAS, so fp32 matrix "
        "multiplies are 30-50x slower (set %s=0 to choose this explicitly).",
        reason,
        ENV_SWITCH,
    )
    return state


def _attempt(state: dict, mode: str) -> dict:
    global _shim, _target

    if sys.platform == "darwin":
        state["blas"] = "Apple Accelerate (MLX built-in)"
        state["reason"] = "not needed on macOS: MLX uses Accelerate"
        return state
    if not sys.platform.startswith("linux"):
        state["reason"] = f"only done on Linux, not {sys.platform}"
        return state
    if mode == "off":
        state["reason"] = f"turned off by {ENV_SWITCH}=0"
        _log.debug("fast CPU BLAS %s", state["reason"])
        return state

    shim_path = _shim_path()
    existing = provider("cblas_sgemm")
    # Already ours: the module was reloaded, or the shim was LD_PRELOADed.
    ours = existing is not None and shim_path is not None and existing == os.path.realpath(shim_path)
    if existing is not None and not ours:
        # LD_PRELOAD (or an earlier RTLD_GLOBAL load) already chose a BLAS for MLX:
        # respect that choice; it is not a slow fallback, so no warning.
        state["blas"] = os.path.basename(existing)
        state["library"] = existing
        state["reason"] = (
            f"cblas_sgemm is already provided by {existing} (LD_PRELOAD?); MLX will use that"
        )
        _log.debug("fast CPU BLAS route not set up: %s", state["reason"])
        return state
    if "mlx.core" in sys.modules and not ours:
        return _fallback(
            state,
            "mlx.core was imported before phiflash_mlx, and MLX's BLAS is fixed when "
            "mlx.core loads (import phiflash_mlx first)",
            mode,
        )

    if shim_path is None:
        return _fallback(
            state,
            "the BLAS shim was not compiled at install time (reinstall with a C "
            "compiler available: pip install -e . or pip install .)",
            mode,
        )
    state["shim"] = shim_path
    try:
        shim = ctypes.CDLL(shim_path, mode=os.RTLD_LOCAL)
    except OSError as exc:
        return _fallback(state, f"cannot load the BLAS shim {shim_path}: {exc}", mode)
    shim.phiflash_blas_init.argtypes = [ctypes.c_char_p]
    shim.phiflash_blas_init.restype = ctypes.c_int
    shim.phiflash_blas_error.restype = ctypes.c_char_p
    shim.phiflash_blas_symbol.restype = ctypes.c_char_p
    shim.phiflash_blas_calls.restype = ctypes.c_ulonglong

    candidates = _candidate_libraries()
    if not candidates:
        return _fallback(
            state,
            f"found no OpenBLAS in the numpy installation (set {ENV_LIBRARY} to a BLAS library)",
            mode,
        )
    errors = []
    library = None
    for path in candidates:
        if shim.phiflash_blas_init(os.fsencode(path)) == 0:
            library = path
            break
        errors.append(shim.phiflash_blas_error().decode(errors="replace"))
    if library is None:
        return _fallback(state, "; ".join(errors), mode)

    # Export cblas_*gemm to everything loaded from now on, libmlx.so included.
    try:
        ctypes.CDLL(shim_path, mode=os.RTLD_GLOBAL | getattr(os, "RTLD_NOLOAD", 4))
    except OSError as exc:  # pragma: no cover - glibc always allows this
        return _fallback(state, f"cannot give the BLAS shim global visibility: {exc}", mode)
    _shim = shim
    try:
        _target = ctypes.CDLL(library, mode=os.RTLD_LOCAL)
    except OSError:  # pragma: no cover - the shim just opened it
        _target = None

    bound = provider("cblas_sgemm")
    if bound is not None and bound != os.path.realpath(shim_path):  # pragma: no cover
        return _fallback(state, f"cblas_sgemm still resolves to {bound}", mode)

    config = _config()
    state.update(
        active=True,
        blas=_describe(library, config),
        library=os.path.realpath(library),
        symbol=shim.phiflash_blas_symbol().decode(),
        ilp64=bool(shim.phiflash_blas_ilp64()),
        config=config,
        reason=None,
    )
    _log.debug("MLX CPU GEMMs go to %s (%s) through %s", state["blas"], library, shim_path)
    return state


def enable() -> dict:
    """Set up the fast BLAS route once per process; return :func:`blas_info`.

    Safe to call more than once and never raises.
    """
    global _state
    if _state is None:
        mode = _mode()
        state = {
            "active": False,
            "blas": MLX_BUILTIN,
            "library": None,
            "shim": None,
            "symbol": None,
            "ilp64": None,
            "config": None,
            "mode": mode,
            "reason": None,
        }
        try:
            _state = _attempt(state, mode)
        except Exception as exc:  # pragma: no cover - must never break the import
            _state = _fallback(state, f"unexpected error: {exc!r}", mode)
    return blas_info()


def blas_info() -> dict:
    """Which BLAS MLX's CPU GEMMs use in this process.

    Keys: ``active`` (bool, the fast route is in place), ``blas`` (a name),
    ``library`` (path of the BLAS, or None for MLX's own), ``shim`` (path of
    the compiled shim), ``symbol`` (the routine sgemm is forwarded to),
    ``ilp64`` (it takes 64-bit integers), ``config`` (OpenBLAS build string),
    ``threads`` (BLAS threads), ``calls`` (GEMM calls forwarded so far),
    ``mode`` (from ``PHIFLASH_CPU_BLAS``) and ``reason`` (why the fast route is
    not active, else None).
    """
    if _state is None:
        return enable()
    info = dict(_state)
    info["threads"] = _threads() if info["active"] else None
    info["calls"] = int(_shim.phiflash_blas_calls()) if (_shim is not None and info["active"]) else None
    return info
