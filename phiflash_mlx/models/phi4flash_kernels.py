"""Selective scan, scan step and GMU gate: GPU kernels where they run, plain ops elsewhere.

The model calls only the three entry functions at the bottom (`selective_scan`,
`selective_state_update`, `gmu_gate`). Each picks one of two paths computing the same math:

* a GPU kernel: ``mx.fast.metal_kernel`` on Apple silicon, ``mx.fast.cuda_kernel`` where MLX's CUDA
  back-end is present (the same kernel bodies, behind a per-back-end prelude), and
* the plain-ops twin below (any back-end), which is also the kernels' oracle in the tests and the
  source of their gradients (every kernel call is an ``mx.custom_function`` whose VJP is the twin's).

Dtype policy (both paths): u, delta, z, B, C, g, memory may be float32, float16 or bfloat16; A, D
and delta_bias are read as float32. All arithmetic and the recurrent state are float32; y has u's
dtype (the gate's output g's dtype) and the returned state is always float32.

Masked scan: ``mask`` (b, l), bool or 0/1, skips the steps where it is 0 exactly -- dt is set to 0
after the softplus, so exp(0 * A) = 1 and dt * B * u = 0 leave the state unchanged. y at a skipped
position is what the scan gives there with dt = 0 (C . state + D * u, gated): finite, meaningless.
That makes left- and right-padded batched prefill exact for the recurrent layer.

Which path runs:

* ``use_kernel=False`` per call, or ``PHIFLASH_KERNELS=ops``: plain ops.
* ``use_kernel=None`` (default) with ``PHIFLASH_KERNELS=auto`` (default): the kernels when a GPU
  back-end (Metal or CUDA) is present and the default device is the GPU, else plain ops.
* ``use_kernel=True``, or ``PHIFLASH_KERNELS=metal`` (or ``kernel``): the kernels; where no GPU
  back-end is present this warns once (``KernelUnavailableWarning``) and falls back to plain ops.

The first time the kernel path is taken, every kernel variant (prefill / step, gated / not, masked,
float32 / float16 / bfloat16, inputs small enough for MLX's ``constant`` address space and not)
runs once on tiny inputs and is compared with its twin. Any failure -- a compile error, a launch
error, a wrong number -- is recorded, warned about once, and the plain ops run from then on.
``kernel_status()`` reports the path, the reason and the probe's result; ``probe_kernels()`` runs the
probe ahead of time (it needs eager evaluation, so inside ``mx.compile`` an unprobed call takes the
ops path). Empty inputs never launch a kernel; grids over 2**31 - 1 threads take the ops path.

Nothing in the entries synchronises with the host, so they work under ``mx.compile`` and
``mx.grad``. This module imports only mlx and the standard library: it can be dropped into
``mlx_lm/models/`` next to ``phi4flash.py`` unchanged.

Shapes: u, delta, z (b, l, d_in); A (d_in, n) = -exp(A_log); B, C (b, l, n); D, delta_bias (d_in,);
state (b, d_in, n). The decode step drops the l axis.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx

MODES = ("auto", "metal", "kernel", "ops")
ENV_VAR = "PHIFLASH_KERNELS"
FLOAT_DTYPES = (mx.float32, mx.float16, mx.bfloat16)
MAX_GRID = 2**31 - 1  # the grid is a C++ int tuple in MLX


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


# ---------------------------------------------------------------------------------------------
# Plain-ops twins: the fallback path, the kernels' oracle in the tests and their gradients
# ---------------------------------------------------------------------------------------------


def softplus(x: mx.array) -> mx.array:
    """mamba_ssm's softplus with threshold 20 (SAMBAY.md 4.5 step 7)."""
    return mx.where(x <= 20.0, mx.log1p(mx.exp(mx.minimum(x, 20.0))), x)


def silu_gate(y: mx.array, z: mx.array) -> mx.array:
    """y * SiLU(z), as the scan kernel gates: y * z / (1 + exp(-z))."""
    return y * z * mx.sigmoid(z)


def _dt(delta, delta_bias):
    delta = _f32(delta)
    if delta_bias is not None:
        delta = delta + _f32(delta_bias)
    return softplus(delta)


def _finish(y, u, D, z, dtype):
    y = y + _f32(D) * u
    if z is not None:
        y = silu_gate(y, _f32(z))
    return y.astype(dtype)


