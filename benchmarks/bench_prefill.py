"""Prefill speed against prompt length on scaled-down shapes: SambaY (ours) vs Phi-4-mini (mlx-lm phi3).

The released models hold about the same number of non-embedding parameters (3.3B ours, 3.2B
Phi-4-mini), so the scaled-down pair is matched the same way:

* ours: hidden 768, 12/6 heads (head_dim 64), intermediate 3072, d_inner 1536, window 512,
  the released layer schedule (Mamba/SWA, Mamba-memory, global attention, GMU/cross);
* phi3: hidden 768, 6/2 heads (head_dim 128 as in Phi-4-mini), intermediate 3328, chosen so the
  non-embedding parameters match ours (within ~2%); LongRoPE with partial rotary 0.75.

Both keep the 200064-token vocabulary (only the last token's logits are computed). Weights are random
float32 by default: on a CPU, prefill is matrix-matrix work and fp32 GEMMs go to OpenBLAS, while
4-bit ``quantized_matmul`` runs ~100x slower there (``--quant q4`` to measure it anyway).

Both models prefill in chunks of ``--step`` tokens (512, our default; mlx-lm's ``generate_step`` uses
2048), evaluating the caches after every chunk, then the last token's logits. Every model runs in its
own subprocess, alternating ours / theirs, ``--rounds`` times; each worker first warms up on a
128-token prompt. Reported: seconds and tokens/s per prompt length (median and range over the
rounds), MLX peak memory and process RSS, cache bytes after the prompt.

Writes ``benchmarks/results/prefill.json`` (``prefill-quick.json`` with ``--quick``) and a PNG.

    python benchmarks/bench_prefill.py --quick    # 16 layers, prompts 512..4K, 1 round: ~5 min on 2 cores
    python benchmarks/bench_prefill.py            # 32 layers, prompts 512..16K, 2 rounds
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

MODELS = ("sambay", "phi3")


def configs(layers: int) -> dict:
    sambay = dict(common.SAMBAY_RELEASED, hidden_size=768, num_attention_heads=12, num_key_value_heads=6,
                  intermediate_size=3072, num_hidden_layers=layers)
    phi3 = dict(common.PHI4_MINI, hidden_size=768, num_attention_heads=6, num_key_value_heads=2,
                intermediate_size=3328, num_hidden_layers=layers,
                rope_scaling=common.phi3_rope_scaling(768, 6))
    return {"sambay": sambay, "phi3": phi3}


def _non_embedding(model, cfg) -> int:
    return common.param_count(model) - cfg["vocab_size"] * cfg["hidden_size"]


def _prefill_phi3(model, ids: list[int], cache, step: int):
    import mlx.core as mx

    done = 0
    while len(ids) - done > 1:
        n = min(step, len(ids) - done - 1)
        model(mx.array([ids[done:done + n]]), cache=cache)
        mx.eval([x for c in cache for x in c.state if isinstance(x, mx.array)])
        done += n
    return model(mx.array([ids[-1:]]), cache=cache)[:, -1]


def worker(args) -> dict:
    import phiflash_mlx  # noqa: F401  (first: MLX's BLAS is fixed when mlx.core is first imported)
    import mlx.core as mx
    from phiflash_mlx.cpu.blas import blas_info
    import numpy as np

    cfg = configs(args.layers)[args.model]
    t0 = time.perf_counter()
    if args.model == "sambay":
        from phiflash_mlx.generate import prefill as run_prefill

        model = common.build_sambay(cfg, args.quant)
        make_cache = model.make_cache
    else:
        from mlx_lm.models.cache import make_prompt_cache

        model = common.build_phi3(cfg, args.quant)
        run_prefill = _prefill_phi3
        make_cache = lambda: make_prompt_cache(model)  # noqa: E731
    if args.cpu_kernels:                          # both models: our CPU products (and our model's CPU paths)
        from phiflash_mlx.cpu.kernels import use_cpu_kernels
        use_cpu_kernels(model)
    out = {"model": args.model, "quant": args.quant, "cpu_kernels": bool(args.cpu_kernels), "config": cfg,
           "build_s": round(time.perf_counter() - t0, 1),
           "params": common.param_count(model), "non_embedding_params": _non_embedding(model, cfg),
           "weight_bytes": common.param_bytes(model), "blas": blas_info(), "points": {}}
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    mx.eval(run_prefill(model, rng.integers(0, V, 128).tolist(), make_cache(), args.step))   # warm-up
    for T in args.lengths:
        ids = rng.integers(0, V, T).tolist()
        cache = make_cache()
        mx.clear_cache()
        mx.reset_peak_memory()
        t0 = time.perf_counter()
        logits = run_prefill(model, ids, cache, args.step)
        mx.eval(logits)
        dt = time.perf_counter() - t0
        cache_bytes = sum(x.nbytes for c in cache for x in c.state if hasattr(x, "nbytes"))
        out["points"][str(T)] = {"seconds": round(dt, 3), "tokens_per_s": round(T / dt, 1),
                                 "cache_bytes": cache_bytes,
                                 "mlx_peak_memory_gib": round(mx.get_peak_memory() / common.GiB, 3),
                                 **common.rss_now()}
        print(f"  [{args.model} {args.quant} {args.layers}L] prompt {T:6d}: {dt:7.2f} s, {T / dt:7.1f} tok/s",
              flush=True)
        del cache, logits
    return out


def aggregate(runs: list[dict]) -> dict:
    table = {}
    for r in runs:
        if "points" not in r:
            continue
        e = table.setdefault(r["model"], {"model": r["model"], "quant": r["quant"], "params": r["params"],
                                          "non_embedding_params": r["non_embedding_params"],
                                          "max_rss_gib": [], "points": {}})
        e["max_rss_gib"].append(r["process"]["max_rss_gib"])
        for T, p in r["points"].items():
            pt = e["points"].setdefault(T, {"seconds": [], "mlx_peak_memory_gib": [], "cache_bytes": p["cache_bytes"]})
            pt["seconds"].append(p["seconds"])
            pt["mlx_peak_memory_gib"].append(p["mlx_peak_memory_gib"])
    for e in table.values():
        for T, pt in e["points"].items():
            med = statistics.median(pt["seconds"])
            pt.update(median_s=med, tokens_per_s=round(int(T) / med, 1),
                      tokens_per_s_range=[round(int(T) / max(pt["seconds"]), 1), round(int(T) / min(pt["seconds"]), 1)])
    return table


def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8))
    styles = {"sambay": ("tab:blue", "SambaY (ours)"), "phi3": ("tab:orange", "Phi-4-mini shape (mlx-lm phi3)")}
    for name, e in report["results"].items():
        color, label = styles[name]
        label += f", {e['non_embedding_params'] / 1e6:.0f}M non-emb. params"
        Ts = sorted(e["points"], key=int)
        xs = [int(t) for t in Ts]
        axes[0].plot(xs, [e["points"][t]["tokens_per_s"] for t in Ts], marker="o", color=color, label=label)
        axes[0].fill_between(xs, [e["points"][t]["tokens_per_s_range"][0] for t in Ts],
                             [e["points"][t]["tokens_per_s_range"][1] for t in Ts], color=color, alpha=0.15)
        axes[1].plot(xs, [e["points"][t]["median_s"] for t in Ts], marker="o", color=color, label=label)
    for ax in axes:
        ax.set_xscale("log", base=2)
        ax.set_xlabel("prompt tokens")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_ylabel("prefill tokens/s (median; band: min-max)")
    axes[1].set_ylabel("prefill seconds")
    axes[1].set_yscale("log")
    m, s = report["machine"], report["settings"]
    return common.save_figure(fig, path, report,
                              f"Prefill, {s['layers']} layers, hidden 768, {s['quant']} weights, chunks of {s['step']} — "
                              f"{m['cpu']} ({m['cpus']} cores)" + (" — quick run" if report["quick"] else ""))


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="16 layers, prompts up to 4K, 1 round")
    p.add_argument("--lengths", type=int, nargs="+")
    p.add_argument("--layers", type=int, help="default 32, quick 16")
    p.add_argument("--quant", default="fp32", choices=["fp32", "q4"])
    p.add_argument("--step", type=int, default=512, help="prefill chunk size for both models")
    p.add_argument("--rounds", type=int, help="default 2, quick 1")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--cpu-kernels", action="store_true",
                   help="q4: attach phiflash_mlx's CPU kernels to both models (as load() does for ours); "
                        "writes prefill-ck.json")
    p.add_argument("--shared-machine", action="store_true", help="record that other jobs were running")
    p.add_argument("--out-dir", default=common.RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--model", choices=MODELS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.layers = args.layers or (16 if args.quick else 32)
    args.lengths = args.lengths or ([512, 1024, 2048, 4096] if args.quick else [512, 1024, 2048, 4096, 8192, 16384])
    if args.worker:
        common.write_result(args.result, worker(args))
        return 0
    rounds = args.rounds or (1 if args.quick else 2)
    report = {"machine": common.machine(), "quick": args.quick, "shared_machine": args.shared_machine,
              "settings": {"layers": args.layers, "lengths": args.lengths, "quant": args.quant, "step": args.step,
                           "rounds": rounds, "cpu_kernels": args.cpu_kernels},
              "load_before": common.load_snapshot(), "runs": []}
    t0 = time.perf_counter()
    for rnd in range(rounds):
        order = list(args.models) if rnd % 2 == 0 else list(reversed(args.models))
        for model in order:
            print(f"round {rnd + 1}/{rounds}: {model}", flush=True)
            r = common.run_worker(os.path.abspath(__file__),
                                  ["--model", model, "--layers", str(args.layers), "--quant", args.quant,
                                   "--step", str(args.step), "--lengths", *map(str, args.lengths),
                                   *(["--cpu-kernels"] if args.cpu_kernels else [])])
            r["round"], r["load"] = rnd, common.load_snapshot()
            report["runs"].append(r)
            if "error" in r:
                print(f"  failed: {r['error']}", flush=True)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    report["results"] = aggregate(report["runs"])
    res = report["results"]
    if "sambay" in res and "phi3" in res:
        report["speedup_vs_phi3"] = {T: round(res["sambay"]["points"][T]["tokens_per_s"] /
                                              res["phi3"]["points"][T]["tokens_per_s"], 3)
                                     for T in res["sambay"]["points"] if T in res["phi3"]["points"]}
        print("prefill speed-up of ours over phi3:", json.dumps(report["speedup_vs_phi3"]))
    os.makedirs(args.out_dir, exist_ok=True)
    stem = ("prefill-quick" if args.quick else "prefill") + ("-ck" if args.cpu_kernels else "")
    common.write_result(os.path.join(args.out_dir, stem + ".json"), report)
    print(f"wrote {os.path.join(args.out_dir, stem + '.json')}")
    if plot(report, os.path.join(args.out_dir, stem + ".png")):
        print(f"wrote {os.path.join(args.out_dir, stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
