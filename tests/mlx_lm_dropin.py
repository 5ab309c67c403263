"""Run the installed mlx-lm with ``phi4flash.py`` dropped into ``mlx_lm.models``, site-packages untouched.

    python tests/mlx_lm_dropin.py DIR steps STEPS.json    # mlx-lm entry points, one after another
    python tests/mlx_lm_dropin.py DIR run MODULE ARGS...  # one entry point (e.g. mlx_lm.server)
    python tests/mlx_lm_dropin.py DIR api CHECKS.json     # checks through mlx-lm's Python API

DIR holds unchanged copies of ``phi4flash.py`` and ``phi4flash_kernels.py``. It is appended to
``mlx_lm.models.__path__``, so ``mlx_lm.models.phi4flash`` (what mlx-lm imports for
``"model_type": "phi4flash"``) is found there exactly as if the files were inside the package; the
``.base`` and ``.cache`` they import are mlx-lm's own. This project's package is not imported.

``steps``: STEPS.json is ``[{"name", "argv": [module, args...], "stdin"?}, ...]``; each module's
``main()`` runs with ``sys.argv = argv`` and stdout/stderr captured; the result is one JSON line per
step, ``{"name", "rc", "out", "err"}`` (rc: 0, the SystemExit code, or 1 for an exception, whose
last line is in ``err``), after the marker line ``=== results``.

``api``: CHECKS.json is a list of ``{"check": name, ...}`` (see ``API_CHECKS``); the result is one JSON
line per check after the marker, ``{"check", "result"}`` or ``{"check", "error"}``.
"""

from __future__ import annotations

import contextlib
import importlib
import io
import json
import sys
import traceback
from pathlib import Path

import mlx_lm.models

MARKER = "=== results"


def _drop_in(directory: str) -> None:
    mlx_lm.models.__path__.append(directory)
    import mlx_lm.models.phi4flash as model_file

    where = Path(model_file.__file__).resolve().parent
    if where != Path(directory).resolve():
        raise SystemExit(f"mlx_lm.models.phi4flash was imported from {where}, not {directory}")


def _run_main(argv: list[str]) -> None:
    module = importlib.import_module(argv[0])
    sys.argv = list(argv)
    module.main()


def _steps(path: str) -> list[dict]:
    results = []
    for step in json.loads(Path(path).read_text()):
        out, err = io.StringIO(), io.StringIO()
        stdin = sys.stdin
        sys.stdin = io.StringIO(step.get("stdin", ""))
        rc = 0
        try:
            with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
                _run_main(step["argv"])
        except SystemExit as exc:
            rc = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
            if exc.code not in (None, 0) and not isinstance(exc.code, int):
                err.write(str(exc.code) + "\n")
        except BaseException:  # noqa: BLE001 -- reported to the test, which shows it
            rc = 1
            err.write(traceback.format_exc())
        finally:
            sys.stdin = stdin
        results.append({"name": step["name"], "rc": rc, "out": out.getvalue(), "err": err.getvalue()})
    return results


# ---------------------------------------------------------------------------------------------
# API checks: each returns JSON-able data; the test compares it with its oracle
# ---------------------------------------------------------------------------------------------


def _model(path: str):
    from mlx_lm.utils import load_model

    model, _ = load_model(Path(path))
    return model