def selective_scan_ops(
    u, delta, A, B, C, D, z=None, delta_bias=None, state=None, mask=None
):
    """Whole-sequence selective scan; returns (y (b, l, d_in) in u's dtype, state (b, d_in, n) f32)."""
    b, l, d_in = u.shape
    n = A.shape[-1]
    dtype = u.dtype
    s = mx.zeros((b, d_in, n), dtype=mx.float32) if state is None else _f32(state)
    if l == 0:
        return mx.zeros((b, 0, d_in), dtype=dtype), s
    u, A, B, C = _f32(u), _f32(A), _f32(B), _f32(C)
    dt = _dt(delta, delta_bias)  # (b, l, d_in)
    if mask is not None:
        dt = mx.where(mask[..., None] != 0, dt, 0.0)
    dA = mx.exp(dt[..., None] * A)  # (b, l, d_in, n)
    dBu = (dt * u)[..., None] * B[:, :, None, :]  # (b, l, d_in, n)
    ys = []
    for t in range(l):
        s = dA[:, t] * s + dBu[:, t]
        ys.append((s * C[:, t, None, :]).sum(-1))
    return _finish(mx.stack(ys, axis=1), u, D, z, dtype), s


def selective_state_update_ops(state, u, delta, A, B, C, D, z=None, delta_bias=None):
    """One decode step: u, delta, z (b, d_in); B, C (b, n). Returns (y in u's dtype, new f32 state)."""
    dtype = u.dtype
    u, A, B, C = _f32(u), _f32(A), _f32(B), _f32(C)
    dt = _dt(delta, delta_bias)
    s = mx.exp(dt[..., None] * A) * _f32(state) + (dt * u)[..., None] * B[:, None, :]
    y = (s * C[:, None, :]).sum(-1)
    return _finish(y, u, D, z, dtype), s


def gmu_gate_ops(g: mx.array, memory: mx.array) -> mx.array:
    """The GMU's elementwise gate SiLU(g) * memory (SAMBAY.md 4.7), in float32, returned in g's dtype."""
    g32 = _f32(g)
    return (g32 * mx.sigmoid(g32) * _f32(memory)).astype(g.dtype)


class KernelUnavailableWarning(RuntimeWarning):
    """The GPU kernels were asked for but cannot run here; the plain-ops path ran instead."""


# ---------------------------------------------------------------------------------------------
# Kernel sources. One body per kernel, shared by Metal and CUDA; a per-back-end header supplies
# PHF_FN (function qualifier), PHF_EXP / PHF_EXP2 / PHF_LOG and PHF_SHUFFLE_XOR, and a per-back-end
# prelude defines `phf_tid`, the flat thread index. Every body guards phf_tid against the number of
# threads it needs, because CUDA rounds the grid up to whole blocks.
# ---------------------------------------------------------------------------------------------

METAL_HEADER = """
#define PHF_FN inline
typedef size_t phf_size_t;
#define PHF_SIZE phf_size_t
#define PHF_EXP(x) metal::precise::exp(x)
#define PHF_EXP2(x) metal::precise::exp2(x)
#define PHF_LOG(x) metal::precise::log(x)
#define PHF_SHUFFLE_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
"""

CUDA_HEADER = """
#define PHF_FN __device__ __forceinline__
typedef unsigned long long phf_size_t;  // no <cstddef> under NVRTC
#define PHF_SIZE phf_size_t
#define PHF_EXP(x) expf(x)
#define PHF_EXP2(x) exp2f(x)
#define PHF_LOG(x) logf(x)
#define PHF_SHUFFLE_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
"""

METAL_PRELUDE = "    const uint phf_tid = thread_position_in_grid.x;\n"
CUDA_PRELUDE = (
    "    const unsigned int phf_tid = blockIdx.x * blockDim.x + threadIdx.x;\n"
)

# Helpers shared by both back-ends.
COMMON_HEADER = """
// log(1 + e) for e >= 0. Below 1 as 2 atanh(e / (2 + e)) by its odd series (t <= 1/3, 8 terms:
// relative error < 3e-9): no cancellation and no identity a fast-math compiler could simplify
// away, so it holds in every math mode. From 1 on, log(1 + e) itself is accurate.
PHF_FN float phf_log1p(float e) {
    if (e >= 1.0f) {
        return PHF_LOG(1.0f + e);
    }
    const float t = e / (2.0f + e);
    const float t2 = t * t;
    float p = 1.0f / 15.0f;
    p = p * t2 + 1.0f / 13.0f;
    p = p * t2 + 1.0f / 11.0f;
    p = p * t2 + 1.0f / 9.0f;
    p = p * t2 + 1.0f / 7.0f;
    p = p * t2 + 1.0f / 5.0f;
    p = p * t2 + 1.0f / 3.0f;
    p = p * t2 + 1.0f;
    return 2.0f * t * p;
}

// mamba_ssm's softplus: log(1 + exp(x)) up to 20, x itself above (SAMBAY.md 4.5 step 7).
PHF_FN float phf_softplus(float x) {
    return (x <= 20.0f) ? phf_log1p(PHF_EXP(x)) : x;
}

// y * SiLU(z), written as the CUDA kernels write it: y * z / (1 + exp(-z)).
PHF_FN float phf_silu_gate(float y, float z) {
    return y * z / (1.0f + PHF_EXP(-z));
}
"""

