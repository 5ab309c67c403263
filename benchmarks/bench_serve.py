"""Serving: multi-turn time to first token with and without checkpoints, aggregate throughput at 1, 2,
4 and 8 concurrent streams, ours (`phiflash serve`) against mlx-lm's server with `phi3`, and the size
of a checkpoint at the released shape.

Both servers run side by side, each on a random-weight model at the same scaled-down shape (Phi-4-mini
is 32 layers x 3072 wide; here `--layers`, `--hidden`, heads and MLP scaled so a 2-core machine runs
the whole benchmark in minutes), with the bundled demo model's tokenizer (640 tokens: the vocabulary
is scaled down too). Requests go over HTTP with OpenAI's streaming chat API; the servers alternate
turn by turn and level by level, so a noisy machine affects both alike, and the report gives ratios.

    python benchmarks/bench_serve.py                 # ~10 min on 2 cores
    python benchmarks/bench_serve.py --quick         # fewer turns and tokens

Multi-turn: a 10-turn conversation sent as an OpenAI client sends it (the whole history each turn,
the answers sent back as `content` only); time to first token per turn for ours with checkpoints,
ours without (`--checkpoint-mb 0`) and mlx-lm; `cached_tokens` as reported; and, as the target's
yardstick, the time to first token of a fresh request holding only that turn's new tokens.

Throughput: N requests at once, each a distinct ~2K-token prompt and `--gen` generated tokens at
temperature 0; aggregate decode tokens/s (see `throughput`) and tokens/s over the whole request.
Times are taken on whole (non-streamed) responses; time to first token is the time of a request for
one token.

Writes results/serve[-quick].json and .png.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tempfile
import threading
import time

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)
import common  # noqa: E402

SERVER_ENV: dict = {}          # --shared-machine: one BLAS / kernel thread per server (both alike)
TOKENIZER_FILES = ("tokenizer.model", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


# --------------------------------------------------------------------------- models

def shapes(layers: int, hidden: int, vocab: int) -> dict:
    heads = hidden // 64
    sambay = dict(common.SAMBAY_RELEASED, vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                  num_key_value_heads=heads // 2 if (heads // 2) % 2 == 0 else heads, intermediate_size=4 * hidden,
                  num_hidden_layers=layers)
    phi3 = dict(common.PHI4_MINI, vocab_size=vocab, hidden_size=hidden, num_attention_heads=heads,
                num_key_value_heads=max(1, heads // 3), intermediate_size=int(hidden * 8 / 3) // 64 * 64,
                num_hidden_layers=layers, rope_scaling=common.phi3_rope_scaling(hidden, heads))
    return {"sambay": sambay, "phi3": phi3}


def write_models(root: str, cfgs: dict) -> dict:
    """Random-weight checkpoints with the demo tokenizer: ours in Hugging Face names, phi3 in mlx-lm's."""
    import numpy as np
    import mlx.core as mx
    from mlx.utils import tree_flatten
    from safetensors.numpy import save_file

    import reference
    from phiflash_mlx.demo import demo_model_path
    from phiflash_mlx.verify import random_weights

    demo = demo_model_path()
    paths = {}
    for name, cfg in cfgs.items():
        d = os.path.join(root, name)
        os.makedirs(d, exist_ok=True)
        for f in TOKENIZER_FILES + ("generation_config.json",):
            if os.path.exists(os.path.join(demo, f)):
                shutil.copy(os.path.join(demo, f), d)
        if name == "sambay":
            weights = random_weights(reference.config_from_dict(cfg), 0)
            save_file({k: np.ascontiguousarray(v, dtype=np.float32) for k, v in weights.items()},
                      os.path.join(d, "model.safetensors"))
            config = dict(cfg, architectures=["Phi4FlashForCausalLM"])
        else:
            model = common.build_phi3(cfg, "fp32")
            mx.save_safetensors(os.path.join(d, "model.safetensors"), dict(tree_flatten(model.parameters())))
            config = dict(cfg, architectures=["Phi3ForCausalLM"])
        with open(os.path.join(d, "config.json"), "w") as f:
            json.dump(config, f)
        paths[name] = d
    return paths


# --------------------------------------------------------------------------- servers

