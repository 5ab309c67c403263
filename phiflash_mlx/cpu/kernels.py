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
* **16-bit shared K/V**: the full-attention layer's cache, read by it and every cross layer at each
  step, stores float16 keys and values (cast when written); the attention kernels widen them as they
  read (F16C where the CPU has it), halving the bytes of the largest long-context cost of a decode
  step. `PHIFLASH_CPU_KV16=0` keeps float32 caches (`set_kv16` from Python).

The library is compiled by setup.py into `_cpu_kernels*.so` (Linux), loaded with ctypes, uses
AVX2+FMA where the CPU has it and portable C elsewhere, and runs on a persistent pool of threads.
Arrays cross to NumPy without copies of weights or caches. Everything computes the same math as
the MLX ops it replaces; tests compare them. `PHIFLASH_CPU_KERNELS=0` turns the C kernels off;
`PHIFLASH_CPU_THREADS=N` sets their threads (default: the CPUs this process may use, at most 8);
`PHIFLASH_CPU_INT8=0` gives 4- and 8-bit products float32 activations (`set_int8` from Python);
`PHIFLASH_CPU_KV16=0` keeps the shared full-attention K/V cache in float32 (`set_kv16`).
"""

from __future__ import annotations

import contextlib
import ctypes
import logging
import os
import threading
import time

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
ENV_KV16 = "PHIFLASH_CPU_KV16"
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
_kv16: bool | None = None          # set_kv16's choice; None: the environment's


def _switched_off() -> bool:
    return os.environ.get(ENV_SWITCH, "").strip().lower() in {"0", "off", "false", "no"}


def int8_enabled() -> bool:
    """Whether 4- and 8-bit products quantize their activations to int8: set_int8's choice, else
    PHIFLASH_CPU_INT8 (on unless 0/off/false/no)."""
    if _int8 is not None:
        return _int8
    return os.environ.get(ENV_INT8, "").strip().lower() not in {"0", "off", "false", "no"}


def set_int8(on: bool | None) -> bool | None:
    """Turn int8 activations on or off for the C products from now on (None: follow PHIFLASH_CPU_INT8
    again); returns the previous choice (None where it followed the environment), so
    `set_int8(previous)` restores it. Takes effect for the next call, also for products called from
    other C kernels."""
    global _int8
    previous = _int8
    _int8 = None if on is None else bool(on)
    if _lib is not None:
        _sync_int8(_lib)
    return previous


def kv16_enabled() -> bool:
    """Whether the full-attention layer's K/V cache (the one the cross layers share) stores float16
    where the CPU kernels are attached: set_kv16's choice, else PHIFLASH_CPU_KV16 (on unless
    0/off/false/no)."""
    if _kv16 is not None:
        return _kv16
    return os.environ.get(ENV_KV16, "").strip().lower() not in {"0", "off", "false", "no"}


def set_kv16(on: bool | None) -> bool | None:
    """Store the shared full-attention K/V in float16 (True) or float32 (False) from the next write on
    (None: follow PHIFLASH_CPU_KV16 again); returns the previous choice (None where it followed the
    environment), so `set_kv16(previous)` restores it. Rows already in a cache keep their dtype until
    the cache is rebuilt; a float32 cache that receives float16 rows stays float32."""
    global _kv16
    previous = _kv16
    _kv16 = None if on is None else bool(on)
    return previous


_lib_int8: bool | None = None      # what the loaded library was last told


def _sync_int8(lib) -> None:
    global _lib_int8
    want = int8_enabled()
    if want != _lib_int8:
        lib.phf_set_q8(int(want))
        _lib_int8 = want


def _library() -> ctypes.CDLL | None:
    """The C kernels' library, or None where it was not built or is switched off."""
    global _lib, _lib_tried
    if _lib_tried:
        if _lib is not None:
            _sync_int8(_lib)        # PHIFLASH_CPU_INT8 may have changed (tests set it per test)
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
                                   ptr, lng, lng, lng, lng, lng, lng, lng, i32, i32, i32]
        lib.phf_attend.restype = i32
        lib.phf_kv16.restype = i32                # (the attention kernels take the K/V dtype code)
        lib.phf_f16c.restype = i32
        lib.phf_ssm_scan.argtypes = [ptr] * 10 + [lng] * 5 + [i32]
        lib.phf_ssm_scan.restype = i32
        lib.phf_simd.restype = i32
        lib.phf_q8_matmul.argtypes = lib.phf_qmatvec.argtypes
        lib.phf_q8_matmul.restype = i32
        # the same products with scales and biases of a dtype code (SD_*) after the biases pointer
        for name in ("phf_qmatvec_sd", "phf_qmatmul_sd", "phf_q8_matmul_sd", "phf_q8_gemm_sd"):
            getattr(lib, name).argtypes = [ptr, lng, lng, ptr, ptr, ptr, i32, lng, i32, i32, ptr, i32, i32]
            getattr(lib, name).restype = i32
        lib.phf_set_q8.argtypes = [i32]
        lib.phf_set_q8.restype = None
        lib.phf_q8.restype = i32
        lib.phf_q8_level.restype = i32
        lib.phf_q8_gemm.argtypes = lib.phf_qmatvec.argtypes
        lib.phf_q8_gemm.restype = i32
        lib.phf_set_q8_gemm_rows.argtypes = [i32]
        lib.phf_set_q8_gemm_rows.restype = i32
        lib.phf_silu_mul_rows.argtypes = [ptr, lng, ptr, lng, ptr, lng, lng, lng, i32]
        lib.phf_silu_mul_rows.restype = i32
    except AttributeError as exc:             # built from older sources: rebuild to get every kernel
        _log.warning("%s is out of date (%s); using MLX's own ops. Rebuild it: python setup.py build_ext "
                     "--inplace (or pip install -e .)", path, exc)
        return None
    _sync_int8(lib)
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
    return max(1, min(_usable_cpus(), DEFAULT_MAX_THREADS))


_cpus_seen = (0.0, 1)    # (when, how many CPUs this process may run on)


def _usable_cpus() -> int:
    """The CPUs this process may run on, asked of the OS at most once a second (a decode step asks
    ~70 times, and the affinity call cost ~1% of a step)."""
    global _cpus_seen
    now = time.monotonic()
    when, cpus = _cpus_seen
    if now - when > 1.0 or when == 0.0:
        try:
            cpus = len(os.sched_getaffinity(0))
        except AttributeError:
            cpus = os.cpu_count() or 1
        _cpus_seen = (now, cpus)
    return cpus


def kernel_info() -> dict:
    """What the C kernels do in this process (for `phiflash info` and benchmarks)."""
    lib = _library()
    if lib is None:
        if _switched_off():
            return {"active": False, "reason": f"{ENV_SWITCH}={os.environ[ENV_SWITCH]}"}
        return {"active": False, "reason": "not built (Linux only; compiled by pip install)"}
    return {"active": True, "simd": "avx2+fma" if lib.phf_simd() else "portable C", "threads": threads(),
            "int8_activations": bool(lib.phf_q8()), "int8_simd": Q8_LEVELS[lib.phf_q8_level()],
            "kv16": kv16_enabled(), "kv16_simd": "f16c" if lib.phf_f16c() else "portable C"}


def _as_float32(a: mx.array) -> np.ndarray:
    if a.dtype != mx.float32:
        a = a.astype(mx.float32)
    mx.eval(a)
    return np.ascontiguousarray(np.asarray(a))


# dtype codes of scales and biases in the C products (cpu_kernels.c's PHF_SD_*)
SD_F32, SD_F16, SD_BF16 = 0, 1, 2
_SD_CODES = {mx.float16: SD_F16, mx.bfloat16: SD_BF16}


# K/V dtypes the attention kernels read (their kvtype argument takes the same codes)
_KV_CODES = {mx.float32: SD_F32, mx.float16: SD_F16}


def _kv_code(*arrays) -> int | None:
    """The kernels' dtype code of K/V arrays that share one dtype (float32 / float16), else None."""
    dtypes = {a.dtype for a in arrays}
    return _KV_CODES.get(dtypes.pop()) if len(dtypes) == 1 else None