# One thread per (batch row, channel), looping over time and the N states. Template parameters:
# N = d_state, Y = the output type. {length} / {skip} / {gate} make the variants.
_SERIAL_TEMPLATE = """
    const int d_in = A_shape[0];
    const int rows = {batch} * d_in;
    if (int(phf_tid) >= rows) {{
        return;  // grid rounded up to whole blocks (CUDA)
    }}
    const int length = {length};
    const int r = int(phf_tid);
    const int b = r / d_in;
    const int c = r - b * d_in;

    float a2[N];  // A * log2(e): exp(dt * A) == exp2(dt * a2)
    float s[N];
    for (int n = 0; n < N; ++n) {{
        a2[n] = static_cast<float>(A[PHF_SIZE(c) * N + n]) * 1.4426950408889634f;
        s[n] = static_cast<float>(state_in[PHF_SIZE(r) * N + n]);
    }}
    const float skip = static_cast<float>(D[c]);
    const float bias = static_cast<float>(delta_bias[c]);

    for (int t = 0; t < length; ++t) {{
        const PHF_SIZE tok = PHF_SIZE(b) * length + t;  // row of B and C: position (b, t)
        const PHF_SIZE i = tok * d_in + c;  // element (b, t, c) of u, delta, z, y
        const float x = static_cast<float>(u[i]);
        float dt = phf_softplus(static_cast<float>(delta[i]) + bias);{skip}
        const float dtx = dt * x;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {{
            // s_t = exp(dt A) s_(t-1) + dt B u ;  y_t = C . s_t
            s[n] = PHF_EXP2(dt * a2[n]) * s[n] + dtx * static_cast<float>(B[tok * N + n]);
            acc += static_cast<float>(C[tok * N + n]) * s[n];
        }}
        float out = acc + skip * x;{gate}
        y[i] = static_cast<Y>(out);
    }}

    for (int n = 0; n < N; ++n) {{
        state_out[PHF_SIZE(r) * N + n] = s[n];
    }}
"""

# LPC lanes per (batch row, channel), each holding N / LPC of the states; y_t is reduced across the
# LPC lanes with butterfly shuffles (xor offsets below LPC stay inside the channel's lanes). The grid
# is rounded up to whole SIMD groups / warps; idle lanes shadow the last row and never write, so
# every shuffle has all 32 lanes present.
_LANES_TEMPLATE = """
    const int d_in = A_shape[0];
    const int rows = {batch} * d_in;
    if (int(phf_tid) >= ((rows * LPC + 31) / 32) * 32) {{
        return;  // whole SIMD groups beyond the rounded grid (CUDA blocks)
    }}
    const bool live = int(phf_tid) < rows * LPC;
    const int r = live ? int(phf_tid) / LPC : rows - 1;
    const int k = int(phf_tid) % LPC;  // lane within the channel
    const int length = {length};
    const int b = r / d_in;
    const int c = r - b * d_in;
    constexpr int NPL = N / LPC;  // states per lane

    float a2[NPL];
    float s[NPL];
    for (int j = 0; j < NPL; ++j) {{
        const int n = k * NPL + j;
        a2[j] = static_cast<float>(A[PHF_SIZE(c) * N + n]) * 1.4426950408889634f;
        s[j] = static_cast<float>(state_in[PHF_SIZE(r) * N + n]);
    }}
    const float skip = static_cast<float>(D[c]);
    const float bias = static_cast<float>(delta_bias[c]);

    for (int t = 0; t < length; ++t) {{
        const PHF_SIZE tok = PHF_SIZE(b) * length + t;
        const PHF_SIZE i = tok * d_in + c;
        const float x = static_cast<float>(u[i]);
        float dt = phf_softplus(static_cast<float>(delta[i]) + bias);{skip}
        const float dtx = dt * x;
        float acc = 0.0f;
        for (int j = 0; j < NPL; ++j) {{
            const PHF_SIZE bn = tok * N + k * NPL + j;
            s[j] = PHF_EXP2(dt * a2[j]) * s[j] + dtx * static_cast<float>(B[bn]);
            acc += static_cast<float>(C[bn]) * s[j];
        }}
        for (int off = LPC / 2; off > 0; off /= 2) {{
            acc += PHF_SHUFFLE_XOR(acc, off);
        }}
        if (live && k == 0) {{
            float out = acc + skip * x;{gate}
            y[i] = static_cast<Y>(out);
        }}
    }}

    if (live) {{
        for (int j = 0; j < NPL; ++j) {{
            state_out[PHF_SIZE(r) * N + k * NPL + j] = s[j];
        }}
    }}
"""