def check_greedy(model: str, prompt: list[int], n: int) -> list[int]:
    """n greedy tokens after ``prompt`` through mlx-lm's generate_step (its default sampler is argmax)."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step

    m = _model(model)
    return [int(t) for t, _ in generate_step(mx.array(prompt), m, max_tokens=n)]


def check_batch(model: str, prompts: list[list[int]], max_tokens: list[int], late: list[int] | None = None):
    """BatchGenerator (greedy, no stop tokens) on prompts of different lengths and lengths of output;
    ``late`` is inserted after three steps, while the others are generating. Also each prompt alone
    through generate_step. Returns {"batched": [...], "single": [...]}."""
    import mlx.core as mx
    from mlx_lm.generate import BatchGenerator, generate_step

    m = _model(model)
    gen = BatchGenerator(m, stop_tokens=[])
    uids = gen.insert(prompts, max_tokens)
    tokens = {uid: [] for uid in uids}
    steps = 0
    late_uid = None
    while responses := gen.next_generated():
        for r in responses:
            if r.finish_reason != "stop":
                tokens[r.uid].append(int(r.token))
        steps += 1
        if steps == 3 and late is not None:
            [late_uid] = gen.insert([late], [max(max_tokens)])
            tokens[late_uid] = []
    gen.close()
    order = uids + ([late_uid] if late is not None else [])
    everything = prompts + ([late] if late is not None else [])
    lengths = max_tokens + ([max(max_tokens)] if late is not None else [])
    single = [
        [int(t) for t, _ in generate_step(mx.array(p), m, max_tokens=k)] for p, k in zip(everything, lengths)
    ]
    return {"batched": [tokens[u] for u in order], "single": single}


def check_batch_generate(model: str, prompts: list[list[int]], max_tokens: int):
    """mlx-lm's batch_generate (tokenizer's stop tokens) against stream_generate one prompt at a time."""
    from mlx_lm import load, stream_generate
    from mlx_lm.generate import batch_generate

    m, tok = load(model)
    batched = batch_generate(m, tok, prompts, max_tokens=max_tokens, return_token_ids=True)
    single = []
    for p in prompts:
        out = [int(r.token) for r in stream_generate(m, tok, p, max_tokens=max_tokens)]
        single.append([t for t in out if t not in tok.eos_token_ids])
    return {"batched": [[int(t) for t in ids] for ids in batched.token_ids], "single": single,
            "texts": list(batched.texts)}


def check_prompt_cache_file(model: str, prompt: list[int], n: int, file: str):
    """Prefill all but the last prompt token, save_prompt_cache, load_prompt_cache, then n greedy tokens
    from the loaded cache and from the original one."""
    import mlx.core as mx
    from mlx_lm.generate import generate_step
    from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache, save_prompt_cache

    m = _model(model)
    cache = make_prompt_cache(m)
    m(mx.array([prompt[:-1]]), cache=cache)
    mx.eval([c.state for c in cache])
    save_prompt_cache(file, cache, {"note": "phi4flash"})
    loaded, meta = load_prompt_cache(file, return_metadata=True)

    def cont(c):
        return [int(t) for t, _ in generate_step(mx.array(prompt[-1:]), m, max_tokens=n, prompt_cache=c)]

    return {
        "types": [type(c).__name__ for c in cache],
        "loaded_types": [type(c).__name__ for c in loaded],
        "meta": meta,
        "from_loaded": cont(loaded),
        "from_original": cont(cache),
    }


def check_quantized_kv(model: str, prompt: list[int], n: int, bits: int, group_size: int):
    """Prefill, turn every cache that mlx-lm can quantize (the KVCache of the full-attention layer)
    into its QuantizedKVCache, then n greedy tokens; also the logits of each step."""
    import mlx.core as mx
    from mlx_lm.models.cache import KVCache, make_prompt_cache

    m = _model(model)
    cache = make_prompt_cache(m)
    logits = m(mx.array([prompt]), cache=cache)[:, -1]
    quantized = []
    for i, c in enumerate(cache):
        if type(c) is KVCache:
            cache[i] = c.to_quantized(group_size=group_size, bits=bits)
            quantized.append(i)
    tokens, steps = [], []
    for _ in range(n):
        token = int(mx.argmax(logits, axis=-1).item())
        tokens.append(token)
        logits = m(mx.array([[token]]), cache=cache)[:, -1]
        steps.append(logits.astype(mx.float32)[0].tolist())
    return {"quantized_layers": quantized, "types": [type(c).__name__ for c in cache], "tokens": tokens,
            "step_logits": steps}


API_CHECKS = {
    "quantized_kv": check_quantized_kv,
    "greedy": check_greedy,
    "batch": check_batch,
    "batch_generate": check_batch_generate,
    "prompt_cache_file": check_prompt_cache_file,
}


def _api(path: str) -> list[dict]:
    results = []
    for item in json.loads(Path(path).read_text()):
        item = dict(item)
        name = item.pop("check")
        try:
            results.append({"check": name, "result": API_CHECKS[name](**item)})
        except Exception:  # noqa: BLE001 -- reported to the test, which shows it
            results.append({"check": name, "error": traceback.format_exc()})
    return results


def main() -> None:
    directory, mode, *rest = sys.argv[1:]
    _drop_in(directory)
    if mode == "run":
        _run_main(rest)
        return
    results = _steps(rest[0]) if mode == "steps" else _api(rest[0])
    foreign = "phiflash_mlx" in sys.modules
    print(MARKER)
    for r in results:
        print(json.dumps(dict(r, phiflash_mlx_imported=foreign)))


if __name__ == "__main__":
    main()
