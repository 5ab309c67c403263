"""The selective-scan, scan-step and GMU kernels against the NumPy reference.

Each kernel test runs on every runner available here:
* "harness": the kernel source compiled as C++ by tests/metal_harness.py (any machine with g++);
* "metal":   the real mx.fast.metal_kernel (Apple silicon only).
The plain-ops twins in phiflash_mlx/models/phi4flash_kernels.py are checked against the reference too, and the dispatch
(fallback when Metal is missing, PHIFLASH_KERNELS, kernel_status) is tested where Metal is absent.
"""

from __future__ import annotations

import os
import subprocess
import sys
import warnings

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.extra import numpy as hnp

import metal_harness
from phiflash_mlx.models import phi4flash_kernels as kernels
from phiflash_mlx.models.phi4flash_kernels import gmu_gate_ops, selective_scan_ops, selective_state_update_ops
from reference import ops as ref

HAS_METAL = mx.metal.is_available()
NO_HARNESS = metal_harness.available()

RUNNERS = [
    pytest.param("harness", marks=pytest.mark.skipif(
        NO_HARNESS is not None, reason=f"CPU harness unavailable: {NO_HARNESS}")),
    pytest.param("metal", marks=pytest.mark.skipif(
        not HAS_METAL, reason="needs Metal (Apple silicon); here the same kernel source is run "
                              "through the C++ harness instead")),
]


def runner_for(name, backend="metal"):
    return metal_harness.make_runner(backend=backend) if name == "harness" else kernels.run_gpu


def assert_close(got, want, name="", rtol=1e-5, atol_scale=1e-5):
    """|got - want| <= atol_scale * max(1, max|want|) + rtol * |want|, elementwise."""
    got, want = np.asarray(got, dtype=np.float64), np.asarray(want, dtype=np.float64)
    assert got.shape == want.shape, f"{name}: shape {got.shape} != {want.shape}"
    assert np.isfinite(got).all(), f"{name}: non-finite output"
    scale = max(1.0, float(np.abs(want).max(initial=0.0)))
    err = np.abs(got - want)
    bound = atol_scale * scale + rtol * np.abs(want)
    worst = np.unravel_index(np.argmax(err - bound), err.shape) if err.size else ()
    assert (err <= bound).all(), (f"{name}: |diff| {err[worst]:.3g} > {bound[worst]:.3g} at {worst} "
                                  f"(got {got[worst]!r}, want {want[worst]!r}, scale {scale:.3g})")


# ---------------------------------------------------------------------------------------------
# Generated inputs: tiny shapes, values covering both sides of the softplus threshold (20), near-zero
# and large Δ, strongly decaying and slowly decaying A, large |z| for the SiLU gate.
# ---------------------------------------------------------------------------------------------

STATE_SIZES = (1, 3, 16)      # each size is one compiled kernel instance: keep the set small


def floats(draw, shape, lo, hi):
    return draw(hnp.arrays(np.float32, shape, elements=st.floats(lo, hi, width=32)))


@st.composite
def scan_inputs(draw, decode=False):
    b = draw(st.integers(1, 2))
    l = draw(st.integers(1, 6))
    d_in = draw(st.integers(1, 6))
    n = draw(st.sampled_from(STATE_SIZES))
    seq = (b, d_in) if decode else (b, l, d_in)
    bn = (b, n) if decode else (b, l, n)
    case = dict(
        u=floats(draw, seq, -3, 3),
        delta=floats(draw, seq, -30, 30),
        A=-np.exp(floats(draw, (d_in, n), -3, 3)),
        B=floats(draw, bn, -3, 3),
        C=floats(draw, bn, -3, 3),
        D=floats(draw, (d_in,), -2, 2),
        z=floats(draw, seq, -40, 40) if draw(st.booleans()) else None,
        delta_bias=floats(draw, (d_in,), -5, 5) if draw(st.booleans()) else None,
        state=floats(draw, (b, d_in, n), -3, 3) if (decode or draw(st.booleans())) else None,
    )
    return case


def to_mx(case):
    return {k: (None if v is None else mx.array(v)) for k, v in case.items()}


def reference_scan(case):
    return ref.selective_scan(case["u"], case["delta"], case["A"], case["B"], case["C"], case["D"],
                              case["z"], case["delta_bias"], case["state"])


def reference_step(case):
    return ref.selective_state_update(case["state"], case["u"], case["delta"], case["A"], case["B"],
                                      case["C"], case["D"], case["z"], case["delta_bias"])


def random_case(rng, b, l, d_in, n, decode=False, gated=True):
    seq = (b, d_in) if decode else (b, l, d_in)
    bn = (b, n) if decode else (b, l, n)

    def f(shape, scale=1.0):
        return (rng.standard_normal(shape) * scale).astype(np.float32)

    return dict(u=f(seq), delta=f(seq, 2.0) - 2.0,
                A=-np.exp(np.log(np.arange(1, n + 1, dtype=np.float32)) + f((d_in, n), 0.1)),
                B=f(bn), C=f(bn), D=f((d_in,)), z=f(seq) if gated else None,
                delta_bias=f((d_in,), 0.5), state=f((b, d_in, n)))


