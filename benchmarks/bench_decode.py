"""Decode speed and memory against context length: SambaY (ours) vs Phi-4-mini in mlx-lm, and vs the
memory-bandwidth limit.

Models (random weights, same quantization for both, built in the same run):

* ``sambay``: ``phiflash_mlx.models.phi4flash.Model`` at the released shape (hidden 2560, 32 layers,
  40/20 heads, intermediate 10240, vocab 200064, window 512, d_inner 5120, d_state 16);
* ``phi3``: ``mlx_lm.models.phi3.Model`` at Phi-4-mini's shape (hidden 3072, 32 layers, 24/8 heads,
  intermediate 8192, vocab 200064, tied embeddings, LongRoPE, partial rotary 0.75).

Quantizations: ``q4`` (4-bit affine, group 64, via ``mlx.nn.quantize``) and ``fp32`` (float32 weights; on Linux ``import phiflash_mlx`` routes MLX's fp32 GEMMs to
OpenBLAS). A float32 3.8B model takes ~15 GB, so ``--fp32-layers`` (default 16, ``--quick`` 8) cuts
the depth of both models for fp32 (SambaY keeps its schedule: h = layers/2); pass 32 where the memory
allows.

Quantized matrix-vector products: on a CPU, ``phiflash_mlx.load`` gives quantized models our
multi-threaded C kernel (``phiflash_mlx/cpu_kernels.py``) instead of MLX's single-threaded
``quantized_matmul``. Each q4 model therefore runs twice: with MLX's ``quantized_matmul`` (``mlx``,
what mlx-lm uses) and with our kernel (``ck``). "ours as shipped vs phi3 in mlx-lm" compares
``sambay-q4-ck`` with ``phi3-q4-mlx``; "same kernels" compares like with like and isolates the
architecture. The ``ck`` runs of ours also use the C attention kernel for decode steps
(``cpu_kernels.attend_few``), as ``phiflash_mlx.load`` does on every CPU, fp32 runs included; phi3
has no layer it applies to. With Metal (a Mac) both run MLX's GPU kernels and only ``mlx`` runs.

Caches are filled with synthetic data of the right size instead of running a real prefill (which would
take hours per point on a small CPU): for ours the shared full-attention K/V (layer h+1) holds `ctx`
positions, every sliding-window cache 512, every Mamba layer random conv/SSM states; for phi3 each
layer's mlx-lm ``KVCache`` holds `ctx` positions. Both are preallocated with room to grow, as after a
prefill, so decoding does not copy them. Cache tensors are float32 (the activation dtype on CPU).

Each point: one warm-up decode step, then ``--steps`` timed steps (greedy: the argmax feeds the next
step). Every (model, quantization) runs in its own subprocess, one at a time; runs alternate ours /
theirs and repeat ``--rounds`` times, so machine noise hits both. Reported: median and range of the
per-step times over all rounds, tokens/s from the median, MLX peak memory and process RSS per point,
cache bytes, and the roofline: the bytes a decode step must read (weights as stored + the caches each
layer attends over; the shared K/V counts once per layer reading it) divided by the measured memory
bandwidth, over the measured time. A per-component profile (LM head, one MLP times the layer count,
the rest) explains where the time goes.

Writes ``benchmarks/results/decode.json`` (``decode-quick.json`` with ``--quick``) and a PNG.

    python benchmarks/bench_decode.py --quick     # 2-core Linux, 24 GiB: ~10 min
    python benchmarks/bench_decode.py             # 4 timed steps, 2 rounds, fp32 at 16 layers
    python benchmarks/bench_decode.py --fp32-layers 32 --rounds 3   # Mac with >= 48 GB
"""

from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

CONTEXTS = [1024, 4096, 16384, 32768]
MODELS = ("sambay", "phi3")


# --------------------------------------------------------------------------- worker


def _config(model: str, layers: int) -> dict:
    cfg = dict(common.SAMBAY_RELEASED if model == "sambay" else common.PHI4_MINI)
    cfg["num_hidden_layers"] = layers
    return cfg


