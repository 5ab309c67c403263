"""Benchmark MLX's CPU matmuls with and without phiflash's fast-BLAS route.

The BLAS MLX uses is fixed when ``mlx.core`` is imported, so every variant runs
in its own subprocess (this same file with ``--worker``), one after the other:

* ``mlx-builtin``: ``PHIFLASH_CPU_BLAS=0``, MLX's own reference BLAS;
* ``fast``: the default, MLX's GEMMs forwarded to numpy's OpenBLAS;
* ``fast-1thread``: the same with ``OPENBLAS_NUM_THREADS=1``.

Workloads: fp32 GEMM 2048x2048x2048, a decode-like fp32 matvec
1x3072 @ 3072x8192, the same shape as a 4-bit (group 64) ``mx.quantized_matmul``
(which does not use BLAS, so it should not change), and a prefill-like
128x3072 @ 3072x8192 in fp32, 4-bit, and 4-bit dequantized to fp32 per call
followed by a BLAS GEMM. Model-level benchmarks plug in through
:func:`model_benchmarks`.

Writes ``benchmarks/results/blas.json`` and, when matplotlib is installed
(``pip install -e '.[bench]'``), ``benchmarks/results/blas.png``.

    python benchmarks/bench_blas.py            # two rounds, about 5 minutes on 2 cores
    python benchmarks/bench_blas.py --quick    # one round, fewer repeats (about 1 minute)
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import common  # noqa: E402  (machine description shared with the other benchmarks)

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
DEFAULT_OUT = os.path.join(HERE, "results")

VARIANTS = {
    "mlx-builtin": {"PHIFLASH_CPU_BLAS": "0"},
    "fast": {"PHIFLASH_CPU_BLAS": "1"},
    "fast-1thread": {"PHIFLASH_CPU_BLAS": "1", "OPENBLAS_NUM_THREADS": "1"},
}
BASELINE, FAST = "mlx-builtin", "fast"


# --------------------------------------------------------------------------- worker side


def _timeit(fn, repeats: int, warmup: int = 1) -> dict:
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return {
        "median_ms": statistics.median(times) * 1e3,
        "min_ms": min(times) * 1e3,
        "repeats": repeats,
    }


def _matmul_benchmarks(variant: str, quick: bool) -> dict:
    import mlx.core as mx

    slow = variant == BASELINE
    results = {}

    def add(name, fn, flops, repeats, warmup=1, **meta):
        r = _timeit(fn, repeats, warmup)
        r["gflops"] = flops / (r["min_ms"] * 1e-3) / 1e9
        r.update(meta)
        results[name] = r

    mx.random.seed(0)
    n = 2048
    a = mx.random.normal((n, n))
    b = mx.random.normal((n, n))
    mx.eval(a, b)
    # The baseline takes seconds per 2048^3 GEMM: no warm-up, few repeats.
    add(
        "gemm_fp32_2048",
        lambda: mx.eval(a @ b),
        2 * n**3,
        repeats=(1 if quick else 3) if slow else (5 if quick else 10),
        warmup=0 if slow else 1,
        shape="2048x2048 @ 2048x2048",
        dtype="float32",
    )

    d_in, d_out = 3072, 8192
    w = mx.random.normal((d_out, d_in)) * 0.02
    wq, scales, biases = mx.quantize(w, group_size=64, bits=4)
    mx.eval(w, wq, scales, biases)
    for m, label in ((1, "matvec"), (128, "prefill128")):
        x = mx.random.normal((m, d_in))
        mx.eval(x)
        reps = 20 if m == 1 else (3 if slow else 10)
        if quick:
            reps = max(2, reps // 3)
        # quantized_matmul does not use BLAS: seconds per call at M=128 in every variant.
        q_reps = reps if m == 1 else 2 if quick else 3
        add(
            f"{label}_fp32",
            lambda x=x: mx.eval(x @ w.T),
            2 * m * d_in * d_out,
            repeats=reps,
            shape=f"{m}x{d_in} @ {d_in}x{d_out}",
            dtype="float32",
        )
        add(
            f"{label}_q4",
            lambda x=x: mx.eval(
                mx.quantized_matmul(x, wq, scales, biases, transpose=True, group_size=64, bits=4)
            ),
            2 * m * d_in * d_out,
            repeats=q_reps,
            shape=f"{m}x{d_in} @ {d_in}x{d_out}",
            dtype="4-bit g64 weights, float32 activations",
        )
    # Prefill alternative: dequantize the 4-bit weights, then one fp32 GEMM (BLAS).
    x = mx.random.normal((128, d_in))
    mx.eval(x)
    add(
        "prefill128_q4_dequant",
        lambda: mx.eval(x @ mx.dequantize(wq, scales, biases, group_size=64, bits=4).T),
        2 * 128 * d_in * d_out,
        repeats=2 if quick else 3 if slow else 5,
        shape=f"128x{d_in} @ {d_in}x{d_out}",
        dtype="4-bit g64 weights dequantized per call, then float32 GEMM",
    )
    return results


# A scaled-down SambaY with the released layer schedule (Mamba, SWA, memory Mamba, global, GMU, cross).
SCALED_DOWN = {
    "model_type": "phi4flash", "vocab_size": 32000, "hidden_size": 1024, "intermediate_size": 4096,
    "num_hidden_layers": 8, "num_attention_heads": 16, "num_key_value_heads": 8, "sliding_window": 512,
    "mamba_d_state": 16, "mamba_d_conv": 4, "mamba_expand": 2, "tie_word_embeddings": True,
}


def model_benchmarks(variant: str, quick: bool) -> dict:
    """Model-level timings: float32 prefill of a scaled-down SambaY (256 tokens, one chunk) and 4-bit
    decode (one token at a time from a 256-token cache). Called after ``import phiflash_mlx`` in each
    variant's worker, so the BLAS route is already fixed."""
    import mlx.core as mx
    import mlx.nn as nn
    from mlx.utils import tree_flatten
    from phiflash_mlx.models.phi4flash import Model, ModelArgs

    slow = variant == BASELINE
    mx.random.seed(0)
    model = Model(ModelArgs.from_dict(SCALED_DOWN))
    mx.eval(model.parameters())
    params = sum(v.size for _, v in tree_flatten(model.parameters()))
    prompt = mx.array([[i % SCALED_DOWN["vocab_size"] for i in range(256)]])
    results = {}

    def prefill():
        cache = model.make_cache()
        model(prompt, cache=cache)
        mx.eval([c.state for c in cache])
        return cache

    r = _timeit(prefill, repeats=1 if slow else 3, warmup=0 if slow else 1)
    r["tokens_per_s"] = 256 / (r["min_ms"] * 1e-3)
    r.update(shape=f"hidden 1024, 8 layers, {params / 1e6:.0f}M parameters, 256-token prompt", dtype="float32")
    results["model_prefill256_fp32"] = r

    nn.quantize(model, group_size=64, bits=4,
                class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    mx.eval(model.parameters())
    cache = prefill()
    token = mx.array([[1]])

    def decode():
        mx.eval(model(token, cache=cache))

    r = _timeit(decode, repeats=5 if quick else 10)
    r["tokens_per_s"] = 1 / (r["min_ms"] * 1e-3)
    r.update(shape=f"same model, 4-bit g64, one token after 256", dtype="4-bit weights, float32 activations")
    results["model_decode_q4"] = r
    return results


def worker(variant: str, quick: bool) -> None:
    import phiflash_mlx  # first: it sets up (or, for the baseline, skips) the BLAS route
    from phiflash_mlx.cpu.blas import blas_info

    results = _matmul_benchmarks(variant, quick)
    results.update(model_benchmarks(variant, quick))
    info = blas_info()
    print(json.dumps({"variant": variant, "blas": info, "results": results}))


# --------------------------------------------------------------------------- driver side


def run_variant(variant: str, quick: bool) -> dict:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("PHIFLASH_", "OPENBLAS_"))}
    env.update(VARIANTS[variant])
    env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", variant] + (["--quick"] if quick else [])
    load_before = os.getloadavg()[0] if hasattr(os, "getloadavg") else None
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"variant {variant} failed:\n{proc.stdout}\n{proc.stderr}")
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    out["wall_s"] = round(time.perf_counter() - t0, 1)
    # 1-minute load average before and after: other processes on the machine skew timings.
    out["loadavg_1min"] = [load_before, os.getloadavg()[0] if hasattr(os, "getloadavg") else None]
    out["env"] = VARIANTS[variant]
    if out["blas"]["active"] != (variant != BASELINE):
        raise SystemExit(f"variant {variant}: unexpected BLAS state {out['blas']}")
    return out


