"""Run ``mx.fast.metal_kernel`` / ``mx.fast.cuda_kernel`` bodies on the CPU: compile them as C++ and
loop over the grid the way the GPU back-end would launch it.

On machines without a GPU back-end (Linux CI) this is how the kernels of
``phiflash_mlx/models/phi4flash_kernels.py`` are tested. The harness takes the *same* body, header
and input/output names that are handed to MLX, writes the function MLX would generate around them,
and compiles it with g++ against a small header that stands in for the Metal (or CUDA) names.

Mirrors MLX 0.32 (``mlx/backend/common/metal_kernel.cpp``, ``mlx/backend/metal/custom_kernel.cpp``,
``mlx/backend/cuda/custom_kernel.cpp``) where it can:

* Metal signature: an input with fewer than 8 elements is ``const constant T*``, others
  ``const device T*``, a 0-d input a reference; ``<name>_shape`` / ``_strides`` / ``_ndim`` only where
  the body mentions them (plain substring search), each thread attribute the body mentions. The two
  address spaces are distinct C++ types here: ``device`` pointers convert only to ``const T*``,
  ``constant`` ones only to ``const volatile T*`` (``constant`` is defined as ``volatile``), so a helper
  declared with the wrong address space fails to compile, as it would on Metal for that shape.
* Types: ``float``, ``half`` (``_Float16``), ``bfloat16_t`` (a struct: explicit from float, implicit to
  float, round-to-nearest-even like MLX's), ``bool``, ints. Template arguments as MLX writes them.
* Launch (Metal): threadgroup = min(threadgroup, grid) per axis as MLX computes it -- an empty grid
  gives a zero-size threadgroup, which Metal rejects, so it is an error here; a threadgroup over 1024
  threads is an error (MLX raises; a kernel's own maximum can be lower on a real GPU).
* Launch (CUDA): block = min(threadgroup, grid), grid of blocks = ceil(grid / threadgroup): the grid
  is rounded up to whole blocks, so bodies must guard their thread index. ``blockIdx``,
  ``blockDim``, ``threadIdx`` and ``__shfl_xor_sync`` are provided; template arguments become
  ``constexpr int`` / ``using`` lines at the top of the body, as MLX's CUDA generator writes them.
* SIMD groups: 32 lanes (consecutive threads of a threadgroup) run in lockstep as fibers (ucontext),
  switching at every ``simd_sum`` / ``simd_shuffle_xor`` / ``__shfl_xor_sync``; lanes that reach a
  SIMD function in divergent control flow, or read a lane that does not exist, fail the call.
  ``thread_index_in_simdgroup``, ``threads_per_simdgroup``, ``simdgroup_index_in_threadgroup`` and
  ``simdgroups_per_threadgroup`` are supplied.

What it checks beyond the arithmetic: every buffer access is bounds-checked (the first out-of-range
index fails the call, naming the buffer); outputs start as NaN so an element no thread writes shows
up; ``order="reverse"`` runs the SIMD groups (and lanes within a lockstep round) last to first.

What it cannot check: threadgroup memory and barriers (refused), the GPU compilers' own numerics
(exp/log ulps, FMA contraction) and register limits.

Compiled libraries are cached by the hash of their C++ source in memory for the run and on disk in
``$PHIFLASH_HARNESS_CACHE`` or ``<tmp>/phiflash-metal-harness``.
"""

from __future__ import annotations

import ctypes
import hashlib
import os
import pathlib
import shutil
import subprocess
import tempfile

import numpy as np

CXX = os.environ.get("CXX", "g++")
CXXFLAGS = ["-std=c++17", "-O1", "-shared", "-fPIC", "-Wall", "-Werror=return-type"]
MAX_CONSTANT_ARRAY_SIZE = 8  # mlx/backend/common/metal_kernel.cpp: size < 8 -> constant
MAX_THREADGROUP = 1024
SIMD_WIDTH = 32

