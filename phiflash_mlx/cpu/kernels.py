"""CPU kernels for decoding (and the prefill path of quantized layers).

Without Metal, MLX is slow at the two things a decode step does: its CPU `quantized_matmul` is
single-threaded and compute-bound (about 0.9 G weights/s on the 2-core x86 build machine), and its
`scaled_dot_product_attention` copies the sliced K/V cache on every call. So on CPUs:

* **Quantized layers** (matrices of at least KERNEL_MIN_WEIGHTS weights, 2/4/8 bits): our C library
  `csrc/cpu_kernels.c` reads the packed codes directly. A few rows (decode): `phf_qmatvec`, one
  pass over the codes per 16 rows. Blocks of BLOCK_ROWS or more (prefill): `phf_qmatmul`, the weight
  dequantized a cache-sized tile at a time and multiplied register-blocked, so a prompt's time grows
  with its length instead of paying for rewriting every matrix in float32 first. By default 4- and
  8-bit products quantize the activations to int8 per group and use integer dot products
  (`csrc/q8.c`, as llama.cpp does): they read the weights at close to memory bandwidth, at the cost of
  a small, measured error (README). `PHIFLASH_CPU_INT8=0` keeps exact float32 activations.
* **Other quantized layers, blocks of many tokens**: dequantize once and one float32 GEMM through
  BLAS (the routed OpenBLAS on Linux, Accelerate on macOS).
* **Differential attention, a few queries**: `phf_attend` computes both stripes' attention reading
  the shared K/V cache once, in place (`attend_few`, installed on the model's attention layers).

The library is compiled by setup.py into `_cpu_kernels*.so` (Linux), loaded with ctypes, uses
AVX2+FMA where the CPU has it and portable C elsewhere, and runs on a persistent pool of threads.
Arrays cross to NumPy without copies of weights or caches. Everything computes the same math as
the MLX ops it replaces; tests compare them. `PHIFLASH_CPU_KERNELS=0` turns the C kernels off;
`PHIFLASH_CPU_THREADS=N` sets their threads (default: the CPUs this process may use, at most 8);
`PHIFLASH_CPU_INT8=0` gives 4- and 8-bit products float32 activations (`set_int8` from Python).
"""

from __future__ import annotations

import ctypes
import logging
import os

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .blas import library_path  # noqa: F401  (re-exported for tests)

# Where the C kernels do not apply (small matrices, other modes): dequantize + GEMM from this many rows
# on (crossover measured between 8 and 32 tokens at 3072 x 8192), MLX's quantized_matmul below.
MIN_TOKENS = 16

ENV_SWITCH = "PHIFLASH_CPU_KERNELS"
ENV_THREADS = "PHIFLASH_CPU_THREADS"
ENV_INT8 = "PHIFLASH_CPU_INT8"
# Bit widths whose products use int8 activations while that is on (2 bits keeps float activations).
INT8_BITS = (4, 8)
Q8_LEVELS = ("portable C", "avx2", "avx512-vnni")
KERNEL_BITS = (2, 4, 8)
# From this many rows on, `phf_qmatmul` (weight dequantized a cache-sized tile at a time, register-
# blocked product) instead of `phf_qmatvec` (one pass over the packed codes per 16 rows). Measured at
# 20480 x 2560, 4-bit g64, 2 threads: 8 rows 44 vs 66 ms, 16 rows 99 vs 71 ms; dequantize + GEMM,
# what blocks used before, took 504 ms at 16 rows and 1054 ms at 512 (qmatmul: 796 ms).
BLOCK_ROWS = 12
# Each kernel call first evaluates its (lazy) input, a round trip to MLX's scheduler of ~0.15 ms here,
# so small matrices stay with quantized_matmul. Measured per call (one thread, 4-bit, group 64):
# 512 x 512: 0.31 ms MLX vs 0.23 ms ours; 1024 x 1024: 1.14 vs 0.18; 4096 x 4096: 20.8 vs 1.35.
KERNEL_MIN_WEIGHTS = 1 << 17

_log = logging.getLogger("phiflash_mlx.cpu_kernels")
_lib: ctypes.CDLL | None = None
_lib_tried = False
_int8: bool | None = None          # set_int8's choice; None: the environment's


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in {"0", "off", "false", "no"}