_SKIP_LINE = (
    "\n        dt = mask[tok] ? dt : 0.0f;  // padding: the state carries through"
)
_GATE_LINE = "\n        out = phf_silu_gate(out, static_cast<float>(z[i]));"

# SiLU(g) * memory, one element per thread; Y = the output type.
_GMU_SOURCE = """
    const PHF_SIZE i = phf_tid;
    if (i >= PHF_SIZE(g_size)) {
        return;  // grid rounded up to whole blocks (CUDA)
    }
    out[i] = static_cast<Y>(phf_silu_gate(static_cast<float>(memory[i]), static_cast<float>(g[i])));
"""

SCAN_LAYOUTS = ("serial", "lanes")


@dataclass(frozen=True)
class KernelSpec:
    """What ``mx.fast.metal_kernel`` / ``cuda_kernel`` is constructed from, less the prelude."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    body: str
    header: str = COMMON_HEADER

    def source(self, backend: str) -> str:
        return (METAL_PRELUDE if backend == "metal" else CUDA_PRELUDE) + self.body

    def full_header(self, backend: str) -> str:
        return (METAL_HEADER if backend == "metal" else CUDA_HEADER) + self.header


@dataclass
class Launch:
    """Everything one call of a kernel gets (the keyword arguments of the kernel object)."""

    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


def scan_spec_name(decode: bool, gated: bool, masked: bool, layout: str) -> str:
    return (
        ("phiflash_scan_step" if decode else "phiflash_selective_scan")
        + ("_gated" if gated else "")
        + ("_masked" if masked else "")
        + ("_lanes" if layout == "lanes" else "")
    )


def _scan_spec(decode: bool, gated: bool, masked: bool, layout: str) -> KernelSpec:
    inputs = ("u", "delta", "A", "B", "C", "D", "delta_bias", "state_in")
    inputs += ("z",) if gated else ()
    inputs += ("mask",) if masked else ()
    template = _LANES_TEMPLATE if layout == "lanes" else _SERIAL_TEMPLATE
    body = template.format(
        batch="state_in_shape[0]",
        length="1" if decode else "u_shape[1]",
        gate=_GATE_LINE if gated else "",
        skip=_SKIP_LINE if masked else "",
    )
    return KernelSpec(
        scan_spec_name(decode, gated, masked, layout), inputs, ("y", "state_out"), body
    )


def _gmu_body() -> str:
    # g_size: total elements, read from the shape (MLX passes g_shape when the body names it).
    return "    const int g_size = g_shape[0];\n" + _GMU_SOURCE


SPECS: dict[str, KernelSpec] = {}
for _layout in SCAN_LAYOUTS:
    for _decode in (False, True):
        for _gated in (False, True):
            for _masked in (False, True) if not _decode else (False,):
                _spec = _scan_spec(_decode, _gated, _masked, _layout)
                SPECS[_spec.name] = _spec
SPECS["phiflash_gmu_gate"] = KernelSpec(
    "phiflash_gmu_gate", ("g", "memory"), ("out",), _gmu_body()
)


def gpu_backend() -> str | None:
    """'metal' or 'cuda' when MLX has that GPU back-end here, else None."""
    try:
        if mx.metal.is_available():
            return "metal"
    except Exception:
        pass
    try:
        cuda = getattr(mx, "cuda", None)
        if cuda is not None and cuda.is_available():
            return "cuda"
    except Exception:
        pass
    return None


_BUILT: dict[tuple[str, str], object] = {}


def _kernel_object(spec: KernelSpec, backend: str):
    key = (spec.name, backend)
    if key not in _BUILT:
        common = dict(
            name=spec.name,
            input_names=list(spec.input_names),
            output_names=list(spec.output_names),
            source=spec.source(backend),
            header=spec.full_header(backend),
        )
        if backend == "metal":
            try:  # safe math (MLX's default), said explicitly where MLX takes the option
                _BUILT[key] = mx.fast.metal_kernel(
                    **common, compile_options={"math_mode": "safe"}
                )
            except TypeError:
                _BUILT[key] = mx.fast.metal_kernel(**common)
        else:
            _BUILT[key] = mx.fast.cuda_kernel(**common)
    return _BUILT[key]


# A runner executes a (KernelSpec, Launch) pair and returns the outputs as MLX arrays. The GPU one
# below is what the model uses; tests substitute the C++ harness's runner to run the same bodies.
Runner = Callable[[KernelSpec, Launch], Sequence[mx.array]]


def run_gpu(spec: KernelSpec, launch: Launch) -> list[mx.array]:
    backend = gpu_backend() or "metal"
    return _kernel_object(spec, backend)(
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
        stream=mx.gpu,
    )


run_metal = run_gpu  # the older name


# ---------------------------------------------------------------------------------------------
# Kernel launches
# ---------------------------------------------------------------------------------------------

_SERIAL_THREADS = (
    64  # 5120 channels at batch 1 give 80 groups to spread over the GPU cores
)
_LANES_THREADS = 256
_GATE_THREADS = 256
scan_layout = os.environ.get(
    "PHIFLASH_SCAN_LAYOUT", "serial"
)  # decided by bench_kernels.py
if scan_layout not in SCAN_LAYOUTS:
    scan_layout = "serial"


def _act(x: mx.array) -> mx.array:
    """Activations go to the kernel in their own float dtype; anything else as float32."""
    return x if x.dtype in FLOAT_DTYPES else x.astype(mx.float32)


def lanes_per_channel(n: int) -> int:
    """The largest power of two <= 32 that divides d_state."""
    lanes = 1
    while lanes < 32 and n % (lanes * 2) == 0:
        lanes *= 2
    return lanes


def _scan_launch(u, delta, A, B, C, D, z, delta_bias, state, mask, layout):
    decode = u.ndim == 2
    b, d_in = u.shape[0], u.shape[-1]
    n = A.shape[-1]
    if delta_bias is None:
        delta_bias = mx.zeros((d_in,), dtype=mx.float32)
    if state is None:
        state = mx.zeros((b, d_in, n), dtype=mx.float32)
    inputs = [_act(u), _act(delta), _f32(A), _act(B), _act(C), _f32(D)]
    inputs += [_f32(delta_bias), _f32(state)]
    if z is not None:
        inputs.append(_act(z))
    if mask is not None:
        inputs.append(mask if mask.dtype == mx.bool_ else mask != 0)
    template = [("N", n), ("Y", u.dtype if u.dtype in FLOAT_DTYPES else mx.float32)]
    if layout == "lanes":
        lpc = lanes_per_channel(n)
        template.insert(1, ("LPC", lpc))
        threads = -(-(b * d_in * lpc) // 32) * 32
        group = _LANES_THREADS
    else:
        threads, group = b * d_in, _SERIAL_THREADS
    spec = SPECS[scan_spec_name(decode, z is not None, mask is not None, layout)]
    launch = Launch(
        inputs=inputs,
        template=template,
        grid=(threads, 1, 1),
        threadgroup=(group, 1, 1),
        output_shapes=[u.shape, (b, d_in, n)],
        output_dtypes=[template[-1][1], mx.float32],
    )
    return spec, launch


def _gmu_launch(g, memory):
    g_in = _act(g)
    launch = Launch(
        inputs=[g_in.reshape(-1), _act(memory).reshape(-1)],
        template=[("Y", g_in.dtype)],
        grid=(g.size, 1, 1),
        threadgroup=(_GATE_THREADS, 1, 1),
        output_shapes=[(g.size,)],
        output_dtypes=[g_in.dtype],
    )
    return SPECS["phiflash_gmu_gate"], launch


def _with_twin_vjp(forward, twin, n_diff):
    """`forward` as an mx.custom_function whose VJP is the plain-ops twin's (MLX's custom kernels have
    none). The first `n_diff` arguments are differentiated; the rest (a mask) get zero cotangents.
    """
    fn = mx.custom_function(forward)

    @fn.vjp
    def _vjp(primals, cotangents, outputs):
        diff, rest = list(primals[:n_diff]), list(primals[n_diff:])
        cots = (
            list(cotangents) if isinstance(cotangents, (list, tuple)) else [cotangents]
        )

        def f(*xs):
            out = twin(*xs, *rest)
            return list(out) if isinstance(out, tuple) else [out]

        _, grads = mx.vjp(f, diff, cots)
        return tuple(grads) + tuple(mx.zeros_like(x) for x in rest)

    return fn


def _named_call(forward_spec, twin, names, values, n_diff, runner, shape=None):
    def forward(*xs):
        spec, launch = forward_spec(**dict(zip(names, xs)))
        out = (runner or run_gpu)(spec, launch)
        return tuple(out) if len(out) > 1 else out[0].reshape(shape)

    def twin_fn(*xs):
        return twin(**dict(zip(names, xs)))

    return _with_twin_vjp(forward, twin_fn, n_diff)(*values)


def _collect(required, optional, mask=None):
    names = [k for k, _ in required] + [k for k, v in optional if v is not None]
    values = [v for _, v in required] + [v for _, v in optional if v is not None]
    n_diff = len(values)
    if mask is not None:
        names.append("mask")
        values.append(mask)
    return names, values, n_diff


def selective_scan_kernel(
    u,
    delta,
    A,
    B,
    C,
    D,
    z=None,
    delta_bias=None,
    state=None,
    mask=None,
    runner: Runner | None = None,
    layout: str | None = None,
):
    """The kernel path of `selective_scan`; `runner` defaults to the GPU. Returns (y, final state)."""
    layout = layout or scan_layout
    names, values, n_diff = _collect(
        [("u", u), ("delta", delta), ("A", A), ("B", B), ("C", C), ("D", D)],
        [("z", z), ("delta_bias", delta_bias), ("state", state)],
        mask,
    )

    def spec_launch(
        u, delta, A, B, C, D, z=None, delta_bias=None, state=None, mask=None
    ):
        return _scan_launch(u, delta, A, B, C, D, z, delta_bias, state, mask, layout)

    return _named_call(spec_launch, selective_scan_ops, names, values, n_diff, runner)


def selective_state_update_kernel(
    state,
    u,
    delta,
    A,
    B,
    C,
    D,
    z=None,
    delta_bias=None,
    runner: Runner | None = None,
    layout: str | None = None,
):
    """The kernel path of `selective_state_update` (u, delta, z (b, d_in); B, C (b, n))."""
    layout = layout or scan_layout
    names, values, n_diff = _collect(
        [("state", state), ("u", u), ("delta", delta), ("A", A), ("B", B)]
        + [("C", C), ("D", D)],
        [("z", z), ("delta_bias", delta_bias)],
    )

    def spec_launch(state, u, delta, A, B, C, D, z=None, delta_bias=None):
        return _scan_launch(u, delta, A, B, C, D, z, delta_bias, state, None, layout)

    return _named_call(
        spec_launch, selective_state_update_ops, names, values, n_diff, runner
    )


def gmu_gate_kernel(g, memory, runner: Runner | None = None):
    """The kernel path of `gmu_gate`: SiLU(g) * memory in one pass over the elements."""
    shape = g.shape

    def spec_launch(g, memory):
        return _gmu_launch(g, memory)

    return _named_call(
        spec_launch, gmu_gate_ops, ["g", "memory"], [g, memory], 2, runner, shape
    )


# ---------------------------------------------------------------------------------------------
# First-use probe: every variant once on tiny inputs against its twin
# ---------------------------------------------------------------------------------------------

_probe_failure: str | None = None
_probed: set = set()


def _det(shape, k: float, scale: float = 1.0, dtype=mx.float32) -> mx.array:
    """Deterministic, varied test values (no random state touched)."""
    size = 1
    for s in shape:
        size *= s
    x = mx.sin(mx.arange(size, dtype=mx.float32) * 0.7 + k) * scale
    return x.reshape(shape).astype(dtype)


def _probe_cases(dtype):
    """(label, kernel thunk, ops thunk) for every variant at one activation dtype, with inputs small
    enough for MLX's constant address space (fewer than 8 elements) and large enough for device.
    """
    for size, (b, l, d_in, n) in (("constant", (1, 1, 1, 4)), ("device", (2, 3, 8, 8))):
        A = -mx.exp(_det((d_in, n), 0.3, 0.5))
        D, bias = _det((d_in,), 1.1), _det((d_in,), 2.3, 0.5)
        seq = lambda k, sc=1.0: _det((b, l, d_in), k, sc, dtype)  # noqa: E731
        u, delta, z = seq(0.1), seq(0.2, 2.0), seq(0.4, 3.0)
        B, C = _det((b, l, n), 0.5, 1.0, dtype), _det((b, l, n), 0.6, 1.0, dtype)
        state = _det((b, d_in, n), 0.8)
        mask = mx.arange(b * l).reshape(b, l) % 3 != 1
        for gated in (False, True):
            for masked in (False, True):
                kw = dict(
                    z=z if gated else None,
                    delta_bias=bias,
                    state=state,
                    mask=mask if masked else None,
                )
                label = f"scan{'-gated' if gated else ''}{'-masked' if masked else ''}"
                yield (
                    f"{label} {dtype} {size}",
                    lambda kw=kw: selective_scan_kernel(u, delta, A, B, C, D, **kw),
                    lambda kw=kw: selective_scan_ops(u, delta, A, B, C, D, **kw),
                )
            args = (state, u[:, 0], delta[:, 0], A, B[:, 0], C[:, 0], D)
            zz = z[:, 0] if gated else None
            yield (
                f"step{'-gated' if gated else ''} {dtype} {size}",
                lambda a=args, zz=zz: selective_state_update_kernel(*a, zz, bias),
                lambda a=args, zz=zz: selective_state_update_ops(*a, zz, bias),
            )
        yield (
            f"gmu {dtype} {size}",
            lambda u=u, z=z: gmu_gate_kernel(z, u),
            lambda u=u, z=z: gmu_gate_ops(z, u),
        )


def _agree(got, want, dtype) -> bool:
    tol = 1e-4 if dtype == mx.float32 else 3e-2
    got, want = _f32(got), _f32(want)
    ok = mx.all(mx.isfinite(got)) & mx.allclose(got, want, rtol=tol, atol=tol)
    return bool(ok.item())  # host sync: the probe only, never the entries


def probe_kernels(dtypes=FLOAT_DTYPES) -> str | None:
    """Run every kernel variant at these dtypes against its twin now; None when all agree, else why
    not (and the ops path is used from then on)."""
    global _probe_failure
    for dtype in dtypes:
        if _probe_failure is not None:
            break
        if dtype in _probed:
            continue
        for label, kernel_fn, ops_fn in _probe_cases(dtype):
            try:
                got, want = kernel_fn(), ops_fn()
                got = got if isinstance(got, tuple) else (got,)
                want = want if isinstance(want, tuple) else (want,)
                if not all(_agree(g, w, dtype) for g, w in zip(got, want)):
                    _probe_failure = f"kernel {label} disagrees with the plain ops"
            except (
                Exception
            ) as exc:  # compile / launch errors surface here, at the eval
                msg = str(exc)
                if (
                    "transformation" in msg
                    or "compile" in msg.lower()
                    and "eval" in msg
                ):
                    return None  # traced (mx.compile): cannot evaluate now, try again later
                first = msg.strip().splitlines()[0] if msg.strip() else ""
                _probe_failure = f"kernel {label} failed: {type(exc).__name__}: {first}"
            if _probe_failure is not None:
                warnings.warn(
                    f"GPU kernel self-check failed ({_probe_failure}); "
                    "using plain MLX ops from now on",
                    KernelUnavailableWarning,
                    stacklevel=3,
                )
                return _probe_failure
        _probed.add(dtype)
    return _probe_failure


def _probe_ok(dtype) -> bool:
    if _probe_failure is not None:
        return False
    dtype = dtype if dtype in FLOAT_DTYPES else mx.float32
    if dtype not in _probed:
        probe_kernels((dtype,))
    return _probe_failure is None and dtype in _probed


def reset_probe() -> None:
    """Forget the probe's results (tests; after changing the runner)."""
    global _probe_failure
    _probe_failure = None
    _probed.clear()