def start(cmd: list, log_path: str, pattern: str = None, timeout: float = 300, url: str = None):
    """Start a server; ready when `pattern` shows in its log (it names the URL) or `url` answers."""
    import httpx
    log = open(log_path, "w")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=common.ROOT,
                            env=dict(os.environ, PYTHONUNBUFFERED="1", **SERVER_ENV))
    deadline = time.time() + timeout
    while time.time() < deadline:
        if pattern and re.search(pattern, open(log_path).read()):
            return proc
        if url:
            try:
                if httpx.get(url + "/v1/models", timeout=2).status_code == 200:
                    return proc
            except httpx.TransportError:
                pass
        if proc.poll() is not None:
            break
        time.sleep(0.3)
    proc.kill()
    raise RuntimeError(f"server did not start: {cmd}\n{open(log_path).read()[-2000:]}")


def free_port() -> int:
    import socket
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


def stream_chat(url: str, messages: list, max_tokens: int, extra: dict | None = None) -> dict:
    """One streaming chat request: time to first token, text, chunks with text, usage, timings."""
    import httpx
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0, "stream": True,
            "stream_options": {"include_usage": True}, **(extra or {})}
    t0 = time.perf_counter()
    first, n, text, usage, timings = None, 0, [], None, None
    with httpx.stream("POST", url + "/v1/chat/completions", json=body, timeout=600) as r:
        r.raise_for_status()
        for line in r.iter_lines():
            if not line.startswith("data: ") or line == "data: [DONE]":
                continue
            chunk = json.loads(line[6:])
            if chunk.get("usage"):
                usage = chunk["usage"]
            if chunk.get("timings"):
                timings = chunk["timings"]
            for c in chunk.get("choices", []):
                delta = c.get("delta", {})
                piece = (delta.get("content") or "") + (delta.get("reasoning_content") or delta.get("reasoning") or "")
                if piece:
                    if first is None:
                        first = time.perf_counter()
                    n += 1
                    if delta.get("content"):
                        text.append(delta["content"])
    end = time.perf_counter()
    return {"t0": t0, "ttft_s": (first or end) - t0, "first": first or end, "end": end, "chunks": n,
            "content": "".join(text), "usage": usage, "timings": timings}


def chat(url: str, messages: list, max_tokens: int) -> dict:
    """One non-streaming chat request: wall time, answer content, usage, timings."""
    import httpx
    body = {"messages": messages, "max_tokens": max_tokens, "temperature": 0.0}
    t0 = time.perf_counter()
    r = httpx.post(url + "/v1/chat/completions", json=body, timeout=900)
    r.raise_for_status()
    out = r.json()
    end = time.perf_counter()
    message = out["choices"][0]["message"]
    return {"t0": t0, "end": end, "wall_s": end - t0, "content": message.get("content") or "",
            "usage": out.get("usage"), "timings": out.get("timings")}


# --------------------------------------------------------------------------- the measurements

WORDS = "the a of to and in is it you that he was for on are with as I his they be at one have this from".split()


def user_text(rng: random.Random, words: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(words)) + f" What is {rng.randint(10, 999)} + {rng.randint(10, 99)}?"


def multi_turn(servers: dict, turns: int, words: int, gen: int, fresh_url: str) -> dict:
    """Each server keeps its own conversation (answers differ); the user messages are the same."""
    rng = random.Random(0)
    users = [user_text(rng, words) for _ in range(turns)]
    convs = {name: [] for name in servers}
    out = {name: [] for name in servers}
    yard = []
    for k in range(turns):
        names = list(servers)
        names = names[k % len(names):] + names[:k % len(names)]          # rotate who goes first
        for name in names:
            convs[name].append({"role": "user", "content": users[k]})
            first = chat(servers[name], convs[name], 1)                 # time to first token
            answer = chat(servers[name], convs[name], gen)              # the answer the client keeps
            convs[name].append({"role": "assistant", "content": answer["content"]})
            cached = ((first["usage"] or {}).get("prompt_tokens_details") or {}).get("cached_tokens")
            out[name].append({"turn": k + 1, "ttft_s": round(first["wall_s"], 4),
                              "prompt_tokens": (first["usage"] or {}).get("prompt_tokens"), "cached_tokens": cached,
                              "timings": first["timings"]})
        # the yardstick: only this turn's new tokens, in a fresh request (no history, no checkpoint)
        ours = out.get("ours_ckpt", [{}])[-1]
        new = (ours.get("prompt_tokens") or 0) - (ours.get("cached_tokens") or 0)
        new_ids = [rng.randrange(10, 600) for _ in range(max(new, 2))]
        import httpx
        t0 = time.perf_counter()
        httpx.post(fresh_url + "/v1/completions", timeout=600,
                   json={"prompt": new_ids, "max_tokens": 1, "temperature": 0}).raise_for_status()
        yard.append({"turn": k + 1, "new_tokens": len(new_ids), "ttft_s": round(time.perf_counter() - t0, 4)})
        print(f"turn {k + 1}: " + ", ".join(f"{n} {out[n][-1]['ttft_s']:.2f}s" for n in servers)
              + f", new-only {yard[-1]['ttft_s']:.2f}s ({len(new_ids)} tokens)", flush=True)
    return {"turns": out, "new_tokens_only": yard, "user_words": words, "max_tokens": gen}


