"""Ours against llama.cpp on the same CPU, in the same run, interleaved: decode at 1K-32K and prefill.

What a CPU-only user runs today for a small reasoning model is llama.cpp with Phi-4-mini-reasoning
(architecture ``phi3``, 3.8B) in Q4_0. This benchmark times that next to ours as ``phiflash_mlx.load``
runs it on a CPU (4-bit group 64 with the CPU kernels attached), both with random weights at the
real shapes, with the same number of threads, one after the other in every round:

* **llama.cpp decode**: ``kvbench`` (``../shared/anchors/llamacpp/``, or ``$LLAMACPP_ANCHOR_DIR``
  built by its ``build.sh``): token generation at depth D from a synthetic cache (a real 512-token
  prefill whose K/V rows repeat to D positions), timed like ``llama-bench``'s ``test_gen``; flash
  attention off (its faster setting here). Q4_0 (and Q4_K_M with ``--qkm`` where it was built).
* **ours decode**: ``bench_decode.py``'s worker (synthetic caches at depth D: the shared K/V holds D
  positions, every sliding window a full ring, random Mamba states).
* **llama.cpp prefill**: ``llama-bench -p 512 -n 0`` (pp512).
* **ours prefill**: prompts of 16, 64 and 512 tokens through ``phiflash_mlx.generate.prefill``
  (one chunk), the time to the logits of the last token (time to first token).
* **memory bandwidth** with 1 and 2 reading threads (numpy), at the start and the end.

Everything runs with the environment as given (no ``OPENBLAS_NUM_THREADS`` or other tuning) and
``--threads`` (default: the CPUs this process may use) for both. Reported per point: medians over
rounds, ours / llama.cpp per round and its median, and the roofline ratio: the bytes a decode step
must read (weights as stored + the caches attended) over the median 2-thread bandwidth, divided by
the measured step time. For llama.cpp the bytes are the GGUF's size (the tied embedding, Q6_K, is
read whole by the output head) plus its F16 K/V at depth D (32 layers x 8 KV heads x 128 x 2 x 2
bytes per position).

Writes ``benchmarks/results/llamacpp.json`` and ``llamacpp.png``.

    ../shared/anchors/llamacpp/build.sh                 # once, ~15-30 min on 2 cores
    python benchmarks/bench_llamacpp.py                 # 1K/4K/16K/32K, pp512, 2 rounds
    python benchmarks/bench_llamacpp.py --depths 1024 --rounds 1 --no-prefill
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

DEPTHS = [1024, 4096, 16384, 32768]
PROMPTS = [16, 64, 512]
ANCHOR_DIR = os.environ.get("LLAMACPP_ANCHOR_DIR", os.path.expanduser("~/.cache/phiflash-anchors/llamacpp"))
# llama.cpp's phi3 at Phi-4-mini's shape: K/V bytes per cached position (F16, 32 layers, 8 x 128)
LLAMA_KV_BYTES_PER_POS = 32 * 8 * 128 * 2 * 2


def _threads_default() -> int:
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


# --------------------------------------------------------------------------- llama.cpp side


def _gguf(anchor: str, quant: str) -> str:
    return os.path.join(anchor, f"phi4mini-random-{quant}.gguf")


def llama_decode(anchor: str, quant: str, depths: list[int], threads: int, gen: int, reps: int) -> dict:
    cmd = [os.path.join(anchor, "kvbench"), "-m", _gguf(anchor, quant), "-t", str(threads), "-fa", "0",
           "-d", ",".join(map(str, depths)), "-n", str(gen), "-r", str(reps)]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - t0, 1), "points": {}}
    if proc.returncode != 0:
        out["error"] = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return out
    for line in proc.stdout.splitlines():
        line = line.strip()
        if line.startswith("{"):
            rec = json.loads(line)
            out["points"][str(rec["depth"])] = rec
    return out


def llama_prefill(anchor: str, quant: str, threads: int, n_prompt: int = 512, reps: int = 2) -> dict:
    bench = os.path.join(anchor, "llama.cpp", "build", "bin", "llama-bench")
    cmd = [bench, "-m", _gguf(anchor, quant), "-t", str(threads), "-fa", "0", "-p", str(n_prompt), "-n", "0",
           "-r", str(reps), "-o", "json"]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    out = {"command": " ".join(cmd[1:]), "wall_s": round(time.perf_counter() - t0, 1)}
    if proc.returncode != 0:
        out["error"] = proc.stderr.strip().splitlines()[-1:] or [f"exit {proc.returncode}"]
        return out
    rec = json.loads(proc.stdout)[0]
    out.update(tokens_per_s=rec["avg_ts"], samples_ts=rec.get("samples_ts"), n_prompt=n_prompt)
    return out


# --------------------------------------------------------------------------- our side


def ours_decode(depths: list[int], steps: int, layers: int) -> dict:
    args = ["--model", "sambay", "--quant", "q4", "--layers", str(layers), "--cpu-kernels", "--steps", str(steps),
            "--warmup", "1", "--contexts", *map(str, depths)]
    return common.run_worker(os.path.join(HERE, "bench_decode.py"), args)


def ours_prefill(prompts: list[int], layers: int) -> dict:
    return common.run_worker(__file__, ["--layers", str(layers), "--prompts", *map(str, prompts)])


def prefill_worker(args) -> dict:
    import phiflash_mlx  # noqa: F401
    import mlx.core as mx
    import numpy as np
    from phiflash_mlx.cpu.kernels import kernel_info, use_cpu_kernels
    from phiflash_mlx.generate import prefill

    import bench_decode

    cfg = bench_decode._config("sambay", args.layers)
    model = common.build_sambay(cfg, "q4")
    use_cpu_kernels(model)
    rng = np.random.default_rng(0)
    V = cfg["vocab_size"]
    out = {"kernel": kernel_info(), "points": {}}
    mx.eval(prefill(model, rng.integers(0, V, 8).tolist(), model.make_cache(), 1024))      # warm-up
    for T in args.prompts:
        ids = rng.integers(0, V, T).tolist()
        cache = model.make_cache()
        t0 = time.perf_counter()
        mx.eval(prefill(model, ids, cache, 1024))
        dt = time.perf_counter() - t0
        out["points"][str(T)] = {"seconds": round(dt, 3), "tokens_per_s": round(T / dt, 2)}
        print(f"  [ours prefill] {T:4d} tokens: {dt:.2f} s ({T / dt:.1f} tok/s)", flush=True)
    return out


# --------------------------------------------------------------------------- report


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def aggregate(report: dict) -> dict:
    bw2 = _median([b["read_gbps_median"] for b in report["bandwidth"] if b.get("threads") == 2])
    bw1 = _median([b["read_gbps_median"] for b in report["bandwidth"] if b.get("threads") == 1])
    gguf_bytes = report.get("gguf_bytes", {})
    res = {"bandwidth_gbps": {"1_thread": bw1, "2_threads": bw2}, "decode": {}, "prefill": {}}
    for d in map(str, report["settings"]["depths"]):
        row = {"ours_s": [], "ratio_per_round": []}
        for q in report["settings"]["llama_quants"]:
            row[f"llama_{q}_s"] = []
        for rnd in report["rounds"]:
            ours = rnd.get("ours_decode", {}).get("points", {}).get(d)
            ours_s = statistics.median(ours["step_times_s"]) if ours else None
            row["ours_s"].append(ours_s)
            if ours:
                row["ours_bytes_per_step"] = ours["cache_read_bytes_per_step"] + rnd["ours_decode"]["weight_bytes"]
            for q in report["settings"]["llama_quants"]:
                lp = rnd.get(f"llama_decode_{q}", {}).get("points", {}).get(d)
                ls = lp["step_s_median"] if lp else None
                row[f"llama_{q}_s"].append(ls)
                if q == "Q4_0" and ours_s and ls:
                    row["ratio_per_round"].append(round(ls / ours_s, 3))
        om = _median(row["ours_s"])
        row["ours_tok_s"] = round(1 / om, 2) if om else None
        for q in report["settings"]["llama_quants"]:
            lm = _median(row[f"llama_{q}_s"])
            row[f"llama_{q}_tok_s"] = round(1 / lm, 2) if lm else None
            if lm and bw2 and q in gguf_bytes:
                need = gguf_bytes[q] + int(d) * LLAMA_KV_BYTES_PER_POS
                row[f"llama_{q}_bytes_per_step"] = int(need)
                row[f"llama_{q}_roofline_ratio"] = round(need / (bw2 * 1e9) / lm, 3)
        if om and bw2 and "ours_bytes_per_step" in row:
            row["ours_roofline_ratio"] = round(row["ours_bytes_per_step"] / (bw2 * 1e9) / om, 3)
        row["ours_over_llama_Q4_0"] = _median(row["ratio_per_round"])
        res["decode"][d] = row
    pre = {"ours_s": {}, "llama_pp512_tok_s": []}
    for rnd in report["rounds"]:
        for T, p in rnd.get("ours_prefill", {}).get("points", {}).items():
            pre["ours_s"].setdefault(T, []).append(p["seconds"])
        lp = rnd.get("llama_prefill_Q4_0", {})
        if "tokens_per_s" in lp:
            pre["llama_pp512_tok_s"].append(lp["tokens_per_s"])
    pre["ours_tok_s"] = {T: round(int(T) / _median(v), 2) for T, v in pre["ours_s"].items()}
    lpp = _median(pre["llama_pp512_tok_s"])
    if lpp and "512" in pre["ours_tok_s"]:
        pre["ours_pp512_over_llama"] = round(pre["ours_tok_s"]["512"] / lpp, 3)
    res["prefill"] = pre
    return res


def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    res = report["results"]
    fig, (a1, a2) = plt.subplots(1, 2, figsize=(11, 4.2))
    depths = report["settings"]["depths"]
    xs = range(len(depths))
    series = [("ours (SambaY 4-bit, CPU kernels)", "ours_tok_s")]
    series += [(f"llama.cpp phi3 {q}", f"llama_{q}_tok_s") for q in report["settings"]["llama_quants"]]
    w = 0.8 / len(series)
    for i, (label, key) in enumerate(series):
        vals = [res["decode"][str(d)].get(key) or 0 for d in depths]
        a1.bar([x + i * w for x in xs], vals, w, label=label)
    a1.set_xticks([x + w * (len(series) - 1) / 2 for x in xs], [f"{d // 1024}K" for d in depths])
    a1.set_ylabel("decode tokens/s")
    a1.set_xlabel("context depth")
    a1.legend(fontsize=8)
    pre = res["prefill"]
    Ts = sorted(pre["ours_tok_s"], key=int)
    a2.plot([int(T) for T in Ts], [int(T) / _median(pre["ours_s"][T]) for T in Ts], "o-", label="ours: prompt tok/s")
    lpp = _median(pre["llama_pp512_tok_s"])
    if lpp:
        a2.axhline(lpp, color="C1", ls="--", label="llama.cpp Q4_0 pp512")
    a2.set_xscale("log", base=2)
    a2.set_xlabel("prompt tokens")
    a2.set_ylabel("prefill tokens/s")
    a2.legend(fontsize=8)
    return common.save_figure(fig, path, report, "ours vs llama.cpp (same CPU, same run, interleaved)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--depths", type=int, nargs="+", default=DEPTHS)
    p.add_argument("--rounds", type=int, default=2)
    p.add_argument("--steps", type=int, default=4, help="our timed decode steps per point")
    p.add_argument("--gen", type=int, default=8, help="llama.cpp generated tokens per repetition")
    p.add_argument("--reps", type=int, default=2, help="llama.cpp repetitions per point")
    p.add_argument("--threads", type=int, default=_threads_default())
    p.add_argument("--qkm", action="store_true", help="also Q4_K_M (needs KEEP_QKM=1 build.sh)")
    p.add_argument("--no-prefill", action="store_true")
    p.add_argument("--anchor-dir", default=ANCHOR_DIR)
    p.add_argument("--shared-machine", action="store_true", help="record that other jobs were running")
    p.add_argument("--out", default=os.path.join(common.RESULTS, "llamacpp.json"))
    p.add_argument("--reaggregate", metavar="JSON", help="recompute summary and plot of an earlier run")
    # worker side (our prefill)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--layers", type=int, default=32, help=argparse.SUPPRESS)
    p.add_argument("--prompts", type=int, nargs="+", default=PROMPTS, help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.worker:
        common.write_result(args.result, prefill_worker(args))
        return 0
    if args.reaggregate:
        with open(args.reaggregate) as f:
            report = json.load(f)
        report["results"] = aggregate(report)
        common.write_result(args.reaggregate, report)
        plot(report, os.path.splitext(args.reaggregate)[0] + ".png")
        print(json.dumps(report["results"], indent=1))
        return 0

    quants = ["Q4_0"] + (["Q4_K_M"] if args.qkm else [])
    for q in quants:
        if not os.path.exists(_gguf(args.anchor_dir, q)) or not os.path.exists(os.path.join(args.anchor_dir, "kvbench")):
            print(f"llama.cpp anchor not built in {args.anchor_dir} ({q}): run ../shared/anchors/llamacpp/build.sh "
                  "(KEEP_QKM=1 for Q4_K_M) or pass --anchor-dir", file=sys.stderr)
            return 2
    if args.threads != _threads_default():
        os.environ["PHIFLASH_CPU_THREADS"] = str(args.threads)      # our kernels then use the same count
    report = {
        "machine": common.machine(), "shared_machine": args.shared_machine,
        "settings": {"depths": args.depths, "rounds": args.rounds, "steps": args.steps, "gen": args.gen,
                     "reps": args.reps, "threads": args.threads, "llama_quants": quants,
                     "prompts": [] if args.no_prefill else args.prompts,
                     "env": {k: os.environ[k] for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS",
                                                        "PHIFLASH_CPU_THREADS", "PHIFLASH_CPU_KERNELS")
                             if k in os.environ}},
        "method": __doc__.split("\n\n")[1].strip(),
        "gguf_bytes": {q: os.path.getsize(_gguf(args.anchor_dir, q)) for q in quants},
        "load_before": common.load_snapshot(), "bandwidth": [], "rounds": [],
    }
    t_start = time.perf_counter()
    report["bandwidth"] += [dict(common.memory_bandwidth(), threads=1), common.memory_bandwidth_threads(2)]
    print(f"bandwidth: {report['bandwidth'][0]['read_gbps_median']} GB/s (1 thread), "
          f"{report['bandwidth'][1]['read_gbps_median']} GB/s (2 threads)", flush=True)
    for r in range(args.rounds):
        rnd = {}
        order = ["llama", "ours"] if r % 2 == 0 else ["ours", "llama"]
        for who in order:
            if who == "llama":
                for q in quants:
                    rnd[f"llama_decode_{q}"] = llama_decode(args.anchor_dir, q, args.depths, args.threads, args.gen,
                                                            args.reps)
                    print(f"round {r} llama.cpp {q} decode:",
                          {d: round(p["tg_tok_s_mean"], 2) for d, p in rnd[f"llama_decode_{q}"]["points"].items()},
                          rnd[f"llama_decode_{q}"].get("error", ""), flush=True)
            else:
                rnd["ours_decode"] = ours_decode(args.depths, args.steps, 32)
                pts = rnd["ours_decode"].get("points", {})
                print(f"round {r} ours decode:", {d: round(1 / statistics.median(p["step_times_s"]), 2)
                                                  for d, p in pts.items()}, rnd["ours_decode"].get("error", ""),
                      flush=True)
        if not args.no_prefill:
            for who in order:
                if who == "llama":
                    rnd["llama_prefill_Q4_0"] = llama_prefill(args.anchor_dir, "Q4_0", args.threads)
                    print(f"round {r} llama.cpp pp512:", rnd["llama_prefill_Q4_0"].get("tokens_per_s"),
                          rnd["llama_prefill_Q4_0"].get("error", ""), flush=True)
                else:
                    rnd["ours_prefill"] = ours_prefill(args.prompts, 32)
        report["rounds"].append(rnd)
    report["bandwidth"] += [dict(common.memory_bandwidth(), threads=1), common.memory_bandwidth_threads(2)]
    report["load_after"] = common.load_snapshot()
    report["total_wall_s"] = round(time.perf_counter() - t_start, 1)
    report["results"] = aggregate(report)
    os.makedirs(os.path.dirname(args.out), exist_ok=True)
    common.write_result(args.out, report)
    plot(report, os.path.splitext(args.out)[0] + ".png")
    print(json.dumps({"decode": {d: {k: v for k, v in row.items() if not isinstance(v, list)}
                                 for d, row in report["results"]["decode"].items()},
                      "prefill": {k: v for k, v in report["results"]["prefill"].items() if k != "ours_s"}}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
