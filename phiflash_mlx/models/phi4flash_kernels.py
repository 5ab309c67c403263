"""Selective scan, scan step and GMU gate: Metal kernels where Metal is available, plain ops elsewhere.

The model calls only the three entry functions at the bottom (`selective_scan`,
`selective_state_update`, `gmu_gate`). Each picks one of two paths computing the same math:

* a Metal kernel made with ``mx.fast.metal_kernel`` (Apple silicon), and
* the plain-ops twin below (any back-end), which is also the kernels' oracle in the tests.

The kernel sources are built once at import from one template. Every kernel runs one thread per
(batch row, channel) -- the GMU gate one per element -- and loops over time and state inside the
thread, so no thread reads what another writes. That is what lets ``tests/metal_harness.py`` compile
the very same source strings as C++ and run them on machines without Metal.

Which path runs:

* ``use_kernel=False`` per call, or ``PHIFLASH_KERNELS=ops``: plain ops.
* ``use_kernel=None`` (default) with ``PHIFLASH_KERNELS=auto`` (default): the kernel when Metal is
  available and the default device is the GPU, else plain ops.
* ``use_kernel=True``, or ``PHIFLASH_KERNELS=metal``: the kernel; where Metal is unavailable this
  warns once (``KernelUnavailableWarning``) and falls back to plain ops.

``set_kernel_mode`` changes the mode at run time; ``kernel_status()`` says which path is active and why.

Shapes (glossary as in ``reference/ops.py``): u, delta, z (b, l, d_in); A (d_in, n) = -exp(A_log);
B, C (b, l, n); D, delta_bias (d_in,); state (b, d_in, n). The decode step drops the l axis.
"""

from __future__ import annotations

import os
import warnings
from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx

MODES = ("auto", "metal", "ops")
ENV_VAR = "PHIFLASH_KERNELS"


# ---------------------------------------------------------------------------------------------
# Plain-ops twins: the fallback path and the kernels' oracle in the tests
# ---------------------------------------------------------------------------------------------


def softplus(x: mx.array) -> mx.array:
    """mamba_ssm's softplus with threshold 20 (SAMBAY.md 4.5 step 7)."""
    return mx.where(x <= 20.0, mx.log1p(mx.exp(mx.minimum(x, 20.0))), x)


def silu_gate(y: mx.array, z: mx.array) -> mx.array:
    """y * SiLU(z), as the scan kernel gates: y * z / (1 + exp(-z))."""
    return y * z * mx.sigmoid(z)


@mx.compile
def _scan_step(s, dA, dBu, C):
    s = dA * s + dBu  # (b, d_in, n)
    return s, (s * C[:, None, :]).sum(-1)  # y_t (b, d_in)


def selective_scan_ops(
    u, delta, A, B, C, D, z=None, delta_bias=None, state=None, mask=None
):
    """Whole-sequence selective scan; returns (y (b, l, d_in), final state (b, d_in, n))."""
    b, l, d_in = u.shape
    dtype = u.dtype
    u, delta, B, C = (x.astype(mx.float32) for x in (u, delta, B, C))
    if z is not None:
        z = z.astype(mx.float32)
    if delta_bias is not None:
        delta = delta + delta_bias
    delta = softplus(delta)
    if mask is not None:
        delta = delta * mask[..., None].astype(delta.dtype)
    dA = mx.exp(delta[..., None] * A)  # (b, l, d_in, n)
    dBu = (delta * u)[..., None] * B[:, :, None, :]  # (b, l, d_in, n)
    s = (
        mx.zeros((b, d_in, A.shape[1]), dtype=mx.float32)
        if state is None
        else state.astype(mx.float32)
    )
    ys = []
    for t in range(l):
        s, y_t = _scan_step(s, dA[:, t], dBu[:, t], C[:, t])
        ys.append(y_t)
    y = mx.stack(ys, axis=1) + D * u
    if z is not None:
        y = silu_gate(y, z)
    return y.astype(dtype), s


