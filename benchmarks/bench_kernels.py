"""Benchmark the Metal scan / GMU kernels against the plain-ops path at the released model's sizes.

Sizes: d_inner 5120, d_state 16, batch 1 (one Mamba layer of Phi-4-mini-flash-reasoning).

* ``prefill``: ``selective_scan`` over T tokens (gated by z, with dt bias and an initial state);
* ``decode``:  one ``selective_state_update`` step;
* ``gmu``:     ``gmu_gate`` over (1, T, 5120) and over one token.

Paths: ``ops`` (plain MLX ops, any back-end), ``kernel-serial`` (one thread per channel) and
``kernel-lanes`` (the lane-parallel scan: the state split over SIMD lanes) -- the kernels only where a
GPU back-end (Metal or CUDA) is present, so on Linux the file reports the ops numbers alone. On a GPU
it prints which scan layout is faster: that decides the default (``PHIFLASH_SCAN_LAYOUT``). Writes
``benchmarks/results/kernels-<platform>.json`` and, when matplotlib is installed
(``pip install -e '.[bench]'``), a PNG next to it.

    python benchmarks/bench_kernels.py            # prefill T = 512 and 4096
    python benchmarks/bench_kernels.py --quick    # T = 512 only, fewer repeats
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
sys.path.insert(0, ROOT)

import mlx.core as mx  # noqa: E402

from phiflash_mlx.models import phi4flash_kernels as kernels  # noqa: E402

D_INNER, D_STATE = 5120, 16


def platform_tag() -> str:
    return f"{sys.platform}-{platform.machine().lower()}"


def timeit(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        mx.eval(fn())
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        mx.eval(fn())
        times.append(time.perf_counter() - t0)
    return {"median_ms": statistics.median(times) * 1e3, "min_ms": min(times) * 1e3, "repeats": repeats}


def inputs(T: int | None, dtype=mx.float32, seed: int = 0):
    """Scan inputs for T tokens, or for one decode step when T is None; activations in `dtype`."""
    mx.random.seed(seed)
    seq = (1, D_INNER) if T is None else (1, T, D_INNER)
    bn = (1, D_STATE) if T is None else (1, T, D_STATE)
    args = dict(
        u=mx.random.normal(seq).astype(dtype),
        delta=(mx.random.normal(seq) - 2.0).astype(dtype),
        A=-mx.exp(mx.log(mx.arange(1, D_STATE + 1, dtype=mx.float32))[None, :] * mx.ones((D_INNER, 1))),
        B=mx.random.normal(bn).astype(dtype),
        C=mx.random.normal(bn).astype(dtype),
        D=mx.ones((D_INNER,)),
        z=mx.random.normal(seq).astype(dtype),
        delta_bias=mx.random.normal((D_INNER,)) * 0.5,
        state=mx.random.normal((1, D_INNER, D_STATE)),
    )
    mx.eval(*args.values())
    return args


def scan_fn(path):
    """The callable for a path: 'ops', or 'kernel-serial' / 'kernel-lanes' (the GPU kernel with that
    scan layout, called directly)."""
    if path == "ops":
        return lambda **a: kernels.selective_scan_ops(**a)
    layout = path.split("-")[1]
    return lambda **a: kernels.selective_scan_kernel(**a, layout=layout)


def step_fn(path):
    if path == "ops":
        return lambda state, **a: kernels.selective_state_update_ops(state, **a)
    layout = path.split("-")[1]
    return lambda state, **a: kernels.selective_state_update_kernel(state, **a, layout=layout)


def gate_fn(path):
    if path == "ops":
        return kernels.gmu_gate_ops
    return kernels.gmu_gate_kernel


def run(prefill_lengths, repeats: int, decode_repeats: int, dtypes) -> dict:
    backend = kernels.gpu_backend()
    paths = ["ops"] + ([f"kernel-{lay}" for lay in kernels.SCAN_LAYOUTS] if backend else [])
    if backend:
        failure = kernels.probe_kernels(tuple(getattr(mx, d) for d in dtypes))
        if failure:
            print(f"kernel self-check failed: {failure}; timing the ops path only")
            paths = ["ops"]
    results = []

    def add(op, T, dtype, path, timing):
        row = {"op": op, "T": T, "dtype": dtype, "path": path, **timing}
        if op == "prefill":
            row["tokens_per_s"] = T / (timing["median_ms"] * 1e-3)
        results.append(row)
        print(f"{op:8s} T={T:<5d} {dtype:9s} {path:14s} {timing['median_ms']:10.3f} ms "
              f"(min {timing['min_ms']:.3f})", flush=True)

    for dname in dtypes:
        dtype = getattr(mx, dname)
        for T in prefill_lengths:
            args = inputs(T, dtype)
            for path in paths:
                reps = repeats if (path != "ops" or T <= 512) else max(1, repeats // 2)
                fn = scan_fn(path)
                add("prefill", T, dname, path, timeit(lambda: fn(**args), reps))
                if path != "kernel-lanes":  # one gate kernel: time it once
                    g, m = args["z"], args["u"]
                    gate = gate_fn(path)
                    add("gmu", T, dname, path, timeit(lambda: gate(g, m), repeats))
            del args

        args = inputs(None, dtype)
        state = args.pop("state")
        for path in paths:
            fn = step_fn(path)
            add("decode", 1, dname, path, timeit(lambda: fn(state, **args), decode_repeats, warmup=3))

    speedups, layouts = {}, {}
    for row in results:
        if row["path"] != "ops":
            base = next(r for r in results if r["path"] == "ops" and r["op"] == row["op"]
                        and r["T"] == row["T"] and r["dtype"] == row["dtype"])
            speedups[f"{row['op']}@T={row['T']}/{row['dtype']}/{row['path']}"] = (
                base["median_ms"] / row["median_ms"])
    if backend and len(paths) == 3:
        for op in ("prefill", "decode"):
            total = {p: sum(r["median_ms"] for r in results if r["op"] == op and r["path"] == p)
                     for p in paths[1:]}
            layouts[op] = min(total, key=total.get).split("-")[1]
            print(f"faster scan layout for {op}: {layouts[op]} "
                  f"(serial {total['kernel-serial']:.3f} ms, lanes {total['kernel-lanes']:.3f} ms, "
                  "summed over the rows above)")
        print("set PHIFLASH_SCAN_LAYOUT=lanes to use the lane-parallel scan, or keep the default "
              "(serial); please paste these lines into the kernels issue")
    return {
        "benchmark": "selective scan / scan step / GMU gate: GPU kernels (serial and lane-parallel "
                     "scan) vs plain MLX ops",
        "platform": platform_tag(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "mlx": mx.__version__,
        "default_device": str(mx.default_device()),
        "kernel_status": kernels.kernel_status(),
        "paths": paths,
        "dtypes": list(dtypes),
        "sizes": {"batch": 1, "d_inner": D_INNER, "d_state": D_STATE, "prefill_T": list(prefill_lengths)},
        "timing": "median wall time of mx.eval(call) over `repeats` runs after one warm-up",
        "results": results,
        "speedup_kernel_over_ops": speedups,
        "faster_scan_layout": layouts,
        "date": time.strftime("%Y-%m-%d"),
    }


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = report["results"]
    rows = [r for r in rows if r["dtype"] == report["dtypes"][0]]
    labels = sorted({(r["op"], r["T"]) for r in rows}, key=lambda k: (k[0], k[1]))
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(report["paths"])
    for j, p in enumerate(report["paths"]):
        vals = [next((r["median_ms"] for r in rows if (r["op"], r["T"]) == lab and r["path"] == p), 0)
                for lab in labels]
        ax.bar([i + j * width for i in range(len(labels))], vals, width, label=p)
    ax.set_xticks([i + width * (len(report["paths"]) - 1) / 2 for i in range(len(labels))])
    ax.set_xticklabels([f"{op}\nT={T}" for op, T in labels])
    ax.set_yscale("log")
    ax.set_ylabel("ms (median, log scale)")
    ax.set_title(f"scan kernels vs plain ops, d_inner {D_INNER}, d_state {D_STATE}, "
                 f"{report['dtypes'][0]} ({report['platform']})")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="prefill T=512 only, fewer repeats")
    parser.add_argument("--T", type=int, nargs="+", help="prefill lengths (default 512 4096)")
    parser.add_argument("--repeats", type=int, help="timed runs per prefill measurement")
    parser.add_argument("--out", default=os.path.join(HERE, "results"), help="output directory")
    parser.add_argument("--dtype", nargs="+", choices=["float32", "float16", "bfloat16"],
                        help="activation dtypes (default: float32 and bfloat16 where a GPU back-end "
                             "is present, float32 elsewhere)")
    args = parser.parse_args(argv)
    dtypes = args.dtype or (["float32", "bfloat16"] if kernels.gpu_backend() else ["float32"])

    lengths = args.T or ([512] if args.quick else [512, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    report = run(lengths, repeats, decode_repeats=20 if args.quick else 100, dtypes=dtypes)
    report["quick"] = args.quick

    os.makedirs(args.out, exist_ok=True)
    base = os.path.join(args.out, f"kernels-{report['platform']}")
    with open(base + ".json", "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {base}.json")
    if plot(report, base + ".png"):
        print(f"wrote {base}.png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
