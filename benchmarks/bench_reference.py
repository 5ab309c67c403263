"""The NumPy reference and `phiflash convert` on a full-size (released-shape) random bf16 checkpoint.

1. Writes a random checkpoint of the released shape (3.8B parameters, ~7.7 GB of bf16) with a
   streaming writer: the safetensors header is computed from the shapes
   (``reference.expected_tensors``) first, then each tensor's bytes are generated and written in
   chunks, so the file is never held in memory. Weights are random bf16 values of magnitude 2^-7..2^-5
   with random signs; norms are ones, biases zero, A_log = log(1..16), D ones, λ small. The file goes
   to ``--ckpt-dir`` (default ``$TMPDIR/phiflash-bench-full-bf16``) and is reused when present;
   it is deleted afterwards unless ``--keep-checkpoint``.
2. In a subprocess: ``reference.load(path, keep_weights=False)`` (memory-mapped, each tensor converted to
   float32 when used), then the seconds for a 16-token prompt without a cache and with the cache API,
   a 1K-token prefill into the cache, and a few decode steps at that context. Peak RSS is recorded in
   total and without the checkpoint's file pages (anonymous memory).
3. ``phiflash convert <checkpoint> <out> -q`` (4-bit, group 64) in a subprocess: wall time, the child's
   peak RSS (``os.wait4``, i.e. ``getrusage`` of that child) and the output size.

Writes ``benchmarks/results/reference.json`` (``reference-quick.json`` with ``--quick``),
``reference.png``, and ``benchmarks/results/convert_full.json``. Needs ~10 GB of free disk.

    python benchmarks/bench_reference.py --quick     # 2 decode steps; ~10 min on 2 cores
    python benchmarks/bench_reference.py             # 4 decode steps
    python benchmarks/bench_reference.py --skip-convert --keep-checkpoint
"""

from __future__ import annotations

import argparse
import json
import math
import os
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
sys.path.insert(0, os.path.dirname(HERE))

import common  # noqa: E402

CHUNK = 1 << 26          # elements generated at a time (128 MiB of bf16)


# --------------------------------------------------------------------------- streaming writer


def _fill(name: str, shape: tuple, rng, dtype: str):
    """Yield the tensor's bytes in chunks (little-endian bf16 or float32)."""
    import numpy as np

    n = math.prod(shape)
    leaf = name.rsplit(".", 1)[-1]
    if dtype == "F32":                                           # A_log and the λ vectors: small
        if leaf == "A_log":
            arr = np.broadcast_to(np.log(np.arange(1, shape[-1] + 1, dtype=np.float32)), shape)
        else:
            arr = rng.standard_normal(shape, dtype=np.float32) * 0.1
        yield np.ascontiguousarray(arr, dtype="<f4").tobytes()
        return
    if "layernorm" in name or "subln" in name or leaf == "D":
        const = 0x3F80                                           # bf16 1.0
    elif leaf == "bias":
        const = 0xC093 if "dt_proj" in name else 0               # dt bias -4.6 (softplus -> ~0.01), else 0
    else:
        const = None
    done = 0
    while done < n:
        m = min(CHUNK, n - done)
        if const is not None:
            bits = np.full(m, const, dtype="<u2")
        else:
            r = rng.integers(0, 1 << 16, size=m, dtype=np.uint16)
            # sign and 7 mantissa bits random, exponent 2^-7 or 2^-6: |w| in [0.0078, 0.031)
            bits = ((r & np.uint16(0x807F)) | ((np.uint16(120) + ((r >> np.uint16(7)) & np.uint16(1))) << np.uint16(7)))
            bits = bits.astype("<u2")
        yield bits.tobytes()
        done += m