def selective_state_update_ops(state, u, delta, A, B, C, D, z=None, delta_bias=None):
    """One decode step: u, delta, z (b, d_in); B, C (b, n). Returns (y (b, d_in), new state)."""
    dtype = u.dtype
    u, delta, B, C = (x.astype(mx.float32) for x in (u, delta, B, C))
    if z is not None:
        z = z.astype(mx.float32)
    if delta_bias is not None:
        delta = delta + delta_bias
    delta = softplus(delta)
    dA = mx.exp(delta[..., None] * A)  # (b, d_in, n)
    s = dA * state + (delta * u)[..., None] * B[:, None, :]
    y = (s * C[:, None, :]).sum(-1) + D * u
    if z is not None:
        y = silu_gate(y, z)
    return y.astype(dtype), s


def gmu_gate_ops(g: mx.array, memory: mx.array) -> mx.array:
    """The GMU's elementwise gate SiLU(g) ⊙ memory (SAMBAY.md 4.7)."""
    return g * mx.sigmoid(g) * memory


class KernelUnavailableWarning(RuntimeWarning):
    """The Metal kernels were asked for but cannot run here; the plain-ops path ran instead."""


# ---------------------------------------------------------------------------------------------
# Kernel sources (Metal Shading Language; written so that they also compile as C++ given a small
# header of Metal names, see tests/metal_harness.py)
# ---------------------------------------------------------------------------------------------

# Helpers placed before each kernel. metal::precise:: keeps full-precision exp/log whatever math mode.
HEADER = """
// log(1 + x) for x >= 0 without losing the x that 1 + x rounds away (Goldberg's correction).
inline float phiflash_log1p(float x) {
    const float w = 1.0f + x;
    return (w == 1.0f) ? x : metal::precise::log(w) * (x / (w - 1.0f));
}

// mamba_ssm's softplus: log(1 + exp(x)) up to 20, x itself above (SAMBAY.md 4.5 step 7).
inline float phiflash_softplus(float x) {
    return (x <= 20.0f) ? phiflash_log1p(metal::precise::exp(x)) : x;
}

// y * SiLU(z), written as the CUDA kernels write it: y * z / (1 + exp(-z)).
inline float phiflash_silu_gate(float y, float z) {
    return y * z / (1.0f + metal::precise::exp(-z));
}
"""

# The selective scan for one (batch row, channel) per thread; {length} and {gate} are filled in to
# make the prefill / decode and gated / ungated variants. Template parameter N = d_state.
_SCAN_TEMPLATE = """
    // thread r = b * d_in + c owns channel c of batch row b; its N state values stay in registers
    const int d_in = A_shape[0];
    const int length = {length};
    const int r = int(thread_position_in_grid.x);
    const int b = r / d_in;
    const int c = r - b * d_in;

    float a2[N];                            // A * log2(e): exp(dt * A) == exp2(dt * a2)
    float s[N];
    for (int n = 0; n < N; ++n) {{
        a2[n] = A[size_t(c) * N + n] * 1.4426950408889634f;
        s[n] = state_in[size_t(r) * N + n];
    }}
    const float skip = D[c];
    const float bias = delta_bias[c];

    for (int t = 0; t < length; ++t) {{
        const size_t tok = size_t(b) * length + t;   // row of B and C: position (b, t)
        const size_t i = tok * d_in + c;             // element (b, t, c) of u, delta, z, y
        const float x = u[i];
        const float dt = phiflash_softplus(delta[i] + bias);
        const float dtx = dt * x;
        float acc = 0.0f;
        for (int n = 0; n < N; ++n) {{
            // s_t = exp(dt A) s_(t-1) + dt B u ;  y_t = C . s_t
            s[n] = metal::precise::exp2(dt * a2[n]) * s[n] + dtx * B[tok * N + n];
            acc += C[tok * N + n] * s[n];
        }}
        float out = acc + skip * x;{gate}
        y[i] = out;
    }}

    for (int n = 0; n < N; ++n) {{
        state_out[size_t(r) * N + n] = s[n];
    }}
"""

_GATE_LINE = "\n        out = phiflash_silu_gate(out, z[i]);"

# SiLU(g) * memory, one element per thread; template parameter T = the element type.
_GMU_SOURCE = """
    const size_t i = thread_position_in_grid.x;
    out[i] = static_cast<T>(phiflash_silu_gate(static_cast<float>(memory[i]),
                                               static_cast<float>(g[i])));
"""


@dataclass(frozen=True)
class KernelSpec:
    """Everything ``mx.fast.metal_kernel`` is constructed from."""

    name: str
    input_names: tuple[str, ...]
    output_names: tuple[str, ...]
    source: str
    header: str = HEADER