def int8_enabled() -> bool:
    """Whether 4- and 8-bit products quantize their activations to int8: set_int8's choice, else
    PHIFLASH_CPU_INT8 (on unless 0/off/false/no)."""
    if _int8 is not None:
        return _int8
    return os.environ.get(ENV_INT8, "").strip().lower() not in {"0", "off", "false", "no"}


def set_int8(on: bool | None) -> bool:
    """Turn int8 activations on or off for the C products from now on (None: back to the environment's
    choice); returns the previous setting. Takes effect for the next call, also for products called
    from other C kernels."""
    global _int8
    previous = int8_enabled()
    _int8 = None if on is None else bool(on)
    if _lib is not None:
        _lib.phf_set_q8(int(int8_enabled()))
    return previous


def _library() -> ctypes.CDLL | None:
    """The C kernels' library, or None where it was not built or is switched off."""
    global _lib, _lib_tried
    if _lib_tried:
        return _lib
    _lib_tried = True
    if _switched_off():
        return None
    path = library_path("_cpu_kernels")
    if path is None:
        _log.debug("the CPU kernels were not built; using MLX's own ops")
        return None
    try:
        lib = ctypes.CDLL(path)
    except OSError as exc:
        _log.debug("cannot load %s (%s); using MLX's own ops", path, exc)
        return None
    ptr, lng, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
    try:
        lib.phf_qmatvec.argtypes = [ptr, lng, lng, ptr, ptr, ptr, lng, i32, i32, ptr, i32, i32]
        lib.phf_qmatvec.restype = i32
        lib.phf_qmatmul.argtypes = lib.phf_qmatvec.argtypes
        lib.phf_qmatmul.restype = i32
        lib.phf_attend.argtypes = [ptr, lng, lng, ptr, lng, lng, lng, lng, ptr, lng, lng, lng, ptr, lng, lng,
                                   ptr, lng, lng, lng, lng, lng, lng, lng, i32, i32]
        lib.phf_attend.restype = i32
        lib.phf_ssm_scan.argtypes = [ptr] * 10 + [lng] * 5 + [i32]
        lib.phf_ssm_scan.restype = i32
        lib.phf_simd.restype = i32
        lib.phf_q8_matmul.argtypes = lib.phf_qmatvec.argtypes
        lib.phf_q8_matmul.restype = i32
        lib.phf_set_q8.argtypes = [i32]
        lib.phf_set_q8.restype = None
        lib.phf_q8.restype = i32
        lib.phf_q8_level.restype = i32
    except AttributeError as exc:             # built from older sources: rebuild to get every kernel
        _log.warning("%s is out of date (%s); using MLX's own ops. Rebuild it: python setup.py build_ext "
                     "--inplace (or pip install -e .)", path, exc)
        return None
    lib.phf_set_q8(int(int8_enabled()))
    _lib = lib
    return lib


# Default ceiling on threads: the decode products are bound by memory bandwidth, which a few cores
# saturate, and idle workers spin briefly between calls. (Measured only on 2 cores; raise it with
# PHIFLASH_CPU_THREADS on a bigger machine and compare.)
DEFAULT_MAX_THREADS = 8


def threads() -> int:
    """Threads the C kernels use: PHIFLASH_CPU_THREADS, else the CPUs this process may run on (at most
    DEFAULT_MAX_THREADS)."""
    raw = os.environ.get(ENV_THREADS, "").strip()
    if raw:
        try:
            return max(1, int(raw))
        except ValueError:
            _log.warning("%s=%r is not a whole number; using the default", ENV_THREADS, raw)
    try:
        cpus = len(os.sched_getaffinity(0))
    except AttributeError:
        cpus = os.cpu_count() or 1
    return max(1, min(cpus, DEFAULT_MAX_THREADS))


