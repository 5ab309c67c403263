"""Decode step time at a given context with float32 vs bfloat16 scales and biases in the quantized linear
layers: two random 4-bit models at the released shapes (same codes; common.build_sambay), synthetic
caches (random K/V of CTX positions, random Mamba states), steps alternating between the two in one
process; medians. Writes benchmarks/results/decode_scales16.json.

    python benchmarks/decode_scales16.py 1024 32 16     # CTX LAYERS STEPS
"""
import json, os, pathlib, statistics, sys, time
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import mlx.core as mx
import common
from phiflash_mlx import cpu_kernels
import phiflash_mlx.models.cache as C
ctx, layers = int(sys.argv[1]), int(sys.argv[2])
steps = int(sys.argv[3]) if len(sys.argv) > 3 else 12
cfg = dict(common.SAMBAY_RELEASED); cfg["num_hidden_layers"] = layers
runs = {}
for name in ("float32", "bfloat16"):
    model = common.build_sambay(cfg, "q4", scales=name)
    cpu_kernels.use_cpu_kernels(model)
    a = model.args
    nkv, hd, Di, n, K = a.num_key_value_heads, a.head_dim, a.d_inner, a.mamba_d_state, a.mamba_d_conv
    caches = model.make_cache()
    for i, c in enumerate(caches):
        k1, k2 = mx.random.split(mx.random.key(1000 + i))
        U = lambda shape, k: mx.random.uniform(-1, 1, shape, key=k)
        if isinstance(c, C.ArraysCache):
            c[0], c[1] = U((1, K - 1, Di), k1), U((1, Di, n), k2)
        elif isinstance(c, C.RotatingKVCache):
            s = min(ctx, c.max_size); c.keys = U((1, nkv // 2, s, 2 * hd), k1); c.values = U((1, nkv // 2, s, 2 * hd), k2)
            c.offset = ctx; c._idx = s
        else:
            c.keys = mx.concatenate([U((1, nkv // 2, ctx, 2 * hd), k1), mx.zeros((1, nkv // 2, 256, 2 * hd))], axis=2)
            c.values = mx.concatenate([U((1, nkv // 2, ctx, 2 * hd), k2), mx.zeros((1, nkv // 2, 256, 2 * hd))], axis=2)
            c.offset = ctx
    mx.eval([c.state for c in caches])
    sd = {str(m.scales.dtype) for _, m in model.named_modules() if type(m).__name__.endswith("QuantizedLinear")}
    nbytes = common.param_bytes(model)
    runs[name] = [model, caches, mx.array([[5]]), []]
    print(f"{name}: quantized-linear scales {sd}, parameter bytes {nbytes / 1e9:.3f} GB", flush=True)
for t in range(steps + 1):
    for name, r in runs.items():
        model, caches, tok, ts = r
        t0 = time.perf_counter()
        out = model(tok, cache=caches); tok = mx.argmax(out[:, -1:], axis=-1); mx.eval(tok)
        if t:
            ts.append(time.perf_counter() - t0)
        r[2] = tok
for name, (_, _, _, ts) in runs.items():
    print(f"ctx={ctx} layers={layers} scales={name} step_s median={statistics.median(ts):.4f} min={min(ts):.4f} "
          f"all={[round(t, 3) for t in ts]}")
f, b = (statistics.median(runs[k][3]) for k in ("float32", "bfloat16"))
print(f"median ratio bf16/f32 = {b / f:.3f}")
results = pathlib.Path(__file__).resolve().parent / "results"
results.mkdir(exist_ok=True)
(results / "decode_scales16.json").write_text(json.dumps(
    {"machine": common.machine(), "ctx": ctx, "layers": layers, "steps": steps,
     "step_s": {k: r[3] for k, r in runs.items()}, "median_ratio_bf16_over_f32": b / f}, indent=1) + "\n")