def _fill_sambay(model, ctx: int, key, kv_dtype=None):
    """The model's own caches (mlx-lm's classes) as after a `ctx`-token prefill: the shared full
    attention K/V holds `ctx` positions (with room to grow), every sliding window its last 512 (a
    full ring), every Mamba layer random conv/SSM states. K/V are in the pair layout, in the dtype
    each layer stores (its DiffAttention.kv_dtype: float16 for the shared full-attention cache once
    the CPU kernels are attached, unless PHIFLASH_CPU_KV16=0; else float32), or all in `kv_dtype`."""
    import mlx.core as mx
    from phiflash_mlx.models.cache import ArraysCache, KVCache, RotatingKVCache

    a = model.args
    P, hd, Di, n, K = a.num_key_value_heads // 2, a.head_dim, a.d_inner, a.mamba_d_state, a.mamba_d_conv
    caches = model.make_cache()
    for i, c in enumerate(caches):
        dt = kv_dtype or getattr(model.layers[i].attn, "kv_dtype", None) or mx.float32
        k1, k2 = mx.random.split(mx.random.key(1000 + i))
        if isinstance(c, ArraysCache):
            c[0] = mx.random.uniform(-1, 1, (1, K - 1, Di), key=k1)
            c[1] = mx.random.uniform(-1, 1, (1, Di, n), key=k2)
            arrays = [c[0], c[1]]
        elif isinstance(c, RotatingKVCache):
            s = min(ctx, c.max_size)
            c.keys = mx.random.uniform(-1, 1, (1, P, s, 2 * hd), key=k1).astype(dt)
            c.values = mx.random.uniform(-1, 1, (1, P, s, 2 * hd), key=k2).astype(dt)
            c.offset = ctx
            c._idx = s
            arrays = [c.keys, c.values]
        elif isinstance(c, KVCache):
            room = mx.zeros((1, P, KVCache.step, 2 * hd), dtype=dt)
            c.keys = mx.concatenate([mx.random.uniform(-1, 1, (1, P, ctx, 2 * hd), key=k1).astype(dt), room], 2)
            c.values = mx.concatenate([mx.random.uniform(-1, 1, (1, P, ctx, 2 * hd), key=k2).astype(dt), room], 2)
            c.offset = ctx
            arrays = [c.keys, c.values]
        mx.eval(arrays)
    return caches


def _sambay_bytes(model, caches, ctx: int) -> tuple[int, int]:
    """(cache bytes held, cache bytes read by one decode step at this context)."""
    from phiflash_mlx.models.phi4flash import CROSS

    held = sum(c.nbytes for c in caches)
    kinds = model.args.layer_kinds
    n_cross = sum(k == CROSS for k in kinds)
    a = model.args
    read = 0
    for c in caches:
        if hasattr(c, "max_size"):                                 # sliding window: the whole ring
            read += c.keys.nbytes + c.values.nbytes
        elif hasattr(c, "keys"):                                   # the global layer and every cross layer
            per_pos = 2 * a.num_key_value_heads * a.head_dim * c.keys.dtype.size
            read += (ctx + 1) * per_pos * (1 + n_cross)
        else:
            read += c.nbytes
    return held, read


def _fill_phi3(model, ctx: int, key):
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache

    a = model.args
    hd = a.hidden_size // a.num_attention_heads
    caches = []
    for i in range(a.num_hidden_layers):
        k1, k2 = mx.random.split(mx.random.key(2000 + i))
        c = KVCache()
        room = mx.zeros((1, a.num_key_value_heads, KVCache.step, hd))
        c.keys = mx.concatenate([mx.random.uniform(-1, 1, (1, a.num_key_value_heads, ctx, hd), key=k1), room], axis=2)
        c.values = mx.concatenate([mx.random.uniform(-1, 1, (1, a.num_key_value_heads, ctx, hd), key=k2), room], axis=2)
        c.offset = ctx
        mx.eval(c.keys, c.values)
        caches.append(c)
    return caches