def kernel_info() -> dict:
    """What the C kernels do in this process (for `phiflash info` and benchmarks)."""
    lib = _library()
    if lib is None:
        if _switched_off():
            return {"active": False, "reason": f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"}
        return {"active": False, "reason": "not built (Linux only; compiled by pip install)"}
    return {"active": True, "simd": "avx2+fma" if lib.phf_simd() else "portable C", "threads": threads(),
            "int8_activations": bool(lib.phf_q8()), "int8_simd": Q8_LEVELS[lib.phf_q8_level()]}


def _as_float32(a: mx.array) -> np.ndarray:
    if a.dtype != mx.float32:
        a = a.astype(mx.float32)
    mx.eval(a)
    return np.ascontiguousarray(np.asarray(a))


class _Packed:
    """NumPy views of one quantized weight, made once (the uint32 codes are not copied)."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array):
        mx.eval(weight, scales, biases)
        self.source = weight                    # identity check: the views follow the module's arrays
        self.w = np.asarray(weight)
        if not self.w.flags["C_CONTIGUOUS"]:
            self.w = np.ascontiguousarray(self.w)
        self.scales = _as_float32(scales)
        self.biases = _as_float32(biases)


def qmatvec(x: mx.array, weight: mx.array, scales: mx.array, biases: mx.array, group_size: int, bits: int,
            packed: _Packed | None = None, simd: bool = True, n_threads: int | None = None,
            block: bool | None = None) -> mx.array:
    """x @ dequantize(weight, scales, biases).T with the C kernel (MLX affine layout), float32.
    `block`: True / False forces `phf_qmatmul` / `phf_qmatvec` (tests); None picks by the row count.

    Falls back to `mx.quantized_matmul` where the kernel is unavailable or does not cover the case."""
    def slow(x):
        return mx.quantized_matmul(x, weight, scales, biases, transpose=True, group_size=group_size, bits=bits)

    lib = _library()
    if lib is None or bits not in KERNEL_BITS or group_size % 32:
        return slow(x)
    return _host_call(lambda x: _qmatvec_c(lib, x, weight, scales, biases, group_size, bits, packed, simd,
                                           n_threads, block), slow, x)


def _qmatvec_c(lib, x, weight, scales, biases, group_size, bits, packed, simd, n_threads, block=None):
    if packed is None or packed.source is not weight:
        packed = _Packed(weight, scales, biases)
    k = x.shape[-1]
    n = packed.w.shape[0]
    xs = _as_float32(x.reshape(-1, k))
    m = xs.shape[0]
    y = np.empty((m, n), dtype=np.float32)
    fn = lib.phf_qmatmul if (m >= BLOCK_ROWS if block is None else block) else lib.phf_qmatvec
    rc = fn(xs.ctypes.data, m, k, packed.w.ctypes.data, packed.scales.ctypes.data,
                         packed.biases.ctypes.data, n, bits, group_size, y.ctypes.data,
                         n_threads or threads(), int(simd))
    if rc != 0:
        return None
    out = mx.array(y).reshape(*x.shape[:-1], n)
    return out if x.dtype == mx.float32 else out.astype(x.dtype)


def _kernel_applies(module) -> bool:
    w = module["weight"]
    return (getattr(module, "mode", "affine") == "affine" and module.bits in KERNEL_BITS and "biases" in module
            and w.shape[0] * w.shape[1] * 32 // module.bits >= KERNEL_MIN_WEIGHTS)


def _packed(module) -> _Packed:
    cached = module.__dict__.get("_phf_packed")
    if cached is None or cached.source is not module["weight"]:
        cached = _Packed(module["weight"], module["scales"], module["biases"])
        module.__dict__["_phf_packed"] = cached
    return cached


def _cpu_product(module, x: mx.array) -> mx.array | None:
    """x @ W.T for a quantized module's W (no bias): the C kernels where they apply (any number of rows:
    `phf_qmatvec` for a few, `phf_qmatmul` for blocks), else dequantize + GEMM for blocks of at least
    MIN_TOKENS rows; None where neither applies (use mx.quantized_matmul)."""
    if _library() is not None and _kernel_applies(module):
        return qmatvec(x, module["weight"], module["scales"], module["biases"], module.group_size, module.bits,
                       packed=_packed(module))
    rows = x.size // x.shape[-1]
    if rows >= MIN_TOKENS:
        w = mx.dequantize(module["weight"], module["scales"], module.get("biases"), group_size=module.group_size,
                          bits=module.bits, mode=module.mode)
        return x @ w.astype(x.dtype).T
    return None


class CPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear for CPUs: the paths of `_cpu_product`, mx.quantized_matmul where neither applies."""

    def __call__(self, x):
        y = _cpu_product(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (`as_linear`) uses the same CPU paths."""

    def as_linear(self, x):
        y = _cpu_product(self, x)
        return super().as_linear(x) if y is None else y


def _host_call(fast, slow, *arrays):
    """`fast(*arrays)`, a C kernel reached through NumPy (a round trip to the host), where that is
    possible and meaningful; `slow(*arrays)`, the same math in MLX ops, elsewhere: inside mx.compile
    or vmap (where MLX refuses to evaluate) `slow` runs, and gradients always come from `slow`, since
    an array made from NumPy carries none. `fast` may return None to leave it to `slow`."""

    @mx.custom_function
    def call(*xs):
        try:
            out = fast(*xs)
        except ValueError:  # "Attempting to eval an array during function transformations"
            out = None
        return slow(*xs) if out is None else out

    @call.vjp
    def call_vjp(primals, cotangents, outputs):
        single = isinstance(primals, mx.array)           # one input: MLX passes it bare
        cot = list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        grads = mx.vjp(slow, [primals] if single else list(primals), cot)[1]
        return grads[0] if single else tuple(grads)

    return call(*arrays)


def _strides(a: np.ndarray) -> tuple[int, ...]:
    return tuple(st // a.itemsize for st in a.strides)


def attend_few(q: mx.array, keys: mx.array, values: mx.array, mask: mx.array | None, scale: float,
               simd: bool = True, n_threads: int | None = None):
    """Both stripes of differential attention for a few queries, with the C kernel: the same result
    as ``DiffAttention._core`` of the model (``DiffAttention.few_query_kernel``), reading the cache
    where it lies.

    q (b, nh, l, hd) in natural head order; keys, values (b, nkv/2, s, 2hd) in the pair layout (pair
    j = KV heads 2j and 2j+1 side by side; stripe 1 uses the first hd columns of the keys, stripe 2
    the last); mask None or bool, broadcastable to (b, 1, l, s). Returns (attn1, attn2), each
    (b, nh/2, l, 2hd), or None where the kernel does not apply (not built, not float32, unexpected
    strides): the caller then computes it with MLX ops."""
    lib = _library()
    if lib is None or any(x.dtype != mx.float32 for x in (q, keys, values)):
        return None
    b, nh, l, hd = q.shape
    half, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    hs = nh // 2
    if nh % 2 or hs % half or keys.shape[-1] != 2 * hd or values.shape[1] != half:
        return None

    def slow(q, keys, values):                                   # MLX's attention, stripe by stripe
        sdpa = mx.fast.scaled_dot_product_attention
        return (sdpa(q[:, 0::2], keys[..., :hd], values, scale=scale, mask=mask),
                sdpa(q[:, 1::2], keys[..., hd:], values, scale=scale, mask=mask))

    def fast(q, keys, values):
        return _attend_c(lib, q, keys, values, mask, scale, simd, n_threads)

    return _host_call(fast, slow, q, keys, values)


def _attend_c(lib, q, keys, values, mask, scale, simd, n_threads):
    b, nh, l, hd = q.shape
    half, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    hs = nh // 2
    r = hs // half * l
    q1, q2 = q[:, 0::2], q[:, 1::2]
    qa = mx.concatenate([q1.reshape(b, half, r, hd), q2.reshape(b, half, r, hd)], axis=1) * scale
    arrays = [qa, keys, values]
    if mask is not None:
        arrays.append(mx.where(mask, 0.0, -1e30).astype(mx.float32))
    mx.eval(*arrays)
    qn, kn, vn = np.ascontiguousarray(np.asarray(qa)), np.asarray(keys), np.asarray(values)
    if kn.strides[-1] != kn.itemsize or vn.strides[-1] != vn.itemsize:
        return None
    bias_ptr, bias_bs, bias_ls = None, 0, s
    if mask is not None:                                   # (l, s), or (b or 1, 1, l, s)
        bn = np.ascontiguousarray(np.broadcast_to(np.asarray(arrays[3]), (*arrays[3].shape[:-2], l, s)))
        bias_ptr = bn.ctypes.data
        bias_bs = l * s if bn.ndim == 4 and bn.shape[0] > 1 else 0
    ks, vs = _strides(kn), _strides(vn)
    out = np.empty((b, half, 2 * r, dv), dtype=np.float32)
    rc = lib.phf_attend(qn.ctypes.data, 2 * half * r * hd, r * hd, kn.ctypes.data, ks[0], ks[1], hd, ks[2],
                        vn.ctypes.data, vs[0], vs[1], vs[2], bias_ptr, bias_bs, bias_ls, out.ctypes.data,
                        b, 2 * half, r, l, hd, dv, s, n_threads or threads(), int(simd))
    if rc != 0:
        return None
    both = mx.array(out)
    return both[:, :, :r].reshape(b, hs, l, dv), both[:, :, r:].reshape(b, hs, l, dv)


def ssm_scan(u: mx.array, dbc: mx.array, z: mx.array | None, w_dt: mx.array, b_dt: mx.array | None,
             A_log: mx.array, D: mx.array, state: mx.array | None, n_threads: int | None = None):
    """The Mamba selective scan after x_proj, with the C kernel (`phf_ssm_scan`): dt_proj, softplus, the
    state update, the output with D*u and, where z is given, the SiLU(z) gate, token by token. u, z
    (b, l, Di); dbc (b, l, R + 2N) = x_proj's output [dt | B | C]; w_dt (Di, R), b_dt (Di,) or None;
    A_log (Di, N); D (Di,); state (b, Di, N) or None (zeros). Returns (y (b, l, Di), final state),
    float32 — the same as dt_proj followed by the model's `selective_scan` ops, which run instead where
    the kernel cannot (and give the gradients)."""
    from ..models.phi4flash_kernels import selective_scan_ops

    b, l, Di = u.shape
    R = w_dt.shape[1]
    N = A_log.shape[1]
    if state is None:
        state = mx.zeros((b, Di, N), dtype=mx.float32)
    arrays = {"u": u, "dbc": dbc, "z": z, "w": w_dt, "bias": b_dt, "A_log": A_log, "D": D, "state": state}
    names = [k for k, v in arrays.items() if v is not None]

    def slow(*xs):
        g = dict(zip(names, xs))
        delta = g["dbc"][..., :R] @ g["w"].T
        if "bias" in g:
            delta = delta + g["bias"]
        A = -mx.exp(g["A_log"].astype(mx.float32))
        y, s = selective_scan_ops(g["u"], delta, A, g["dbc"][..., R:R + N], g["dbc"][..., R + N:], g["D"], g.get("z"),
                                  None, g["state"])
        return y.astype(mx.float32), s

    lib = _library()
    if lib is None:
        return slow(*(arrays[k] for k in names))

    def fast(*xs):
        g = dict(zip(names, xs))
        g["A"] = -mx.exp(g.pop("A_log").astype(mx.float32))
        g = {k: (v if v.dtype == mx.float32 else v.astype(mx.float32)) for k, v in g.items()}
        mx.eval(*g.values())
        n = {k: np.ascontiguousarray(np.asarray(v)) for k, v in g.items()}
        y = np.empty((b, l, Di), dtype=np.float32)
        s_out = np.empty((b, Di, N), dtype=np.float32)
        ptr = lambda k: n[k].ctypes.data if k in n else None  # noqa: E731
        rc = lib.phf_ssm_scan(ptr("u"), ptr("dbc"), ptr("z"), ptr("w"), ptr("bias"), ptr("A"), ptr("D"), ptr("state"),
                              y.ctypes.data, s_out.ctypes.data, b, l, Di, R, N, n_threads or threads())
        if rc != 0:
            return None
        return mx.array(y), mx.array(s_out)

    return _host_call(fast, slow, *(arrays[k] for k in names))


def ssm_step(u, dbc, z, w_dt, b_dt, A_log, D, state, n_threads=None):
    """`ssm_scan` for one token: u, z (b, Di); dbc (b, R + 2N). Returns (y (b, Di), new state)."""
    y, s = ssm_scan(u[:, None], dbc[:, None], None if z is None else z[:, None], w_dt, b_dt, A_log, D, state,
                    n_threads)
    return y[:, 0], s


def _mamba_scan_applies(mixer, a, mask, cache) -> bool:
    names = ("in_proj", "x_proj", "dt_proj", "out_proj", "A_log", "D", "_conv", "d_inner", "dt_rank", "d_state",
             "produces_memory")
    if mask is not None or not all(hasattr(mixer, n) for n in names):
        return False
    if cache is not None and getattr(cache, "lengths", None) is not None:
        return False
    dt = mixer.dt_proj
    return (type(dt) is nn.Linear and dt["weight"].shape == (mixer.d_inner, mixer.dt_rank)
            and mixer.d_state <= 256)


def _depthwise_conv(mixer, x, cache):
    """The mixer's causal depthwise convolution + SiLU (the model's `_conv` without a padding mask)
    as K shifted multiply-adds. MLX's CPU conv1d runs a depthwise convolution as one BLAS GEMM per
    channel (5120 calls per layer and token here), which also wakes OpenBLAS's threads to compete
    with the kernels' own; this reads the same weights and updates the cache the same way."""
    conv = getattr(mixer, "conv1d", None)
    K = getattr(mixer, "d_conv", None)
    w = None if conv is None else conv.get("weight")
    if w is None or K is None or w.shape != (x.shape[-1], K, 1):
        return mixer._conv(x, None, cache)
    keep = K - 1
    b, l, Di = x.shape
    past = None if cache is None else cache[0]
    if past is None:
        past = mx.zeros((b, keep, Di), dtype=x.dtype)
    window = mx.concatenate([past.astype(x.dtype), x], axis=1)               # (b, K-1+l, Di)
    if cache is not None:
        cache[0] = window[:, window.shape[1] - keep:]
    taps = w[:, :, 0].T.astype(x.dtype)                                    # (K, Di)
    out = window[:, 0:l] * taps[0]
    for k in range(1, K):
        out = out + window[:, k:k + l] * taps[k]
    if "bias" in conv:
        out = out + conv["bias"].astype(x.dtype)
    return nn.silu(out)


