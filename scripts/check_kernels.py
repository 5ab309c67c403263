"""One-command check of the GPU kernels on a real Mac (or a CUDA machine): paste its summary into an issue.

    python scripts/check_kernels.py            # re-runs itself with MTL_SHADER_VALIDATION=1
    python scripts/check_kernels.py --quick    # skips the long scans and the model
    python scripts/check_kernels.py --harness  # on Linux: the same checks through the C++ harness

What it runs (each check is independent; a failure is reported and the next one runs):

1. ``kernel_status()`` and the first-use self-check of every variant at float32/float16/bfloat16;
2. every kernel variant (prefill / step, gated / not, masked / not, serial / lane-parallel scan, the
   GMU gate) at every dtype against the NumPy reference, at shapes whose inputs MLX passes in the
   ``constant`` address space (< 8 elements) and in ``device`` memory, and at d_inner 5120 / d_state 16;
3. gradients through each entry with the kernels forced (the twins' VJPs) against the ops path;
4. the masked scan over left and right padding against the unpadded reference;
5. bf16 dtype flow through the whole model (golden checkpoint in ../shared/golden, if present):
   logits dtype and agreement of kernels vs plain ops;
6. long scans (T = 4096 at d_inner 5120) of both layouts against the ops path.

Metal's shader validation (``MTL_SHADER_VALIDATION=1``) makes out-of-bounds accesses and bad launches
fail loudly; the script sets it and restarts itself unless ``--no-validation`` is given.
"""

from __future__ import annotations

