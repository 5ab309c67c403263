"""Helpers shared by bench_decode.py, bench_prefill.py and bench_reference.py.

* machine description (same fields as bench_blas.py) plus load average and free memory;
* a memory-bandwidth probe (numpy sum and copy of a large array);
* random-weight models built tensor by tensor (4-bit group 64 or float32), so a 3.8B-parameter
  model never holds more than one float32 tensor beyond its final weights;
* the released SambaY shape and Phi-4-mini's shape for mlx-lm's ``phi3`` model;
* running one worker per subprocess and reading its peak resident memory with ``os.wait4``.

Workers are these same scripts with ``--worker``: each measured model lives in its own process, one at
a time, so process peak memory is per model and the machine is never asked for two models at once.
"""

from __future__ import annotations

import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time

HERE = os.path.dirname(os.path.abspath(__file__))
ROOT = os.path.dirname(HERE)
RESULTS = os.path.join(HERE, "results")
GiB = 2**30

# --------------------------------------------------------------------------- shapes

# Phi-4-mini-flash-reasoning as released (SAMBAY.md 2).
SAMBAY_RELEASED = dict(
    model_type="phi4flash", vocab_size=200064, hidden_size=2560, intermediate_size=10240,
    num_hidden_layers=32, num_attention_heads=40, num_key_value_heads=20, sliding_window=512,
    mamba_d_state=16, mamba_d_conv=4, mamba_expand=2, mb_per_layer=2, tie_word_embeddings=True,
)

# Phi-4-mini-instruct's config.json, in mlx-lm's phi3 ModelArgs fields. LongRoPE factors are all 1.0:
# the values do not change the cost, only that SuScaledRoPE (not plain RoPE) is used, as in the release.
PHI4_MINI = dict(
    model_type="phi3", hidden_size=3072, num_hidden_layers=32, intermediate_size=8192,
    num_attention_heads=24, num_key_value_heads=8, rms_norm_eps=1e-5, vocab_size=200064,
    rope_theta=10000.0, partial_rotary_factor=0.75, max_position_embeddings=131072,
    original_max_position_embeddings=4096, tie_word_embeddings=True,
    rope_scaling={"type": "longrope", "long_factor": [1.0] * 48, "short_factor": [1.0] * 48},
)