def _cpu_mamba_call(self, a, mask=None, cache=None):
    """Mamba.__call__ for CPUs: dt_proj and the selective scan (decode steps and prompts alike) run as
    one C call (`ssm_scan`); everything else is the model's own code."""
    if not _mamba_scan_applies(self, a, mask, cache):
        return super(type(self), self).__call__(a, mask, cache)
    from ..models.phi4flash_kernels import gmu_gate

    Di = self.d_inner
    xz = self.in_proj(a)
    x, z = xz[..., :Di], xz[..., Di:]
    u = _depthwise_conv(self, x, cache)
    dbc = self.x_proj(u)
    dt = self.dt_proj
    y, state = ssm_scan(u, dbc, None if self.produces_memory else z, dt["weight"], dt.get("bias"), self.A_log,
                        self.D, None if cache is None else cache[1])
    if cache is not None:
        cache[1] = state
        cache.advance(a.shape[1])
    y = y.astype(a.dtype)
    memory = None
    if self.produces_memory:
        memory = y
        y = gmu_gate(z, memory)
    return self.out_proj(y), memory


def _np_product(lib, module, xs: np.ndarray) -> np.ndarray | None:
    """xs (m, k) contiguous float32 @ W.T of a quantized module, host to host (no MLX round trip)."""
    packed = _packed(module)
    m, k = xs.shape
    n = packed.w.shape[0]
    y = np.empty((m, n), dtype=np.float32)
    fn = lib.phf_qmatmul if m >= BLOCK_ROWS else lib.phf_qmatvec
    rc = fn(xs.ctypes.data, m, k, packed.w.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data, n,
            module.bits, module.group_size, y.ctypes.data, threads(), 1)
    return None if rc != 0 else y