def _concurrent(url: str, prompts: list, max_tokens: int) -> tuple:
    results = [None] * len(prompts)

    def run(i):
        results[i] = chat(url, prompts[i], max_tokens)

    start = time.perf_counter()
    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(prompts))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results, max(r["end"] for r in results) - start


def throughput(servers: dict, levels: list, prompt_words: int, gen: int) -> dict:
    """N requests at once, twice: with max_tokens 1 (prefill and one step: P seconds) and with `gen`
    (T seconds), on different prompts of the same length so no cache is reused. Aggregate decode rate
    = sum of (tokens - 1) / (T - P); the whole-request rate = tokens / T. Timed on whole responses,
    not on streamed text: random-weight models write bytes that are not whole characters, and a
    server holds such text back, so streamed chunks would measure the detokenizer, not decoding."""
    out = {name: [] for name in servers}
    for level in levels:
        names = list(servers) if level % 2 else list(servers)[::-1]
        for name in names:
            rng = random.Random(1000 * level + len(name))
            prefill_prompts = [[{"role": "user", "content": user_text(rng, prompt_words)}] for _ in range(level)]
            prompts = [[{"role": "user", "content": user_text(rng, prompt_words)}] for _ in range(level)]
            _, prefill_s = _concurrent(servers[name], prefill_prompts, 1)
            results, total_s = _concurrent(servers[name], prompts, gen)
            tokens = [(r["usage"] or {}).get("completion_tokens") or 0 for r in results]
            decode = sum(max(t - 1, 0) for t in tokens) / max(total_s - prefill_s, 1e-9)
            whole = sum(tokens) / total_s
            prompt_tokens = [(r["usage"] or {}).get("prompt_tokens") for r in results]
            out[name].append({"streams": level, "generated": tokens, "prompt_tokens": prompt_tokens,
                              "decode_tok_s": round(decode, 2), "whole_tok_s": round(whole, 2),
                              "prefill_only_s": round(prefill_s, 3), "total_s": round(total_s, 3)})
            print(f"{name} x{level}: decode {decode:.1f} tok/s, whole {whole:.1f} tok/s "
                  f"(prompts {prompt_tokens[0]} tokens; prefill+1 {prefill_s:.1f} s, total {total_s:.1f} s)",
                  flush=True)
    return out