@dataclass
class Launch:
    """Everything one call of a kernel gets (the keyword arguments of the kernel object)."""

    inputs: list
    template: list
    grid: tuple[int, int, int]
    threadgroup: tuple[int, int, int]
    output_shapes: list
    output_dtypes: list


def _scan_spec(decode: bool, gated: bool) -> KernelSpec:
    name = ("phiflash_scan_step" if decode else "phiflash_selective_scan") + (
        "_gated" if gated else ""
    )
    inputs = ("u", "delta", "A", "B", "C", "D", "delta_bias", "state_in") + (
        ("z",) if gated else ()
    )
    source = _SCAN_TEMPLATE.format(
        length="1" if decode else "u_shape[1]", gate=_GATE_LINE if gated else ""
    )
    return KernelSpec(name, inputs, ("y", "state_out"), source)


SPECS: dict[str, KernelSpec] = {
    spec.name: spec
    for spec in (
        _scan_spec(decode=False, gated=False),
        _scan_spec(decode=False, gated=True),
        _scan_spec(decode=True, gated=False),
        _scan_spec(decode=True, gated=True),
        KernelSpec("phiflash_gmu_gate", ("g", "memory"), ("out",), _GMU_SOURCE),
    )
}


def _build_kernels():
    try:
        built = {
            name: mx.fast.metal_kernel(
                name=spec.name,
                input_names=list(spec.input_names),
                output_names=list(spec.output_names),
                source=spec.source,
                header=spec.header,
            )
            for name, spec in SPECS.items()
        }
        return built, None
    except Exception as exc:  # an MLX without metal_kernel: the ops path still works
        return {}, f"mx.fast.metal_kernel failed: {exc}"


_KERNELS, _BUILD_ERROR = _build_kernels()


# A runner executes a (KernelSpec, Launch) pair and returns the outputs as MLX arrays. The Metal one
# below is what the model uses; tests pass the C++ harness's runner to execute the same code on CPU.
Runner = Callable[[KernelSpec, Launch], Sequence[mx.array]]


def run_metal(spec: KernelSpec, launch: Launch) -> list[mx.array]:
    return _KERNELS[spec.name](
        inputs=launch.inputs,
        template=launch.template,
        grid=launch.grid,
        threadgroup=launch.threadgroup,
        output_shapes=launch.output_shapes,
        output_dtypes=launch.output_dtypes,
    )


# ---------------------------------------------------------------------------------------------
# Kernel paths (the entry functions below dispatch here or to the ops twins)
# ---------------------------------------------------------------------------------------------

_SCAN_THREADS = (
    64  # threads per group: 5120 channels give 80 groups to spread over the GPU cores
)
_GATE_THREADS = 256


def _f32(x: mx.array) -> mx.array:
    return x if x.dtype == mx.float32 else x.astype(mx.float32)


def _scan_launch(
    u, delta, A, B, C, D, z, delta_bias, state
) -> tuple[KernelSpec, Launch]:
    decode = u.ndim == 2
    b, d_in = u.shape[0], u.shape[-1]
    n = A.shape[1]
    if delta_bias is None:
        delta_bias = mx.zeros((d_in,), dtype=mx.float32)
    if state is None:
        state = mx.zeros((b, d_in, n), dtype=mx.float32)
    inputs = [u, delta, A, B, C, D, delta_bias, state] + ([] if z is None else [z])
    name = ("phiflash_scan_step" if decode else "phiflash_selective_scan") + (
        "" if z is None else "_gated"
    )
    launch = Launch(
        inputs=[_f32(x) for x in inputs],
        template=[("N", n)],
        grid=(b * d_in, 1, 1),
        threadgroup=(_SCAN_THREADS, 1, 1),
        output_shapes=[u.shape, (b, d_in, n)],
        output_dtypes=[mx.float32, mx.float32],
    )
    return SPECS[name], launch


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
    runner: Runner | None = None,
):
    """The kernel path of `selective_scan`; `runner` defaults to Metal. Returns (y, final state)."""
    spec, launch = _scan_launch(u, delta, A, B, C, D, z, delta_bias, state)
    y, s = (runner or run_metal)(spec, launch)
    return y, s