def _as_f32_kv(keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """16-bit K/V as float32 for MLX's attention (the MLX twins of the kernels that read them as stored)."""
    return (keys if keys.dtype == mx.float32 else keys.astype(mx.float32),
            values if values.dtype == mx.float32 else values.astype(mx.float32))


def _as_bits16(a: mx.array) -> np.ndarray:
    """The raw 16-bit patterns of a float16 / bfloat16 array as a NumPy uint16 array (a view of MLX's
    buffer where it is contiguous)."""
    bits = a.view(mx.uint16)
    mx.eval(bits)
    return np.ascontiguousarray(np.asarray(bits))


class _Packed:
    """NumPy views of one quantized weight, made once (the uint32 codes are not copied). Scales and
    biases stay as stored: float16 / bfloat16 ones as their uint16 bit patterns (`sdtype` SD_F16 /
    SD_BF16, converted by the C products as they read them: 4 bytes less per group than float32),
    anything else as float32 (SD_F32)."""

    def __init__(self, weight: mx.array, scales: mx.array, biases: mx.array):
        mx.eval(weight, scales, biases)
        self.source = weight                    # identity check: the views follow the module's arrays
        self.scales_source = scales
        self.w = np.asarray(weight)
        if not self.w.flags["C_CONTIGUOUS"]:
            self.w = np.ascontiguousarray(self.w)
        code = _SD_CODES.get(scales.dtype)
        if code is not None and biases.dtype == scales.dtype:
            self.sdtype = code
            self.scales = _as_bits16(scales)
            self.biases = _as_bits16(biases)
        elif _float16_exact(scales, biases):
            # float32 values that float16 holds exactly (a checkpoint with float16 scales whose loader
            # widened them, as it does for the embedding, whose lookups are the activations): the
            # products read the float16 copy, the same numbers in half the bytes (the tied LM head of
            # the released model: 32 MB less per decode step, for 32 MB more memory)
            self.sdtype = SD_F16
            self.scales = _as_bits16(scales.astype(mx.float16))
            self.biases = _as_bits16(biases.astype(mx.float16))
        else:
            self.sdtype = SD_F32
            self.scales = _as_float32(scales)
            self.biases = _as_float32(biases)


def _float16_exact(scales: mx.array, biases: mx.array) -> bool:
    if scales.dtype != mx.float32 or biases.dtype != mx.float32:
        return False
    same = (mx.array_equal(scales.astype(mx.float16).astype(mx.float32), scales)
            & mx.array_equal(biases.astype(mx.float16).astype(mx.float32), biases))
    return bool(same.item())


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
    fn = lib.phf_qmatmul_sd if (m >= BLOCK_ROWS if block is None else block) else lib.phf_qmatvec_sd
    rc = fn(xs.ctypes.data, m, k, packed.w.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data,
            packed.sdtype, n, bits, group_size, y.ctypes.data, n_threads or threads(), int(simd))
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
    if cached is None or cached.source is not module["weight"] or cached.scales_source is not module["scales"]:
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
        scales, biases = module["scales"], module.get("biases")
        if x.dtype == mx.float32 and scales.dtype in (mx.float16, mx.bfloat16):   # dequantize in float32
            scales = scales.astype(mx.float32)
            biases = None if biases is None else biases.astype(mx.float32)
        w = mx.dequantize(module["weight"], scales, biases, group_size=module.group_size, bits=module.bits,
                          mode=module.mode)
        return x @ w.astype(x.dtype).T
    return None


class CPUQuantizedLinear(nn.QuantizedLinear):
    """nn.QuantizedLinear for CPUs: the paths of `_cpu_product`, mx.quantized_matmul where neither applies."""

    def __call__(self, x):
        y = _cpu_product(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


# The output projection (LM head) is the one product whose result a prefill throws away: mlx-lm's
# generate_step and our `generate.prefill` evaluate only the caches for all but the last token, and
# MLX computes nothing that is not evaluated. A host call computes on the spot instead (it is
# eager): rows x vocab x hidden multiply-adds for nothing (511 x 200064 x 2560 = 2.6e11 for one
# 512-token chunk of the released model). So for more than one position per sequence the head stays
# a lazy MLX product, unless `all_logits()` says every position's logits will be read (teacher-forced
# scoring); one position per sequence (decoding, also batched; a prompt's last token) takes the C kernels.
_ALL_LOGITS = threading.local()


@contextlib.contextmanager
def all_logits():
    """Within this block the LM head computes every position with the C kernels (all logits are
    wanted, e.g. perplexity); outside it, only one position per sequence does."""
    before = getattr(_ALL_LOGITS, "on", False)
    _ALL_LOGITS.on = True
    try:
        yield
    finally:
        _ALL_LOGITS.on = before


def _head_product(module, x: mx.array) -> mx.array | None:
    if x.ndim >= 2 and x.shape[-2] > 1 and not getattr(_ALL_LOGITS, "on", False):
        return None
    return _cpu_product(module, x)


class CPUQuantizedEmbedding(nn.QuantizedEmbedding):
    """nn.QuantizedEmbedding whose tied output projection (`as_linear`) uses the same CPU paths (for
    one position per sequence; see `all_logits`)."""

    def as_linear(self, x):
        y = _head_product(self, x)
        return super().as_linear(x) if y is None else y


class CPUQuantizedHead(nn.QuantizedLinear):
    """A model's quantized `lm_head`: the CPU paths for one position per sequence (see `all_logits`)."""

    def __call__(self, x):
        y = _head_product(self, x)
        if y is None:
            return super().__call__(x)
        return y + self["bias"] if "bias" in self else y


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
    the last); mask None or bool, broadcastable to (b, 1, l, s). q is float32; keys and values float32
    or float16 (a 16-bit cache, widened as it is read: the result is float32 attention over the
    stored values). Returns (attn1, attn2), each (b, nh/2, l, 2hd) float32, or None where the kernel
    does not apply (not built, other dtypes, unexpected strides): the caller then computes it with
    MLX ops."""
    lib = _library()
    if lib is None or q.dtype != mx.float32 or _kv_code(keys, values) is None:
        return None
    b, nh, l, hd = q.shape
    half, s, dv = keys.shape[1], keys.shape[2], values.shape[-1]
    hs = nh // 2
    if nh % 2 or hs % half or keys.shape[-1] != 2 * hd or values.shape[1] != half:
        return None

    def slow(q, keys, values):                                   # MLX's attention, stripe by stripe
        sdpa = mx.fast.scaled_dot_product_attention
        keys, values = _as_f32_kv(keys, values)
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
                        b, 2 * half, r, l, hd, dv, s, n_threads or threads(), int(simd), _kv_code(keys, values))
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
    """Mamba.__call__ for CPUs: a one-token step of batch 1 runs the whole mixer in one C call
    (`_mamba_step`); otherwise dt_proj and the selective scan (prompts) run as one C call (`ssm_scan`)
    and everything else is the model's own code."""
    if a.ndim == 3 and a.shape[:2] == (1, 1) and _mamba_step_applies(self, mask, cache):
        return _mamba_step(self, a, cache)
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
    fn = lib.phf_qmatmul_sd if m >= BLOCK_ROWS else lib.phf_qmatvec_sd
    rc = fn(xs.ctypes.data, m, k, packed.w.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data,
            packed.sdtype, n, module.bits, module.group_size, y.ctypes.data, threads(), 1)
    return None if rc != 0 else y


def _silu_mul_host(lib, g: np.ndarray, v: np.ndarray) -> np.ndarray | None:
    """SiLU(g) * v for 2-D float32 g, v of one shape with contiguous rows (views of a wider array are
    fine), as a new contiguous array: one C call over the thread pool (`phf_silu_mul_rows`)."""
    m, n = g.shape
    if g.dtype != np.float32 or v.dtype != np.float32 or v.shape != g.shape or (m > 1 and n > 0 and (
            g.strides[1] != 4 or v.strides[1] != 4)):
        return None
    out = np.empty((m, n), dtype=np.float32)
    rc = lib.phf_silu_mul_rows(out.ctypes.data, n, g.ctypes.data, g.strides[0] // 4, v.ctypes.data,
                               v.strides[0] // 4, m, n, threads())
    return None if rc != 0 else out


def _gated_pair_applies(first, second, x) -> bool:
    """Both products of a gated block on the C kernels (the mat-vec for a decode step's few rows, the
    block product for a prompt's)."""
    ok = all(type(m) is CPUQuantizedLinear and _kernel_applies(m) and "bias" not in m for m in (first, second))
    return ok and x.size > 0 and _library() is not None


def _cpu_mlp_call(self, x):
    """MLP.__call__ for CPUs: fc1, SiLU(gate) * value and fc2 in one host call (one evaluation instead
    of two; the gate over the thread pool, where MLX's CPU back-end computes it on one thread: ~7% of a
    512-token prompt); the model's code elsewhere."""
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
        gated = _silu_mul_host(lib, h[:, :half], h[:, half:])
        y = None if gated is None else _np_product(lib, fc2, gated)
        if y is None:
            return None
        out = mx.array(y).reshape(*x.shape[:-1], y.shape[-1])
        return out if x.dtype == mx.float32 else out.astype(x.dtype)

    return _host_call(fast, slow, x)


def _cpu_gmu_call(self, a, memory):
    """GatedMemoryUnit.__call__ for CPUs: in_proj, SiLU(.) * memory and out_proj in one host call."""
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
        gated = _silu_mul_host(lib, g, mem)
        y = None if gated is None else _np_product(lib, outp, gated)
        if y is None:
            return None
        out = mx.array(y).reshape(*a.shape[:-1], y.shape[-1])
        return out if a.dtype == mx.float32 else out.astype(a.dtype)

    return _host_call(fast, slow, a, memory)


_CPU_CLASSES: dict = {}


def _cpu_subclass(cls, call=None, **attrs):
    """A subclass of `cls` whose __call__ is `call` (and with `attrs`; made once per class), so only the
    modules it is given to change and the model file stays the plain MLX implementation."""
    sub = _CPU_CLASSES.get(cls)
    if sub is None:
        body = dict(attrs)
        if call is not None:
            body["__call__"] = call
        sub = type("CPU" + cls.__name__, (cls,), body)
        _CPU_CLASSES[cls] = sub
    return sub


def _on_cpu_device() -> bool:
    return not mx.metal.is_available() and mx.default_device().type == mx.DeviceType.cpu


def _cpu_kv_dtype(self):
    """DiffAttention.kv_dtype once the CPU kernels are attached: float16 for the full-attention layer
    (whose cache every cross layer reads) while kv16_enabled() and the default device is the CPU;
    otherwise what the model class says (None: keys and values keep the activations' dtype)."""
    from ..models.phi4flash import GLOBAL

    own = next((k.__dict__["kv_dtype"] for k in type(self).__mro__[1:] if "kv_dtype" in k.__dict__), None)
    if own is None and getattr(self, "kind", None) == GLOBAL and kv16_enabled() and _on_cpu_device():
        return mx.float16
    return own


def use_cpu_kernels(model: nn.Module) -> int:
    """Switch every QuantizedLinear / QuantizedEmbedding of `model` (ours or any mlx-lm model) to the
    CPU versions above, and give our differential-attention layers the attention kernels (and a
    kv_dtype that stores the shared full-attention cache in float16 while `kv16_enabled()`, on a CPU
    device); returns how many modules changed."""
    from ..models.phi4flash import MLP, GatedMemoryUnit, Mamba, SambaYModel

    count = 0
    for name, module in model.named_modules():
        if type(module) is SambaYModel and _library() is not None:
            module.__class__ = _cpu_subclass(type(module), _cpu_sambay_call)
            count += 1
        if hasattr(module, "few_query_kernel") and _library() is not None:
            module.few_query_kernel = attend_few
            from .attention import attend_many  # (it imports this module)
            module.many_query_kernel = attend_many
            if hasattr(module, "kv_dtype") and not type(module).__name__.startswith("CPU"):
                module.__class__ = _cpu_subclass(type(module), kv_dtype=property(_cpu_kv_dtype))
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
            module.__class__ = CPUQuantizedHead if name.rsplit(".", 1)[-1] == "lm_head" else CPUQuantizedLinear
            count += 1
        elif type(module) is nn.QuantizedEmbedding:
            module.__class__ = CPUQuantizedEmbedding
            count += 1
    return count


# ---------------------------------------------------------------------------------------------
# Fused decode steps (csrc/fused.c): one host call for what MLX runs as many small ops
# ---------------------------------------------------------------------------------------------

class _QWeight(ctypes.Structure):
    """fused.c's phf_qweight: one quantized weight in MLX's affine layout."""
    _fields_ = [("w", ctypes.c_void_p), ("scales", ctypes.c_void_p), ("biases", ctypes.c_void_p),
                ("n", ctypes.c_long), ("k", ctypes.c_long), ("bits", ctypes.c_int), ("group_size", ctypes.c_int),
                ("sdtype", ctypes.c_int)]


ENV_FUSED = "PHIFLASH_CPU_FUSED"


def _fused_library():
    """The kernel library when it has the fused steps (and PHIFLASH_CPU_FUSED is not 0), else None."""
    if os.environ.get(ENV_FUSED, "").strip().lower() in {"0", "off", "false", "no"}:
        return None
    lib = _library()
    if lib is None:
        return None
    fn = getattr(lib, "_phf_fused_ready", None)
    if fn is None:
        try:
            step = lib.phf_mamba_step
        except AttributeError:
            lib._phf_fused_ready = False
            return None
        ptr, lng, i32 = ctypes.c_void_p, ctypes.c_long, ctypes.c_int
        step.argtypes = [ptr] * 16 + [lng] * 5 + [i32]
        step.restype = i32
        try:
            lib.phf_layernorm.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, lng]
            lib.phf_layernorm.restype = None
            lib.phf_mlp_residual.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ptr, lng, i32]
            lib.phf_mlp_residual.restype = i32
            lib.phf_gmu_residual.argtypes = [ptr, ptr, ptr, ctypes.c_float, ptr, ptr, ptr, lng, i32]
            lib.phf_gmu_residual.restype = i32
            lib.phf_fused_simd.argtypes = [i32]
            lib.phf_fused_simd.restype = i32
            lib.phf_attend_rows.argtypes = ([ptr, ptr, lng, lng, ptr, lng, lng, ptr, ptr, ptr, ptr] + [lng] * 5
                                            + [i32, i32])
            lib.phf_attend_rows.restype = i32
            lib.phf_decode_layers.argtypes = [ptr, ptr, lng, lng, i32]
            lib.phf_decode_layers.restype = i32
        except AttributeError:
            lib._phf_fused_ready = False
            return None
        lib._phf_fused_ready = fn = True
    return lib if fn else None