# numpy dtype -> (Metal type string as MLX's get_type_string writes it, CUDA type string)
_TYPES = {
    np.dtype(np.float32): ("float", "float"),
    np.dtype(np.float16): ("half", "__half"),
    np.dtype(np.int32): ("int32_t", "int32_t"),
    np.dtype(np.uint32): ("uint32_t", "uint32_t"),
    np.dtype(np.int64): ("int64_t", "int64_t"),
    np.dtype(np.bool_): ("bool", "bool"),
}
BF16 = "bfloat16"  # bfloat16 arrays travel as ("bfloat16", uint16 bits)

_ATTRIBUTES = {  # Metal attribute: (type, expression in the thread loop)
    "thread_position_in_grid": ("uint3", "tpig"),
    "threads_per_grid": ("uint3", "grid"),
    "grid_size": ("uint3", "grid"),
    "thread_position_in_threadgroup": ("uint3", "tptg"),
    "threadgroup_position_in_grid": ("uint3", "tgpig"),
    "threads_per_threadgroup": ("uint3", "tg"),
    "thread_index_in_threadgroup": ("uint", "tiitg"),
    "thread_index_in_simdgroup": ("uint", "tiitg % 32u"),
    "threads_per_simdgroup": ("uint", "32u"),
    "thread_execution_width": ("uint", "32u"),
    "simdgroup_index_in_threadgroup": ("uint", "tiitg / 32u"),
    "simdgroups_per_threadgroup": ("uint", "(tg.x * tg.y * tg.z + 31u) / 32u"),
}
_UNSUPPORTED = (
    "threadgroup_barrier",
    "simdgroup_barrier",
    "atomic_",
    "quad_",
    "__syncthreads",
    "threadgroup float",
    "__shared__",
)
_SIMD_CALLS = ("simd_sum", "simd_shuffle_xor", "__shfl_xor_sync", "PHF_SHUFFLE_XOR")