# ---------------------------------------------------------------------------------------------
# Path selection
# ---------------------------------------------------------------------------------------------


def _mode_from_env() -> tuple[str, str]:
    raw = os.environ.get(ENV_VAR)
    if raw is None or raw.strip() == "":
        return "auto", "default"
    mode = raw.strip().lower()
    if mode not in MODES:
        warnings.warn(
            f"{ENV_VAR}={raw!r} is not one of {', '.join(MODES)}; using 'auto'",
            RuntimeWarning,
            stacklevel=2,
        )
        return "auto", f"default ({ENV_VAR}={raw!r} not understood)"
    return mode, ENV_VAR


_mode, _mode_source = _mode_from_env()
_warned: set[str] = set()


def set_kernel_mode(mode: str) -> None:
    """'auto', 'metal' / 'kernel' (the GPU kernels) or 'ops' for calls with use_kernel=None."""
    global _mode, _mode_source
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, not {mode!r}")
    _mode, _mode_source = mode, "set_kernel_mode"
    _warned.clear()


def _gpu_blocker() -> str | None:
    """Why the GPU kernels cannot run here, or None when they can."""
    if gpu_backend() is None:
        return "Metal is not available on this machine, nor MLX's CUDA back-end"
    return None


_metal_blocker = _gpu_blocker  # the older name


