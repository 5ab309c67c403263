"""CPU paths side by side in one process, alternated round by round (4-bit random weights at the
released shapes, 32 layers, the CPU kernels as `phiflash_mlx.load` attaches them):

* **AVX2 vs native**: whole decode steps at 1K and 32K (synthetic caches, as `bench_decode.py` fills
  them) and a 512-token prompt, with every C kernel held to AVX2 (the int8 products capped with
  `phf_set_q8_level_cap(1)`, the 512-bit decode attention off) against the best this CPU has: what a
  CPU without AVX-512 (most laptops) would run, on this machine's memory.
* **sampling**: one draw from 200064 logits, greedy, with the default temperature 0.6 / top-p 0.95
  on the host (what `Sampler` does on a CPU device) and through MLX's ops (`filter_logprobs` +
  `mx.random.categorical`, what it does on Metal / CUDA), and top-p 1.0 on the host.
* **generation**: `Generator.stream` with the default sampling, the host draw vs MLX's ops.

Writes ``benchmarks/results/cpu-paths.json`` and ``cpu-paths.png``.

    python benchmarks/bench_cpu_paths.py                      # ~5 minutes on 2 cores
    python benchmarks/bench_cpu_paths.py --rounds 1 --contexts 1024 --no-prefill
"""

from __future__ import annotations

import argparse
import importlib
import os
import statistics
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402


def _held_to(lib, level: str) -> None:
    """Every C kernel at its best ("native") or held to AVX2 ("avx2")."""
    lib.phf_set_q8_level_cap(2 if level == "native" else 1)
    lib.phf_set_attend_decode(1 if level == "native" else 0)


def _decode_ms(model, caches, steps: int) -> float:
    import mlx.core as mx

    tok = mx.array([[5]])
    for _ in range(2):
        mx.eval(model(tok, cache=caches))
    t0 = time.perf_counter()
    for _ in range(steps):
        out = model(tok, cache=caches)
        tok = mx.argmax(out[:, -1:], axis=-1)
        mx.eval(tok)
    return (time.perf_counter() - t0) / steps * 1e3


def levels(model, lib, contexts, rounds: int, steps: int, prefill: bool) -> dict:
    import mlx.core as mx
    import numpy as np

    import bench_decode
    from phiflash_mlx.generate import prefill as run_prefill

    out = {}
    for ctx in contexts:
        caches = bench_decode._fill_sambay(model, ctx, mx.random.key(ctx))
        ms = {"native": [], "avx2": []}
        for _ in range(rounds):
            for level in ms:
                _held_to(lib, level)
                ms[level].append(round(_decode_ms(model, caches, steps), 2))
        out[f"decode_{ctx}_ms"] = ms
        print(f"  decode {ctx}: native {statistics.median(ms['native']):.1f} ms, "
              f"AVX2 {statistics.median(ms['avx2']):.1f} ms", flush=True)
        del caches
    if prefill:
        rng = np.random.default_rng(0)
        vocab = model.args.vocab_size
        mx.eval(run_prefill(model, rng.integers(0, vocab, 8).tolist(), model.make_cache(), 1024))
        tps = {"native": [], "avx2": []}
        for _ in range(rounds):
            for level in tps:
                _held_to(lib, level)
                ids = rng.integers(0, vocab, 512).tolist()
                t0 = time.perf_counter()
                mx.eval(run_prefill(model, ids, model.make_cache(), 1024))
                tps[level].append(round(512 / (time.perf_counter() - t0), 1))
        out["prefill_512_tok_s"] = tps
        print(f"  prefill 512: native {statistics.median(tps['native'])} tok/s, "
              f"AVX2 {statistics.median(tps['avx2'])} tok/s", flush=True)
    _held_to(lib, "native")
    return out


def sampling(vocab: int, repeats: int) -> dict:
    import mlx.core as mx

    gen = importlib.import_module("phiflash_mlx.generate")
    logits = mx.random.normal((1, vocab), key=mx.random.key(3)) * 3
    mx.eval(logits)
    cases = {
        "greedy": (gen.SamplingParams(temp=0), None),
        "t0.6_p0.95_host": (gen.SamplingParams(temp=0.6, top_p=0.95, seed=1), None),
        "t0.6_p0.95_mlx_ops": (gen.SamplingParams(temp=0.6, top_p=0.95, seed=1), gen.Sampler._ops),
        "t0.6_p1.0_host": (gen.SamplingParams(temp=0.6, top_p=1.0, seed=1), None),
    }
    out = {}
    for name, (params, draw) in cases.items():
        s = gen.Sampler(params)
        call = (lambda: draw(s, logits)) if draw else (lambda: s(logits))
        for _ in range(3):
            mx.eval(call())
        times = []
        for _ in range(repeats):
            t0 = time.perf_counter()
            mx.eval(call())
            times.append((time.perf_counter() - t0) * 1e3)
        out[name] = round(statistics.median(times), 3)
        print(f"  sampling {name}: {out[name]:.2f} ms", flush=True)
    return out