def _fusable_product(module, k: int, n: int | None = None, bias: bool = False) -> bool:
    """A quantized linear layer (without bias unless `bias`) whose product `phf_qmatvec` computes (any
    size)."""
    if not isinstance(module, nn.QuantizedLinear) or ("bias" in module and not bias) or "biases" not in module:
        return False
    w = module["weight"]
    return (getattr(module, "mode", "affine") == "affine" and module.bits in KERNEL_BITS
            and module.group_size % 32 == 0 and k % module.group_size == 0
            and w.shape[1] * 32 // module.bits == k and (n is None or w.shape[0] == n))


def _qweight(module) -> _QWeight:
    """The phf_qweight of a quantized module, made once per packed weight (it points into `_packed`)."""
    packed = _packed(module)
    held = module.__dict__.get("_phf_qweight")
    if held is None or held[0] is not packed:
        q = _QWeight(packed.w.ctypes.data, packed.scales.ctypes.data, packed.biases.ctypes.data,
                     packed.w.shape[0], packed.w.shape[1] * 32 // module.bits, module.bits, module.group_size,
                     packed.sdtype)
        held = (packed, q)
        module.__dict__["_phf_qweight"] = held
    return held[1]


def _host_f32(a: mx.array, shape=None) -> np.ndarray:
    """A float32 C-contiguous NumPy copy (or view) of an evaluated array."""
    n = np.asarray(a if a.dtype == mx.float32 else a.astype(mx.float32))
    n = np.ascontiguousarray(n, dtype=np.float32)
    return n if shape is None else n.reshape(shape)


def _padded(cache) -> bool:
    """A batch cache that holds padding (mlx-lm's lengths / left_padding)."""
    return getattr(cache, "lengths", None) is not None or getattr(cache, "left_padding", None) is not None


def _mamba_step_applies(mixer, mask, cache) -> bool:
    """The fused one-token mixer applies: no padding, quantized in/x/out projections, float dt_proj."""
    if mask is not None or _fused_library() is None or (cache is not None and _padded(cache)):
        return False
    names = ("in_proj", "x_proj", "dt_proj", "out_proj", "conv1d", "A_log", "D", "d_inner", "dt_rank", "d_state",
             "d_conv", "produces_memory")
    if not all(hasattr(mixer, n) for n in names):
        return False
    Di, R, N, K = mixer.d_inner, mixer.dt_rank, mixer.d_state, mixer.d_conv
    H = mixer.out_proj["weight"].shape[0]
    conv, dt = mixer.conv1d, mixer.dt_proj
    return (_fusable_product(mixer.in_proj, H, 2 * Di) and _fusable_product(mixer.x_proj, Di, R + 2 * N)
            and _fusable_product(mixer.out_proj, Di, H)
            and type(dt) is nn.Linear and dt["weight"].shape == (Di, R)
            and conv["weight"].shape == (Di, K, 1) and mixer.A_log.shape == (Di, N) and mixer.D.shape == (Di,))


class _MambaHost:
    """Host copies of a mixer's small float parameters (conv taps, dt_proj, A = -exp(A_log), D), kept
    while the module holds the same arrays."""

    def __init__(self, mixer):
        conv, dt = mixer.conv1d, mixer.dt_proj
        self.sources = self._sources(mixer)
        A = -mx.exp(mixer.A_log.astype(mx.float32))
        mx.eval(A, *[x for x in self.sources if x is not None])
        self.conv_w = _host_f32(conv["weight"][:, :, 0])
        self.conv_b = _host_f32(conv["bias"]) if "bias" in conv else None
        self.dt_w = _host_f32(dt["weight"])
        self.dt_b = _host_f32(dt["bias"]) if "bias" in dt else None
        self.A = _host_f32(A)
        self.D = _host_f32(mixer.D)

    @staticmethod
    def _sources(mixer):
        conv, dt = mixer.conv1d, mixer.dt_proj
        return (conv["weight"], conv.get("bias"), dt["weight"], dt.get("bias"), mixer.A_log, mixer.D)

    @classmethod
    def of(cls, mixer) -> "_MambaHost":
        held = mixer.__dict__.get("_phf_host")
        if held is None or any(x is not y for x, y in zip(held.sources, cls._sources(mixer))):
            held = cls(mixer)
            mixer.__dict__["_phf_host"] = held
        return held


def _mamba_step_host(lib, mixer, a: np.ndarray, conv_state: mx.array, ssm_state: mx.array):
    """One token through the Mamba mixer in one C call (`phf_mamba_step`): a is the mixer's input,
    (H,) float32 on the host; the states are evaluated MLX arrays of the cache's shapes. Returns
    (out (H,), memory (Di,) or None, new conv state (max(K-1, 1), Di), new ssm state (Di, N)) as
    NumPy arrays, or None where the kernel refuses."""
    Di, N, K = mixer.d_inner, mixer.d_state, mixer.d_conv
    keep = K - 1
    host = _MambaHost.of(mixer)
    cs = _host_f32(conv_state, (keep, Di))
    ss = _host_f32(ssm_state, (Di, N))
    conv_out = np.empty((max(keep, 1), Di), dtype=np.float32)
    ssm_out = np.empty((Di, N), dtype=np.float32)
    out = np.empty(a.shape, dtype=np.float32)
    memory = np.empty((Di,), dtype=np.float32) if mixer.produces_memory else None
    qs = [_qweight(m) for m in (mixer.in_proj, mixer.x_proj, mixer.out_proj)]
    rc = lib.phf_mamba_step(a.ctypes.data, *[ctypes.addressof(q) for q in qs], _ptr(host.conv_w),
                            _ptr(host.conv_b), _ptr(host.dt_w), _ptr(host.dt_b), _ptr(host.A), _ptr(host.D),
                            cs.ctypes.data, ss.ctypes.data, conv_out.ctypes.data, ssm_out.ctypes.data,
                            out.ctypes.data, _ptr(memory), a.shape[-1], Di, K, mixer.dt_rank, N, threads())
    return None if rc != 0 else (out, memory, conv_out, ssm_out)


def _mamba_step_arrays(mixer, memory, conv_out, ssm_out, dtype, conv_dtype) -> tuple:
    """`_mamba_step_host`'s memory (where the layer makes one) and new states as MLX arrays of the
    cache's shapes: ((1, 1, Di) memory,) (1, K-1, Di) conv state, (1, Di, N) float32 scan state."""
    Di, N, keep = mixer.d_inner, mixer.d_state, mixer.d_conv - 1
    res = [] if memory is None else [mx.array(memory).reshape(1, 1, Di).astype(dtype)]
    res.append(mx.array(conv_out[:keep]).reshape(1, keep, Di).astype(conv_dtype))
    res.append(mx.array(ssm_out).reshape(1, Di, N))
    return tuple(res)


def _ptr(a: np.ndarray | None):
    return None if a is None else a.ctypes.data


def _mamba_step(mixer, a, cache):
    """One token of batch 1 through the whole mixer in one host call (`phf_mamba_step`); the model's
    own Mamba.__call__ on a scratch cache is the twin (mx.compile, gradients, any failure)."""
    from ..models.cache import ArraysCache

    Di, N, K = mixer.d_inner, mixer.d_state, mixer.d_conv
    H = a.shape[-1]
    keep = K - 1
    conv_state = None if cache is None else cache[0]
    ssm_state = None if cache is None else cache[1]
    if conv_state is None:
        conv_state = mx.zeros((1, keep, Di), dtype=a.dtype)
    if ssm_state is None:
        ssm_state = mx.zeros((1, Di, N), dtype=mx.float32)
    mem = mixer.produces_memory
    base = super(type(mixer), mixer).__call__ if type(mixer).__name__.startswith("CPU") else mixer.__call__

    def slow(a, conv_state, ssm_state):
        scratch = ArraysCache(2)
        scratch[0], scratch[1] = conv_state, ssm_state
        out, memory = base(a, None, scratch)
        return (out, memory, scratch[0], scratch[1]) if mem else (out, scratch[0], scratch[1])

    def fast(a, conv_state, ssm_state):
        lib = _fused_library()
        mx.eval(a, conv_state, ssm_state)
        if conv_state.shape != (1, keep, Di) or ssm_state.shape != (1, Di, N):
            return None
        step = _mamba_step_host(lib, mixer, _host_f32(a, (H,)), conv_state, ssm_state)
        if step is None:
            return None
        out, memory, conv_out, ssm_out = step
        dtype = a.dtype
        return (mx.array(out).reshape(1, 1, H).astype(dtype),
                *_mamba_step_arrays(mixer, memory, conv_out, ssm_out, dtype, conv_state.dtype))

    res = _host_call(fast, slow, a, conv_state, ssm_state)
    if mem:
        out, memory, conv_new, ssm_new = res
    else:
        (out, conv_new, ssm_new), memory = res, None
    if cache is not None:
        cache[0], cache[1] = conv_new, ssm_new
        cache.advance(1)
    return out, memory


# ---- the decoder layers of a one-token step, each in one or two host calls ----------------------
#
# SambaYModel.__call__ for a decode step of batch 1 without masks runs every layer as a "unit": a pure
# function of MLX arrays (the hidden state, the states it reads) computed on the host in one call,
# with the model's own modules as its twin (mx.compile, gradients). The caches are read and written
# by the loop, outside the units, as the model does. A Mamba or GMU layer is one unit (both
# LayerNorms, the mixer, the MLP and both residual adds); an attention layer with a cache of its own
# is two (LayerNorm + Wqkv; then, after MLX's cache update, the attention, the differential
# combination, the sub-LN, out_proj and the MLP half); a cross layer is one.


def _np_param(module, name) -> np.ndarray | None:
    """A float32 host copy of module[name] (None where absent), kept while the module holds that array."""
    store = module.__dict__.setdefault("_phf_np", {})
    src = module.get(name) if name in module else None
    held = store.get(name)
    if held is None or held[0] is not src:
        held = (src, None if src is None else _host_f32(src).reshape(-1))
        store[name] = held
    return held[1]


def _norm_host(norm):
    return _np_param(norm, "weight"), _np_param(norm, "bias"), float(getattr(norm, "eps", 1e-5))


def _layer_norm_applies(norm, H) -> bool:
    return (type(norm) is nn.LayerNorm and all(n not in norm or norm[n].shape == (H,) for n in ("weight", "bias")))


def _mlp_applies(layer, H) -> bool:
    mlp = layer.mlp
    if not (hasattr(mlp, "fc1") and hasattr(mlp, "fc2")) or not _layer_norm_applies(layer.post_attention_layernorm, H):
        return False
    inter = mlp.fc2["weight"].shape[1] * 32 // getattr(mlp.fc2, "bits", 32)
    return _fusable_product(mlp.fc1, H, 2 * inter) and _fusable_product(mlp.fc2, inter, H)


def _mlp_half(lib, layer, hn: np.ndarray) -> bool:
    """hn += MLP(LN2(hn)) on the host (in place)."""
    w, b, eps = _norm_host(layer.post_attention_layernorm)
    return lib.phf_mlp_residual(hn.ctypes.data, _ptr(w), _ptr(b), eps, ctypes.addressof(_qweight(layer.mlp.fc1)),
                                ctypes.addressof(_qweight(layer.mlp.fc2)), hn.shape[0], threads()) == 0


def _plain_mlp_half(layer, h):
    return h + layer.mlp(layer.post_attention_layernorm(h))


def _h_out(hn: np.ndarray, like: mx.array) -> mx.array:
    out = mx.array(hn).reshape(like.shape)
    return out if like.dtype == mx.float32 else out.astype(like.dtype)


def _h_in(h: mx.array) -> np.ndarray:
    """A writable float32 host copy of the (evaluated) hidden state."""
    return np.array(np.asarray(h if h.dtype == mx.float32 else h.astype(mx.float32)), dtype=np.float32).reshape(-1)


def _mamba_unit(layer, h, cache):
    from ..models.cache import ArraysCache

    mixer = layer.attn
    Di, N, K = mixer.d_inner, mixer.d_state, mixer.d_conv
    H, keep, mem = h.shape[-1], mixer.d_conv - 1, mixer.produces_memory
    conv_state, ssm_state = cache[0], cache[1]
    if conv_state is None:
        conv_state = mx.zeros((1, keep, Di), dtype=h.dtype)
    if ssm_state is None:
        ssm_state = mx.zeros((1, Di, N), dtype=mx.float32)

    def slow(h, conv_state, ssm_state):
        scratch = ArraysCache(2)
        scratch[0], scratch[1] = conv_state, ssm_state
        o, memory = mixer(layer.input_layernorm(h), None, scratch)
        h = _plain_mlp_half(layer, h + o)
        return (h, memory, scratch[0], scratch[1]) if mem else (h, scratch[0], scratch[1])

    def fast(h, conv_state, ssm_state):
        lib = _fused_library()
        mx.eval(h, conv_state, ssm_state)
        if lib is None or conv_state.shape != (1, keep, Di) or ssm_state.shape != (1, Di, N):
            return None
        hn = _h_in(h)
        a = np.empty_like(hn)
        w, b, eps = _norm_host(layer.input_layernorm)
        lib.phf_layernorm(hn.ctypes.data, _ptr(w), _ptr(b), eps, a.ctypes.data, H)
        step = _mamba_step_host(lib, mixer, a, conv_state, ssm_state)
        if step is None:
            return None
        out, memory, conv_out, ssm_out = step
        hn += out
        if not _mlp_half(lib, layer, hn):
            return None
        return (_h_out(hn, h), *_mamba_step_arrays(mixer, memory, conv_out, ssm_out, h.dtype, conv_state.dtype))

    res = _host_call(fast, slow, h, conv_state, ssm_state)
    if mem:
        h, memory, conv_new, ssm_new = res
    else:
        (h, conv_new, ssm_new), memory = res, None
    cache[0], cache[1] = conv_new, ssm_new
    cache.advance(1)
    return h, memory


def _gmu_unit(layer, h, memory):
    gmu = layer.attn
    H = h.shape[-1]

    def slow(h, memory):
        return _plain_mlp_half(layer, h + gmu(layer.input_layernorm(h), memory))

    def fast(h, memory):
        lib = _fused_library()
        mx.eval(h, memory)
        if lib is None:
            return None
        hn = _h_in(h)
        mn = _host_f32(memory, (-1,))
        w, b, eps = _norm_host(layer.input_layernorm)
        rc = lib.phf_gmu_residual(hn.ctypes.data, _ptr(w), _ptr(b), eps, ctypes.addressof(_qweight(gmu.in_proj)),
                                  ctypes.addressof(_qweight(gmu.out_proj)), mn.ctypes.data, H, threads())
        if rc != 0 or not _mlp_half(lib, layer, hn):
            return None
        return _h_out(hn, h)

    return _host_call(fast, slow, h, memory)


def _linear_host(lib, module, x: np.ndarray) -> np.ndarray | None:
    """x (k,) @ W.T (+ bias) of a quantized module, host to host."""
    y = _np_product(lib, module, x.reshape(1, -1))
    if y is None:
        return None
    y = y.reshape(-1)
    bias = _np_param(module, "bias")
    return y if bias is None else y + bias


def _qkv_unit(layer, h):
    """LN1 + Wqkv: (1, 1, rows) in h's dtype."""
    attn = layer.attn

    def slow(h):
        return attn.Wqkv(layer.input_layernorm(h))

    def fast(h):
        lib = _fused_library()
        mx.eval(h)
        if lib is None:
            return None
        hn = _h_in(h)
        a = np.empty_like(hn)
        w, b, eps = _norm_host(layer.input_layernorm)
        lib.phf_layernorm(hn.ctypes.data, _ptr(w), _ptr(b), eps, a.ctypes.data, hn.shape[0])
        y = _linear_host(lib, attn.Wqkv, a)
        if y is None:
            return None
        out = mx.array(y).reshape(1, 1, -1)
        return out if h.dtype == mx.float32 else out.astype(h.dtype)

    return _host_call(fast, slow, h)


def _lambda_host(attn) -> float:
    p = attn.inner_cross_attn
    src = (p["lambda_q1"], p["lambda_k1"], p["lambda_q2"], p["lambda_k2"])
    held = attn.__dict__.get("_phf_lambda")
    if held is None or any(x is not y for x, y in zip(held[0], src)):
        lam = (mx.exp(mx.sum(p.lambda_q1 * p.lambda_k1)) - mx.exp(mx.sum(p.lambda_q2 * p.lambda_k2))
               + attn.lambda_init)
        held = (src, float(lam.astype(mx.float32).item()))
        attn.__dict__["_phf_lambda"] = held
    return held[1]


def _attention_out_ops(attn, h, q, keys, values, cache):
    """The model's DiffAttention.__call__ after the cache update, for one query: q (1, 1, >= nh * hd)."""
    nh, hd = attn.nh, attn.hd
    qh = q[..., : nh * hd].reshape(1, 1, nh, hd).transpose(0, 2, 1, 3)
    attn1, attn2 = attn._core(qh, keys, values, None, cache)
    p = attn.inner_cross_attn
    lam = mx.exp(mx.sum(p.lambda_q1 * p.lambda_k1)) - mx.exp(mx.sum(p.lambda_q2 * p.lambda_k2)) + attn.lambda_init
    d = attn1 - lam.astype(attn1.dtype) * attn2
    d = p.subln(d) * (1.0 - attn.lambda_init)
    d = d.transpose(0, 2, 1, 3).reshape(1, 1, nh * hd)
    return attn.out_proj(d.astype(h.dtype))


def _diff_tail_host(lib, attn, o: np.ndarray, r: int) -> np.ndarray | None:
    """From both stripes' attention o (P, 2r, dv): the differential combination, sub-LN, the
    (1 - lambda_init) factor and out_proj (+ bias), on the host. Returns (H,) or None."""
    hs = attn.nh // 2
    dv = o.shape[-1]
    d = o[:, :r].reshape(hs, dv) - _lambda_host(attn) * o[:, r:].reshape(hs, dv)
    p = attn.inner_cross_attn
    sub_w = _np_param(p.subln, "weight")
    d = d / np.sqrt(np.mean(d * d, axis=-1, keepdims=True) + np.float32(p.subln.eps))
    if sub_w is not None:
        d = d * sub_w
    d = np.ascontiguousarray((d * np.float32(1.0 - attn.lambda_init)).reshape(-1), dtype=np.float32)
    return _linear_host(lib, attn.out_proj, d)


def _attention_tail_unit(layer, h, q, keys, values, cache):
    """The attention of one query over (keys, values), the differential combination, the sub-LN,
    out_proj and the residual, then the MLP half. q (1, 1, nh * hd) (or a wider Wqkv output whose
    first nh * hd columns are the query)."""
    attn = layer.attn
    nh, hd = attn.nh, attn.hd

    def slow(h, q, keys, values):
        return _plain_mlp_half(layer, h + _attention_out_ops(attn, h, q, keys, values, cache))

    def fast(h, q, keys, values):
        lib = _fused_library()
        kvtype = _kv_code(keys, values)
        if lib is None or q.dtype != mx.float32 or kvtype is None:
            return None
        mx.eval(h, q, keys, values)
        kn, vn = np.asarray(keys), np.asarray(values)
        if kn.strides[-1] != kn.itemsize or vn.strides[-1] != vn.itemsize:
            return None
        half, s, dv = kn.shape[1], kn.shape[2], vn.shape[-1]
        hs = nh // 2
        r = hs // half
        qn = np.asarray(q).reshape(-1)[: nh * hd].reshape(nh, hd)
        qa = np.empty((2, half, r, hd), dtype=np.float32)
        np.multiply(qn[0::2].reshape(half, r, hd), attn.scale, out=qa[0])
        np.multiply(qn[1::2].reshape(half, r, hd), attn.scale, out=qa[1])
        ks, vs = _strides(kn), _strides(vn)
        o = np.empty((half, 2 * r, dv), dtype=np.float32)
        rc = lib.phf_attend(qa.ctypes.data, 2 * half * r * hd, r * hd, kn.ctypes.data, ks[0], ks[1], hd, ks[2],
                            vn.ctypes.data, vs[0], vs[1], vs[2], None, 0, s, o.ctypes.data, 1, 2 * half, r, 1, hd,
                            dv, s, threads(), 1, kvtype)
        if rc != 0:
            return None
        y = _diff_tail_host(lib, attn, o, r)
        if y is None:
            return None
        hn = _h_in(h)
        hn += y
        if not _mlp_half(lib, layer, hn):
            return None
        return _h_out(hn, h)

    return _host_call(fast, slow, h, q, keys, values)


def _store_dtype(attn):
    """The dtype an attention layer writes its new K/V rows in: its kv_dtype (float16 for the shared
    full-attention cache while KV16 is on), None for the activations' own."""
    return getattr(attn, "kv_dtype", None)


def _stores_f16(attn) -> bool:
    dt = _store_dtype(attn)
    return dt is not None and dt == mx.float16


def _kv_to_store(attn, keys: mx.array, values: mx.array) -> tuple[mx.array, mx.array]:
    """New K/V rows as the model's DiffAttention.__call__ hands them to its cache."""
    dt = _store_dtype(attn)
    return (keys, values) if dt is None else (keys.astype(dt), values.astype(dt))


def _kv_dtype_applies(attn) -> bool:
    """The attention stores its new rows as they come or as float16 (what the host attention reads)."""
    kv_dtype = attn.kv_dtype
    return kv_dtype is None or kv_dtype == mx.float16


def _attention_applies(layer, H, cache) -> bool:
    from ..models.cache import KVCache, RotatingKVCache

    attn = layer.attn
    if not all(hasattr(attn, n) for n in ("Wqkv", "out_proj", "inner_cross_attn", "nh", "nkv", "hd", "kind",
                                            "lambda_init", "scale")):
        return False
    if not _kv_dtype_applies(attn) or not _layer_norm_applies(layer.input_layernorm, H):
        return False
    if cache is not None and type(cache) not in (KVCache, RotatingKVCache):
        return False
    subln = getattr(attn.inner_cross_attn, "subln", None)
    return (type(subln) is nn.RMSNorm and attn.nh % 2 == 0 and attn.nkv % 2 == 0
            and _fusable_product(attn.Wqkv, H, bias=True) and _fusable_product(attn.out_proj, attn.nh * attn.hd,
                                                                                H, bias=True))


def _decode_units_apply(model, inputs, cache, input_embeddings, capture) -> bool:
    if capture is not None or cache is None or _fused_library() is None or mx.metal.is_available():
        return False
    if mx.default_device().type != mx.DeviceType.cpu:           # a GPU back-end (CUDA) computes there
        return False
    shape = (input_embeddings if input_embeddings is not None else inputs).shape
    return tuple(shape[:2]) == (1, 1) and len(cache) >= model.num_cached


def _cpu_sambay_call(self, inputs, cache=None, input_embeddings=None, capture=None):
    """SambaYModel.__call__ for CPUs: a one-token step of batch 1 runs each decoder layer as one or two
    host calls (the units above), where the layer's modules allow it; anything else is the model's
    own loop."""
    from ..models.phi4flash import CROSS, GLOBAL, GMU, MAMBA, MAMBA_MEM, SWA

    base = super(type(self), self).__call__
    if not _decode_units_apply(self, inputs, cache, input_embeddings, capture):
        return base(inputs, cache, input_embeddings, capture)
    h = input_embeddings if input_embeddings is not None else self.embed_tokens(inputs)
    masks = self._masks(h, cache)
    if any(m is not None for m in masks.values()):
        return base(inputs, cache, input_embeddings, capture)
    H = h.shape[-1]
    plan = _step_plan(self, cache, H)
    if plan is not None:
        return self.final_layernorm(_whole_step(self, h, plan))
    memory = shared = None
    for i, layer in enumerate(self.layers):
        c = cache[i] if i < self.num_cached else None
        kind = layer.kind
        if kind in (MAMBA, MAMBA_MEM) and c is not None and _layer_norm_applies(layer.input_layernorm, H) \
                and _mamba_step_applies(layer.attn, None, c) and _mlp_applies(layer, H):
            h, mem = _mamba_unit(layer, h, c)
            if mem is not None:
                memory = mem
            continue
        if kind == GMU and memory is not None and _layer_norm_applies(layer.input_layernorm, H) \
                and _mlp_applies(layer, H) and _fusable_product(layer.attn.in_proj, H, memory.shape[-1]) \
                and _fusable_product(layer.attn.out_proj, memory.shape[-1], H):
            h = _gmu_unit(layer, h, memory)
            continue
        attn = layer.attn
        if kind in (SWA, GLOBAL) and c is not None and _attention_applies(layer, H, c) and _mlp_applies(layer, H):
            qkv = _qkv_unit(layer, h)
            nh, nkv, hd = attn.nh, attn.nkv, attn.hd
            split = (nh + nkv) * hd
            keys, values = c.update_and_fetch(*_kv_to_store(attn, attn._pairs(qkv[..., nh * hd: split]),
                                                            attn._pairs(qkv[..., split:])))
            h = _attention_tail_unit(layer, h, qkv, keys, values, c)
            if kind == GLOBAL:
                shared = (keys, values, c)
            continue
        if kind == CROSS and shared is not None and _attention_applies(layer, H, shared[2]) \
                and _mlp_applies(layer, H):
            q = _qkv_unit(layer, h)
            h = _attention_tail_unit(layer, h, q, shared[0], shared[1], shared[2])
            continue
        # the model's own code for this layer
        a = layer.input_layernorm(h)
        if kind in (MAMBA, MAMBA_MEM):
            o, mem = layer.attn(a, masks[MAMBA], c)
            if mem is not None:
                memory = mem
        elif kind == GMU:
            o = layer.attn(a, memory)
        elif kind == SWA:
            o, _ = layer.attn(a, masks[SWA], c)
        elif kind == GLOBAL:
            o, shared = layer.attn(a, masks[GLOBAL], c)
        else:
            o, _ = layer.attn(a, masks[GLOBAL], shared=shared)
        h = h + o
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    return self.final_layernorm(h)


# ---- the whole decode step in one host call ------------------------------------------------------
#
# The units above still hand over to MLX's scheduler about twice per layer (each unit's result, each
# cache update is evaluated before the next layer can read it). Where every layer fits, the whole
# step is one host call instead: the attention layers attend over their cache as it will be after
# this step's update (the cache's rows plus the new row, `phf_attend_rows`), and the cache updates
# (mlx-lm's own update_and_fetch, the Mamba states) are applied afterwards, lazily; they are
# evaluated with the next step's inputs. Inside that call the layer loop itself is C
# (`phf_decode_layers` over one `phf_layer` per layer: the weights' part made once per layer and kept
# while its modules and arrays are the same objects, this step's cache pointers filled per step);
# driving the layers from Python cost 10-15 ms of a ~100 ms 4-bit step at 1K context, on one thread
# while the pool waited.


def _rows_after_update(c) -> np.ndarray | None:
    """Which rows update_and_fetch of one new position will return, as rows of the cache's current
    buffer (-1: the new position); None where the update would move rows (growing a KVCache beyond its
    buffer keeps them, trimming a RotatingKVCache does not) or the cache is empty."""
    from ..models.cache import KVCache, RotatingKVCache

    if getattr(c, "keys", None) is None:
        return None
    length = c.keys.shape[2]
    if type(c) is KVCache:
        prev = c.offset
        if prev > length:
            return None
        rows = np.arange(prev + 1, dtype=np.int32)
        rows[prev] = -1
        return rows
    if type(c) is not RotatingKVCache:
        return None
    prev, idx, size = c.offset, c._idx, c.max_size
    new_length = length
    if prev >= length and length < size:                # grows: zeros appended, the new row at prev
        if prev != length:
            return None
        idx, new_length = prev, length + min(c.step, size - prev)
    if new_length > size:                               # would trim (after a long prompt): rows move
        return None
    if idx == size:
        idx = c.keep
    if not 0 <= idx < new_length:
        return None
    count = prev + 1 if prev + 1 < new_length else new_length
    rows = np.arange(new_length, dtype=np.int32)[:count]
    if idx < count:
        rows[idx] = -1
    if rows.max(initial=-1) >= length or (rows < 0).sum() != 1:
        return None
    return rows


def _scratch_kv(c, keys, values):
    """A cache like `c` (same type and bookkeeping) holding keys / values, for the MLX twin."""
    s = type(c).__new__(type(c))
    s.__dict__.update(c.__dict__)
    s.keys, s.values = keys[...], values[...]                 # fresh arrays: updates stay in the copy
    return s


class _Layer(ctypes.Structure):
    """fused.c's phf_layer: one decoder layer of `phf_decode_layers` (its weights, then this step's state)."""
    _fields_ = ([("kind", ctypes.c_int), ("flags", ctypes.c_int)]
                + [(n, ctypes.c_void_p) for n in ("ln1_w", "ln1_b", "ln2_w", "ln2_b")]
                + [("ln1_eps", ctypes.c_float), ("ln2_eps", ctypes.c_float)]
                + [(n, ctypes.c_void_p) for n in ("fc1", "fc2", "in_proj", "x_proj", "out_proj", "in_bias", "out_bias",
                                                  "conv_w", "conv_b", "dt_w", "dt_b", "A", "D")]
                + [(n, ctypes.c_long) for n in ("Di", "K", "R", "N", "nh", "nkv", "hd")]
                + [(n, ctypes.c_float) for n in ("scale", "lam", "out_scale", "subln_eps")]
                + [(n, ctypes.c_void_p) for n in ("subln_w", "conv_state", "ssm_state", "conv_out", "ssm_out", "k", "v")]
                + [(n, ctypes.c_long) for n in ("k_hs", "k_ts", "v_hs", "v_ts", "T")]
                + [("rows", ctypes.c_void_p), ("kvtype", ctypes.c_int), ("pad", ctypes.c_int),
                   ("k_out", ctypes.c_void_p), ("v_out", ctypes.c_void_p)])


L_MAMBA, L_GMU, L_ATTN, L_CROSS = 0, 1, 2, 3            # phf_layer.kind
L_MEMORY, L_SHARES, L_STORE16 = 1, 2, 4                  # phf_layer.flags


def _modules(module, depth: int) -> list:
    """A module and (down to `depth` levels) its submodules: what a layer's host description is made
    from."""
    out = [module]
    if depth > 0:
        for v in module.values():
            if isinstance(v, nn.Module):
                out += _modules(v, depth - 1)
    return out


def _snapshot(modules: list) -> tuple:
    """Who each module's entries are (ids; the caller keeps the objects alive): new weights, an
    adapter, a swapped or added submodule change it."""
    return tuple(tuple(map(id, m.values())) for m in modules)


def _layer_ids(layer, below: list) -> tuple:
    """_snapshot of a layer and the modules below it (the layer itself is not held: it holds its
    _LayerHost, and a cycle would keep a deleted model's weights until the garbage collector ran)."""
    return (tuple(map(id, layer.values())),) + _snapshot(below)


class _LayerHost:
    """One decoder layer as `phf_decode_layers` takes it: the phf_layer's weight part (host views and
    copies made once), or `struct` None where the layer's modules are not ones the step covers. Kept
    in the layer's __dict__ while its modules and arrays are the same objects."""

    def __init__(self, layer, H: int):
        from ..models.phi4flash import CROSS, GLOBAL, GMU, MAMBA, MAMBA_MEM, SWA

        self.H = H
        self.below = _modules(layer, 3)[1:]
        self.held = [tuple(m.values()) for m in [layer] + self.below]  # (keeps the ids below meaningful)
        self.ids = _layer_ids(layer, self.below)
        self.struct = None
        kind = getattr(layer, "kind", None)
        if not (_layer_norm_applies(layer.input_layernorm, H) and _mlp_applies(layer, H)):
            return
        attn = layer.attn
        q = _Layer()
        ln1, ln2 = _norm_host(layer.input_layernorm), _norm_host(layer.post_attention_layernorm)
        q.ln1_w, q.ln1_b, q.ln1_eps = _ptr(ln1[0]), _ptr(ln1[1]), ln1[2]
        q.ln2_w, q.ln2_b, q.ln2_eps = _ptr(ln2[0]), _ptr(ln2[1]), ln2[2]
        q.fc1, q.fc2 = ctypes.addressof(_qweight(layer.mlp.fc1)), ctypes.addressof(_qweight(layer.mlp.fc2))
        self.keep = [ln1, ln2, _qweight(layer.mlp.fc1), _qweight(layer.mlp.fc2)]
        if kind in (MAMBA, MAMBA_MEM):
            if not _mamba_step_applies(attn, None, None):
                return
            host = _MambaHost.of(attn)
            q.kind, q.flags = L_MAMBA, L_MEMORY if attn.produces_memory else 0
            ws = [_qweight(m) for m in (attn.in_proj, attn.x_proj, attn.out_proj)]
            q.in_proj, q.x_proj, q.out_proj = [ctypes.addressof(w) for w in ws]
            q.conv_w, q.conv_b, q.dt_w, q.dt_b = _ptr(host.conv_w), _ptr(host.conv_b), _ptr(host.dt_w), _ptr(host.dt_b)
            q.A, q.D = _ptr(host.A), _ptr(host.D)
            q.Di, q.K, q.R, q.N = attn.d_inner, attn.d_conv, attn.dt_rank, attn.d_state
            self.keep += [host, ws]
        elif kind == GMU:
            di = getattr(getattr(attn, "in_proj", None), "weight", None)
            if di is None or not (_fusable_product(attn.in_proj, H, di.shape[0])
                                  and _fusable_product(attn.out_proj, di.shape[0], H)):
                return
            ws = [_qweight(attn.in_proj), _qweight(attn.out_proj)]
            q.kind, q.in_proj, q.out_proj = L_GMU, ctypes.addressof(ws[0]), ctypes.addressof(ws[1])
            self.keep.append(ws)
        elif kind in (SWA, GLOBAL, CROSS):
            if not _attention_applies(layer, H, None):
                return
            p = attn.inner_cross_attn
            ws = [_qweight(attn.Wqkv), _qweight(attn.out_proj)]
            biases = [_np_param(attn.Wqkv, "bias"), _np_param(attn.out_proj, "bias"), _np_param(p.subln, "weight")]
            q.kind = L_CROSS if kind == CROSS else L_ATTN
            q.flags = L_SHARES if kind == GLOBAL else 0
            q.in_proj, q.out_proj = ctypes.addressof(ws[0]), ctypes.addressof(ws[1])
            q.in_bias, q.out_bias, q.subln_w = [_ptr(b) for b in biases]
            q.nh, q.nkv, q.hd = attn.nh, attn.nkv, attn.hd
            q.scale, q.lam, q.out_scale = attn.scale, _lambda_host(attn), 1.0 - attn.lambda_init
            q.subln_eps = float(p.subln.eps)
            self.keep += [ws, biases]
        else:
            return
        self.struct = q

    @classmethod
    def of(cls, layer, H: int) -> "_LayerHost":
        held = layer.__dict__.get("_phf_layer_host")
        if held is None or held.H != H or _layer_ids(layer, held.below) != held.ids:
            held = cls(layer, H)
            layer.__dict__["_phf_layer_host"] = held
        return held


def _step_plan(model, cache, H):
    """Per layer (layer, kind, cache, rows, host) where the whole step can run on the host; else None.
    What the layer's modules allow is settled by its _LayerHost; here only what depends on the caches
    and the switches."""
    from ..models.cache import KVCache, RotatingKVCache
    from ..models.phi4flash import CROSS, GLOBAL, GMU, MAMBA, MAMBA_MEM, SWA

    if _fused_library() is None:
        return None
    plan, memory, shared = [], False, False
    for i, layer in enumerate(model.layers):
        c = cache[i] if i < model.num_cached else None
        kind, rows = layer.kind, None
        host = _LayerHost.of(layer, H)
        if host.struct is None:
            return None
        if kind in (MAMBA, MAMBA_MEM):
            if c is None or c[0] is None or c[1] is None or _padded(c):
                return None
            memory = memory or layer.attn.produces_memory
        elif kind == GMU:
            if not memory:
                return None
        elif kind in (SWA, GLOBAL):
            if type(c) not in (KVCache, RotatingKVCache) or not _kv_dtype_applies(layer.attn):
                return None
            if getattr(c, "keys", None) is None or _kv_code(c.keys, c.values) is None:
                return None                       # (the host attention reads float32 / float16 caches)
            if c.keys.dtype == mx.float16 and not _stores_f16(layer.attn):
                return None                       # (float32 rows into a 16-bit cache: MLX's update decides the dtype)
            rows = _rows_after_update(c)
            if rows is None:
                return None
            shared = shared or kind == GLOBAL
        elif kind == CROSS:
            if not shared or not _kv_dtype_applies(layer.attn):
                return None
        else:
            return None
        plan.append((layer, kind, c, rows, host))
    return plan


def _whole_step(model, h0, plan):
    """One host call for every layer of the step (the plan from _step_plan); returns the hidden state
    before the final norm and applies the cache updates."""
    from ..models.cache import ArraysCache
    from ..models.phi4flash import CROSS, GLOBAL, GMU, MAMBA, MAMBA_MEM, SWA

    states = []
    for layer, kind, c, rows, _ in plan:
        if kind in (MAMBA, MAMBA_MEM):
            states += [c[0], c[1]]
        elif kind in (SWA, GLOBAL):
            states += [c.keys, c.values]

    def slow(h, *states):
        it = iter(states)
        outs, memory, shared = [], None, None
        for layer, kind, c, rows, _ in plan:
            attn = layer.attn
            if kind in (MAMBA, MAMBA_MEM):
                scratch = ArraysCache(2)
                scratch[0], scratch[1] = next(it), next(it)
                o, mem = attn(layer.input_layernorm(h), None, scratch)
                outs += [scratch[0], scratch[1]]
                memory = mem if mem is not None else memory
            elif kind == GMU:
                o = attn(layer.input_layernorm(h), memory)
            else:
                qkv = attn.Wqkv(layer.input_layernorm(h))
                if kind == CROSS:
                    keys, values, kv_cache = shared
                else:
                    kv_cache = _scratch_kv(c, next(it), next(it))
                    split = (attn.nh + attn.nkv) * attn.hd
                    k, v = _kv_to_store(attn, attn._pairs(qkv[..., attn.nh * attn.hd: split]),
                                        attn._pairs(qkv[..., split:]))
                    keys, values = kv_cache.update_and_fetch(k, v)
                    outs += [k, v]
                    if kind == GLOBAL:
                        shared = (keys, values, kv_cache)
                o = _attention_out_ops(attn, h, qkv, keys, values, kv_cache)
            h = _plain_mlp_half(layer, h + o)
        return (h, *outs)

    def fast(h, *states):
        lib = _fused_library()
        if lib is None:
            return None
        mx.eval(h, *states)
        hn = _h_in(h)
        layers = (_Layer * len(plan))(*[host.struct for *_, host in plan])
        it = iter(states)
        keep, outs = [], []             # (keep: what the step's pointers point into)
        for q, (layer, kind, c, rows, host) in zip(layers, plan):
            attn = layer.attn
            if kind in (MAMBA, MAMBA_MEM):
                conv_state, ssm_state = next(it), next(it)
                Di, N, keep_rows = attn.d_inner, attn.d_state, attn.d_conv - 1
                if conv_state.shape != (1, keep_rows, Di) or ssm_state.shape != (1, Di, N):
                    return None
                cs, ss = _host_f32(conv_state, (keep_rows, Di)), _host_f32(ssm_state, (Di, N))
                conv_out = np.empty((max(keep_rows, 1), Di), dtype=np.float32)
                ssm_out = np.empty((Di, N), dtype=np.float32)
                q.conv_state, q.ssm_state, q.conv_out, q.ssm_out = cs.ctypes.data, ss.ctypes.data, \
                    conv_out.ctypes.data, ssm_out.ctypes.data
                keep += [cs, ss]
                outs.append((conv_out, ssm_out, keep_rows, conv_state.dtype))
            elif kind in (SWA, GLOBAL):
                kb, vb = next(it), next(it)
                kvtype = _kv_code(kb, vb)
                if kvtype is None:
                    return None
                kn, vn = np.asarray(kb), np.asarray(vb)
                P, hd = attn.nkv // 2, attn.hd
                if kn.shape[1] != P or kn.shape[-1] != 2 * hd or vn.shape[1] != P or vn.shape[-1] != 2 * hd \
                        or kn.strides[-1] != kn.itemsize or vn.strides[-1] != vn.itemsize:
                    return None
                store16 = _stores_f16(attn)
                k_out = np.empty((P, 2 * hd), dtype=np.float16 if store16 else np.float32)
                v_out = np.empty_like(k_out)
                ks, vs = _strides(kn), _strides(vn)
                q.k, q.v, q.k_hs, q.k_ts, q.v_hs, q.v_ts = kn.ctypes.data, vn.ctypes.data, ks[1], ks[2], vs[1], vs[2]
                q.rows, q.T, q.kvtype = rows.ctypes.data, rows.shape[0], kvtype
                q.k_out, q.v_out = k_out.ctypes.data, v_out.ctypes.data
                if store16:
                    q.flags |= L_STORE16
                keep += [kn, vn, rows]
                outs.append((k_out, v_out, P, hd))
        rc = lib.phf_decode_layers(hn.ctypes.data, ctypes.addressof(layers), len(plan), hn.shape[0], threads())
        if rc != 0:
            return None
        res = []
        for (layer, kind, *_), out in zip((p for p in plan if p[1] in (MAMBA, MAMBA_MEM, SWA, GLOBAL)), outs):
            if kind in (MAMBA, MAMBA_MEM):
                conv_out, ssm_out, keep_rows, conv_dtype = out
                Di, N = conv_out.shape[1], ssm_out.shape[1]
                res += [mx.array(conv_out[:keep_rows]).reshape(1, keep_rows, Di).astype(conv_dtype),
                        mx.array(ssm_out).reshape(1, Di, N)]
            else:
                k_out, v_out, P, hd = out
                res += [mx.array(k_out).reshape(1, P, 1, 2 * hd), mx.array(v_out).reshape(1, P, 1, 2 * hd)]
        return (_h_out(hn, h), *res)

    res = _host_call(fast, slow, h0, *states)
    h, outs = res[0], iter(res[1:])
    for layer, kind, c, rows, _ in plan:
        if kind in (MAMBA, MAMBA_MEM):
            c[0], c[1] = next(outs), next(outs)
            c.advance(1)
        elif kind in (SWA, GLOBAL):
            keys, _ = c.update_and_fetch(next(outs), next(outs))
            if keys.shape[2] != rows.shape[0]:               # the cache did not do what _rows_after_update said
                raise RuntimeError(f"{type(c).__name__} returned {keys.shape[2]} positions after one update, "
                                   f"the fused decode step attended {rows.shape[0]}; set {ENV_FUSED}=0")
    return h