SHIM = r"""
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <cstring>
#include <type_traits>
#include <ucontext.h>

typedef unsigned int uint;
typedef unsigned short ushort;
struct uint3 { uint x, y, z; };

// ---- the 16-bit float stand-ins -------------------------------------------------------------
typedef _Float16 half;
struct bfloat16_t {
    uint16_t bits;
    bfloat16_t() = default;
    explicit bfloat16_t(float f) {
        uint32_t u; std::memcpy(&u, &f, 4);
        if ((u & 0x7fffffffu) > 0x7f800000u) { bits = uint16_t((u >> 16) | 0x40u); return; }
        u += 0x7fffu + ((u >> 16) & 1u);          // round to nearest even, as MLX's float_to_bfloat_bits
        bits = uint16_t(u >> 16);
    }
    operator float() const { uint32_t u = uint32_t(bits) << 16; float f; std::memcpy(&f, &u, 4); return f; }
};
typedef bfloat16_t __nv_bfloat16;
typedef half __half;

// ---- faults -----------------------------------------------------------------------------------
struct PhfFault { int hit; const char* what; const char* buffer; long long index; long long size; };
static PhfFault phf_fault = {0, nullptr, nullptr, 0, 0};
static void phf_fail(const char* what, const char* buffer, long long index, long long size) {
    if (!phf_fault.hit) phf_fault = {1, what, buffer, index, size};
}

// ---- buffers: device and constant are different types -------------------------------------------
template <typename T>
struct Checked {
    T* data; long long size; const char* name;
    template <typename I> T& operator[](I index) const {
        long long k = static_cast<long long>(index);
        if (k < 0 || k >= size) {
            phf_fail("out-of-bounds access", name, k, size);
            static typename std::remove_const<T>::type scratch;
            return scratch;
        }
        return data[k];
    }
};
template <typename T> struct DevicePtr : Checked<T> {
    operator T*() const { return this->data; }
    operator volatile T*() const = delete;        // a `constant` parameter does not take it
};
template <typename T> struct ConstantPtr : Checked<T> {
    operator volatile T*() const { return this->data; }
};
#define device
#define constant volatile
#define thread
#define threadgroup

// ---- math ---------------------------------------------------------------------------------------
namespace metal {
#define PHF_UNARY(fn) inline float fn(float x) { return std::fn(x); }
#define PHF_MATH PHF_UNARY(exp) PHF_UNARY(exp2) PHF_UNARY(log) PHF_UNARY(log2) PHF_UNARY(sqrt) \
    PHF_UNARY(tanh) PHF_UNARY(fabs) PHF_UNARY(abs) \
    inline float rsqrt(float x) { return 1.0f / std::sqrt(x); } \
    inline float max(float a, float b) { return std::fmax(a, b); } \
    inline float min(float a, float b) { return std::fmin(a, b); }
PHF_MATH
namespace precise { PHF_MATH }
namespace fast { PHF_MATH }
#undef PHF_MATH
#undef PHF_UNARY
}  // namespace metal
#define __device__
#define __forceinline__ inline
#define __global__
inline float expf(float x) { return std::exp(x); }
inline float exp2f(float x) { return std::exp2(x); }
inline float logf(float x) { return std::log(x); }
inline float log1pf(float x) { return std::log1p(x); }

// ---- SIMD groups: 32 lanes as fibers in lockstep -------------------------------------------------
struct PhfSimd {
    int on, n, cur;
    ucontext_t sched;
    ucontext_t ctx[32];
    int calls[32];
    int done[32];
    alignas(16) unsigned char slot[32][16];
    unsigned long long flat[32];
};
static PhfSimd phf_simd;
static char phf_stacks[32][1 << 17];

static void phf_yield() { swapcontext(&phf_simd.ctx[phf_simd.cur], &phf_simd.sched); }

template <typename T> static T phf_exchange(T v, int src_mask, bool sum) {
    if (!phf_simd.on) { phf_fail("SIMD function outside a SIMD group", "simd", 0, 0); return v; }
    const int me = phf_simd.cur;
    std::memcpy(phf_simd.slot[me], &v, sizeof(T));
    phf_simd.calls[me]++;
    phf_yield();                                    // every lane has published its value
    T r = v;
    if (sum) {
        float acc = 0.0f;
        for (int l = 0; l < phf_simd.n; ++l) { T x; std::memcpy(&x, phf_simd.slot[l], sizeof(T)); acc += float(x); }
        r = T(acc);
    } else {
        const int src = me ^ src_mask;
        if (src >= phf_simd.n) phf_fail("shuffle from a lane that does not exist", "simd", src, phf_simd.n);
        else std::memcpy(&r, phf_simd.slot[src], sizeof(T));
    }
    phf_yield();                                    // every lane has read before anyone writes again
    return r;
}
template <typename T> T simd_shuffle_xor(T v, ushort mask) { return phf_exchange(v, int(mask), false); }
template <typename T> T simd_sum(T v) { return phf_exchange(v, 0, true); }
template <typename T> T __shfl_xor_sync(unsigned int, T v, int mask) { return phf_exchange(v, mask, false); }
"""


class HarnessError(RuntimeError):
    """The kernel could not be compiled, or misbehaved (out-of-bounds access, divergent SIMD call)."""


def available() -> str | None:
    """None when the harness can run here, else why not."""
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX}) on PATH"
    return None


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("PHIFLASH_HARNESS_CACHE") or os.path.join(
        tempfile.gettempdir(), "phiflash-metal-harness")
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _type_name(kind, backend: str) -> str:
    """C type of an input/output kind: a numpy dtype or BF16."""
    if kind == BF16:
        return "bfloat16_t" if backend == "metal" else "__nv_bfloat16"
    names = _TYPES.get(np.dtype(kind))
    if names is None:
        raise HarnessError(f"dtype {kind} is not supported by the harness")
    return names[0] if backend == "metal" else names[1]


def _template_value(value, backend: str) -> tuple[str, str]:
    """(parameter kind, C++ argument) of one template argument, as MLX writes it."""
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, int):
        return "int", str(value)
    name = str(value)  # an mx.Dtype such as mlx.core.float32
    for suffix, kind in (("bfloat16", BF16), ("float16", np.float16), ("float32", np.float32)):
        if name.endswith(suffix):
            return "typename", _type_name(kind, backend)
    raise HarnessError(f"template argument {value!r}: not a type the harness knows")