def _phi3_bytes(model, caches, ctx: int) -> tuple[int, int]:
    held = sum(c.keys[..., :c.offset, :].nbytes + c.values[..., :c.offset, :].nbytes for c in caches)
    return held, held * (ctx + 1) // ctx


def _profile(model, kind: str, repeats: int = 3) -> dict:
    """Seconds for the tied LM head and for one MLP on one token (times the layer count)."""
    import mlx.core as mx

    inner = model.model
    H = model.args.hidden_size
    x = mx.random.uniform(-1, 1, (1, 1, H))
    mx.eval(x)

    def best(fn):
        mx.eval(fn())
        ts = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(fn())
            ts.append(time.perf_counter() - t0)
        return statistics.median(ts)

    head = best(lambda: inner.embed_tokens.as_linear(x))
    mlp = best(lambda: inner.layers[0].mlp(x))
    return {"lm_head_s": head, "one_mlp_s": mlp, "all_mlps_s": mlp * len(inner.layers)}


def worker(args) -> dict:
    import phiflash_mlx  # noqa: F401  (first: MLX's BLAS is fixed when mlx.core is first imported)
    import mlx.core as mx
    from phiflash_mlx.cpu.blas import blas_info

    cfg = _config(args.model, args.layers)
    t0 = time.perf_counter()
    build = common.build_sambay if args.model == "sambay" else common.build_phi3
    model = build(cfg, args.quant)
    if args.cpu_kernels:
        from phiflash_mlx.cpu.kernels import kernel_info, use_cpu_kernels
        use_cpu_kernels(model)
    build_s = time.perf_counter() - t0
    fill = _fill_sambay if args.model == "sambay" else _fill_phi3
    count = _sambay_bytes if args.model == "sambay" else _phi3_bytes
    out = {
        "model": args.model, "quant": args.quant, "cpu_kernels": bool(args.cpu_kernels),
        **({"kernel": kernel_info()} if args.cpu_kernels else {}),
        "config": cfg, "build_s": round(build_s, 1),
        "params": common.param_count(model), "weight_bytes": common.param_bytes(model),
        "rss_after_build": common.rss_now(), "blas": blas_info(), "points": {},
    }
    tag = f"{args.model} {args.quant}{' ck' if args.cpu_kernels else ''}"
    print(f"  [{tag} {args.layers}L] built in {build_s:.0f} s, "
          f"{out['weight_bytes'] / 1e9:.2f} GB of weights", flush=True)
    vocab = cfg["vocab_size"]
    for ctx in args.contexts:
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        caches = fill(model, ctx, None)
        fill_s = time.perf_counter() - t0
        held, read = count(model, caches, ctx)
        tok = (ctx * 7919) % vocab
        times = []
        for step in range(args.warmup + args.steps):
            t0 = time.perf_counter()
            logits = model(mx.array([[tok]]), cache=caches)
            tok = mx.argmax(logits[0, -1]).item()
            dt = time.perf_counter() - t0
            if step >= args.warmup:
                times.append(dt)
        point = {
            "step_times_s": [round(t, 4) for t in times],
            "cache_bytes": held, "cache_read_bytes_per_step": read,
            "fill_s": round(fill_s, 2),
            "mlx_peak_memory_gib": round(mx.get_peak_memory() / common.GiB, 3),
            **common.rss_now(),
        }
        out["points"][str(ctx)] = point
        print(f"  [{tag}] ctx {ctx:6d}: {statistics.median(times):.3f} s/token, cache "
              f"{held / 2**20:.0f} MiB, peak {point['mlx_peak_memory_gib']:.2f} GiB", flush=True)
        del caches, logits
    if args.profile:
        out["profile"] = _profile(model, args.model)
    return out


# --------------------------------------------------------------------------- driver


def run_key(model: str, quant: str, cpu_kernels: bool) -> str:
    """sambay-q4-ck / sambay-q4-mlx / phi3-q4-mlx / ... / sambay-fp32 (kernels only matter for q4)."""
    if quant != "q4":
        return f"{model}-{quant}"
    return f"{model}-{quant}-{'ck' if cpu_kernels else 'mlx'}"


