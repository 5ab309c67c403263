"""Prompt attention on a CPU: one layer's ``DiffAttention._core`` at the released model's shapes
(40 query heads, 10 KV pairs, head size 64, float32), l queries over s keys under a causal mask
(the last l positions of s), three ways, interleaved in one process:

* ``mlx``: the model's MLX path (MLX's CPU scaled_dot_product_attention on the pair layout);
* ``phf_attend``: the few-query decode kernel given all l rows and a dense mask (its scratch grows as
  rows x s, so only where that stays small);
* ``attend_many``: the many-query kernel (phiflash_mlx/cpu/attention.py, phf_attend_many).

Writes ``benchmarks/results/cpu-attention.json`` and, with matplotlib, a PNG next to it.

    python benchmarks/bench_cpu_attention.py                         # l:s = 512:512 and 2048:4096
    python benchmarks/bench_cpu_attention.py --points 512:512 --repeats 5
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
from mlx_lm.models.base import create_causal_mask  # noqa: E402

from phiflash_mlx.cpu import kernels as cpu_kernels  # noqa: E402
from phiflash_mlx.cpu.attention import attend_many  # noqa: E402
from phiflash_mlx.models import phi4flash  # noqa: E402

NH, PAIRS, HD = 40, 10, 64
FEW_KERNEL_MAX_SCRATCH = 256 << 20  # bytes of phf_attend's per-thread scores (rows x s) we are willing to time


def measure(l: int, s: int, repeats: int) -> dict:
    q = mx.random.normal((1, NH, l, HD), key=mx.random.key(0))
    keys = mx.random.normal((1, PAIRS, s, 2 * HD), key=mx.random.key(1))
    values = mx.random.normal((1, PAIRS, s, 2 * HD), key=mx.random.key(2))
    mx.eval(q, keys, values)
    layer = phi4flash.DiffAttention(phi4flash.ModelArgs(), 1, phi4flash.SWA)
    layer.few_query_kernel = None
    dense = create_causal_mask(l, s - l)

    def core(kernel):
        layer.many_query_kernel = kernel
        return layer._core(q, keys, values, "causal", None)

    paths = {"mlx": lambda: core(None), "attend_many": lambda: core(attend_many)}
    if NH // PAIRS * l * s * 4 <= FEW_KERNEL_MAX_SCRATCH:          # rows = both stripes' heads x l
        paths["phf_attend"] = lambda: cpu_kernels.attend_few(q, keys, values, dense, layer.scale)
    times = {name: [] for name in paths}
    outs = {}
    for _ in range(repeats):
        for name, fn in paths.items():
            t0 = time.perf_counter()
            out = fn()
            mx.eval(out)
            times[name].append(time.perf_counter() - t0)
            outs[name] = out
    row = {"l": l, "s": s, "repeats": repeats}
    for name, ts in times.items():
        row[name] = {"median_ms": statistics.median(ts) * 1e3, "min_ms": min(ts) * 1e3}
        if name != "mlx":
            row[name]["max_abs_diff_vs_mlx"] = max(float(mx.abs(a - b).max()) for a, b in zip(outs[name], outs["mlx"]))
    return row


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--points", default="512:512,2048:4096", help="comma-separated l:s pairs")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu-attention.json"))
    args = ap.parse_args()
    try:
        points = [tuple(int(x) for x in p.split(":")) for p in args.points.split(",")]
        if any(len(p) != 2 or p[0] < 1 or p[1] < p[0] for p in points):
            raise ValueError
    except ValueError:
        sys.exit(f"--points {args.points!r}: expected l:s pairs with 1 <= l <= s, e.g. 512:512,2048:4096")
    if attend_many(mx.zeros((1, 2, 2, 4)), mx.zeros((1, 1, 2, 8)), mx.zeros((1, 1, 2, 8)), None, 1.0) is None:
        sys.exit("the CPU kernels are not built: python setup.py build_ext --inplace")
    rows = []
    for l, s in points:
        row = measure(l, s, args.repeats)
        rows.append(row)
        print(json.dumps(row))
    result = {"platform": f"{sys.platform}-{platform.machine().lower()}", "kernels": cpu_kernels.kernel_info(),
              "shape": {"query_heads": NH, "kv_pairs": PAIRS, "head_dim": HD, "mask": "causal"}, "points": rows}
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    with open(args.out, "w") as f:
        json.dump(result, f, indent=1)
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6, 4))
    labels = [f"l={r['l']}\ns={r['s']}" for r in rows]
    for i, name in enumerate(("mlx", "phf_attend", "attend_many")):
        xs = [j + (i - 1) * 0.27 for j, r in enumerate(rows) if name in r]
        ys = [r[name]["median_ms"] for r in rows if name in r]
        ax.bar(xs, ys, width=0.27, label=name)
    ax.set_xticks(range(len(rows)), labels)
    ax.set_yscale("log")
    ax.set_ylabel("ms per layer (median)")
    ax.set_title("DiffAttention._core on CPU, causal, 40 heads x 64")
    ax.legend()
    fig.tight_layout()
    fig.savefig(os.path.splitext(args.out)[0] + ".png", dpi=100)


if __name__ == "__main__":
    main()
