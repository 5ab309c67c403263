"""Run ``mx.fast.metal_kernel`` sources on the CPU: compile the kernel body as C++ and loop over the grid.

On machines without Metal (Linux CI) this is how the Metal kernels of ``phiflash_mlx/models/phi4flash_kernels.py`` are
tested: the harness takes the *same* ``KernelSpec`` (source, header, input/output names) that is handed
to ``mx.fast.metal_kernel``, writes the function MLX would generate around it -- the same parameters in
the same order, ``<name>_shape`` / ``_strides`` / ``_ndim`` only where the source mentions them, the
thread-position attributes the source uses, the template parameters -- and compiles it with g++ against
a small header that supplies the Metal names the kernels use. Then it calls the kernel once per thread of
the launch grid and hands back the outputs.

What it checks beyond the arithmetic:
* every buffer access is bounds-checked (an out-of-range index fails the call, naming the buffer);
* outputs start as NaN, so an element no thread writes shows up;
* ``order="reverse"`` runs the threads last to first: identical outputs mean no thread depends on
  another's writes (Metal runs them in no particular order).

What it cannot check: threadgroup memory, barriers and SIMD-group functions (not supported: such
kernels are refused), and the Metal compiler's own numerics (exp/log ulps, FMA contraction).

Compiled libraries are cached by the hash of their C++ source in ``$PHIFLASH_HARNESS_CACHE`` or
``<tmp>/phiflash-metal-harness``.
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

# Dtype names as MLX's get_type_string writes them in the generated signature.
_C_TYPES = {
    np.dtype(np.float32): "float",
    np.dtype(np.int32): "int32_t",
    np.dtype(np.uint32): "uint32_t",
    np.dtype(np.int64): "int64_t",
    np.dtype(np.bool_): "bool",
}

# Thread attributes the harness can supply; MLX adds a parameter for each one the source mentions
# (by plain substring search, as here). Anything SIMD- or threadgroup-cooperative is refused.
_SUPPORTED_ATTRIBUTES = {            # name: (Metal type, variable of the grid loop)
    "thread_position_in_grid": ("uint3", "tpig"),
    "threads_per_grid": ("uint3", "grid"),
    "grid_size": ("uint3", "grid"),
    "thread_position_in_threadgroup": ("uint3", "tptg"),
    "threadgroup_position_in_grid": ("uint3", "tgpig"),
    "threads_per_threadgroup": ("uint3", "tg"),
    "thread_index_in_threadgroup": ("uint", "tiitg"),
}
_UNSUPPORTED_ATTRIBUTES = (
    "dispatch_quadgroups_per_threadgroup", "dispatch_simdgroups_per_threadgroup",
    "dispatch_threads_per_threadgroup", "grid_origin", "quadgroup_index_in_threadgroup",
    "quadgroups_per_threadgroup", "simdgroup_index_in_threadgroup", "simdgroups_per_threadgroup",
    "thread_execution_width", "thread_index_in_quadgroup", "thread_index_in_simdgroup",
    "threadgroups_per_grid", "threads_per_simdgroup",
)
_UNSUPPORTED_CALLS = ("simd_", "threadgroup_barrier", "atomic_", "quad_")

METAL_SHIM = r"""
// The Metal names the kernels use, in C++.
#include <cmath>
#include <cstddef>
#include <cstdint>
#include <cstdio>
#include <type_traits>

#define device
#define constant
#define threadgroup
#define thread

typedef unsigned int uint;
struct uint3 { uint x, y, z; };

namespace metal {
#define PHIFLASH_UNARY(fn) \
    inline float fn(float x) { return std::fn(x); }
#define PHIFLASH_MATH \
    PHIFLASH_UNARY(exp) PHIFLASH_UNARY(exp2) PHIFLASH_UNARY(log) PHIFLASH_UNARY(log2) \
    PHIFLASH_UNARY(sqrt) PHIFLASH_UNARY(tanh) PHIFLASH_UNARY(fabs) PHIFLASH_UNARY(abs) \
    inline float rsqrt(float x) { return 1.0f / std::sqrt(x); } \
    inline float max(float a, float b) { return std::fmax(a, b); } \
    inline float min(float a, float b) { return std::fmin(a, b); }
PHIFLASH_MATH
namespace precise { PHIFLASH_MATH }
namespace fast { PHIFLASH_MATH }
#undef PHIFLASH_MATH
#undef PHIFLASH_UNARY
}  // namespace metal

// Bounds-checked stand-in for a `device T*` / `constant T*` parameter. Out-of-range accesses are
// recorded (the first one wins) and redirected to a scratch element, so the run finishes and
// Python raises with the details.
struct PhiflashFault { int hit; const char* buffer; long long index; long long size; };
static PhiflashFault phiflash_fault = {0, nullptr, 0, 0};