def generate_source(name, input_names, output_names, source, header, inputs, template,
                    output_kinds, backend: str = "metal") -> str:
    """The C++ translation unit: shim, header, the kernel function as MLX would declare it, launch."""
    for word in _UNSUPPORTED:
        if word in source:
            raise HarnessError(f"kernel {name} uses {word}, which the CPU harness cannot emulate")
    simd = any(c in source for c in _SIMD_CALLS)

    params, args = [], []
    for i, (pname, (kind, shape)) in enumerate(zip(input_names, inputs)):
        ctype = _type_name(kind, backend)
        size = int(np.prod(shape, dtype=np.int64))
        if len(shape) == 0:
            params.append(f"const {ctype}& {pname}")
            args.append(f"*static_cast<const {ctype}*>(g_ins[{i}])")
            continue
        if backend == "metal":
            wrapper = "ConstantPtr" if size < MAX_CONSTANT_ARRAY_SIZE else "DevicePtr"
        else:
            wrapper = "DevicePtr"
        params.append(f"{wrapper}<const {ctype}> {pname}")
        args.append(f"{wrapper}<const {ctype}>{{{{static_cast<const {ctype}*>(g_ins[{i}]), "
                    f"g_sizes[{i}], \"{pname}\"}}}}")
        if f"{pname}_shape" in source:
            params.append(f"ConstantPtr<const int> {pname}_shape")
            args.append(f"ConstantPtr<const int>{{{{g_shapes[{i}], g_ndims[{i}], \"{pname}_shape\"}}}}")
        if f"{pname}_strides" in source:
            params.append(f"ConstantPtr<const int64_t> {pname}_strides")
            args.append(f"ConstantPtr<const int64_t>{{{{g_strides[{i}], g_ndims[{i}], "
                        f"\"{pname}_strides\"}}}}")
        if f"{pname}_ndim" in source:
            params.append(f"const int& {pname}_ndim")
            args.append(f"g_ndims[{i}]")
    for j, (oname, kind) in enumerate(zip(output_names, output_kinds)):
        ctype = _type_name(kind, backend)
        params.append(f"DevicePtr<{ctype}> {oname}")
        args.append(f"DevicePtr<{ctype}>{{{{static_cast<{ctype}*>(g_outs[{j}]), g_out_sizes[{j}], "
                    f"\"{oname}\"}}}}")
    if backend == "metal":
        for attr, (atype, expr) in _ATTRIBUTES.items():
            if attr in source:
                params.append(f"{atype} {attr}")
                args.append(expr)

    fn = f"custom_kernel_{name}"
    lines = [SHIM, header]
    body = source
    call = fn
    if template:
        if backend == "metal":
            tparams = ", ".join(f"{_template_value(v, backend)[0]} {k}" for k, v in template)
            targs = ", ".join(_template_value(v, backend)[1] for _, v in template)
            lines.append(f"template <{tparams}>")
            call = f"{fn}<{targs}>"
        else:  # MLX's CUDA generator: constants at the top of the body
            consts = []
            for k, v in template:
                kind, arg = _template_value(v, backend)
                consts.append(f"  using {k} = {arg};" if kind == "typename"
                              else f"  constexpr {kind} {k} = {arg};")
            body = "\n".join(consts) + "\n\n" + source
    if backend == "cuda":
        lines.append("static thread_local uint3 blockIdx, blockDim, threadIdx;")
    lines.append(f"void {fn}(\n    " + ",\n    ".join(params) + ") {\n" + body + "\n}\n")
    cuda_setup = ("    blockIdx = tgpig; blockDim = tg; threadIdx = tptg;\n"
                  if backend == "cuda" else "")
    lines.append(f"""
static void* const* g_ins; static const long long* g_sizes; static const int* const* g_shapes;
static const int64_t* const* g_strides; static const int* g_ndims; static void* const* g_outs;
static const long long* g_out_sizes; static uint3 g_grid, g_tg;

static void phf_thread(unsigned long long flat) {{
    const uint3 grid = g_grid, tg = g_tg;
    const uint3 tpig = {{uint(flat % grid.x), uint(flat / grid.x % grid.y), uint(flat / grid.x / grid.y)}};
    const uint3 tptg = {{tpig.x % tg.x, tpig.y % tg.y, tpig.z % tg.z}};
    const uint3 tgpig = {{tpig.x / tg.x, tpig.y / tg.y, tpig.z / tg.z}};
    const uint tiitg = tptg.x + tg.x * (tptg.y + tg.y * tptg.z);
    (void)tptg; (void)tgpig; (void)tiitg; (void)grid;
{cuda_setup}    {call}({", ".join(args)});
}}

static void phf_lane_entry() {{
    const int me = phf_simd.cur;
    phf_thread(phf_simd.flat[me]);
    phf_simd.done[me] = 1;
}}

// One SIMD group: n lanes as fibers, resumed round by round until all are done.
static void phf_run_simdgroup(const unsigned long long* flats, int n, int reverse) {{
    phf_simd.on = 1; phf_simd.n = n;
    for (int l = 0; l < n; ++l) {{
        phf_simd.flat[l] = flats[l]; phf_simd.calls[l] = 0; phf_simd.done[l] = 0;
        getcontext(&phf_simd.ctx[l]);
        phf_simd.ctx[l].uc_stack.ss_sp = phf_stacks[l];
        phf_simd.ctx[l].uc_stack.ss_size = sizeof(phf_stacks[l]);
        phf_simd.ctx[l].uc_link = &phf_simd.sched;
        makecontext(&phf_simd.ctx[l], phf_lane_entry, 0);
    }}
    for (;;) {{
        int alive = 0, finished = 0;
        for (int s = 0; s < n; ++s) {{
            const int l = reverse ? n - 1 - s : s;
            if (phf_simd.done[l]) continue;
            phf_simd.cur = l;
            swapcontext(&phf_simd.sched, &phf_simd.ctx[l]);
            if (phf_simd.done[l]) ++finished; else ++alive;
        }}
        if (alive == 0 || phf_fault.hit) break;
        int first = -1;
        for (int l = 0; l < n; ++l) {{
            if (phf_simd.done[l] || (first >= 0 && phf_simd.calls[l] != phf_simd.calls[first])) {{
                phf_fail("SIMD function reached in divergent control flow", "lane", l, n);
            }}
            if (first < 0 && !phf_simd.done[l]) first = l;
        }}
        if (phf_fault.hit) break;  // suspended lanes are abandoned; their stacks are reused
    }}
    phf_simd.on = 0;
}}

extern "C" int phiflash_launch(void* const* ins, const long long* sizes, const int* const* shapes,
                               const int64_t* const* strides, const int* ndims, void* const* outs,
                               const long long* out_sizes, const uint* grid_dims,
                               const uint* tg_dims, int reverse, long long* fault_index,
                               long long* fault_size, const char** fault_buffer,
                               const char** fault_what) {{
    g_ins = ins; g_sizes = sizes; g_shapes = shapes; g_strides = strides; g_ndims = ndims;
    g_outs = outs; g_out_sizes = out_sizes;
    g_grid = {{grid_dims[0], grid_dims[1], grid_dims[2]}};
    g_tg = {{tg_dims[0], tg_dims[1], tg_dims[2]}};
    phf_fault = {{0, nullptr, nullptr, 0, 0}};
    const unsigned long long total = 1ull * g_grid.x * g_grid.y * g_grid.z;
    const int simd = {1 if simd else 0};
    if (!simd) {{
        for (unsigned long long step = 0; step < total && !phf_fault.hit; ++step) {{
            phf_thread(reverse ? total - 1 - step : step);
        }}
    }} else {{
        // 1-D grids: SIMD groups are 32 consecutive threads of a threadgroup
        const unsigned long long tgx = g_tg.x;
        const unsigned long long groups = (total + tgx - 1) / tgx;
        const unsigned long long per = (tgx + 31) / 32;
        for (unsigned long long s = 0; s < groups * per && !phf_fault.hit; ++s) {{
            const unsigned long long sg = reverse ? groups * per - 1 - s : s;
            const unsigned long long first = (sg / per) * tgx + (sg % per) * 32;
            const unsigned long long end_tg = (sg / per + 1) * tgx;
            unsigned long long flats[32];
            int n = 0;
            for (unsigned long long f = first; f < first + 32 && f < end_tg && f < total; ++f) flats[n++] = f;
            if (n > 0) phf_run_simdgroup(flats, n, reverse);
        }}
    }}
    *fault_index = phf_fault.index; *fault_size = phf_fault.size;
    *fault_buffer = phf_fault.buffer; *fault_what = phf_fault.what;
    return phf_fault.hit;
}}
""")
    return "\n".join(lines)