def _np_silu(g: np.ndarray) -> np.ndarray:
    return g / (1.0 + np.exp(-g))


def _gated_pair_applies(first, second, x) -> bool:
    """Both products of a gated block on the C kernels for a few rows (a decode step)."""
    ok = all(type(m) is CPUQuantizedLinear and _kernel_applies(m) and "bias" not in m for m in (first, second))
    return ok and x.size // x.shape[-1] < BLOCK_ROWS and _library() is not None


def _cpu_mlp_call(self, x):
    """MLP.__call__ for CPUs: a decode step runs fc1, SiLU(gate) * value and fc2 in one host call
    (one evaluation instead of two, no MLX element-wise ops in between); the model's code elsewhere."""
    if not (hasattr(self, "fc1") and hasattr(self, "fc2") and _gated_pair_applies(self.fc1, self.fc2, x)):
        return super(type(self), self).__call__(x)
    lib = _library()
    fc1, fc2 = self.fc1, self.fc2

    def slow(x):
        gate, value = mx.split(nn.QuantizedLinear.__call__(fc1, x), 2, axis=-1)
        return nn.QuantizedLinear.__call__(fc2, nn.silu(gate) * value)

    def fast(x):
        xs = _as_float32(x.reshape(-1, x.shape[-1]))
        h = _np_product(lib, fc1, xs)
        if h is None:
            return None
        half = h.shape[-1] // 2
        y = _np_product(lib, fc2, np.ascontiguousarray(_np_silu(h[:, :half]) * h[:, half:], dtype=np.float32))
        if y is None:
            return None
        out = mx.array(y).reshape(*x.shape[:-1], y.shape[-1])
        return out if x.dtype == mx.float32 else out.astype(x.dtype)

    return _host_call(fast, slow, x)