def snapshot_sizes(contexts=(512, 2048, 32768)) -> dict:
    """Bytes of one checkpoint at the released shape (32 layers, hidden 2560, d_inner 5120, d_state 16,
    window 512, 20 KV heads x 64), with mlx-lm's cache classes filled to each context, float32 (the
    CPU policy) and bfloat16; and what a snapshot costs to take (copy_cache: no bytes copied)."""
    import mlx.core as mx
    from mlx_lm.models.cache import ArraysCache, KVCache, RotatingKVCache

    from phiflash_mlx.models.phi4flash import ModelArgs
    from phiflash_mlx.serving.checkpoints import cache_nbytes, copy_cache

    args = ModelArgs.from_dict(common.SAMBAY_RELEASED)
    kinds = args.layer_kinds[: args.num_hidden_layers // 2 + 2]
    d_inner = args.mamba_expand * args.hidden_size
    pairs, pair_dim = args.num_key_value_heads // 2, 2 * (args.hidden_size // args.num_attention_heads)
    out = {"shape": {"layers": args.num_hidden_layers, "hidden": args.hidden_size, "d_inner": d_inner,
                     "d_state": args.mamba_d_state, "d_conv": args.mamba_d_conv, "window": args.sliding_window,
                     "kv_heads": args.num_key_value_heads, "head_dim": args.hidden_size // args.num_attention_heads,
                     "cached_layers": {k: kinds.count(k) for k in set(kinds)}}, "points": []}
    for dtype in (mx.float32, mx.bfloat16):
        for T in contexts:
            caches = []
            for kind in kinds:
                if kind.startswith("mamba"):
                    c = ArraysCache(2)
                    c[0] = mx.zeros((1, args.mamba_d_conv - 1, d_inner), dtype)
                    c[1] = mx.zeros((1, d_inner, args.mamba_d_state), mx.float32)
                elif kind == "swa":
                    c = RotatingKVCache(max_size=args.sliding_window)
                    for start in range(0, T, 512):
                        n = min(512, T - start)
                        kv = mx.zeros((1, pairs, n, pair_dim), dtype)
                        c.update_and_fetch(kv, kv)
                else:
                    c = KVCache()
                    for start in range(0, T, 4096):
                        n = min(4096, T - start)
                        kv = mx.zeros((1, pairs, n, pair_dim), dtype)
                        c.update_and_fetch(kv, kv)
                caches.append(c)
            mx.eval([c.state for c in caches])
            by_kind = {}
            for kind, c in zip(kinds, caches):
                key = "mamba" if kind.startswith("mamba") else kind
                by_kind[key] = by_kind.get(key, 0) + cache_nbytes([c])
            t0 = time.perf_counter()
            snap = copy_cache(caches)
            mx.eval([c.state for c in snap])
            take_s = time.perf_counter() - t0
            out["points"].append({"dtype": str(dtype).split(".")[-1], "context": T, "bytes": cache_nbytes(caches),
                                  "by_kind": by_kind, "take_snapshot_s": round(take_s, 6)})
            print(f"snapshot {str(dtype).split('.')[-1]} @ {T}: {cache_nbytes(caches) / 2**20:.1f} MiB "
                  + ", ".join(f"{k} {v / 2**20:.2f} MiB" for k, v in by_kind.items()), flush=True)
    return out


# --------------------------------------------------------------------------- report

def plot(report: dict, path: str) -> bool:
    plt = common.plt()
    if plt is None:
        return False
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    mt = report["multi_turn"]
    for name, rows in mt["turns"].items():
        a.plot([r["turn"] for r in rows], [r["ttft_s"] for r in rows], marker="o", label=name)
    a.plot([r["turn"] for r in mt["new_tokens_only"]], [r["ttft_s"] for r in mt["new_tokens_only"]],
           linestyle="--", color="gray", label="new tokens only (yardstick)")
    a.set_xlabel("turn")
    a.set_ylabel("time to first token (s)")
    a.set_title("multi-turn chat, whole history each turn")
    a.legend(fontsize=8)
    for name, rows in report["throughput"].items():
        b.plot([r["streams"] for r in rows], [r["decode_tok_s"] for r in rows], marker="o", label=name)
    b.set_xlabel("concurrent streams")
    b.set_ylabel("aggregate decode tokens/s")
    b.set_xscale("log", base=2)
    b.set_title("throughput")
    b.legend(fontsize=8)
    return common.save_figure(fig, path, report, f"serving, {report['config']['layers']} layers x "
                                                 f"{report['config']['hidden']} (random weights)")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true")
    p.add_argument("--layers", type=int, default=8)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--turns", type=int, default=10)
    p.add_argument("--turn-words", type=int, default=60, help="words in each user message")
    p.add_argument("--turn-gen", type=int, default=24, help="tokens generated per turn")
    p.add_argument("--prompt-words", type=int, default=40, help="words in each throughput prompt (~70 tokens; 1350 for ~2K)")
    p.add_argument("--gen", type=int, default=64, help="tokens generated per throughput stream")
    p.add_argument("--levels", default="1,2,4,8")
    p.add_argument("--shared-machine", action="store_true")
    p.add_argument("--skip", default="", help="comma list of parts to skip: snapshot,multi,throughput")
    args = p.parse_args(argv)
    if args.quick:
        args.turns, args.gen, args.prompt_words = min(args.turns, 4), min(args.gen, 32), min(args.prompt_words, 300)
    skip = set(filter(None, args.skip.split(",")))
    if args.shared_machine:
        # on a machine other jobs keep busy, multi-threaded BLAS and kernels spin against them:
        # measured 17.5 tok/s with one thread against 1.4-2.4 tok/s with the defaults (same model)
        SERVER_ENV.update(OPENBLAS_NUM_THREADS="1", PHIFLASH_CPU_THREADS="1", OMP_NUM_THREADS="1")
    report = {"machine": common.machine(), "load_before": common.load_snapshot(),
              "shared_machine": args.shared_machine, "server_env": dict(SERVER_ENV), "config": vars(args)}
    if "snapshot" not in skip:
        report["snapshot"] = snapshot_sizes()
    from phiflash_mlx.demo import demo_model_path
    import phiflash_mlx
    _, tok = phiflash_mlx.load(demo_model_path())
    cfgs = shapes(args.layers, args.hidden, tok.vocab_size)
    report["shapes"] = cfgs
    procs = []
    tmp = tempfile.mkdtemp(prefix="bench-serve-")
    try:
        paths = write_models(tmp, cfgs)
        ctx = "16384"
        servers = {}
        for name, extra in (("ours_ckpt", []), ("ours_nockpt", ["--checkpoint-mb", "0"])):
            log = os.path.join(tmp, name + ".log")
            procs.append(start([sys.executable, "-m", "phiflash_mlx.cli", "serve", "--model", paths["sambay"],
                                "--port", "0", "--log-level", "warning", "--max-context", ctx, "--max-batch", "8",
                                "--temp", "0", *extra], log, r"at (http://127\.0\.0\.1:\d+)/v1"))
            servers[name] = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", open(log).read()).group(1)
        port = free_port()
        log = os.path.join(tmp, "mlxlm.log")
        procs.append(start([sys.executable, "-m", "mlx_lm", "server", "--model", paths["phi3"], "--port", str(port),
                            "--decode-concurrency", "8", "--prompt-concurrency", "8", "--temp", "0",
                            "--log-level", "WARNING"], log, url=f"http://127.0.0.1:{port}"))
        servers["mlx_lm_phi3"] = f"http://127.0.0.1:{port}"
        time.sleep(1)
        # warm-up: one short request each
        for url in servers.values():
            chat(url, [{"role": "user", "content": "hi"}], 4)
        if "multi" not in skip:
            report["multi_turn"] = multi_turn(servers, args.turns, args.turn_words, args.turn_gen,
                                              servers["ours_nockpt"])
        if "throughput" not in skip:
            levels = [int(x) for x in args.levels.split(",")]
            report["throughput"] = throughput({"ours": servers["ours_ckpt"], "mlx_lm_phi3": servers["mlx_lm_phi3"]},
                                              levels, args.prompt_words, args.gen)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=20)
            except subprocess.TimeoutExpired:
                proc.kill()
        shutil.rmtree(tmp, ignore_errors=True)
    report["load_after"] = common.load_snapshot()
    summary = {}
    if "multi_turn" in report:
        mt = report["multi_turn"]
        rows = mt["turns"]
        summary["ttft_ratio_no_ckpt_over_ckpt_last_turn"] = round(
            rows["ours_nockpt"][-1]["ttft_s"] / rows["ours_ckpt"][-1]["ttft_s"], 2)
        summary["ttft_ckpt_over_new_only_per_turn"] = [
            round(r["ttft_s"] / y["ttft_s"], 2) for r, y in zip(rows["ours_ckpt"], mt["new_tokens_only"])]
        summary["ttft_mlxlm_over_ours_ckpt_per_turn"] = [
            round(m["ttft_s"] / o["ttft_s"], 2) for m, o in zip(rows["mlx_lm_phi3"], rows["ours_ckpt"])]
    if "throughput" in report:
        tp = report["throughput"]
        one = tp["ours"][0]["decode_tok_s"]
        summary["ours_scaling_vs_1_stream"] = {r["streams"]: round(r["decode_tok_s"] / one, 2) for r in tp["ours"]}
        summary["ours_over_mlxlm"] = {o["streams"]: round(o["decode_tok_s"] / m["decode_tok_s"], 2)
                                      for o, m in zip(tp["ours"], tp["mlx_lm_phi3"])}
    report["summary"] = summary
    print(json.dumps(summary, indent=1))
    os.makedirs(common.RESULTS, exist_ok=True)
    name = "serve-quick" if args.quick else "serve"
    common.write_result(os.path.join(common.RESULTS, name + ".json"), report)
    if "multi_turn" in report and "throughput" in report:
        plot(report, os.path.join(common.RESULTS, name + ".png"))
    return 0


if __name__ == "__main__":
    sys.exit(main())
