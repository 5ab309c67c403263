"""Quantized products on CPUs: float32 activations against int8 activations (csrc/q8.c).

In one process, interleaved round by round (the build machine is shared: medians, not minimums):

* **decode mat-vec**: one row of x times a 4-bit group-64 matrix at two real shapes (20480 x 2560:
  Phi-4-mini-flash's largest projection; 2560 x 10240), 1 and 2 threads, as GB/s of weights read
  (codes + float32 scales and biases);
* **prefill block**: 512 rows times 20480 x 2560 and 2560 x 10240 (the MLP's two products), 1 and 2
  threads, as GMAC/s: the float tile (`phf_qmatmul` with int8 off, 20480 x 2560 at 2 threads only),
  q8.c's block kernel (the row route to q8_gemm.c off) and q8_gemm.c's weight-rows-in-lanes tile.

Both sides go through the same exported entry points (`phf_qmatvec`, `phf_qmatmul`) with the int8
switch flipped between calls. Writes ``benchmarks/results/q8.json`` and ``q8.png``.

    python benchmarks/bench_q8.py                 # 5 rounds
    python benchmarks/bench_q8.py --rounds 2 --no-prefill
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


def _operands(n: int, k: int, rows: int, rng):
    w = rng.integers(0, 2 ** 32, (n, k // 8), dtype=np.uint32)          # uniform 4-bit codes
    scales = (rng.random((n, k // 64), dtype=np.float32) * 0.01).astype(np.float32)
    biases = (-rng.random((n, k // 64), dtype=np.float32) * 0.08).astype(np.float32)
    x = rng.standard_normal((rows, k)).astype(np.float32)
    return x, w, scales, biases


def _time(fn, x, w, s, b, threads, reps):
    m, k = x.shape
    n = w.shape[0]
    y = np.empty((m, n), np.float32)
    out = []
    for _ in range(reps):
        t0 = time.perf_counter()
        rc = fn(x.ctypes.data, m, k, w.ctypes.data, s.ctypes.data, b.ctypes.data, n, 4, 64, y.ctypes.data, threads, 1)
        out.append(time.perf_counter() - t0)
        assert rc == 0
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--rounds", type=int, default=5)
    p.add_argument("--no-prefill", action="store_true")
    args = p.parse_args(argv)

    from phiflash_mlx.cpu import kernels

    lib = kernels._library()
    if lib is None:
        raise SystemExit("the CPU kernels are not built here (python setup.py build_ext --inplace)")
    rng = np.random.default_rng(0)
    result = {"machine": common.machine(),
              "int8_simd": kernels.kernel_info().get("int8_simd"), "rounds": args.rounds, "matvec": [],
              "prefill": []}
    previous = kernels.set_int8(None)
    try:
        for n, k in ((20480, 2560), (2560, 10240)):
            x, w, s, b = _operands(n, k, 1, rng)
            nbytes = w.nbytes + s.nbytes + b.nbytes
            for threads in (1, 2):
                times = {"float": [], "int8": []}
                for _ in range(args.rounds):
                    for name in ("float", "int8"):
                        kernels.set_int8(name == "int8")
                        times[name] += _time(lib.phf_qmatvec, x, w, s, b, threads, 15)
                row = {"n": n, "k": k, "threads": threads, "bytes": nbytes}
                for name, ts in times.items():
                    med = statistics.median(ts)
                    row[name] = {"ms": med * 1e3, "GBps": nbytes / med / 1e9}
                result["matvec"].append(row)
                print(f"mat-vec {n} x {k}, {threads} thread(s): float {row['float']['ms']:.2f} ms "
                      f"({row['float']['GBps']:.1f} GB/s), int8 {row['int8']['ms']:.2f} ms "
                      f"({row['int8']['GBps']:.1f} GB/s)", flush=True)
        if not args.no_prefill:
            previous_rows = lib.phf_set_q8_gemm_rows(16)
            try:
                for n, k in ((20480, 2560), (2560, 10240)):
                    x, w, s, b = _operands(n, k, 512, rng)
                    macs = 512 * n * k
                    for threads in (1, 2):
                        names = ["block", "lanes"] + (["float"] if (n, threads) == (20480, 2) else [])
                        times = {name: [] for name in names}
                        for _ in range(max(2, args.rounds // 2)):
                            for name in names:
                                kernels.set_int8(name != "float")
                                lib.phf_set_q8_gemm_rows(16 if name == "lanes" else 0)
                                times[name] += _time(lib.phf_qmatmul, x, w, s, b, threads, 1)
                        row = {"rows": 512, "n": n, "k": k, "threads": threads}
                        for name, ts in times.items():
                            med = statistics.median(ts)
                            row[name] = {"ms": med * 1e3, "GMACps": macs / med / 1e9}
                        result["prefill"].append(row)
                        print(f"prefill 512 x ({n} x {k}), {threads} thread(s): "
                              + ", ".join(f"{name} {row[name]['ms']:.0f} ms ({row[name]['GMACps']:.0f} GMAC/s)"
                                          for name in names), flush=True)
            finally:
                lib.phf_set_q8_gemm_rows(previous_rows)
    finally:
        kernels.set_int8(previous)

    RESULTS.mkdir(exist_ok=True)
    (RESULTS / "q8.json").write_text(json.dumps(result, indent=1) + "\n")
    plt = common.plt()
    if plt is not None:
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = [f"{r['n']}x{r['k']}\n{r['threads']} thr" for r in result["matvec"]]
        pos = np.arange(len(labels))
        ax.bar(pos - 0.2, [r["float"]["GBps"] for r in result["matvec"]], 0.4, label="float32 activations")
        ax.bar(pos + 0.2, [r["int8"]["GBps"] for r in result["matvec"]], 0.4, label="int8 activations")
        ax.set_xticks(pos, labels)
        ax.set_ylabel("GB/s of weights read")
        ax.set_title("4-bit g64 mat-vec on the CPU (medians, interleaved)")
        ax.legend()
        fig.tight_layout()
        fig.savefig(RESULTS / "q8.png", dpi=120)
    print(f"wrote {RESULTS / 'q8.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