template <typename T>
struct Checked {
    T* data;
    long long size;
    const char* name;
    template <typename I>
    T& operator[](I index) const {
        long long k = static_cast<long long>(index);
        if (k < 0 || k >= size) {
            if (!phiflash_fault.hit) phiflash_fault = {1, name, k, size};
            static typename std::remove_const<T>::type scratch;
            return scratch;
        }
        return data[k];
    }
};
"""


class HarnessError(RuntimeError):
    """The kernel could not be compiled or touched memory outside its buffers."""


def available() -> str | None:
    """None when the harness can run here, else why not."""
    if shutil.which(CXX) is None:
        return f"no C++ compiler ({CXX}) on PATH"
    return None


def _cache_dir() -> pathlib.Path:
    root = os.environ.get("PHIFLASH_HARNESS_CACHE") or os.path.join(tempfile.gettempdir(),
                                                                   "phiflash-metal-harness")
    path = pathlib.Path(root)
    path.mkdir(parents=True, exist_ok=True)
    return path


def _template_value(value) -> tuple[str, str]:
    """(parameter kind, C++ argument) of one template argument, as MLX's write_template writes it."""
    if isinstance(value, bool):
        return "bool", "true" if value else "false"
    if isinstance(value, int):
        return "int", str(value)
    name = str(value)                     # an mx.Dtype such as mlx.core.float32
    if name.endswith("float32"):
        return "typename", "float"
    raise HarnessError(f"template argument {value!r}: the harness supports only float32 types")


def generate_source(name, input_names, output_names, source, header, inputs, template,
                    output_dtypes) -> str:
    """The C++ translation unit: shim, header, kernel function as MLX would declare it, grid loop."""
    for attr in _UNSUPPORTED_ATTRIBUTES:
        if attr in source:
            raise HarnessError(f"kernel {name} uses {attr}, which the CPU harness cannot emulate")
    for call in _UNSUPPORTED_CALLS:
        if call in source:
            raise HarnessError(f"kernel {name} uses {call}*, which the CPU harness cannot emulate")

    params, args = [], []
    for i, (pname, arr) in enumerate(zip(input_names, inputs)):
        ctype = _C_TYPES.get(arr.dtype)
        if ctype is None:
            raise HarnessError(f"input {pname}: dtype {arr.dtype} not supported by the harness")
        if arr.ndim == 0:
            params.append(f"const {ctype}& {pname}")
            args.append(f"*static_cast<const {ctype}*>(ins[{i}])")
            continue
        params.append(f"Checked<const {ctype}> {pname}")
        args.append(f"Checked<const {ctype}>{{static_cast<const {ctype}*>(ins[{i}]), sizes[{i}], \"{pname}\"}}")
        # MLX adds these exactly when the source contains the name (substring search).
        if f"{pname}_shape" in source:
            params.append(f"Checked<const int> {pname}_shape")
            args.append(f"Checked<const int>{{shapes[{i}], ndims[{i}], \"{pname}_shape\"}}")
        if f"{pname}_strides" in source:
            params.append(f"Checked<const int64_t> {pname}_strides")
            args.append(f"Checked<const int64_t>{{strides[{i}], ndims[{i}], \"{pname}_strides\"}}")
        if f"{pname}_ndim" in source:
            params.append(f"const int& {pname}_ndim")
            args.append(f"ndims[{i}]")
    for j, (oname, dtype) in enumerate(zip(output_names, output_dtypes)):
        ctype = _C_TYPES.get(np.dtype(dtype))
        if ctype is None:
            raise HarnessError(f"output {oname}: dtype {dtype} not supported by the harness")
        params.append(f"Checked<{ctype}> {oname}")
        args.append(f"Checked<{ctype}>{{static_cast<{ctype}*>(outs[{j}]), out_sizes[{j}], \"{oname}\"}}")
    for attr, (atype, var) in _SUPPORTED_ATTRIBUTES.items():
        if attr in source:
            params.append(f"{atype} {attr}")
            args.append(var)

    tparams = ", ".join(f"{_template_value(v)[0]} {k}" for k, v in template)
    targs = ", ".join(_template_value(v)[1] for _, v in template)
    fn = f"custom_kernel_{name}"
    lines = [METAL_SHIM, header]
    if template:
        lines.append(f"template <{tparams}>")
    lines.append(f"void {fn}(\n    " + ",\n    ".join(params) + ") {\n" + source + "\n}\n")
    call = f"{fn}<{targs}>" if template else fn
    lines.append(f"""
extern "C" int phiflash_launch(void* const* ins, const long long* sizes, const int* const* shapes,
                               const int64_t* const* strides, const int* ndims, void* const* outs,
                               const long long* out_sizes, const uint* grid_dims, const uint* group_dims,
                               int reverse, long long* fault_index, long long* fault_size,
                               const char** fault_buffer) {{
    (void)sizes; (void)shapes; (void)strides; (void)ndims; (void)out_sizes; (void)group_dims;
    phiflash_fault = {{0, nullptr, 0, 0}};
    const uint3 grid = {{grid_dims[0], grid_dims[1], grid_dims[2]}};
    const uint3 tg = {{group_dims[0], group_dims[1], group_dims[2]}};
    const unsigned long long total = 1ull * grid.x * grid.y * grid.z;
    for (unsigned long long step = 0; step < total; ++step) {{
        const unsigned long long flat = reverse ? total - 1 - step : step;
        const uint3 tpig = {{uint(flat % grid.x), uint(flat / grid.x % grid.y),
                            uint(flat / grid.x / grid.y)}};
        const uint3 tptg = {{tpig.x % tg.x, tpig.y % tg.y, tpig.z % tg.z}};
        const uint3 tgpig = {{tpig.x / tg.x, tpig.y / tg.y, tpig.z / tg.z}};
        const uint tiitg = tptg.x + tg.x * (tptg.y + tg.y * tptg.z);
        (void)tptg; (void)tgpig; (void)tiitg;
        {call}({", ".join(args)});
        if (phiflash_fault.hit) break;
    }}
    *fault_index = phiflash_fault.index;
    *fault_size = phiflash_fault.size;
    *fault_buffer = phiflash_fault.buffer;
    return phiflash_fault.hit;
}}
""")
    return "\n".join(lines)