import argparse
import os
import platform
import subprocess
import sys
import time
import traceback

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="skip the long scans and the model")
    parser.add_argument("--harness", action="store_true",
                        help="run the kernels through tests/metal_harness.py (machines without a GPU)")
    parser.add_argument("--backend", choices=["metal", "cuda"], default="metal",
                        help="with --harness: which back-end's launch to mirror")
    parser.add_argument("--no-validation", action="store_true",
                        help="do not set MTL_SHADER_VALIDATION=1")
    args = parser.parse_args(argv)

    if (sys.platform == "darwin" and not args.no_validation
            and os.environ.get("MTL_SHADER_VALIDATION") != "1"):
        env = dict(os.environ, MTL_SHADER_VALIDATION="1", MTL_DEBUG_LAYER="1")
        return subprocess.call([sys.executable, os.path.abspath(__file__), *sys.argv[1:]], env=env)

    import mlx.core as mx
    import numpy as np

    from phiflash_mlx.models import phi4flash_kernels as K
    from reference import ops as ref

    runner = None
    if args.harness:
        sys.path.insert(0, os.path.join(ROOT, "tests"))
        import metal_harness

        runner = metal_harness.make_runner(backend=args.backend)
        K._gpu_blocker = lambda: None
        K.gpu_backend = lambda: args.backend
        K.run_gpu = runner
    elif K.gpu_backend() is None:
        print("No GPU back-end here (Metal or MLX's CUDA); run with --harness to check the kernel "
              "sources through the C++ harness instead.")
        return 2
    K.set_kernel_mode("metal")

    results = []

    def check(name):
        def wrap(fn):
            t0 = time.perf_counter()
            try:
                detail = fn() or ""
                results.append((name, "PASS", detail, time.perf_counter() - t0))
            except Exception as exc:
                tb = traceback.format_exc(limit=3).strip().splitlines()
                results.append((name, "FAIL", f"{type(exc).__name__}: {exc}"[:400] + " | "
                                + " / ".join(tb[-3:])[:400], time.perf_counter() - t0))
            print(f"[{results[-1][1]}] {name} ({results[-1][3]:.1f} s) {results[-1][2]}", flush=True)
            return fn
        return wrap

    dtypes = [mx.float32, mx.float16, mx.bfloat16]
    eps = {mx.float32: 1e-4, mx.float16: 3e-3, mx.bfloat16: 2e-2}

    def close(got, want, tol, what):
        got = np.asarray(np.array(mx.array(got).astype(mx.float32)), np.float64)
        want = np.asarray(want, np.float64)
        scale = max(1.0, float(np.abs(want).max(initial=0)))
        err = float(np.abs(got - want).max(initial=0))
        if not np.isfinite(got).all() or err > tol * scale:
            raise AssertionError(f"{what}: max |diff| {err:.3g} > {tol * scale:.3g}")
        return err / scale

    def case(rng, b, l, d_in, n, decode=False):
        seq = (b, d_in) if decode else (b, l, d_in)
        bn = (b, n) if decode else (b, l, n)
        f = lambda s, sc=1.0: (rng.standard_normal(s) * sc).astype(np.float32)  # noqa: E731
        return dict(u=f(seq), delta=f(seq, 2.0) - 2.0,
                    A=-np.exp(np.log(np.arange(1, n + 1, dtype=np.float32)) + f((d_in, n), 0.1)),
                    B=f(bn), C=f(bn), D=f((d_in,)), z=f(seq), delta_bias=f((d_in,), 0.5),
                    state=f((b, d_in, n)))

    def as_mx(c, dtype, gated=True):
        out = {}
        for k, v in c.items():
            x = mx.array(v)
            out[k] = x.astype(dtype) if k in ("u", "delta", "B", "C", "z") else x
        if not gated:
            out["z"] = None
        return out

    def rounded(c, dtype):
        return {k: (np.array(mx.array(v).astype(dtype).astype(mx.float32))
                    if k in ("u", "delta", "B", "C", "z") else v) for k, v in c.items()}

    @check("status and first-use self-check (all variants, f32/f16/bf16)")
    def _():
        failure = K.probe_kernels(tuple(dtypes))
        st = K.kernel_status()
        if failure:
            raise AssertionError(failure)
        return f"active={st['active']} backend={st['backend']} layout={st['scan_layout']}"

    shapes = [(1, 1, 1, 4), (2, 5, 8, 16)] + ([] if args.harness else [(1, 16, 5120, 16)])
    for layout in K.SCAN_LAYOUTS:
        for dtype in dtypes:
            @check(f"every variant vs reference: {layout} scan, {str(dtype).split('.')[-1]}")
            def _(layout=layout, dtype=dtype):
                rng = np.random.default_rng(0)
                worst = 0.0
                for b, l, d_in, n in shapes:
                    c = case(rng, b, l, d_in, n)
                    r = rounded(c, dtype)
                    for gated in (False, True):
                        for masked in (False, True):
                            mask = rng.random((b, l)) > 0.3 if masked else None
                            m = as_mx(c, dtype, gated)
                            y, s = K.selective_scan_kernel(
                                **m, mask=None if mask is None else mx.array(mask),
                                runner=runner, layout=layout)
                            if y.dtype != dtype or s.dtype != mx.float32:
                                raise AssertionError(f"dtypes {y.dtype}, {s.dtype}")
                            if mask is None:
                                yr, sr = ref.selective_scan(r["u"], r["delta"], r["A"], r["B"],
                                                            r["C"], r["D"], r["z"] if gated else None,
                                                            r["delta_bias"], r["state"])
                                worst = max(worst, close(y, yr, eps[dtype], "y"))
                                worst = max(worst, close(s, sr, 1e-4, "state"))
                            else:
                                yo, so = K.selective_scan_ops(**m, mask=mx.array(mask))
                                worst = max(worst, close(y, np.array(yo.astype(mx.float32)),
                                                         eps[dtype], "masked y"))
                                worst = max(worst, close(s, np.array(so), 1e-4, "masked state"))
                        d = case(rng, b, 1, d_in, n, decode=True)
                        rd = rounded(d, dtype)
                        md = as_mx(d, dtype, gated)
                        y, s = K.selective_state_update_kernel(
                            md.pop("state"), **md, runner=runner, layout=layout)
                        yr, sr = ref.selective_state_update(
                            rd["state"], rd["u"], rd["delta"], rd["A"], rd["B"], rd["C"], rd["D"],
                            rd["z"] if gated else None, rd["delta_bias"])
                        worst = max(worst, close(y, yr, eps[dtype], "step y"))
                        worst = max(worst, close(s, sr, 1e-4, "step state"))
                    g, mem = (mx.array(rng.standard_normal((b, l, d_in)).astype(np.float32) * 4)
                              .astype(dtype) for _ in range(2))
                    out = K.gmu_gate_kernel(g, mem, runner=runner)
                    gw = np.array(g.astype(mx.float32))
                    worst = max(worst, close(out, ref.swiglu(gw, np.array(mem.astype(mx.float32))),
                                             eps[dtype], "gmu"))
                return f"worst relative error {worst:.2e}"

    @check("gradients through each entry (kernels forced) vs the ops path")
    def _():
        rng = np.random.default_rng(1)
        c = as_mx(case(rng, 2, 4, 8, 16), mx.float32)
        mask = mx.array([[True, True, False, True], [False, True, True, True]])
        names = ("u", "delta", "A", "B", "C", "D", "z", "delta_bias", "state")
        worst = 0.0
        for use in (True, False):
            def loss(*xs, use=use):
                y, s = K.selective_scan(*xs, mask=mask, use_kernel=use)
                return (mx.where(mask[..., None], y, 0) ** 2).sum() + (s ** 2).sum()
            g = mx.grad(loss, argnums=tuple(range(9)))(*(c[k] for k in names))
            if use:
                gk = g
            else:
                for a, b_, k in zip(gk, g, names):
                    worst = max(worst, close(a, np.array(b_), 1e-3, f"d/d{k}"))
        step = {k: (v[:, 0] if k in ("u", "delta", "B", "C", "z") else v) for k, v in c.items()}
        order = ("state", "u", "delta", "A", "B", "C", "D", "z", "delta_bias")
        gs = [mx.grad(lambda *xs, use=use: sum((o ** 2).sum() for o in
                                               K.selective_state_update(*xs, use_kernel=use)),
                      argnums=tuple(range(9)))(*(step[k] for k in order)) for use in (True, False)]
        for a, b_, k in zip(*gs, order):
            worst = max(worst, close(a, np.array(b_), 1e-3, f"step d/d{k}"))
        gg = [mx.grad(lambda x, y, use=use: (K.gmu_gate(x, y, use_kernel=use) ** 2).sum(),
                      argnums=(0, 1))(c["u"], c["z"]) for use in (True, False)]
        for a, b_ in zip(*gg):
            worst = max(worst, close(a, np.array(b_), 1e-3, "gmu grad"))
        return f"worst relative difference {worst:.2e}"

    @check("masked scan over left+right padding equals the unpadded reference")
    def _():
        rng = np.random.default_rng(2)
        c = case(rng, 2, 5, 16, 16)
        yr, sr = ref.selective_scan(c["u"], c["delta"], c["A"], c["B"], c["C"], c["D"], c["z"],
                                    c["delta_bias"], c["state"])
        pad = dict(c)
        for k in ("u", "delta", "z", "B", "C"):
            x = c[k]
            pad[k] = np.concatenate([rng.standard_normal((2, 3) + x.shape[2:]), x,
                                     rng.standard_normal((2, 2) + x.shape[2:])], 1).astype(np.float32)
        mask = np.zeros((2, 10), bool)
        mask[:, 3:8] = True
        worst = 0.0
        for layout in K.SCAN_LAYOUTS:
            y, s = K.selective_scan_kernel(**as_mx(pad, mx.float32), mask=mx.array(mask),
                                           runner=runner, layout=layout)
            worst = max(worst, close(np.array(y)[:, 3:8], yr, 1e-4, f"{layout} y"),
                        close(s, sr, 1e-4, f"{layout} state"))
        return f"worst relative error {worst:.2e}"

    if not args.quick and not args.harness:
        @check("bf16 dtype flow through the model (golden checkpoint), kernels vs ops")
        def _():
            import pathlib

            import phiflash_mlx

            golden = pathlib.Path(os.environ.get("PHIFLASH_GOLDEN", pathlib.Path(ROOT).parent /
                                                 "shared" / "golden"))
            paths = sorted(p for p in golden.glob("*") if (p / "vectors.npz").exists())
            if not paths:
                return f"skipped: no golden checkpoint under {golden}"
            model, _tok = phiflash_mlx.load(str(paths[0]), dtype="bfloat16", tokenizer=False)
            ids = mx.array(np.load(paths[0] / "vectors.npz")["input_ids_long"])
            outs = {}
            for mode in ("ops", "metal"):
                K.set_kernel_mode(mode)
                cache = model.make_cache()
                pre = model(ids[:, :-1], cache=cache)
                step = model(ids[:, -1:], cache=cache)
                mx.eval(pre, step)
                outs[mode] = (pre, step)
            K.set_kernel_mode("metal")
            if outs["metal"][0].dtype != mx.bfloat16:
                raise AssertionError(f"logits dtype {outs['metal'][0].dtype}, expected bfloat16")
            err = max(close(a, np.array(b.astype(mx.float32)), 5e-2, "logits")
                      for a, b in zip(outs["metal"], outs["ops"]))
            return f"logits bf16, kernels vs ops worst relative difference {err:.2e}"

        @check("long scans: T=4096, d_inner 5120, d_state 16, both layouts vs ops")
        def _():
            rng = np.random.default_rng(3)
            c = case(rng, 1, 4096, 5120, 16)
            m = as_mx(c, mx.float32)
            yo, so = K.selective_scan_ops(**m)
            mx.eval(yo, so)
            worst = 0.0
            for layout in K.SCAN_LAYOUTS:
                y, s = K.selective_scan_kernel(**m, layout=layout)
                worst = max(worst, close(y, np.array(yo), 1e-3, f"{layout} y"),
                            close(s, np.array(so), 1e-3, f"{layout} state"))
            return f"worst relative difference {worst:.2e}"

    st = K.kernel_status()
    print("\n---- paste from here ----")
    print(f"phiflash kernel check: {platform.platform()} {platform.machine()}, mlx {mx.__version__}, "
          f"backend {st['backend']}{' (C++ harness)' if args.harness else ''}, "
          f"MTL_SHADER_VALIDATION={os.environ.get('MTL_SHADER_VALIDATION', 'unset')}")
    print("| check | result | seconds | detail |")
    print("|---|---|---|---|")
    for name, res, detail, secs in results:
        print(f"| {name} | {res} | {secs:.1f} | {detail.replace('|', '/')} |")
    failed = sum(r[1] == "FAIL" for r in results)
    print(f"{len(results) - failed} passed, {failed} failed; kernel_status: active={st['active']}, "
          f"probe={st['probe']}")
    print("Then run: python benchmarks/bench_kernels.py --quick  (prints the faster scan layout)")
    return 1 if failed else 0


if __name__ == "__main__":
    raise SystemExit(main())