_LIBS: dict[str, ctypes.CDLL] = {}


def compile_source(cpp: str) -> ctypes.CDLL:
    """Compile (or reuse, from this run or the disk cache) a translation unit from `generate_source`."""
    key = hashlib.sha256("\0".join([CXX, *CXXFLAGS, cpp]).encode()).hexdigest()[:24]
    if key in _LIBS:
        return _LIBS[key]
    cache = _cache_dir()
    lib_path = cache / f"kernel-{key}.so"
    if not lib_path.exists():
        src_path = cache / f"kernel-{key}.cpp"
        src_path.write_text(cpp)
        tmp = cache / f"kernel-{key}.{os.getpid()}.tmp.so"
        proc = subprocess.run([CXX, *CXXFLAGS, str(src_path), "-o", str(tmp)],
                              capture_output=True, text=True)
        if proc.returncode != 0:
            raise HarnessError(f"g++ failed on {src_path}:\n{proc.stderr[:4000]}")
        os.replace(tmp, lib_path)  # atomic: concurrent test runs never see half a file
    lib = ctypes.CDLL(str(lib_path))
    lib.phiflash_launch.restype = ctypes.c_int
    _LIBS[key] = lib
    return lib


def _as_numpy(x):
    """(kind, contiguous numpy array) of an input: bfloat16 travels as its uint16 bits."""
    if isinstance(x, tuple) and x[0] == BF16:
        return BF16, np.ascontiguousarray(x[1], dtype=np.uint16)
    x = np.ascontiguousarray(x)
    return x.dtype, x