def kernel_status() -> dict:
    """Which path calls with use_kernel=None take, and why."""
    blocker = _gpu_blocker()
    backend = gpu_backend() if blocker is None else None
    on_gpu = mx.default_device().type == mx.gpu if blocker is None else False
    forced = _mode in ("metal", "kernel")
    if _mode == "ops":
        active, reason = "ops", f"mode 'ops' (from {_mode_source})"
    elif blocker is not None:
        active = "ops"
        reason = blocker + (
            " -- mode 'metal' falls back to plain ops" if forced else ""
        )
    elif _probe_failure is not None:
        active, reason = "ops", f"self-check failed: {_probe_failure}"
    elif _mode == "auto" and not on_gpu:
        active, reason = "ops", "mode 'auto' and the default device is the CPU"
    else:
        active, reason = backend, f"mode {_mode!r} and {backend} is available"
    return {
        "active": active,
        "reason": reason,
        "mode": _mode,
        "mode_source": _mode_source,
        "backend": backend,
        "metal_available": backend == "metal",
        "scan_layout": scan_layout,
        "probe": {
            "failure": _probe_failure,
            "passed_dtypes": sorted(str(d) for d in _probed),
        },
        "default_device": str(mx.default_device()),
        "kernels": sorted(SPECS),
    }