def phi3_rope_scaling(hidden: int, heads: int, partial: float = 0.75) -> dict:
    half = int(hidden // heads * partial) // 2
    return {"type": "longrope", "long_factor": [1.0] * half, "short_factor": [1.0] * half}


# --------------------------------------------------------------------------- machine


def machine() -> dict:
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith(("model name", "Model")):
                    cpu = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    if sys.platform == "darwin":
        try:
            cpu = subprocess.run(["sysctl", "-n", "machdep.cpu.brand_string"], capture_output=True,
                                 text=True).stdout.strip() or cpu
        except OSError:
            pass
    versions = {}
    for mod in ("mlx.core", "mlx_lm", "numpy"):
        try:
            m = __import__(mod, fromlist=["_"])
            versions[mod.split(".")[0].replace("mlx_lm", "mlx-lm")] = m.__version__
        except Exception as exc:  # pragma: no cover
            versions[mod.split(".")[0]] = f"unavailable: {exc}"
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / GiB
    except (ValueError, OSError, AttributeError):
        pass
    return {
        "platform": f"{platform.system()} {platform.release()} {platform.machine()}",
        "cpu": cpu,
        "cpus": os.cpu_count(),
        "memory_gib": None if mem is None else round(mem, 1),
        "python": platform.python_version(),
        **versions,
    }


def load_snapshot() -> dict:
    """What else the machine is doing: load average and available memory (Linux)."""
    out = {"loadavg_1min": os.getloadavg()[0] if hasattr(os, "getloadavg") else None}
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    out["mem_available_gib"] = round(int(line.split()[1]) * 1024 / GiB, 1)
    except OSError:
        pass
    return out


def memory_bandwidth(size_mb: int = 1024, repeats: int = 5) -> dict:
    """Best-of-N numpy read (sum) and copy bandwidth over a `size_mb` array, in GB/s (10^9 bytes).
    numpy's sum runs on one core, like MLX's CPU back-end."""
    import numpy as np

    a = np.ones(size_mb * 2**20 // 8, dtype=np.float64)
    b = np.empty_like(a)
    reads, copies = [], []
    for _ in range(repeats):
        t0 = time.perf_counter()
        a.sum()
        reads.append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        np.copyto(b, a)
        copies.append(time.perf_counter() - t0)
    n = a.nbytes
    return {
        "array_bytes": n,
        "read_gbps_best": round(n / min(reads) / 1e9, 1),
        "read_gbps_median": round(n / statistics.median(reads) / 1e9, 1),
        "copy_gbps_best": round(2 * n / min(copies) / 1e9, 1),     # read + write
        "copy_gbps_median": round(2 * n / statistics.median(copies) / 1e9, 1),
        "method": f"numpy sum (read) and copyto (read+write) of a {size_mb} MiB float64 array, best and median of {repeats}",
    }


def memory_bandwidth_threads(threads: int = 2, size_mb: int = 1024, repeats: int = 5) -> dict:
    """Read bandwidth with `threads` readers at once: each Python thread sums its own share of
    `size_mb` (numpy releases the GIL in sum), the wall time of the slowest counts. GB/s (10^9 B)."""
    import threading

    import numpy as np

    arrays = [np.ones(size_mb * 2**20 // 8 // threads, dtype=np.float64) for _ in range(threads)]
    times = []
    for _ in range(repeats):
        workers = [threading.Thread(target=a.sum) for a in arrays]
        t0 = time.perf_counter()
        for w in workers:
            w.start()
        for w in workers:
            w.join()
        times.append(time.perf_counter() - t0)
    n = sum(a.nbytes for a in arrays)
    return {"threads": threads, "array_bytes": n, "read_gbps_best": round(n / min(times) / 1e9, 1),
            "read_gbps_median": round(n / statistics.median(times) / 1e9, 1),
            "method": f"{threads} threads each summing its own {size_mb // threads} MiB float64 array, "
                      f"best and median of {repeats}"}


# --------------------------------------------------------------------------- process memory


def rss_now() -> dict:
    """Current and peak resident memory of this process in GiB (Linux /proc; ru_maxrss elsewhere).
    `anon` excludes file pages (memory-mapped checkpoints)."""
    out = {}
    try:
        with open("/proc/self/status") as f:
            for line in f:
                key, _, val = line.partition(":")
                if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                    out[{"VmRSS": "rss", "VmHWM": "peak_rss", "RssAnon": "rss_anon",
                         "RssFile": "rss_file"}[key] + "_gib"] = round(int(val.split()[0]) * 1024 / GiB, 3)
    except OSError:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        out["peak_rss_gib"] = round(peak / GiB if sys.platform == "darwin" else peak * 1024 / GiB, 3)
    return out


def maxrss_gib(ru_maxrss: int) -> float:
    return round(ru_maxrss / GiB if sys.platform == "darwin" else ru_maxrss * 1024 / GiB, 3)


# --------------------------------------------------------------------------- subprocess workers


def run_worker(script: str, args: list[str], env: dict | None = None, timeout: float | None = None) -> dict:
    """Run `python script --worker ... --result FILE` and return its JSON, with the child's own peak
    RSS (from os.wait4, so it is this child's, not the maximum over all children) and wall time."""
    fd, result = tempfile.mkstemp(suffix=".json", prefix="phiflash-bench-")
    os.close(fd)
    full_env = dict(os.environ)
    full_env["PYTHONPATH"] = os.pathsep.join([ROOT] + ([full_env["PYTHONPATH"]] if full_env.get("PYTHONPATH") else []))
    full_env.update(env or {})
    cmd = [sys.executable, script, "--worker", *args, "--result", result]
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, env=full_env)
    deadline = None if timeout is None else t0 + timeout
    while True:
        pid, status, usage = os.wait4(proc.pid, os.WNOHANG)
        if pid:
            break
        if deadline is not None and time.perf_counter() > deadline:
            proc.kill()
            pid, status, usage = os.wait4(proc.pid, 0)
            break
        time.sleep(0.2)
    proc.returncode = os.waitstatus_to_exitcode(status)
    wall = time.perf_counter() - t0
    try:
        with open(result) as f:
            text = f.read()
        out = json.loads(text) if text.strip() else {}
    finally:
        os.unlink(result)
    out["process"] = {"returncode": proc.returncode, "wall_s": round(wall, 1),
                      "max_rss_gib": maxrss_gib(usage.ru_maxrss)}
    if proc.returncode != 0:
        out.setdefault("error", f"worker exited with {proc.returncode}")
    return out


def write_result(path: str, obj: dict) -> None:
    with open(path, "w") as f:
        json.dump(obj, f, indent=2)
        f.write("\n")


def summarize(times: list[float]) -> dict:
    return {"median_s": statistics.median(times), "min_s": min(times), "max_s": max(times),
            "n": len(times), "all_s": [round(t, 4) for t in times]}


# --------------------------------------------------------------------------- random weights


# dtype of the random 4-bit models' scales and biases in the quantized linear layers: float16 (the
# default, what `phiflash convert` writes and our loader keeps on CPUs, so the numbers are what users
# get), or bfloat16 / float32 (the C products read them as stored). The quantized embedding keeps
# float32, as the loader casts it: its output is the model's activation dtype.
ENV_SCALES = "PHIFLASH_BENCH_SCALES"


def scales_dtype(name: str | None = None):
    """The mx dtype for `name` (else $PHIFLASH_BENCH_SCALES, else float16)."""
    import mlx.core as mx

    name = (name or os.environ.get(ENV_SCALES, "") or "float16").strip()
    if name not in ("float32", "bfloat16", "float16"):
        raise SystemExit(f"{ENV_SCALES}={name!r}: choose float32, bfloat16 or float16")
    return getattr(mx, name)


def randomize(model, quant: str, seed: int = 0, scale: float = 0.02, scales: str | None = None) -> None:
    """Give every linear / embedding weight random values, tensor by tensor, and evaluate each module
    before the next, so peak memory is the final weights plus one tensor.

    quant "q4": 4-bit group-64 affine (mlx.nn.quantize), packed words drawn directly (uniform codes),
    scales `scale`/8 and biases -scale: values in about [-scale, scale]. Modules whose input width is
    not a multiple of 64 (dt_proj, input 160) stay float32. quant "fp32": uniform in [-scale, scale].
    `scales`: the dtype of the quantized linear layers' scales and biases (see ENV_SCALES).
    Norms, biases, A_log, D, the λ vectors and the conv keep their (cheap) initial values."""
    import mlx.core as mx
    import mlx.nn as nn

    sdtype = scales_dtype(scales)
    if quant == "q4":
        nn.quantize(model, group_size=64, bits=4,
                    class_predicate=lambda p, m: hasattr(m, "to_quantized") and m.weight.shape[-1] % 64 == 0)
    elif quant != "fp32":
        raise ValueError(quant)
    key = mx.random.key(seed)
    for i, (path, module) in enumerate(model.named_modules()):
        k = mx.random.fold_in(key, i) if hasattr(mx.random, "fold_in") else mx.random.key(seed * 100003 + i)
        if isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding)):
            w = module.weight
            module.weight = mx.random.randint(0, 2**31 - 1, w.shape, key=k).astype(mx.uint32)
            module.scales = mx.full(module.scales.shape, scale / 8, dtype=sdtype)
            module.biases = mx.full(module.biases.shape, -scale, dtype=sdtype)
            if isinstance(module, nn.QuantizedEmbedding):    # the loader widens an embedding's (its lookups
                module.scales = module.scales.astype(mx.float32)   # are the activations)
                module.biases = module.biases.astype(mx.float32)
        elif isinstance(module, (nn.Linear, nn.Embedding)):
            module.weight = mx.random.uniform(-scale, scale, module.weight.shape, key=k)
            if getattr(module, "bias", None) is not None and "bias" in module:
                module.bias = mx.zeros(module.bias.shape)
        else:
            continue
        mx.eval(module.parameters())
    mx.eval(model.parameters())


def param_bytes(model) -> int:
    from mlx.utils import tree_flatten

    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def param_count(model) -> int:
    """Logical parameter count (a packed 4-bit word holds 8 weights; scales/biases not counted)."""
    import mlx.nn as nn
    from mlx.utils import tree_flatten

    n = 0
    for path, module in model.named_modules():
        own = {k: v for k, v in module.items() if hasattr(v, "size")} if hasattr(module, "items") else {}
        quantized = isinstance(module, (nn.QuantizedLinear, nn.QuantizedEmbedding))
        for name, v in own.items():
            if quantized and name in ("scales", "biases"):
                continue
            n += v.size * (32 // module.bits if quantized and name == "weight" else 1)
    return n or sum(v.size for _, v in tree_flatten(model.parameters()))


def cpu_kernel_available() -> bool:
    """True where quantized models get our C decode kernel (CPU-only MLX with the library built)."""
    import phiflash_mlx  # noqa: F401
    import mlx.core as mx
    from phiflash_mlx.cpu.kernels import kernel_info

    return not mx.metal.is_available() and kernel_info()["active"]


def build_sambay(cfg: dict, quant: str, seed: int = 0, scales: str | None = None):
    """The SambaY model with random weights; `scales`: see ENV_SCALES (quant "q4")."""
    import phiflash_mlx  # noqa: F401  (routes fp32 GEMMs to OpenBLAS before mlx.core is used)
    from phiflash_mlx.models.phi4flash import Model, ModelArgs

    model = Model(ModelArgs.from_dict(cfg))
    randomize(model, quant, seed, scales=scales)
    return model


def build_phi3(cfg: dict, quant: str, seed: int = 1):
    import phiflash_mlx  # noqa: F401  (same BLAS route for both models)
    from mlx_lm.models import phi3

    model = phi3.Model(phi3.ModelArgs(**cfg))
    randomize(model, quant, seed)
    return model


def plt():
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as pyplot
        return pyplot
    except ImportError:
        print("matplotlib not installed (pip install -e '.[bench]'); skipping the plot")
        return None


def save_figure(fig, path: str, report: dict, title: str, fontsize: int = 9) -> bool:
    """Title the figure (noting a shared machine), write it as PNG and close it."""
    import matplotlib.pyplot as plt

    shared = "; machine shared with other jobs" if report.get("shared_machine") else ""
    fig.suptitle(title + shared, fontsize=fontsize)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True