def launch_dims(grid, threadgroup, backend: str):
    """(threads launched per axis, threadgroup per axis) as MLX's back-end launches them."""
    grid = tuple(int(g) for g in grid)
    if any(g <= 0 for g in grid):
        raise HarnessError(f"empty grid {grid}: MLX would launch a zero-size threadgroup, "
                           "which the GPU rejects; do not launch")
    if any(g >= 2**31 for g in grid):
        raise HarnessError(f"grid {grid}: MLX takes the grid as C++ ints (TypeError)")
    group = tuple(min(int(t), g) for t, g in zip(threadgroup, grid))  # as MLX computes it
    if group[0] * group[1] * group[2] > MAX_THREADGROUP:
        raise HarnessError(f"threadgroup {group} is over {MAX_THREADGROUP} threads")
    if backend == "cuda":  # whole blocks
        grid = tuple(-(-g // t) * t for g, t in zip(grid, group))
    return grid, group


def run_kernel(name, input_names, output_names, source, header, inputs, template, grid,
               threadgroup, output_shapes, output_dtypes, order="forward",
               backend="metal") -> list[np.ndarray]:
    """Execute a kernel as the GPU back-end would, on NumPy arrays (bfloat16 as (BF16, uint16 bits)).

    Inputs are made row-contiguous first (``ensure_row_contiguous=True``, MLX's default).
    """
    if len(inputs) != len(input_names) or len(output_shapes) != len(output_names):
        raise HarnessError(f"kernel {name}: expected {len(input_names)} inputs and "
                           f"{len(output_names)} outputs")
    arrays = [_as_numpy(x) for x in inputs]
    out_kinds = [BF16 if k == BF16 else np.dtype(k) for k in output_dtypes]
    cpp = generate_source(name, input_names, output_names, source, header,
                          [(k, a.shape) for k, a in arrays], template, out_kinds, backend)
    launched, group = launch_dims(grid, threadgroup, backend)
    lib = compile_source(cpp)

    outputs = []
    for shape, kind in zip(output_shapes, out_kinds):
        if kind == BF16:
            outputs.append(np.full(tuple(shape), 0x7fc0, dtype=np.uint16))  # NaN
        else:
            fill = np.nan if kind.kind == "f" else 0
            outputs.append(np.full(tuple(shape), fill, dtype=kind))

    keep = []

    def c_array(ctype, values):
        arr = (ctype * max(1, len(values)))(*values)
        keep.append(arr)
        return arr

    data = [a for _, a in arrays]
    shapes = [c_array(ctypes.c_int, x.shape) for x in data]
    strides = [c_array(ctypes.c_int64, [s // x.itemsize for s in x.strides]) for x in data]
    fi, fs = ctypes.c_longlong(), ctypes.c_longlong()
    fb, fw = ctypes.c_char_p(), ctypes.c_char_p()
    hit = lib.phiflash_launch(
        c_array(ctypes.c_void_p, [x.ctypes.data for x in data]),
        c_array(ctypes.c_longlong, [x.size for x in data]),
        c_array(ctypes.POINTER(ctypes.c_int),
                [ctypes.cast(s, ctypes.POINTER(ctypes.c_int)) for s in shapes]),
        c_array(ctypes.POINTER(ctypes.c_int64),
                [ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in strides]),
        c_array(ctypes.c_int, [x.ndim for x in data]),
        c_array(ctypes.c_void_p, [o.ctypes.data for o in outputs]),
        c_array(ctypes.c_longlong, [o.size for o in outputs]),
        c_array(ctypes.c_uint, launched),
        c_array(ctypes.c_uint, group),
        ctypes.c_int(1 if order == "reverse" else 0),
        ctypes.byref(fi), ctypes.byref(fs), ctypes.byref(fb), ctypes.byref(fw),
    )
    if hit:
        raise HarnessError(f"kernel {name}: {fw.value.decode()} {fb.value.decode()}"
                           f"[{fi.value}] (size {fs.value})")
    return [(BF16, o) if k == BF16 else o for o, k in zip(outputs, out_kinds)]


def to_numpy(x):
    """An mx.array as a harness input (bfloat16 as its bits)."""
    import mlx.core as mx

    if x.dtype == mx.bfloat16:
        return (BF16, np.array(x.view(mx.uint16)))
    return np.array(x)


def from_numpy(x):
    import mlx.core as mx

    if isinstance(x, tuple) and x[0] == BF16:
        return mx.array(x[1]).view(mx.bfloat16)
    return mx.array(x)


def make_runner(order: str = "forward", backend: str = "metal", log: list | None = None):
    """A runner for ``phi4flash_kernels``' ``*_kernel(..., runner=...)`` functions and its
    ``run_gpu``: the same spec and launch, executed here. `log` collects (spec name, launch)."""
    import mlx.core as mx

    def kind_of(dt):
        if dt == mx.bfloat16:
            return BF16
        return {mx.float32: np.float32, mx.float16: np.float16, mx.bool_: np.bool_}[dt]

    def run(spec, launch):
        if log is not None:
            log.append((spec.name, launch))
        outs = run_kernel(spec.name, spec.input_names, spec.output_names, spec.source(backend),
                          spec.full_header(backend), [to_numpy(x) for x in launch.inputs],
                          launch.template, launch.grid, launch.threadgroup, launch.output_shapes,
                          [kind_of(d) for d in launch.output_dtypes], order=order,
                          backend=backend)
        return [from_numpy(o) for o in outs]

    return run