def plot(report: dict, path: str) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'); skipping the plot")
        return False
    variants = list(report["variants"])
    names = list(report["variants"][variants[0]]["results"])
    fig, ax = plt.subplots(figsize=(11, 5))
    width = 0.8 / len(variants)
    for i, v in enumerate(variants):
        res = report["variants"][v]["results"]
        ys = [res[n]["min_ms"] if n in res else float("nan") for n in names]
        bars = ax.bar([j + (i - (len(variants) - 1) / 2) * width for j in range(len(names))], ys, width, label=v)
        for bar, y in zip(bars, ys):
            label = f"{y:.0f}" if y >= 10 else f"{y:.1f}"
            ax.annotate(label, (bar.get_x() + bar.get_width() / 2, y), ha="center", va="bottom", fontsize=7)
    ax.set_yscale("log")
    ax.set_xticks(range(len(names)))
    ax.set_xticklabels(names, rotation=15)
    ax.set_ylabel("time per call, best of N, ms (log scale; lower is better)")
    m = report["machine"]
    speedup = report["speedup_vs_builtin"].get(FAST, {}).get("gemm_fp32_2048")
    title = f"MLX {m.get('mlx')} CPU matmuls, {m['cpu']} ({m['cpus']} cores)"
    if speedup:
        title += f"\nfp32 GEMM 2048³: fast BLAS {speedup:.0f}x faster than MLX's built-in BLAS"
    loads = [x for v in variants for pair in report["variants"][v].get("loadavg_1min", []) for x in pair if x is not None]
    if loads:
        title += f" (1-min load average during the run {min(loads):.1f}-{max(loads):.1f})"
    ax.set_title(title, fontsize=10)
    ax.legend(loc="upper left", bbox_to_anchor=(1.01, 1.0), fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return True


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out-dir", default=DEFAULT_OUT, help="where blas.json and blas.png go")
    parser.add_argument("--quick", action="store_true", help="fewer repeats (a smoke test)")
    parser.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    parser.add_argument(
        "--rounds", type=int, default=0, help="times each variant runs, taking turns (default 2, --quick 1)"
    )
    parser.add_argument("--worker", choices=list(VARIANTS), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.worker:
        worker(args.worker, args.quick)
        return 0

    report = {
        "machine": common.machine(),
        "quick": args.quick,
        "note": "speed-ups compare best-of-N times (min_ms, best round), which are the least "
        "affected by other load on a shared machine; medians are listed too",
        "variants": {},
        "speedup_vs_builtin": {},
    }
    rounds = args.rounds or (1 if args.quick else 2)
    report["rounds"] = rounds
    for k in range(rounds):
        # Variants take turns, so a burst of outside load does not hit only one of them.
        for v in args.variants:
            print(f"round {k + 1}/{rounds}: {v} ...", flush=True)
            out = run_variant(v, args.quick)
            for name, r in out["results"].items():
                rate = f"  {r['gflops']:7.1f} GFLOP/s" if "gflops" in r else ""
                print(f"  {name:22s} median {r['median_ms']:9.2f} ms  min {r['min_ms']:9.2f} ms{rate}")
            kept = report["variants"].get(v)
            if kept is None:
                for r in out["results"].values():
                    r["min_ms_per_round"] = [r["min_ms"]]
                out["loadavg_1min"] = [out["loadavg_1min"]]
                report["variants"][v] = out
                continue
            # Keep, per workload, the round with the best time.
            kept["loadavg_1min"].append(out["loadavg_1min"])
            for name, r in out["results"].items():
                history = kept["results"][name]["min_ms_per_round"] + [r["min_ms"]]
                if r["min_ms"] < kept["results"][name]["min_ms"]:
                    kept["results"][name] = r
                kept["results"][name]["min_ms_per_round"] = history
    if BASELINE in report["variants"]:
        base = report["variants"][BASELINE]["results"]
        for v, out in report["variants"].items():
            if v == BASELINE:
                continue
            report["speedup_vs_builtin"][v] = {
                n: round(base[n]["min_ms"] / r["min_ms"], 2)
                for n, r in out["results"].items()
                if n in base
            }
    for v, sp in report["speedup_vs_builtin"].items():
        print(f"speed-up (best-of-N) of {v} over {BASELINE}: " + ", ".join(f"{n} {s}x" for n, s in sp.items()))

    os.makedirs(args.out_dir, exist_ok=True)
    json_path = os.path.join(args.out_dir, "blas.json")
    with open(json_path, "w") as f:
        json.dump(report, f, indent=2)
        f.write("\n")
    print(f"wrote {json_path}")
    png_path = os.path.join(args.out_dir, "blas.png")
    if plot(report, png_path):
        print(f"wrote {png_path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