def _cpu_gmu_call(self, a, memory):
    """GatedMemoryUnit.__call__ for CPUs: in_proj, SiLU(.) * memory and out_proj in one host call for a
    decode step."""
    if not (hasattr(self, "in_proj") and hasattr(self, "out_proj") and memory is not None
            and memory.shape[:-1] == a.shape[:-1] and _gated_pair_applies(self.in_proj, self.out_proj, a)):
        return super(type(self), self).__call__(a, memory)
    lib = _library()
    inp, outp = self.in_proj, self.out_proj

    def slow(a, memory):
        g = nn.QuantizedLinear.__call__(inp, a)
        return nn.QuantizedLinear.__call__(outp, (nn.silu(g) * memory).astype(a.dtype))

    def fast(a, memory):
        xs = _as_float32(a.reshape(-1, a.shape[-1]))
        mem = _as_float32(memory.reshape(-1, memory.shape[-1]))
        g = _np_product(lib, inp, xs)
        if g is None or g.shape != mem.shape:
            return None
        y = _np_product(lib, outp, np.ascontiguousarray(_np_silu(g) * mem, dtype=np.float32))
        if y is None:
            return None
        out = mx.array(y).reshape(*a.shape[:-1], y.shape[-1])
        return out if a.dtype == mx.float32 else out.astype(a.dtype)

    return _host_call(fast, slow, a, memory)