def aggregate(runs: list[dict], bandwidth_gbps: float) -> dict:
    """Per (model, quant, kernels): per context, median/range over all rounds' step times, and the roofline."""
    table = {}
    for r in runs:
        if "points" not in r:
            continue
        entry = table.setdefault(run_key(r["model"], r["quant"], r.get("cpu_kernels", False)), {
            "model": r["model"], "quant": r["quant"], "cpu_kernels": r.get("cpu_kernels", False),
            "layers": r["config"]["num_hidden_layers"],
            "params": r["params"], "weight_bytes": r["weight_bytes"], "points": {},
            "max_rss_gib": [], "profile": [],
        })
        entry["max_rss_gib"].append(r["process"]["max_rss_gib"])
        if "profile" in r:
            entry["profile"].append(r["profile"])
        for ctx, p in r["points"].items():
            pt = entry["points"].setdefault(ctx, {"step_times_s": [], "mlx_peak_memory_gib": [], "peak_rss_gib": []})
            pt["step_times_s"] += p["step_times_s"]
            pt["mlx_peak_memory_gib"].append(p["mlx_peak_memory_gib"])
            pt["peak_rss_gib"].append(p.get("peak_rss_gib"))
            pt["cache_bytes"] = p["cache_bytes"]
            pt["cache_read_bytes_per_step"] = p["cache_read_bytes_per_step"]
    for entry in table.values():
        for ctx, pt in entry["points"].items():
            ts = pt["step_times_s"]
            med = statistics.median(ts)
            pt.update(median_s=round(med, 4), min_s=min(ts), max_s=max(ts), tokens_per_s=round(1 / med, 3))
            pt["bytes_per_step"] = entry["weight_bytes"] + pt["cache_read_bytes_per_step"]
            pt["roofline_s"] = pt["bytes_per_step"] / (bandwidth_gbps * 1e9)
            pt["roofline_ratio"] = round(pt["roofline_s"] / med, 4)
        if entry["profile"]:
            prof = {k: statistics.median(p[k] for p in entry["profile"]) for k in entry["profile"][0]}
            # what is left for the mixers (Mamba, attention, GMU), norms and overheads, per context
            prof["rest_s"] = {c: round(pt["median_s"] - prof["lm_head_s"] - prof["all_mlps_s"], 3)
                              for c, pt in entry["points"].items()}
            entry["profile"] = prof
    return table


COMPARISONS = {
    # name: (ours, theirs)
    "q4": ("sambay-q4-ck", "phi3-q4-mlx"),             # ours as phiflash_mlx.load runs it vs mlx-lm as is
    "q4_same_kernels": ("sambay-q4-ck", "phi3-q4-ck"),  # architecture only: both with our CPU kernel
    "q4_mlx_kernels": ("sambay-q4-mlx", "phi3-q4-mlx"),  # architecture only: both with MLX's kernel
    "fp32": ("sambay-fp32", "phi3-fp32"),
}


def headline(table: dict) -> dict:
    out = {}
    for name, (ours_key, theirs_key) in COMPARISONS.items():
        ours, theirs = table.get(ours_key), table.get(theirs_key)
        if name == "q4" and not ours:                   # no CPU kernel (Metal, or not built)
            ours = table.get("sambay-q4-mlx")
            ours_key = "sambay-q4-mlx"
        if not ours:
            continue
        ctxs = sorted(ours["points"], key=int)
        h = {"ours": ours_key, "theirs": theirs_key if theirs else None, "layers": ours["layers"],
             "tokens_per_s": {}, "speedup_vs_phi3": {}, "cache_ratio_phi3_over_ours": {},
             "roofline_ratio_ours": {}, "roofline_ratio_phi3": {}}
        for c in ctxs:
            o = ours["points"][c]
            h["tokens_per_s"][c] = {"ours": o["tokens_per_s"]}
            h["roofline_ratio_ours"][c] = o["roofline_ratio"]
            if theirs and c in theirs["points"]:
                t = theirs["points"][c]
                h["tokens_per_s"][c]["phi3"] = t["tokens_per_s"]
                h["speedup_vs_phi3"][c] = round(o["tokens_per_s"] / t["tokens_per_s"], 3)
                h["cache_ratio_phi3_over_ours"][c] = round(t["cache_bytes"] / o["cache_bytes"], 2)
                h["roofline_ratio_phi3"][c] = t["roofline_ratio"]
        lo, hi = ctxs[0], ctxs[-1]
        h[f"ours_slowdown_{hi}_vs_{lo}"] = round(ours["points"][hi]["median_s"] / ours["points"][lo]["median_s"], 3)
        if theirs and hi in theirs["points"] and lo in theirs["points"]:
            h[f"phi3_slowdown_{hi}_vs_{lo}"] = round(
                theirs["points"][hi]["median_s"] / theirs["points"][lo]["median_s"], 3)
        out[name] = h
    return out