def _use_kernel(use_kernel: bool | None, dtype) -> bool:
    if use_kernel is False or (use_kernel is None and _mode == "ops"):
        return False
    forced = use_kernel is True or _mode in ("metal", "kernel")
    blocker = _gpu_blocker()
    if blocker is not None:
        if forced and blocker not in _warned:
            _warned.add(blocker)
            warnings.warn(
                f"GPU kernels requested but unavailable: {blocker}; using plain MLX ops",
                KernelUnavailableWarning,
                stacklevel=3,
            )
        return False
    if not forced and mx.default_device().type != mx.gpu:
        return False
    return _probe_ok(dtype)


def _launchable(threads: int) -> bool:
    """Empty grids never launch; grids past MLX's int range take the ops path."""
    return 0 < threads <= MAX_GRID


def _scan_threads(b: int, d_in: int, n: int) -> int:
    lanes = lanes_per_channel(n) if scan_layout == "lanes" else 1
    return -(-(b * d_in * lanes) // 32) * 32


# ---------------------------------------------------------------------------------------------
# Entry points (the model calls only these)
# ---------------------------------------------------------------------------------------------


def selective_scan(
    u,
    delta,
    A,
    B,
    C,
    D,
    z=None,
    delta_bias=None,
    state=None,
    mask=None,
    use_kernel=None,
):
    """Whole-sequence selective scan (SAMBAY.md 4.5 steps 7-9) with an optional padding mask (b, l);
    returns (y (b, l, d_in) in u's dtype, state (b, d_in, n) float32)."""
    b, l, d_in = u.shape
    if (
        l > 0
        and _launchable(_scan_threads(b, d_in, A.shape[-1]))
        and _use_kernel(use_kernel, u.dtype)
    ):
        return selective_scan_kernel(u, delta, A, B, C, D, z, delta_bias, state, mask)
    return selective_scan_ops(u, delta, A, B, C, D, z, delta_bias, state, mask)


def selective_state_update(
    state, u, delta, A, B, C, D, z=None, delta_bias=None, use_kernel=None
):
    """One decode step (SAMBAY.md 5.2); returns (y (b, d_in) in u's dtype, new state float32)."""
    b, d_in = u.shape
    if _launchable(_scan_threads(b, d_in, A.shape[-1])) and _use_kernel(
        use_kernel, u.dtype
    ):
        return selective_state_update_kernel(state, u, delta, A, B, C, D, z, delta_bias)
    return selective_state_update_ops(state, u, delta, A, B, C, D, z, delta_bias)


def gmu_gate(g, memory, use_kernel=None):
    """The GMU gate SiLU(g) * memory (SAMBAY.md 4.7), in g's dtype."""
    if (
        g.shape == memory.shape
        and _launchable(g.size)
        and _use_kernel(use_kernel, g.dtype)
    ):
        return gmu_gate_kernel(g, memory)
    return gmu_gate_ops(g, memory)