def write_checkpoint(directory: str, cfg_dict: dict, seed: int = 0) -> dict:
    import numpy as np
    from reference import config_from_dict, expected_tensors
    from reference.checkpoint import FP32_IN_ORIGINAL

    os.makedirs(directory, exist_ok=True)
    shapes = expected_tensors(config_from_dict(cfg_dict))
    header, offset = {}, 0
    for name in sorted(shapes):
        dtype = "F32" if name.rsplit(".", 1)[-1] in FP32_IN_ORIGINAL else "BF16"
        size = math.prod(shapes[name]) * (4 if dtype == "F32" else 2)
        header[name] = {"dtype": dtype, "shape": list(shapes[name]), "data_offsets": [offset, offset + size]}
        offset += size
    header["__metadata__"] = {"format": "pt"}
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * (-len(blob) % 8)
    path = os.path.join(directory, "model.safetensors")
    tmp = path + ".partial"
    rng = np.random.default_rng(seed)
    t0 = time.perf_counter()
    with open(tmp, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        for name in sorted(shapes):
            start = f.tell()
            for chunk in _fill(name, tuple(shapes[name]), rng, header[name]["dtype"]):
                f.write(chunk)
            begin, end = header[name]["data_offsets"]
            assert f.tell() - start == end - begin, name
    os.replace(tmp, path)
    with open(os.path.join(directory, "config.json"), "w") as f:
        json.dump({**cfg_dict, "architectures": ["Phi4FlashForCausalLM"], "torch_dtype": "bfloat16"}, f, indent=1)
    return {"path": path, "bytes": os.path.getsize(path), "tensors": len(shapes),
            "parameters": sum(math.prod(s) for s in shapes.values()),
            "write_s": round(time.perf_counter() - t0, 1), **common.rss_now()}


# --------------------------------------------------------------------------- workers


def reference_worker(args) -> dict:
    import numpy as np
    import reference

    out = {"threads_env": {k: os.environ.get(k) for k in ("OPENBLAS_NUM_THREADS", "OMP_NUM_THREADS")}}
    t0 = time.perf_counter()
    model = reference.load(args.ckpt, keep_weights=False)
    out["load_s"] = round(time.perf_counter() - t0, 2)
    rng = np.random.default_rng(0)
    V = model.cfg.vocab_size
    prompt = rng.integers(0, V, size=(1, 16))

    t0 = time.perf_counter()
    model.forward(prompt)
    out["prompt16_no_cache_s"] = round(time.perf_counter() - t0, 2)
    out["rss_after_prompt16"] = common.rss_now()
    print(f"  reference: 16-token prompt without cache {out['prompt16_no_cache_s']} s", flush=True)
    t0 = time.perf_counter()
    model.forward(prompt, model.new_cache())
    out["prompt16_cache_api_s"] = round(time.perf_counter() - t0, 2)
    print(f"  reference: 16-token prompt with the cache API {out['prompt16_cache_api_s']} s", flush=True)

    ctx = args.context
    cache = model.new_cache()
    ids = rng.integers(0, V, size=(1, ctx))
    t0 = time.perf_counter()
    logits = model.forward(ids, cache)
    out["prefill_s"] = round(time.perf_counter() - t0, 2)
    out["prefill_tokens_per_s"] = round(ctx / out["prefill_s"], 2)
    out["cache_bytes_after_prefill"] = cache.nbytes()
    print(f"  reference: prefill {ctx} tokens {out['prefill_s']} s", flush=True)
    tok = int(np.argmax(logits[0, -1]))
    del logits
    times = []
    for _ in range(args.steps):
        t0 = time.perf_counter()
        logits = model.forward(np.array([[tok]]), cache)
        tok = int(np.argmax(logits[0, -1]))
        times.append(time.perf_counter() - t0)
        print(f"  reference: decode step {times[-1]:.2f} s", flush=True)
    out["context"] = ctx
    out["decode"] = common.summarize(times)
    out["decode_tokens_per_s"] = round(1 / statistics.median(times), 3)
    out["rss_end"] = common.rss_now()
    return out


def run_convert(ckpt: str, out_dir: str) -> dict:
    """`phiflash convert CKPT OUT -q` in a child process; its own peak RSS via os.wait4."""
    if os.path.exists(out_dir):
        shutil.rmtree(out_dir)
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([common.ROOT] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    cmd = [sys.executable, "-m", "phiflash_mlx.cli", "convert", ckpt, out_dir, "-q"]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=env)
    _, status, usage = os.wait4(proc.pid, 0)
    wall = time.perf_counter() - t0
    rc = os.waitstatus_to_exitcode(status)
    files = {}
    if os.path.isdir(out_dir):
        for name in sorted(os.listdir(out_dir)):
            files[name] = os.path.getsize(os.path.join(out_dir, name))
    quant = None
    try:
        with open(os.path.join(out_dir, "config.json")) as f:
            quant = json.load(f).get("quantization")
        quant = {k: v for k, v in quant.items() if not isinstance(v, (dict, bool))} | {
            "modules_kept_full_precision": sorted(k for k, v in quant.items() if v is False)}
    except (OSError, ValueError, AttributeError):
        pass
    return {
        "command": "phiflash convert <checkpoint> <out> -q",
        "returncode": rc, "wall_s": round(wall, 1),
        "peak_rss_gib": common.maxrss_gib(usage.ru_maxrss),
        "peak_rss_source": "os.wait4 rusage of the convert process (getrusage RUSAGE_CHILDREN for that child)",
        "output_bytes": sum(files.values()), "output_files": files, "quantization": quant,
    }


# --------------------------------------------------------------------------- driver


def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    r = report["reference"]
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.5))
    names = ["prompt 16\n(no cache)", "prompt 16\n(cache API)", f"prefill {r['context']}",
             f"decode step\nat {r['context']}"]
    vals = [r["prompt16_no_cache_s"], r["prompt16_cache_api_s"], r["prefill_s"], r["decode"]["median_s"]]
    bars = axes[0].bar(names, vals, color="tab:green")
    for b, v in zip(bars, vals):
        axes[0].annotate(f"{v:.1f} s", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    axes[0].set_ylabel("seconds")
    axes[0].set_title("NumPy reference, released shape, bf16 checkpoint", fontsize=9)
    mem_names, mem_vals = ["reference\npeak RSS", "reference anon\nat the end"], [
        r["process"]["max_rss_gib"], r["rss_end"].get("rss_anon_gib", float("nan"))]
    if report.get("convert"):
        mem_names.append("convert -q\npeak RSS")
        mem_vals.append(report["convert"]["peak_rss_gib"])
    bars = axes[1].bar(mem_names, mem_vals, color="tab:purple")
    for b, v in zip(bars, mem_vals):
        axes[1].annotate(f"{v:.1f} GiB", (b.get_x() + b.get_width() / 2, v), ha="center", va="bottom", fontsize=8)
    axes[1].axhline(24, color="red", ls="--", lw=1)
    axes[1].text(0, 24.3, "24 GiB machine", color="red", fontsize=8)
    axes[1].set_ylabel("GiB")
    axes[1].set_ylim(0, 27)
    axes[1].set_title("memory (RSS includes the memory-mapped checkpoint's pages;\nanon excludes them)", fontsize=9)
    m = report["machine"]
    return common.save_figure(fig, path, report, f"{m['cpu']} ({m['cpus']} cores, {m.get('memory_gib')} GiB)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="2 decode steps instead of 4")
    p.add_argument("--ckpt-dir", default=os.path.join(tempfile.gettempdir(), "phiflash-bench-full-bf16"))
    p.add_argument("--keep-checkpoint", action="store_true", help="do not delete the checkpoint afterwards")
    p.add_argument("--skip-convert", action="store_true")
    p.add_argument("--skip-reference", action="store_true")
    p.add_argument("--context", type=int, default=1024, help="prefill length before the decode steps")
    p.add_argument("--steps", type=int, help="decode steps (default 4, quick 2)")
    p.add_argument("--shared-machine", action="store_true", help="record that other jobs were running")
    p.add_argument("--out-dir", default=common.RESULTS)
    p.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--ckpt", help=argparse.SUPPRESS)
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    args.steps = args.steps or (2 if args.quick else 4)
    if args.worker:
        common.write_result(args.result, reference_worker(args))
        return 0

    os.makedirs(args.out_dir, exist_ok=True)
    machine = common.machine()
    ckpt_file = os.path.join(args.ckpt_dir, "model.safetensors")
    if os.path.exists(ckpt_file) and os.path.exists(os.path.join(args.ckpt_dir, "config.json")):
        written = {"path": ckpt_file, "bytes": os.path.getsize(ckpt_file), "reused": True}
        print(f"reusing {ckpt_file}", flush=True)
    else:
        print(f"writing a random released-shape bf16 checkpoint to {args.ckpt_dir} ...", flush=True)
        written = write_checkpoint(args.ckpt_dir, common.SAMBAY_RELEASED)
        print(f"  {written['bytes'] / 1e9:.2f} GB in {written['write_s']} s, writer peak RSS "
              f"{written.get('peak_rss_gib')} GiB", flush=True)
    report = {"machine": machine, "quick": args.quick, "shared_machine": args.shared_machine,
              "checkpoint": written, "load_before": common.load_snapshot(),
              "bandwidth": common.memory_bandwidth()}
    try:
        if not args.skip_reference:
            print("running the NumPy reference ...", flush=True)
            r = common.run_worker(os.path.abspath(__file__),
                                  ["--ckpt", args.ckpt_dir, "--context", str(args.context), "--steps", str(args.steps)])
            report["reference"] = r
            print(f"  peak RSS {r['process']['max_rss_gib']} GiB, decode {r.get('decode_tokens_per_s')} tok/s",
                  flush=True)
        if not args.skip_convert:
            print("running phiflash convert -q ...", flush=True)
            out_dir = args.ckpt_dir.rstrip("/") + "-q4"
            conv = run_convert(args.ckpt_dir, out_dir)
            conv.update(machine=machine, shared_machine=args.shared_machine, source_bytes=written["bytes"],
                        load=common.load_snapshot())
            shutil.rmtree(out_dir, ignore_errors=True)
            report["convert"] = conv
            print(f"  convert: {conv['wall_s']} s, peak RSS {conv['peak_rss_gib']} GiB, output "
                  f"{conv['output_bytes'] / 1e9:.2f} GB", flush=True)
            common.write_result(os.path.join(args.out_dir, "convert_full.json"), conv)
    finally:
        if not args.keep_checkpoint:
            shutil.rmtree(args.ckpt_dir, ignore_errors=True)
    if "reference" in report:
        stem = "reference-quick" if args.quick else "reference"
        common.write_result(os.path.join(args.out_dir, stem + ".json"), report)
        if "error" not in report["reference"] and plot(report, os.path.join(args.out_dir, stem + ".png")):
            print(f"wrote {os.path.join(args.out_dir, stem + '.png')}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