def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 3, figsize=(16, 5))
    styles = {"sambay": ("tab:blue", "SambaY (ours)"), "phi3": ("tab:orange", "Phi-4-mini (mlx-lm phi3)")}
    for key, e in report["results"].items():
        color, name = styles[e["model"]]
        ck = e.get("cpu_kernels", False)
        ls = "--" if e["quant"] != "q4" else ("-" if ck else ":")
        kern = "" if e["quant"] != "q4" else (", our CPU kernel" if ck else ", MLX kernel")
        label = f"{name}, {e['quant']}{kern}, {e['layers']} layers"
        ctxs = sorted(e["points"], key=int)
        xs = [int(c) for c in ctxs]
        med = [e["points"][c]["tokens_per_s"] for c in ctxs]
        lo = [1 / e["points"][c]["max_s"] for c in ctxs]
        hi = [1 / e["points"][c]["min_s"] for c in ctxs]
        axes[0].plot(xs, med, ls, marker="o", color=color, label=label)
        axes[0].fill_between(xs, lo, hi, color=color, alpha=0.15)
        if (e["quant"] == "q4" and not ck) or not any(v["quant"] == "q4" and v["model"] == e["model"]
                                                      for v in report["results"].values()):
            axes[1].plot(xs, [e["points"][c]["cache_bytes"] / 2**20 for c in ctxs], "-", marker="o", color=color,
                         label=f"{name}, {e['layers']} layers")
        axes[2].plot(xs, [e["points"][c]["roofline_ratio"] for c in ctxs], ls, marker="o", color=color, label=label)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("context (tokens)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    axes[0].set_ylabel("decode tokens/s (median; band: min-max)")
    axes[0].set_yscale("log")
    axes[1].set_ylabel("cache MiB (float32)")
    axes[1].set_yscale("log")
    axes[2].set_ylabel("roofline ratio (bytes/bandwidth ÷ measured time)")
    axes[2].set_yscale("log")
    m = report["machine"]
    return common.save_figure(fig, path, report,
                              f"Decode vs context, random weights — {m['cpu']} ({m['cpus']} cores), MLX {m.get('mlx')}, "
                              f"bandwidth {report['bandwidth_gbps_used']} GB/s" + (" — quick run" if report["quick"] else ""),
                              fontsize=10)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 timed steps, 1 round, fp32 at 8 layers")
    p.add_argument("--contexts", type=int, nargs="+", default=CONTEXTS)
    p.add_argument("--quants", nargs="+", default=["q4", "fp32"], choices=["q4", "fp32"])
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--steps", type=int, help="timed decode steps per point (default 4, quick 2)")
    p.add_argument("--warmup", type=int, default=1)
    p.add_argument("--rounds", type=int, help="how many times to repeat every run (default 2, quick 1)")
    p.add_argument("--q4-layers", type=int, default=32)
    p.add_argument("--q4-kernels", nargs="+", default=["ck", "mlx"], choices=["ck", "mlx"],
                   help="q4 runs with our CPU kernel (ck) and/or MLX's quantized_matmul (mlx); default both")
    p.add_argument("--fp32-layers", type=int, help="depth for fp32 runs (default 16, quick 8)")
    p.add_argument("--shared-machine", action="store_true",
                   help="record that other jobs were running (timings are noisier)")
    p.add_argument("--out-dir", default=common.RESULTS)
    p.add_argument("--reaggregate", metavar="JSON",
                   help="recompute the summary and the plot of an earlier run's JSON (no measuring)")
    # worker side
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--quant", choices=["q4", "fp32"], help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, help=argparse.SUPPRESS)
    p.add_argument("--profile", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--cpu-kernels", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0

    if args.reaggregate:
        with open(args.reaggregate) as f:
            report = json.load(f)
        report["results"] = aggregate(report["runs"], report["bandwidth_gbps_used"])
        report["headline"] = headline(report["results"])
        common.write_result(args.reaggregate, report)
        plot(report, os.path.splitext(args.reaggregate)[0] + ".png")
        print(json.dumps(report["headline"], indent=1))
        return 0

    steps = args.steps or (2 if args.quick else 4)
    rounds = args.rounds or (1 if args.quick else 2)
    fp32_layers = args.fp32_layers or (8 if args.quick else 16)
    report = {
        "machine": common.machine(), "quick": args.quick, "shared_machine": args.shared_machine,
        "settings": {"contexts": args.contexts, "steps": steps, "warmup": args.warmup, "rounds": rounds,
                     "q4_layers": args.q4_layers, "fp32_layers": fp32_layers},
        "method": ("random weights; caches filled with synthetic float32 data of the right size (no real "
                   "prefill); per point one warm-up step then the timed steps; one subprocess per "
                   "(model, quantization), alternating ours/theirs, repeated per round"),
        "load_before": common.load_snapshot(), "bandwidth": [common.memory_bandwidth()], "runs": [],
    }
    kernels = [False]
    if "q4" in args.quants and common.cpu_kernel_available():
        kernels = [k == "ck" for k in args.q4_kernels]
    report["settings"]["q4_kernels"] = ["ck" if k else "mlx" for k in kernels]
    t_start = time.perf_counter()
    # fp32: ours as phiflash_mlx.load runs it (the attention kernel where available); phi3 has nothing
    # for the kernels to replace, so the flag changes nothing for it
    fp32_kern = common.cpu_kernel_available()
    plan = [(quant, kern) for quant in args.quants for kern in (kernels if quant == "q4" else [fp32_kern])]
    for rnd in range(rounds):
        order = list(args.models) if rnd % 2 == 0 else list(reversed(args.models))
        for (quant, kern), model in [(qk, m) for qk in plan for m in order]:
            layers = args.q4_layers if quant == "q4" else fp32_layers
            print(f"round {rnd + 1}/{rounds}: {run_key(model, quant, kern)} {layers} layers", flush=True)
            wargs = ["--model", model, "--quant", quant, "--layers", str(layers), "--steps", str(steps),
                     "--warmup", str(args.warmup), "--contexts", *map(str, args.contexts)]
            if kern:
                wargs.append("--cpu-kernels")
            if rnd == 0:
                wargs.append("--profile")
            r = common.run_worker(os.path.abspath(__file__), wargs)
            r["round"] = rnd
            r["load"] = common.load_snapshot()
            report["runs"].append(r)
            if "error" in r:
                print(f"  failed: {r['error']}", flush=True)
    report["bandwidth"].append(common.memory_bandwidth())
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    bw = statistics.median([b["read_gbps_median"] for b in report["bandwidth"]])
    report["bandwidth_gbps_used"] = bw
    report["results"] = aggregate(report["runs"], bw)
    report["headline"] = headline(report["results"])
    print(json.dumps(report["headline"], indent=1))

    os.makedirs(args.out_dir, exist_ok=True)
    stem = "decode-quick" if args.quick else "decode"
    json_path = os.path.join(args.out_dir, stem + ".json")
    common.write_result(json_path, report)
    print(f"wrote {json_path}")
    png = os.path.join(args.out_dir, stem + ".png")
    if plot(report, png):
        print(f"wrote {png}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
