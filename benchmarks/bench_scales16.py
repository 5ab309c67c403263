"""Quantized mat-vec on CPUs: float32 against bfloat16 scales and biases.

A 4-bit group-64 weight reads 32 bytes of codes per group plus its scale and bias: 8 bytes as float32,
4 as bfloat16 (40 -> 36 bytes per group). In one process, interleaved round by round (the build
machine is shared: medians, and only the ratio inside one run means anything): one row of x times
20480 x 2560 and 2560 x 10240, 1 and 2 threads, with the int8-activation products (the default) and
the float-activation ones (PHIFLASH_CPU_INT8=0), through `phf_qmatvec_sd`. Reports ms and GB/s of
the bytes each variant reads. Writes ``benchmarks/results/scales16.json`` and ``scales16.png``.

    python benchmarks/bench_scales16.py                 # 7 rounds
    python benchmarks/bench_scales16.py --rounds 3 --no-float
"""

from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time

import numpy as np

import common

RESULTS = pathlib.Path(__file__).resolve().parent / "results"


def _bf16_bits(a: np.ndarray) -> np.ndarray:
    """float32 -> bfloat16 bit patterns, rounded to nearest even."""
    u = a.view(np.uint32).astype(np.uint64)
    return ((u + 0x7FFF + ((u >> 16) & 1)) >> 16).astype(np.uint16)


def _time(lib, x, w, s, b, code, threads, reps):
    m, k = x.shape
    n = w.shape[0]
    y = np.empty((m, n), np.float32)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rc = lib.phf_qmatvec_sd(x.ctypes.data, m, k, w.ctypes.data, s.ctypes.data, b.ctypes.data, code, n, 4, 64,
                                y.ctypes.data, threads, 1)
        out.append(time.perf_counter() - t0)
        assert rc == 0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=7)
    p.add_argument("--no-float", action="store_true", help="only the int8-activation products")
    args = p.parse_args(argv)

    from phiflash_mlx.cpu import kernels

    lib = kernels._library()
    if lib is None:
        raise SystemExit("the CPU kernels are not built here (python setup.py build_ext --inplace)")
    rng = np.random.default_rng(0)
    result = {"machine": common.machine(), "int8_simd": kernels.kernel_info().get("int8_simd"),
              "rounds": args.rounds, "reps_per_round": 15, "matvec": []}
    paths = ("int8",) if args.no_float else ("int8", "float")
    previous = kernels.set_int8(None)
    try:
        for n, k in ((20480, 2560), (2560, 10240)):
            w = rng.integers(0, 2 ** 32, (n, k // 8), dtype=np.uint32)
            s32 = (rng.random((n, k // 64), dtype=np.float32) * 0.01).astype(np.float32)
            b32 = (-rng.random((n, k // 64), dtype=np.float32) * 0.08).astype(np.float32)
            variants = {"float32": (s32, b32, kernels.SD_F32), "bfloat16": (_bf16_bits(s32), _bf16_bits(b32),
                                                                            kernels.SD_BF16)}
            x = rng.standard_normal((1, k)).astype(np.float32)
            for path in paths:
                kernels.set_int8(path == "int8")
                for threads in (1, 2):
                    times = {name: [] for name in variants}
                    for _ in range(args.rounds):
                        for name, (s, b, code) in variants.items():
                            times[name] += _time(lib, x, w, s, b, code, threads, 15)
                    row = {"n": n, "k": k, "activations": path, "threads": threads}
                    for name, (s, b, _) in variants.items():
                        nbytes = w.nbytes + s.nbytes + b.nbytes
                        med = statistics.median(times[name])
                        row[name] = {"ms": med * 1e3, "GBps": nbytes / med / 1e9, "bytes": nbytes}
                    row["time_ratio_bf16_over_f32"] = row["bfloat16"]["ms"] / row["float32"]["ms"]
                    result["matvec"].append(row)
                    print(f"{path:5s} {n} x {k}, {threads} thr: f32 scales {row['float32']['ms']:.3f} ms "
                          f"({row['float32']['GBps']:.1f} GB/s), bf16 {row['bfloat16']['ms']:.3f} ms "
                          f"({row['bfloat16']['GBps']:.1f} GB/s); time ratio {row['time_ratio_bf16_over_f32']:.3f}",
                          flush=True)
    finally:
        kernels.set_int8(previous)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "scales16.json").write_text(json.dumps(result, indent=1) + "\n")
    plt = common.plt()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(8, 3.5))
        rows = result["matvec"]
        labels = [f"{r['n']}x{r['k']}\n{r['activations']} {r['threads']}t" for r in rows]
        pos = np.arange(len(labels))
        ax.bar(pos - 0.2, [r["float32"]["ms"] for r in rows], 0.4, label="float32 scales/biases")
        ax.bar(pos + 0.2, [r["bfloat16"]["ms"] for r in rows], 0.4, label="bfloat16 scales/biases")
        ax.set_xticks(pos, labels, fontsize=7)
        ax.set_ylabel("ms per mat-vec (median)")
        ax.set_title("4-bit g64 mat-vec on the CPU, interleaved")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "scales16.png", dpi=120)
    print(f"wrote {RESULTS / 'scales16.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
