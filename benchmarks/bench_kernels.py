"""Benchmark the Metal scan / GMU kernels against the plain-ops path at the released model's sizes.

Sizes: d_inner 5120, d_state 16, batch 1 (one Mamba layer of Phi-4-mini-flash-reasoning).

* ``prefill``: ``selective_scan`` over T tokens (gated by z, with dt bias and an initial state);
* ``decode``:  one ``selective_state_update`` step;
* ``gmu``:     ``gmu_gate`` over (1, T, 5120) and over one token.

Paths: ``ops`` (plain MLX ops, any back-end) and ``metal`` (the kernels; only where Metal is available,
so on Linux the file reports the ops numbers alone). Writes
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


def inputs(T: int | None, seed: int = 0):
    """Scan inputs for T tokens, or for one decode step when T is None."""
    mx.random.seed(seed)
    seq = (1, D_INNER) if T is None else (1, T, D_INNER)
    bn = (1, D_STATE) if T is None else (1, T, D_STATE)
    args = dict(
        u=mx.random.normal(seq),
        delta=mx.random.normal(seq) - 2.0,
        A=-mx.exp(mx.log(mx.arange(1, D_STATE + 1, dtype=mx.float32))[None, :] * mx.ones((D_INNER, 1))),
        B=mx.random.normal(bn),
        C=mx.random.normal(bn),
        D=mx.ones((D_INNER,)),
        z=mx.random.normal(seq),
        delta_bias=mx.random.normal((D_INNER,)) * 0.5,
        state=mx.random.normal((1, D_INNER, D_STATE)),
    )
    mx.eval(*args.values())
    return args


def run(prefill_lengths, repeats: int, decode_repeats: int) -> dict:
    paths = ["ops"] + (["metal"] if kernels.kernel_status()["metal_available"] else [])
    results = []

    def add(op, T, path, timing):
        row = {"op": op, "T": T, "path": path, **timing}
        if op == "prefill":
            row["tokens_per_s"] = T / (timing["median_ms"] * 1e-3)
        results.append(row)
        print(f"{op:8s} T={T:<5d} {path:5s} {timing['median_ms']:10.3f} ms (min {timing['min_ms']:.3f})",
              flush=True)

    for T in prefill_lengths:
        args = inputs(T)
        for path in paths:
            use = path == "metal"
            reps = repeats if (use or T <= 512) else max(1, repeats // 2)
            add("prefill", T, path, timeit(lambda: kernels.selective_scan(**args, use_kernel=use), reps))
            g, m = args["z"], args["u"]
            add("gmu", T, path, timeit(lambda: kernels.gmu_gate(g, m, use_kernel=use), repeats))
        del args

    args = inputs(None)
    state = args.pop("state")
    for path in paths:
        use = path == "metal"
        add("decode", 1, path, timeit(
            lambda: kernels.selective_state_update(state, **args, use_kernel=use), decode_repeats, warmup=3))
        g, m = args["z"][:, None], args["u"][:, None]
        add("gmu", 1, path, timeit(lambda: kernels.gmu_gate(g, m, use_kernel=use), decode_repeats, warmup=3))

    speedups = {}
    for row in results:
        if row["path"] == "metal":
            base = next(r for r in results if r["path"] == "ops" and r["op"] == row["op"] and r["T"] == row["T"])
            speedups[f"{row['op']}@T={row['T']}"] = base["median_ms"] / row["median_ms"]
    return {
        "benchmark": "selective scan / scan step / GMU gate: Metal kernels vs plain MLX ops",
        "platform": platform_tag(),
        "machine": platform.platform(),
        "processor": platform.processor() or platform.machine(),
        "mlx": mx.__version__,
        "default_device": str(mx.default_device()),
        "kernel_status": kernels.kernel_status(),
        "paths": paths,
        "sizes": {"batch": 1, "d_inner": D_INNER, "d_state": D_STATE, "prefill_T": list(prefill_lengths)},
        "timing": "median wall time of mx.eval(call) over `repeats` runs after one warm-up",
        "results": results,
        "speedup_metal_over_ops": speedups,
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
    ax.set_title(f"scan kernels vs plain ops, d_inner {D_INNER}, d_state {D_STATE} ({report['platform']})")
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
    args = parser.parse_args(argv)

    lengths = args.T or ([512] if args.quick else [512, 4096])
    repeats = args.repeats or (3 if args.quick else 5)
    report = run(lengths, repeats, decode_repeats=20 if args.quick else 100)
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