_CPU_CLASSES: dict = {}


def _cpu_subclass(cls, call):
    """A subclass of `cls` whose __call__ is `call` (made once per class), so only the modules it is
    given to change and the model file stays the plain MLX implementation."""
    sub = _CPU_CLASSES.get(cls)
    if sub is None:
        sub = type("CPU" + cls.__name__, (cls,), {"__call__": call})
        _CPU_CLASSES[cls] = sub
    return sub


def use_cpu_kernels(model: nn.Module) -> int:
    """Switch every QuantizedLinear / QuantizedEmbedding of `model` (ours or any mlx-lm model) to the
    CPU versions above, and give our differential-attention layers the few-query attention kernel;
    returns how many modules changed."""
    from ..models.phi4flash import MLP, GatedMemoryUnit, Mamba

    count = 0
    for _, module in model.named_modules():
        if hasattr(module, "few_query_kernel") and _library() is not None:
            module.few_query_kernel = attend_few
            count += 1
        if type(module) is Mamba and _library() is not None:
            module.__class__ = _cpu_subclass(type(module), _cpu_mamba_call)
            count += 1
        elif type(module) is MLP and _library() is not None:
            module.__class__ = _cpu_subclass(type(module), _cpu_mlp_call)
            count += 1
        elif type(module) is GatedMemoryUnit and _library() is not None:
            module.__class__ = _cpu_subclass(type(module), _cpu_gmu_call)
            count += 1
        if type(module) is nn.QuantizedLinear:
            module.__class__ = CPUQuantizedLinear
            count += 1
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CPUQuantizedEmbedding
            count += 1
    return count