# ---------------------------------------------------------------------------------------------
# Kernels (harness and Metal) against the reference
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
@pytest.mark.parametrize("runner", RUNNERS)
@settings(deadline=None, max_examples=25)
@given(case=scan_inputs())
def test_selective_scan_kernel_matches_reference(runner, layout, case):
    y, s = kernels.selective_scan_kernel(**to_mx(case), runner=runner_for(runner), layout=layout)
    y_ref, s_ref = reference_scan(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
@pytest.mark.parametrize("runner", RUNNERS)
@settings(deadline=None, max_examples=20)
@given(case=scan_inputs(decode=True))
def test_scan_step_kernel_matches_reference(runner, layout, case):
    y, s = kernels.selective_state_update_kernel(**to_mx(case), runner=runner_for(runner),
                                                 layout=layout)
    y_ref, s_ref = reference_step(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


@st.composite
def gate_inputs(draw):
    shape = draw(hnp.array_shapes(min_dims=1, max_dims=3, min_side=1, max_side=7))
    return floats(draw, shape, -60, 60), floats(draw, shape, -100, 100)


@pytest.mark.parametrize("runner", RUNNERS)
@settings(deadline=None, max_examples=20)
@given(gm=gate_inputs())
def test_gmu_gate_kernel_matches_reference(runner, gm):
    g, memory = gm
    out = kernels.gmu_gate_kernel(mx.array(g), mx.array(memory), runner=runner_for(runner))
    with np.errstate(over="ignore"):
        assert_close(out, ref.swiglu(g, memory), "gmu")


@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
@pytest.mark.parametrize("runner", RUNNERS)
def test_real_size_prefill_then_decode(runner, layout, monkeypatch):
    """d_inner 5120, d_state 16 as in the released model: a 4-token prefill, then 3 decode steps."""
    monkeypatch.setattr(kernels, "scan_layout", layout)
    run = runner_for(runner)
    rng = np.random.default_rng(5120)
    for gated in (True, False):
        case = random_case(rng, 1, 4, 5120, 16, gated=gated)
        y, s = kernels.selective_scan_kernel(**to_mx(case), runner=run)
        y_ref, s_ref = reference_scan(case)
        assert_close(y, y_ref, "prefill y")
        assert_close(s, s_ref, "prefill state")
        for step in range(3):
            tok = random_case(rng, 1, 1, 5120, 16, decode=True, gated=gated)
            tok["A"], tok["D"], tok["delta_bias"] = case["A"], case["D"], case["delta_bias"]
            tok["state"] = s_ref
            y, s = kernels.selective_state_update_kernel(**to_mx(dict(tok, state=np.array(s))),
                                                         runner=run)
            y_ref, s_ref = reference_step(tok)
            assert_close(y, y_ref, f"step {step} y")
            assert_close(s, s_ref, f"step {step} state")


@pytest.mark.parametrize("runner", RUNNERS)
@settings(deadline=None, max_examples=10)
@given(case=scan_inputs(), split=st.integers(0, 6))
def test_scan_in_chunks_equals_whole(runner, case, split):
    """Prefill in two chunks, carrying the state, gives the whole-sequence result (prompt caching)."""
    run = runner_for(runner)
    l = case["u"].shape[1]
    split = min(max(split, 1), l)
    seq_keys = ("u", "delta", "B", "C", "z")
    first = {k: (v[:, :split] if k in seq_keys and v is not None else v) for k, v in case.items()}
    y1, s1 = kernels.selective_scan_kernel(**to_mx(first), runner=run)
    parts = [np.array(y1)]
    if split < l:
        second = {k: (v[:, split:] if k in seq_keys and v is not None else v) for k, v in case.items()}
        second["state"] = np.array(s1)
        y2, s1 = kernels.selective_scan_kernel(**to_mx(second), runner=run)
        parts.append(np.array(y2))
    y_whole, s_whole = kernels.selective_scan_kernel(**to_mx(case), runner=run)
    assert_close(np.concatenate(parts, axis=1), y_whole, "y", rtol=1e-6, atol_scale=1e-6)
    assert_close(s1, s_whole, "state", rtol=1e-6, atol_scale=1e-6)


# ---------------------------------------------------------------------------------------------
# The harness itself
# ---------------------------------------------------------------------------------------------

needs_harness = pytest.mark.skipif(NO_HARNESS is not None, reason=f"CPU harness unavailable: {NO_HARNESS}")


@needs_harness
@settings(deadline=None, max_examples=20)
@given(case=scan_inputs())
def test_kernel_threads_are_independent(case):
    """Threads run last-to-first give bit-identical outputs: no thread reads another's writes."""
    args = to_mx(case)
    forward = kernels.selective_scan_kernel(**args, runner=metal_harness.make_runner("forward"))
    backward = kernels.selective_scan_kernel(**args, runner=metal_harness.make_runner("reverse"))
    for a, b in zip(forward, backward):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@needs_harness
def test_harness_signature_follows_mlx():
    """Shape arrays only where the source names them, as mx.fast.metal_kernel generates them."""
    step = kernels.SPECS["phiflash_scan_step"]
    scan = kernels.SPECS["phiflash_selective_scan"]
    x = (np.dtype(np.float32), (2, 3))
    args = dict(inputs=[x] * len(step.input_names), template=[("N", 4), ("Y", mx.float16)],
                output_kinds=[np.float16, np.float32])
    step_cpp = metal_harness.generate_source(step.name, step.input_names, step.output_names,
                                             step.source("metal"), step.full_header("metal"), **args)
    scan_cpp = metal_harness.generate_source(scan.name, scan.input_names, scan.output_names,
                                             scan.source("metal"), scan.full_header("metal"), **args)
    assert "A_shape" in step_cpp and "u_shape" not in step_cpp
    assert "A_shape" in scan_cpp and "ConstantPtr<const int> u_shape" in scan_cpp
    assert "uint3 thread_position_in_grid" in scan_cpp
    assert "template <int N, typename Y>" in scan_cpp and "custom_kernel_" + scan.name + "<16" not in scan_cpp
    assert "DevicePtr<half> y" in scan_cpp  # the output in the template's dtype


@needs_harness
def test_harness_catches_out_of_bounds_and_unwritten_outputs():
    src = "uint i = thread_position_in_grid.x;\n    out[i] = inp[i + 1];"
    with pytest.raises(metal_harness.HarnessError, match=r"inp\[4\]"):
        metal_harness.run_kernel("oob", ["inp"], ["out"], src, "", [np.ones(4, np.float32)], [],
                                 (4, 1, 1), (32, 1, 1), [(4,)], [np.float32])
    src = "uint i = thread_position_in_grid.x;\n    if (i > 0) out[i] = inp[i];"
    (out,) = metal_harness.run_kernel("partial", ["inp"], ["out"], src, "", [np.ones(4, np.float32)],
                                      [], (4, 1, 1), (32, 1, 1), [(4,)], [np.float32])
    assert np.isnan(out[0]) and (out[1:] == 1).all()


# ---------------------------------------------------------------------------------------------
# Plain-ops twins against the reference (the fallback path and the kernels' oracle on a Mac)
# ---------------------------------------------------------------------------------------------

@settings(deadline=None, max_examples=40)
@given(case=scan_inputs())
def test_selective_scan_ops_matches_reference(case):
    y, s = selective_scan_ops(**to_mx(case))
    y_ref, s_ref = reference_scan(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


@settings(deadline=None, max_examples=40)
@given(case=scan_inputs(decode=True))
def test_scan_step_ops_matches_reference(case):
    args = to_mx(case)
    y, s = selective_state_update_ops(args.pop("state"), **args)
    y_ref, s_ref = reference_step(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


@settings(deadline=None, max_examples=40)
@given(gm=gate_inputs())
def test_gmu_gate_ops_matches_reference(gm):
    g, memory = gm
    with np.errstate(over="ignore"):
        assert_close(gmu_gate_ops(mx.array(g), mx.array(memory)), ref.swiglu(g, memory), "gmu")


def test_real_size_ops_match_reference():
    rng = np.random.default_rng(16)
    case = random_case(rng, 1, 3, 5120, 16)
    y, s = selective_scan_ops(**to_mx(case))
    y_ref, s_ref = reference_scan(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


# ---------------------------------------------------------------------------------------------
# Dispatch: which path runs, and the fallback where Metal is missing
# ---------------------------------------------------------------------------------------------

@pytest.fixture
def restore_mode():
    saved = kernels.kernel_status()["mode"], kernels._mode_source
    kernels.reset_probe()
    yield
    kernels.set_kernel_mode(saved[0])
    kernels._mode_source = saved[1]
    kernels.reset_probe()


def force_harness(monkeypatch, runner=None):
    """Make this Linux machine look like one with a GPU back-end whose kernels run in the harness."""
    monkeypatch.setattr(kernels, "_gpu_blocker", lambda: None)
    monkeypatch.setattr(kernels, "gpu_backend", lambda: "metal")
    monkeypatch.setattr(kernels, "run_gpu", runner or metal_harness.make_runner())
    kernels.reset_probe()


@pytest.mark.parametrize("runner", RUNNERS)
def test_entry_functions_reach_the_kernels(runner, restore_mode, monkeypatch):
    """The three functions the model calls, called as the model calls them, run the kernel path
    (on Linux with the harness standing in for Metal) and agree with the reference."""
    if runner == "harness":
        force_harness(monkeypatch)
    kernels.set_kernel_mode("metal")
    kernels.probe_kernels((mx.float32,))
    assert kernels.kernel_status()["probe"]["failure"] is None
    calls = []
    real_scan_launch = kernels._scan_launch
    monkeypatch.setattr(kernels, "_scan_launch", lambda *a: calls.append("scan") or real_scan_launch(*a))
    kernels.set_kernel_mode("metal")
    rng = np.random.default_rng(7)
    c = random_case(rng, 2, 3, 5, 3)
    m = to_mx(c)
    y, s = kernels.selective_scan(m["u"], m["delta"], m["A"], m["B"], m["C"], m["D"], z=m["z"],
                                  delta_bias=m["delta_bias"], state=m["state"])
    y_ref, s_ref = reference_scan(c)
    assert_close(y, y_ref, "scan y")
    assert_close(s, s_ref, "scan state")
    t = random_case(rng, 2, 1, 5, 3, decode=True, gated=False)
    m = to_mx(t)
    y, s = kernels.selective_state_update(m["state"], m["u"], m["delta"], m["A"], m["B"], m["C"], m["D"],
                                          delta_bias=m["delta_bias"])
    y_ref, s_ref = reference_step(t)
    assert_close(y, y_ref, "step y")
    assert_close(s, s_ref, "step state")
    assert calls == ["scan", "scan"]
    out = kernels.gmu_gate(m["u"], m["delta"], use_kernel=True)
    assert_close(out, ref.swiglu(t["u"], t["delta"]), "gmu")


@pytest.mark.skipif(HAS_METAL, reason="checks the fallback on machines without Metal")
def test_forcing_kernels_without_metal_falls_back_and_says_so(restore_mode):
    rng = np.random.default_rng(0)
    case = random_case(rng, 1, 3, 4, 2)
    args = to_mx(case)
    kernels.set_kernel_mode("auto")
    status = kernels.kernel_status()
    assert status["active"] == "ops" and not status["metal_available"]
    assert "Metal" in status["reason"]

    with pytest.warns(kernels.KernelUnavailableWarning, match="Metal"):
        y, s = kernels.selective_scan(**args, use_kernel=True)
    y_ops, s_ops = selective_scan_ops(**args)
    np.testing.assert_array_equal(np.array(y), np.array(y_ops))
    np.testing.assert_array_equal(np.array(s), np.array(s_ops))

    with warnings.catch_warnings():                     # warned once; later calls are quiet
        warnings.simplefilter("error")
        kernels.selective_state_update(args["state"], args["u"][:, 0], args["delta"][:, 0], args["A"],
                                       args["B"][:, 0], args["C"][:, 0], args["D"], use_kernel=True)
        kernels.gmu_gate(args["u"], args["delta"], use_kernel=True)

    kernels.set_kernel_mode("metal")
    with pytest.warns(kernels.KernelUnavailableWarning):
        out = kernels.gmu_gate(args["u"], args["delta"])
    np.testing.assert_array_equal(np.array(out), np.array(gmu_gate_ops(args["u"], args["delta"])))
    status = kernels.kernel_status()
    assert status["mode"] == "metal" and status["active"] == "ops" and "falls back" in status["reason"]


def test_ops_mode_and_use_kernel_false_never_warn(restore_mode):
    args = to_mx(random_case(np.random.default_rng(1), 1, 2, 3, 2))
    kernels.set_kernel_mode("ops")
    assert kernels.kernel_status()["active"] == "ops"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        kernels.selective_scan(**args)
        kernels.selective_scan(**args, use_kernel=False)
    with pytest.raises(ValueError):
        kernels.set_kernel_mode("cuda")


@pytest.mark.skipif(HAS_METAL, reason="checks the fallback on machines without Metal")
def test_env_var_selects_mode():
    code = ("import warnings, mlx.core as mx; from phiflash_mlx.models import phi4flash_kernels as k; "
            "warnings.simplefilter('always'); "
            "y = k.gmu_gate(mx.ones((2, 3)), mx.ones((2, 3))); mx.eval(y); "
            "s = k.kernel_status(); print(s['mode'], s['mode_source'], s['active'])")
    env = dict(os.environ, PHIFLASH_KERNELS="metal")
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env,
                          cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["metal", "PHIFLASH_KERNELS", "ops"]
    assert "KernelUnavailableWarning" in proc.stderr


@pytest.mark.skipif(not HAS_METAL, reason="needs Metal (Apple silicon)")
def test_auto_mode_uses_metal_kernels_on_gpu(restore_mode):
    kernels.set_kernel_mode("auto")
    status = kernels.kernel_status()
    assert status["metal_available"]
    assert status["active"] == ("metal" if mx.default_device().type == mx.gpu else "ops")


def test_model_same_outputs_with_kernel_path_forced_and_ops_path():
    """On Metal: the whole model with the kernels forced equals the plain-ops path. Elsewhere: forcing
    the kernels warns that they are unavailable, falls back, and still gives the same outputs."""
    import warnings

    import numpy as np

    import phiflash_mlx
    from conftest import GOLDEN_MODELS, golden_path

    model, _ = phiflash_mlx.load(str(golden_path(GOLDEN_MODELS[0])))
    ids = mx.array(np.load(golden_path(GOLDEN_MODELS[0]) / "vectors.npz")["input_ids_long"])

    def run():
        cache = model.make_cache()
        prefill = model(ids[:, :-1], cache=cache)
        step = model(ids[:, -1:], cache=cache)
        return np.array(prefill), np.array(step)

    try:
        kernels.set_kernel_mode("ops")
        ops_prefill, ops_step = run()
        kernels.set_kernel_mode("metal")
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            k_prefill, k_step = run()
        if not mx.metal.is_available():
            assert kernels.kernel_status()["active"] == "ops"
            assert any(issubclass(w.category, kernels.KernelUnavailableWarning) for w in caught)
    finally:
        kernels.set_kernel_mode("auto")
    np.testing.assert_allclose(k_prefill, ops_prefill, atol=1e-4, rtol=1e-4)
    np.testing.assert_allclose(k_step, ops_step, atol=1e-4, rtol=1e-4)


# ---------------------------------------------------------------------------------------------
# Entry contract: dtype policy and the padding mask
# ---------------------------------------------------------------------------------------------

ACT_DTYPES = [mx.float32, mx.float16, mx.bfloat16]
PATHS = ["ops", pytest.param("harness", marks=pytest.mark.skipif(
    NO_HARNESS is not None, reason=f"CPU harness unavailable: {NO_HARNESS}"))]


def call_scan(path, layout="serial", backend="metal", **kw):
    if path == "ops":
        return selective_scan_ops(**kw)
    return kernels.selective_scan_kernel(
        **kw, runner=metal_harness.make_runner(backend=backend), layout=layout)


def call_step(path, layout="serial", backend="metal", **kw):
    if path == "ops":
        return selective_state_update_ops(**kw)
    return kernels.selective_state_update_kernel(
        **kw, runner=metal_harness.make_runner(backend=backend), layout=layout)


def rounded(case, dtype):
    """The case with the activations rounded to `dtype` (what the kernels read), as float32 NumPy."""
    out = dict(case)
    for k in ("u", "delta", "B", "C", "z"):
        if case.get(k) is not None:
            out[k] = np.array(mx.array(case[k]).astype(dtype).astype(mx.float32))
    return out


def act_mx(case, dtype):
    """Activations in `dtype`, A / D / delta_bias / state float32."""
    m = to_mx(case)
    return {k: (v.astype(dtype) if k in ("u", "delta", "B", "C", "z") and v is not None else v)
            for k, v in m.items()}


@pytest.mark.parametrize("backend", ["metal", "cuda"])
@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
@pytest.mark.parametrize("dtype", ACT_DTYPES, ids=str)
@pytest.mark.parametrize("path", PATHS)
def test_dtype_policy_every_variant(path, dtype, layout, backend):
    """f32/f16/bf16 activations: y in u's dtype, state float32, all math in float32 -- so the result
    equals the reference on the rounded inputs up to the final rounding of y. Two sizes: one whose
    inputs MLX passes in the constant address space (< 8 elements), one in device memory."""
    if path == "ops" and (layout, backend) != ("serial", "metal"):
        pytest.skip("the ops path has no layouts or back-ends")
    if backend == "cuda" and dtype != mx.bfloat16:
        pytest.skip("CUDA: bfloat16 here (its own type name); float32 in the grid-rounding test")
    rng = np.random.default_rng(3)
    eps = {mx.float32: 1e-5, mx.float16: 2e-3, mx.bfloat16: 1.6e-2}[dtype]
    for b, l, d_in, n in ((1, 1, 1, 4), (2, 4, 8, 16)):
        for gated, masked in ((False, False), (True, False), (True, True)):
            case = random_case(rng, b, l, d_in, n, gated=gated)
            mask = rng.random((b, l)) > 0.4 if masked else None
            want_y, want_s = ref_masked_scan(rounded(case, dtype), mask)
            y, s = call_scan(path, layout, backend, **act_mx(case, dtype),
                             mask=None if mask is None else mx.array(mask))
            assert y.dtype == dtype and s.dtype == mx.float32
            y = np.array(y.astype(mx.float32))
            assert np.isfinite(y).all(), "y at skipped positions must stay finite"
            keep = np.ones(y.shape[:2], bool) if mask is None else mask
            assert_close(y[keep], want_y[keep], f"y {dtype}", rtol=eps, atol_scale=eps)
            assert_close(s, want_s, "state", rtol=1e-5, atol_scale=1e-5)
        step = random_case(rng, b, 1, d_in, n, decode=True)
        y, s = call_step(path, layout, backend, **act_mx(step, dtype))
        want_y, want_s = reference_step(rounded(step, dtype))
        assert y.dtype == dtype and s.dtype == mx.float32
        assert_close(y.astype(mx.float32), want_y, "step y", rtol=eps, atol_scale=eps)
        assert_close(s, want_s, "step state")
        g, m = (rng.standard_normal((b, l, d_in)).astype(np.float32) * 4 for _ in range(2))
        gm = rounded(dict(u=g, delta=m), dtype)
        if path == "ops":
            out = gmu_gate_ops(mx.array(g).astype(dtype), mx.array(m).astype(dtype))
        else:
            out = kernels.gmu_gate_kernel(mx.array(g).astype(dtype), mx.array(m).astype(dtype),
                                          runner=metal_harness.make_runner(backend=backend))
        assert out.dtype == dtype and out.shape == g.shape
        assert_close(out.astype(mx.float32), ref.swiglu(gm["u"], gm["delta"]), "gmu",
                     rtol=eps, atol_scale=eps)


def ref_masked_scan(case, mask):
    """The reference scan run over the kept positions of each row only (the oracle for the mask):
    returns y at every position (kept ones compared) and the final state."""
    if mask is None:
        return reference_scan(case)
    b, l, d_in = case["u"].shape
    ys = np.zeros((b, l, d_in), np.float32)
    states = []
    for i in range(b):
        keep = np.flatnonzero(mask[i])
        row = {k: (v[i:i + 1] if k in ("u", "delta", "B", "C", "z", "state") and v is not None
                   else v) for k, v in case.items()}
        row = {k: (v[:, keep] if k in ("u", "delta", "B", "C", "z") and v is not None else v)
               for k, v in row.items()}
        if len(keep):
            y, s = reference_scan(row)
            ys[i, keep] = y[0]
        else:
            s = (np.zeros((1, d_in, case["A"].shape[1]), np.float32) if case["state"] is None
                 else case["state"][i:i + 1])
        states.append(s[0])
    return np.where(mask[..., None], ys, np.nan), np.stack(states)


@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
@pytest.mark.parametrize("path", PATHS)
@settings(deadline=None, max_examples=8)
@given(left=st.integers(0, 3), right=st.integers(0, 3), seed=st.integers(0, 2**16))
def test_masked_scan_over_padding_equals_unpadded(path, layout, left, right, seed):
    """[left pads + sequence + right pads] with the pads masked: the same final state and the same y
    at the real positions as the scan of the sequence alone (reference), pads of any value."""
    if path == "ops" and layout != "serial":
        pytest.skip("the ops path has no layouts")
    rng = np.random.default_rng(seed)
    b, l, d_in, n = 2, 3, 4, 16
    case = random_case(rng, b, l, d_in, n)
    want_y, want_s = reference_scan(case)
    total = left + l + right
    padded = dict(case)
    for k in ("u", "delta", "z"):
        x = rng.standard_normal((b, total, d_in)).astype(np.float32) * 5
        x[:, left:left + l] = case[k]
        padded[k] = x
    for k in ("B", "C"):
        x = rng.standard_normal((b, total, n)).astype(np.float32) * 5
        x[:, left:left + l] = case[k]
        padded[k] = x
    mask = np.zeros((b, total), bool)
    mask[:, left:left + l] = True
    mask_arg = mx.array(mask) if seed % 2 else mx.array(mask.astype(np.float32))  # bool or 0/1
    y, s = call_scan(path, layout, **to_mx(padded), mask=mask_arg)
    y = np.array(y)
    assert np.isfinite(y).all()
    assert_close(y[:, left:left + l], want_y, "y on the real positions")
    assert_close(s, want_s, "final state")


# ---------------------------------------------------------------------------------------------
# Gradients through each entry, in every mode (oracle: finite differences of the NumPy reference)
# ---------------------------------------------------------------------------------------------

SCAN_ARGS = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")


def directional_fd(loss_np, case, keys, direction, h=1e-3):
    """d/dh loss(case + h * direction) at 0, central differences in float64."""
    plus = {k: (case[k].astype(np.float64) + h * direction[k] if k in keys else case[k])
            for k in case}
    minus = {k: (case[k].astype(np.float64) - h * direction[k] if k in keys else case[k])
             for k in case}
    return (loss_np(plus) - loss_np(minus)) / (2 * h)


def set_path(mode, monkeypatch, layout="serial"):
    if mode == "ops":
        kernels.set_kernel_mode("ops")
    else:
        force_harness(monkeypatch)
        monkeypatch.setattr(kernels, "scan_layout", layout)
        kernels.set_kernel_mode("metal")


@pytest.mark.parametrize("mode", ["ops", pytest.param("kernel-serial", marks=needs_harness),
                                  pytest.param("kernel-lanes", marks=needs_harness)])
def test_gradients_through_each_entry(mode, restore_mode, monkeypatch):
    set_path(mode.split("-")[0], monkeypatch, mode.split("-")[-1])
    launches = []
    if mode != "ops":
        kernels.probe_kernels((mx.float32,))
        real = kernels.run_gpu
        monkeypatch.setattr(kernels, "run_gpu", lambda s, l: launches.append(s.name) or real(s, l))
    rng = np.random.default_rng(11)
    b, l, d_in, n = 2, 3, 4, 4
    case = random_case(rng, b, l, d_in, n)
    mask = np.ones((b, l), bool)
    mask[0, 0] = mask[1, 2] = False
    wy = rng.standard_normal((b, l, d_in)).astype(np.float32)
    ws = rng.standard_normal((b, d_in, n)).astype(np.float32)
    direction = {k: rng.standard_normal(case[k].shape) for k in SCAN_ARGS}

    def loss_np(c):
        y, s = ref_masked_scan(c, mask)
        return float(np.sum(np.where(mask[..., None], y, 0) * wy) + np.sum(s * ws))

    def loss_mx(*xs):
        y, s = kernels.selective_scan(*xs, mask=mx.array(mask))
        return (mx.where(mx.array(mask)[..., None], y, 0) * mx.array(wy)).sum() + (
            s * mx.array(ws)).sum()

    m = to_mx(case)
    grads = mx.grad(loss_mx, argnums=tuple(range(9)))(*(m[k] for k in SCAN_ARGS))
    got = sum(float((g * mx.array(direction[k])).sum()) for g, k in zip(grads, SCAN_ARGS))
    want = directional_fd(loss_np, case, SCAN_ARGS, direction)
    assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (got, want)

    step = random_case(rng, b, 1, d_in, n, decode=True)
    wy1 = rng.standard_normal((b, d_in)).astype(np.float32)
    dstep = {k: rng.standard_normal(step[k].shape) for k in SCAN_ARGS}
    order = ("state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")

    def step_np(c):
        y, s = reference_step(c)
        return float(np.sum(y * wy1) + np.sum(s * ws))

    def step_mx(*xs):
        y, s = kernels.selective_state_update(*xs)
        return (y * mx.array(wy1)).sum() + (s * mx.array(ws)).sum()

    ms = to_mx(step)
    grads = mx.grad(step_mx, argnums=tuple(range(9)))(*(ms[k] for k in order))
    got = sum(float((g * mx.array(dstep[k])).sum()) for g, k in zip(grads, order))
    want = directional_fd(step_np, step, order, dstep)
    assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (got, want)

    g, mem = (rng.standard_normal((b, l, d_in)).astype(np.float32) for _ in range(2))
    dg, dm = (rng.standard_normal((b, l, d_in)) for _ in range(2))
    gg, gm = mx.grad(lambda a, c: (kernels.gmu_gate(a, c) * mx.array(wy)).sum(), argnums=(0, 1))(
        mx.array(g), mx.array(mem))
    got = float((gg * mx.array(dg)).sum() + (gm * mx.array(dm)).sum())
    h = 1e-3
    want = (np.sum(ref.swiglu(g + h * dg, mem + h * dm) * wy)
            - np.sum(ref.swiglu(g - h * dg, mem - h * dm) * wy)) / (2 * h)
    assert abs(got - want) <= 2e-3 * max(1.0, abs(want)), (got, want)
    if mode != "ops":  # the forward passes really ran the kernels
        assert any("selective_scan" in x for x in launches)
        assert any("scan_step" in x for x in launches) and "phiflash_gmu_gate" in launches


def test_entries_compile_and_have_no_host_sync(restore_mode):
    """mx.compile traces the entries (any host sync inside would raise)."""
    kernels.set_kernel_mode("ops")
    case = to_mx(random_case(np.random.default_rng(2), 1, 3, 4, 2))
    mask = mx.array([[True, False, True]])
    f = mx.compile(lambda *xs: kernels.selective_scan(*xs, mask=mask))
    y, s = f(*(case[k] for k in SCAN_ARGS))
    y2, s2 = kernels.selective_scan(*(case[k] for k in SCAN_ARGS), mask=mask)
    np.testing.assert_allclose(np.array(s), np.array(s2), rtol=1e-6, atol=1e-6)
    gate = mx.compile(kernels.gmu_gate)
    np.testing.assert_allclose(np.array(gate(case["u"], case["z"])),
                               np.array(gmu_gate_ops(case["u"], case["z"])), rtol=1e-6)


# ---------------------------------------------------------------------------------------------
# First-use probe, empty and oversized launches
# ---------------------------------------------------------------------------------------------

@needs_harness
@pytest.mark.parametrize("failure", ["raises", "wrong-numbers"])
def test_probe_failure_warns_once_and_falls_back(failure, restore_mode, monkeypatch):
    good = metal_harness.make_runner()

    def bad(spec, launch):
        if failure == "raises":
            raise RuntimeError("Thread group size (2048) is greater than the maximum allowed")
        out = good(spec, launch)
        return [o * 1.5 for o in out]

    force_harness(monkeypatch, runner=bad)
    kernels.set_kernel_mode("metal")
    case = random_case(np.random.default_rng(4), 1, 3, 4, 2)
    args = to_mx(case)
    with pytest.warns(kernels.KernelUnavailableWarning, match="self-check failed"):
        y, s = kernels.selective_scan(**args)
    y_ops, s_ops = selective_scan_ops(**args)
    np.testing.assert_array_equal(np.array(y), np.array(y_ops))
    np.testing.assert_array_equal(np.array(s), np.array(s_ops))
    with warnings.catch_warnings():  # once only; every later call quietly takes the ops path
        warnings.simplefilter("error")
        kernels.gmu_gate(args["u"], args["z"])
        kernels.selective_scan(**{k: (v.astype(mx.bfloat16) if k == "u" else v)
                                  for k, v in args.items()})
    status = kernels.kernel_status()
    assert status["active"] == "ops" and "self-check failed" in status["reason"]
    assert ("RuntimeError" if failure == "raises" else "disagrees") in status["probe"]["failure"]


@needs_harness
def test_probe_passes_and_status_reports_kernels(restore_mode, monkeypatch):
    force_harness(monkeypatch)
    kernels.set_kernel_mode("metal")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.probe_kernels() is None
    status = kernels.kernel_status()
    assert status["active"] == "metal" and status["probe"]["failure"] is None
    assert len(status["probe"]["passed_dtypes"]) == 3


@needs_harness
def test_empty_inputs_never_launch_and_big_grids_take_ops(restore_mode, monkeypatch):
    log = []
    force_harness(monkeypatch, runner=metal_harness.make_runner(log=log))
    kernels.set_kernel_mode("metal")
    kernels.probe_kernels((mx.float32,))
    log.clear()
    rng = np.random.default_rng(6)
    for b, l, d_in in ((1, 0, 4), (0, 3, 4), (2, 3, 0)):
        case = to_mx(random_case(rng, b, l, d_in, 3))
        y, s = kernels.selective_scan(**case, mask=mx.ones((b, l)))
        assert y.shape == (b, l, d_in) and s.shape == (b, d_in, 3)
        if b * d_in == 0:
            y, s = kernels.selective_state_update(case["state"], mx.zeros((b, d_in)),
                                                  mx.zeros((b, d_in)), case["A"],
                                                  mx.zeros((b, 3)), mx.zeros((b, 3)), case["D"])
            assert y.shape == (b, d_in)
        assert kernels.gmu_gate(case["u"], case["u"]).shape == (b, l, d_in)
    assert log == []
    monkeypatch.setattr(kernels, "MAX_GRID", 63)  # stands in for 2**31 - 1
    case = random_case(rng, 1, 2, 64, 2)
    y, s = kernels.selective_scan(**to_mx(case))
    assert log == []
    y_ref, s_ref = reference_scan(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")


# ---------------------------------------------------------------------------------------------
# The harness mirrors MLX: address spaces, launch edges, CUDA grid rounding, SIMD groups
# ---------------------------------------------------------------------------------------------

def _copy_kernel(header, n, grid=None):
    src = "const uint i = thread_position_in_grid.x;\n    out[i] = first(inp) + inp[i];"
    return metal_harness.run_kernel("as", ["inp"], ["out"], src, header,
                                    [np.arange(n, dtype=np.float32)], [], (grid or n, 1, 1),
                                    (32, 1, 1), [(n,)], [np.float32])


@needs_harness
def test_harness_address_spaces_follow_mlx_size_rule():
    """MLX passes an input with fewer than 8 elements as `constant`: a helper taking a `device`
    pointer compiles for 8 elements and fails for 7 (and the other way round)."""
    dev = "inline float first(const device float* p) { return p[0]; }"
    const = "inline float first(const constant float* p) { return p[0]; }"
    (out,) = _copy_kernel(dev, 8)
    np.testing.assert_array_equal(out, np.arange(8))
    with pytest.raises(metal_harness.HarnessError, match="g\\+\\+ failed"):
        _copy_kernel(dev, 7)
    (out,) = _copy_kernel(const, 7)
    np.testing.assert_array_equal(out, np.arange(7))
    with pytest.raises(metal_harness.HarnessError, match="g\\+\\+ failed"):
        _copy_kernel(const, 8)


@needs_harness
def test_harness_launch_edges():
    src = "out[thread_position_in_grid.x] = inp[thread_position_in_grid.x];"
    x = np.ones(4, np.float32)
    with pytest.raises(metal_harness.HarnessError, match="empty grid"):
        metal_harness.run_kernel("e", ["inp"], ["out"], src, "", [x], [], (0, 1, 1), (32, 1, 1),
                                 [(4,)], [np.float32])
    with pytest.raises(metal_harness.HarnessError, match="over 1024"):
        metal_harness.run_kernel("e", ["inp"], ["out"], src, "", [np.ones(4096, np.float32)], [],
                                 (4096, 1, 1), (2048, 1, 1), [(4096,)], [np.float32])
    assert metal_harness.launch_dims((40, 1, 1), (32, 1, 1), "cuda") == ((64, 1, 1), (32, 1, 1))
    assert metal_harness.launch_dims((20, 1, 1), (32, 1, 1), "metal") == ((20, 1, 1), (20, 1, 1))


def _unguarded(spec):
    """The spec with its bounds guard removed."""
    import re

    body = re.sub(r"\n    if \([^\n]*\) \{\n        return;[^\n]*\n    \}", "", spec.body)
    assert body != spec.body
    return kernels.KernelSpec(spec.name + "_unguarded", spec.input_names, spec.output_names, body)


@needs_harness
@pytest.mark.parametrize("layout", kernels.SCAN_LAYOUTS)
def test_cuda_grid_rounding_needs_and_has_the_guard(layout):
    """CUDA runs whole blocks: 70 channels at 64 threads per block launch 128 threads (lanes: the
    rounded SIMD groups, then 256-thread blocks). The guarded bodies give the reference; the same
    bodies without the guard read past the buffers."""
    rng = np.random.default_rng(70)
    case = random_case(rng, 1, 3, 70, 16)
    cuda = metal_harness.make_runner(backend="cuda")
    y, s = kernels.selective_scan_kernel(**to_mx(case), runner=cuda, layout=layout)
    y_ref, s_ref = reference_scan(case)
    assert_close(y, y_ref, "y")
    assert_close(s, s_ref, "state")
    g, m = (rng.standard_normal(300).astype(np.float32) for _ in range(2))
    out = kernels.gmu_gate_kernel(mx.array(g), mx.array(m), runner=cuda)
    assert_close(out, ref.swiglu(g, m), "gmu")

    spec, launch = kernels._scan_launch(*(to_mx(case)[k] for k in (
        "u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")), None, layout)
    if layout == "serial":  # (the lanes body also keeps idle lanes from writing: `live`)
        with pytest.raises(metal_harness.HarnessError, match="out-of-bounds"):
            cuda(_unguarded(spec), launch)
    gspec, glaunch = kernels._gmu_launch(mx.array(g), mx.array(m))
    with pytest.raises(metal_harness.HarnessError, match="out-of-bounds"):
        cuda(_unguarded(gspec), glaunch)


@needs_harness
def test_harness_simd_groups_run_in_lockstep():
    x = np.arange(40, dtype=np.float32)
    src = ("const uint i = thread_position_in_grid.x;\n"
           "    out[i] = simd_sum(inp[i]) + 1000.0f * float(thread_index_in_simdgroup == i % 32);")
    (out,) = metal_harness.run_kernel("sum", ["inp"], ["out"], src, "", [x], [], (40, 1, 1),
                                      (64, 1, 1), [(40,)], [np.float32])
    want = np.r_[np.full(32, x[:32].sum()), np.full(8, x[32:].sum())] + 1000
    np.testing.assert_array_equal(out, want)
    src = ("const uint i = thread_position_in_grid.x;\n"
           "    out[i] = simd_shuffle_xor(inp[i], ushort(5));")
    (out,) = metal_harness.run_kernel("xor", ["inp"], ["out"], src, "", [x[:32]], [], (32, 1, 1),
                                      (32, 1, 1), [(32,)], [np.float32], order="reverse")
    np.testing.assert_array_equal(out, x[:32].astype(int) ^ 5)
    divergent = ("const uint i = thread_position_in_grid.x;\n"
                 "    out[i] = (i % 2) ? simd_sum(inp[i]) : 0.0f;")
    with pytest.raises(metal_harness.HarnessError, match="divergent"):
        metal_harness.run_kernel("div", ["inp"], ["out"], divergent, "", [x], [], (40, 1, 1),
                                 (64, 1, 1), [(40,)], [np.float32])
    missing = ("const uint i = thread_position_in_grid.x;\n"
               "    out[i] = simd_shuffle_xor(inp[i], ushort(16));")
    with pytest.raises(metal_harness.HarnessError, match="does not exist"):
        metal_harness.run_kernel("gap", ["inp"], ["out"], missing, "", [x], [], (40, 1, 1),
                                 (64, 1, 1), [(40,)], [np.float32])


@needs_harness
@settings(deadline=None, max_examples=12)
@given(case=scan_inputs())
def test_lane_parallel_scan_threads_are_independent(case):
    """Lanes: SIMD groups (and lanes within a round) run last-to-first give identical outputs."""
    args = to_mx(case)
    fwd = kernels.selective_scan_kernel(**args, runner=metal_harness.make_runner("forward"),
                                        layout="lanes")
    rev = kernels.selective_scan_kernel(**args, runner=metal_harness.make_runner("reverse"),
                                        layout="lanes")
    for a, b in zip(fwd, rev):
        np.testing.assert_array_equal(np.array(a), np.array(b))


@needs_harness
def test_mac_check_script_runs_through_the_harness():
    """scripts/check_kernels.py (the one-command Mac check) runs its checks here with --harness."""
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    proc = subprocess.run([sys.executable, os.path.join(root, "scripts", "check_kernels.py"),
                           "--harness", "--quick"], capture_output=True, text=True, cwd=root,
                          timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "---- paste from here ----" in proc.stdout and " 0 failed" in proc.stdout
    assert proc.stdout.count("| PASS |") >= 9


def test_cuda_sources_use_only_cuda_names():
    """What NVRTC compiles: no Metal attribute, namespace, address space or type, no <cstddef> type;
    the Metal sources use no CUDA name."""
    import re

    metal_words = r"\b(thread_position_in_grid|metal::\w+|device|constant|uint|ushort|size_t|half|bfloat16_t|simd_\w+)\b"
    cuda_words = r"\b(blockIdx|blockDim|threadIdx|__shfl_xor_sync|__device__|expf|logf|exp2f)\b"
    for spec in kernels.SPECS.values():
        cuda_src = spec.full_header("cuda") + spec.source("cuda")
        metal_src = spec.full_header("metal") + spec.source("metal")
        assert not re.findall(metal_words, re.sub(r"//[^\n]*", "", cuda_src)), spec.name
        assert not re.findall(cuda_words, re.sub(r"//[^\n]*", "", metal_src)), spec.name