def selective_state_update_kernel(
    state, u, delta, A, B, C, D, z=None, delta_bias=None, runner: Runner | None = None
):
    """The kernel path of `selective_state_update` (u, delta, z (b, d_in); B, C (b, n))."""
    spec, launch = _scan_launch(u, delta, A, B, C, D, z, delta_bias, state)
    y, s = (runner or run_metal)(spec, launch)
    return y, s


def gmu_gate_kernel(g, memory, runner: Runner | None = None):
    """The kernel path of `gmu_gate`: SiLU(g) * memory in one pass over the elements."""
    if g.dtype != memory.dtype or g.dtype not in (mx.float32, mx.float16, mx.bfloat16):
        g, memory = _f32(g), _f32(memory)
    launch = Launch(
        inputs=[g, memory],
        template=[("T", g.dtype)],
        grid=(g.size, 1, 1),
        threadgroup=(_GATE_THREADS, 1, 1),
        output_shapes=[g.shape],
        output_dtypes=[g.dtype],
    )
    return (runner or run_metal)(SPECS["phiflash_gmu_gate"], launch)[0]


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
    """Choose 'auto', 'metal' or 'ops' for calls made with use_kernel=None (overrides PHIFLASH_KERNELS)."""
    global _mode, _mode_source
    if mode not in MODES:
        raise ValueError(f"kernel mode must be one of {', '.join(MODES)}, not {mode!r}")
    _mode, _mode_source = mode, "set_kernel_mode"
    _warned.clear()


def _metal_blocker() -> str | None:
    """Why the Metal kernels cannot run here, or None when they can."""
    if _BUILD_ERROR is not None:
        return _BUILD_ERROR
    if not mx.metal.is_available():
        return "Metal is not available on this machine (MLX has no Metal back-end here)"
    return None


def kernel_status() -> dict:
    """Which path calls with use_kernel=None take, and why."""
    blocker = _metal_blocker()
    on_gpu = mx.default_device().type == mx.gpu if blocker is None else False
    if _mode == "ops":
        active, reason = "ops", f"mode 'ops' (from {_mode_source})"
    elif blocker is not None:
        active = "ops"
        reason = blocker + (
            " -- mode 'metal' falls back to plain ops" if _mode == "metal" else ""
        )
    elif _mode == "auto" and not on_gpu:
        active, reason = "ops", "mode 'auto' and the default device is the CPU"
    else:
        active, reason = "metal", f"mode {_mode!r} and Metal is available"
    return {
        "active": active,
        "reason": reason,
        "mode": _mode,
        "mode_source": _mode_source,
        "metal_available": blocker is None,
        "default_device": str(mx.default_device()),
        "kernels": sorted(SPECS),
    }


def _use_kernel(use_kernel: bool | None) -> bool:
    if use_kernel is False or (use_kernel is None and _mode == "ops"):
        return False
    forced = use_kernel is True or _mode == "metal"
    blocker = _metal_blocker()
    if blocker is not None:
        if forced and blocker not in _warned:
            _warned.add(blocker)
            warnings.warn(
                f"Metal kernels requested but unavailable: {blocker}; using plain MLX ops",
                KernelUnavailableWarning,
                stacklevel=3,
            )
        return False
    return forced or mx.default_device().type == mx.gpu


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
    """Whole-sequence selective scan (SAMBAY.md 4.5 steps 7-9); returns (y (b, l, d_in), state (b, d_in, n))."""
    if _use_kernel(use_kernel):
        return selective_scan_kernel(u, delta, A, B, C, D, z, delta_bias, state)
    return selective_scan_ops(u, delta, A, B, C, D, z, delta_bias, state, mask)


def selective_state_update(
    state, u, delta, A, B, C, D, z=None, delta_bias=None, use_kernel=None
):
    """One decode step (SAMBAY.md 5.2); returns (y (b, d_in), new state (b, d_in, n))."""
    if _use_kernel(use_kernel):
        return selective_state_update_kernel(state, u, delta, A, B, C, D, z, delta_bias)
    return selective_state_update_ops(state, u, delta, A, B, C, D, z, delta_bias)


def gmu_gate(g, memory, use_kernel=None):
    """The GMU gate SiLU(g) * memory (SAMBAY.md 4.7)."""
    if _use_kernel(use_kernel) and g.shape == memory.shape:
        return gmu_gate_kernel(g, memory)
    return gmu_gate_ops(g, memory)