_LIBS: dict[str, ctypes.CDLL] = {}


def compile_source(cpp: str) -> ctypes.CDLL:
    """Compile (or reuse from the cache) and load a translation unit from `generate_source`."""
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
            raise HarnessError(f"g++ failed on {src_path}:\n{proc.stderr}")
        os.replace(tmp, lib_path)              # atomic: concurrent test runs never see half a file
    lib = ctypes.CDLL(str(lib_path))
    lib.phiflash_launch.restype = ctypes.c_int
    _LIBS[key] = lib
    return lib


def run_kernel(name, input_names, output_names, source, header, inputs, template, grid,
               threadgroup, output_shapes, output_dtypes, order="forward") -> list[np.ndarray]:
    """Execute a kernel as ``mx.fast.metal_kernel(...)(...)`` would, on NumPy arrays.

    Inputs are made row-contiguous first (``ensure_row_contiguous=True``, MLX's default).
    """
    if len(inputs) != len(input_names) or len(output_shapes) != len(output_names):
        raise HarnessError(f"kernel {name}: expected {len(input_names)} inputs and "
                           f"{len(output_names)} outputs")
    inputs = [np.ascontiguousarray(x) for x in inputs]
    cpp = generate_source(name, input_names, output_names, source, header, inputs, template,
                          output_dtypes)
    lib = compile_source(cpp)

    outputs = []
    for shape, dtype in zip(output_shapes, output_dtypes):
        dtype = np.dtype(dtype)
        fill = np.nan if dtype.kind == "f" else 0      # unwritten float outputs stay NaN
        outputs.append(np.full(tuple(shape), fill, dtype=dtype))

    keep = []                                          # ctypes arrays must outlive the call

    def c_array(ctype, values):
        arr = (ctype * max(1, len(values)))(*values)
        keep.append(arr)
        return arr

    shapes = [c_array(ctypes.c_int, x.shape) for x in inputs]
    strides = [c_array(ctypes.c_int64, [s // x.itemsize for s in x.strides]) for x in inputs]
    grid = tuple(int(g) for g in grid)
    group = tuple(max(1, min(int(t), g)) for t, g in zip(threadgroup, grid))   # as MLX clamps it
    fault_index, fault_size, fault_buffer = ctypes.c_longlong(), ctypes.c_longlong(), ctypes.c_char_p()
    if min(grid) == 0:
        return outputs
    hit = lib.phiflash_launch(
        c_array(ctypes.c_void_p, [x.ctypes.data for x in inputs]),
        c_array(ctypes.c_longlong, [x.size for x in inputs]),
        c_array(ctypes.POINTER(ctypes.c_int), [ctypes.cast(s, ctypes.POINTER(ctypes.c_int)) for s in shapes]),
        c_array(ctypes.POINTER(ctypes.c_int64), [ctypes.cast(s, ctypes.POINTER(ctypes.c_int64)) for s in strides]),
        c_array(ctypes.c_int, [x.ndim for x in inputs]),
        c_array(ctypes.c_void_p, [o.ctypes.data for o in outputs]),
        c_array(ctypes.c_longlong, [o.size for o in outputs]),
        c_array(ctypes.c_uint, grid),
        c_array(ctypes.c_uint, group),
        ctypes.c_int(1 if order == "reverse" else 0),
        ctypes.byref(fault_index), ctypes.byref(fault_size), ctypes.byref(fault_buffer),
    )
    if hit:
        raise HarnessError(f"kernel {name}: out-of-bounds access {fault_buffer.value.decode()}"
                           f"[{fault_index.value}] (size {fault_size.value})")
    return outputs


def make_runner(order: str = "forward"):
    """A runner for ``phiflash_mlx.models.phi4flash_kernels``' ``*_kernel(..., runner=...)`` functions."""
    import mlx.core as mx

    def run(spec, launch):
        arrays = [np.array(x) for x in launch.inputs]
        dtypes = []
        for dt in launch.output_dtypes:
            if dt != mx.float32:
                raise HarnessError(f"output dtype {dt}: the harness supports float32 outputs")
            dtypes.append(np.float32)
        outs = run_kernel(spec.name, spec.input_names, spec.output_names, spec.source, spec.header,
                          arrays, launch.template, launch.grid, launch.threadgroup,
                          launch.output_shapes, dtypes, order=order)
        return [mx.array(o) for o in outs]

    return run