def generation(model, rounds: int, tokens: int) -> dict:
    import numpy as np

    gen = importlib.import_module("phiflash_mlx.generate")
    host_call = gen.Sampler.__call__
    rng = np.random.default_rng(0)
    tps = {"host": [], "mlx_ops": []}
    try:
        for r in range(rounds):
            for name in tps:
                gen.Sampler.__call__ = host_call if name == "host" else gen.Sampler._ops
                g = gen.Generator(model, None)
                ids = rng.integers(0, model.args.vocab_size, 64).tolist()
                last = None
                for last in g.stream(ids, max_tokens=tokens, stop_on_eos=False,
                                     sampling=gen.SamplingParams(temp=0.6, top_p=0.95, seed=r)):
                    pass
                tps[name].append(round(last.generation_tps, 2))
    finally:
        gen.Sampler.__call__ = host_call
    print(f"  generation: host {statistics.median(tps['host'])} tok/s, "
          f"MLX ops {statistics.median(tps['mlx_ops'])} tok/s", flush=True)
    return tps


def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    r = report["results"]
    fig, axes = plt.subplots(1, 4, figsize=(15, 3.6))
    names = [k for k in r if k.startswith("decode_")]
    xs = range(len(names))
    for i, level in enumerate(("native", "avx2")):
        axes[0].bar([x + 0.4 * i for x in xs], [statistics.median(r[k][level]) for k in names], width=0.4,
                    label=level)
    axes[0].set_xticks([x + 0.2 for x in xs], [k.split("_")[1] for k in names])
    axes[0].set_ylabel("ms per decode step")
    axes[0].set_xlabel("context")
    axes[0].legend(fontsize=8)
    pf = r.get("prefill_512_tok_s", {})
    axes[1].bar(list(pf), [statistics.median(v) for v in pf.values()])
    axes[1].set_ylabel("tok/s, 512-token prompt")
    s = r.get("sampling_ms", {})
    axes[2].barh(list(s), list(s.values()))
    axes[2].set_xlabel("ms per draw (200064 logits)")
    g = r.get("generation_tok_s", {})
    axes[3].bar(list(g), [statistics.median(v) for v in g.values()])
    axes[3].set_ylabel("tok/s, default sampling")
    return common.save_figure(fig, path, report, "CPU paths in one process (4-bit, 32 layers, 2 threads)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--contexts", type=int, nargs="+", default=[1024, 32768])
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--steps", type=int, default=10, help="timed decode steps per round")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--tokens", type=int, default=40, help="generated tokens per round")
    p.add_argument("--shared-machine", action="store_true", help="record that other jobs were running")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "cpu-paths.json"))
    args = p.parse_args(argv)
    if not common.cpu_kernel_available():
        print("the CPU kernels are not built here (Linux only); nothing to compare", file=sys.stderr)
        return 1
    from phiflash_mlx.cpu.kernels import _library, use_cpu_kernels

    lib = _library()
    if lib.phf_q8_level() < 2:
        print("this CPU has no AVX512-VNNI: the AVX2 comparison would compare AVX2 with itself", file=sys.stderr)
    cfg = dict(common.SAMBAY_RELEASED)
    model = common.build_sambay(cfg, "q4")
    use_cpu_kernels(model)
    report = {"machine": common.machine(), "shared_machine": args.shared_machine, "settings": vars(args),
              "load_before": common.load_snapshot(), "results": {}}
    t0 = time.perf_counter()
    report["results"].update(levels(model, lib, args.contexts, args.rounds, args.steps, not args.no_prefill))
    report["results"]["sampling_ms"] = sampling(cfg["vocab_size"], 20)
    report["results"]["generation_tok_s"] = generation(model, args.rounds, args.tokens)
    report["total_wall_s"] = round(time.perf_counter() - t0, 1)
    report["load_after"] = common.load_snapshot()
    common.write_result(args.out, report)
    print(f"wrote {args.out}")
    if plot(report, os.path.splitext(args.out)[0] + ".png"):
        print(f"wrote {os.path.splitext(args.out)[0]}.png")
    return 0


if __name__ == "__main__":
    sys.exit(main())
