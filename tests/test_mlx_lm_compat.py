"""The model as an mlx-lm model: mlx-lm's own model check, and its tools with the model file dropped in.

* ``model_test_runner``, the check mlx-lm applies to every model (``tests/test_models.py``), is read
  unchanged from ``../shared/upstream/mlx-lm/test_models.py`` (extracted with ``ast``, never copied
  here) and run on the golden configs, the demo's and one with a per-layer ``sliding_window`` list,
  with float32, float16 and bfloat16 weights. ``TestModels.test_phi4flash`` is the entry mlx-lm's
  contribution guide asks for, written as the other models' entries in that file are.
* ``phi4flash.py`` and ``phi4flash_kernels.py`` are copied unchanged into a temporary folder that a
  subprocess appends to ``mlx_lm.models.__path__`` (``tests/mlx_lm_dropin.py``); mlx-lm's entry points
  then run as a user runs them: ``mlx_lm.generate``, ``cache_prompt`` + ``--prompt-cache-file``,
  ``benchmark -b 4``, ``lora --train``, ``chat``, ``server``, ``convert``, and its Python API
  (``generate_step``, ``BatchGenerator``, ``batch_generate``, ``save_prompt_cache`` /
  ``load_prompt_cache``).

Oracles: the golden vectors (greedy continuations computed by the reference implementation), the
demo's arithmetic (457 + 68 = 525), and, for batching and prompt-cache files, mlx-lm's own
single-sequence path.
"""

from __future__ import annotations

import ast
import builtins
import copy
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import unittest
import urllib.request
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx.utils import tree_map

from conftest import GOLDEN_MODELS, ROOT, golden_path

UPSTREAM = ROOT.parent / "shared" / "upstream" / "mlx-lm"
MODEL_FILES = ("phi4flash.py", "phi4flash_kernels.py")
MODELS_DIR = ROOT / "phiflash_mlx" / "models"
DEMO = ROOT / "phiflash_mlx" / "demo" / "model"
DRIVER = Path(__file__).with_name("mlx_lm_dropin.py")

QUESTION = "What is 457 + 68?"
ANSWER = "<think>457+68: u:7+8+0=15, t:5+6+1=12, h:4+0+1=05. so 525</think>525"
SUBTRACTION = "Subtract 68 from 403."  # 335


# ---------------------------------------------------------------------------------------------
# mlx-lm's model_test_runner, unchanged
# ---------------------------------------------------------------------------------------------


def _upstream_method(name: str):
    """``TestModels.<name>`` from mlx-lm's test_models.py, compiled from its own source text.

    Only the one method is taken (importing the whole file needs what a given mlx-lm release has);
    its globals are the names it uses, bound to what the file imports them as.
    """
    path = UPSTREAM / "test_models.py"
    if not path.is_file():
        pytest.fail(f"{path} is missing: these tests read mlx-lm's own test files from ../shared/upstream/mlx-lm")
    tree = ast.parse(path.read_text(encoding="utf-8"))
    cls = next(n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "TestModels")
    fn = next(n for n in cls.body if isinstance(n, ast.FunctionDef) and n.name == name)
    module = ast.Module(body=[fn], type_ignores=[])
    code = compile(module, str(path), "exec")
    return code, fn


class _MxWithOtherHalf:
    """``mlx.core`` whose ``float16`` is another 16-bit float type.

    The runner loops ``for t in [mx.float32, mx.float16]``; given this as its ``mx`` the same,
    unchanged code checks bfloat16 weights (cast, forward, cache, decode all keep the dtype).
    """

    def __init__(self, half):
        self._half = half

    def __getattr__(self, name):
        return self._half if name == "float16" else getattr(mx, name)


def model_test_runner(half=mx.float16):
    """mlx-lm's ``TestModels.model_test_runner`` as a function of (self, model, model_type,
    vocab_size, num_layers), run with ``half`` as its 16-bit type."""
    from mlx_lm.models.cache import make_prompt_cache

    code, fn = _upstream_method("model_test_runner")
    namespace = {
        "copy": copy,
        "mx": mx if half == mx.float16 else _MxWithOtherHalf(half),
        "nn": nn,
        "tree_map": tree_map,
        "make_prompt_cache": make_prompt_cache,
    }
    nodes = list(ast.walk(fn))
    loaded = {n.id for n in nodes if isinstance(n, ast.Name) and isinstance(n.ctx, ast.Load)}
    local = {n.id for n in nodes if isinstance(n, ast.Name) and not isinstance(n.ctx, ast.Load)}
    local |= {n.arg for n in nodes if isinstance(n, ast.arg)}
    missing = loaded - local - set(namespace) - set(dir(builtins))
    assert not missing, f"the upstream runner now uses names this test does not provide: {missing}"
    exec(code, namespace)
    return namespace["model_test_runner"]


def _config(name: str) -> dict:
    if name == "demo":
        return json.loads((DEMO / "config.json").read_text())
    if name == "sliding-window-list":  # the per-layer form of the released config (SAMBAY.md 1.6)
        config = json.loads((golden_path("tiny") / "config.json").read_text())
        n, w = config["num_hidden_layers"], config["sliding_window"]
        config["sliding_window"] = [w if i < n // 2 and i % 2 == 1 else None for i in range(n)]
        return config
    return json.loads((golden_path(name) / "config.json").read_text())


CONFIGS = [*GOLDEN_MODELS, "demo", "sliding-window-list"]


def _phi4flash():
    from phiflash_mlx.models import phi4flash

    return phi4flash


@pytest.mark.parametrize("half", [mx.float16, mx.bfloat16], ids=["float32+float16", "float32+bfloat16"])
@pytest.mark.parametrize("config_name", CONFIGS)
def test_mlx_lm_model_test_runner(config_name, half):
    phi4flash = _phi4flash()
    args = phi4flash.ModelArgs.from_dict(_config(config_name))
    model = phi4flash.Model(args)
    runner = model_test_runner(half)
    case = unittest.TestCase()
    runner(case, model, args.model_type, args.vocab_size, args.num_hidden_layers)


class TestModels(unittest.TestCase):
    """In the style of mlx-lm's tests/test_models.py (the entry its contribution guide asks for)."""

    model_test_runner = staticmethod(lambda *a: model_test_runner()(*a))

    def test_phi4flash(self):
        phi4flash = _phi4flash()

        args = phi4flash.ModelArgs(
            model_type="phi4flash",
            hidden_size=128,
            intermediate_size=256,
            num_hidden_layers=8,
            num_attention_heads=4,
            num_key_value_heads=2,
            sliding_window=16,
            layer_norm_eps=1e-5,
            mamba_d_state=16,
            mamba_d_conv=4,
            mamba_expand=2,
            mb_per_layer=2,
            vocab_size=1000,
        )
        model = phi4flash.Model(args)
        self.model_test_runner(self, model, args.model_type, args.vocab_size, args.num_hidden_layers)


def test_model_files_import_only_what_mlx_lm_models_has():
    """Droppable unchanged: the model file imports mlx, .base, .cache and its kernel module; the kernel
    module imports nothing of this project."""
    allowed = {
        "phi4flash.py": {"mlx", ".base", ".cache", ".phi4flash_kernels"},
        "phi4flash_kernels.py": {"mlx"},
    }
    stdlib = set(sys.stdlib_module_names)
    for name, ok in allowed.items():
        tree = ast.parse((MODELS_DIR / name).read_text())
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                roots = [a.name.split(".")[0] for a in node.names]
            elif isinstance(node, ast.ImportFrom):
                roots = ["." * node.level + (node.module or "")] if node.level else [node.module.split(".")[0]]
            else:
                continue
            for root in roots:
                assert root in ok or root in stdlib or root == "__future__", f"{name} imports {root}"


# ---------------------------------------------------------------------------------------------
# The model file dropped into the installed mlx-lm (a subprocess; site-packages untouched)
# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def dropin(tmp_path_factory) -> Path:
    """A folder with unchanged copies of the model file and its kernel module."""
    directory = tmp_path_factory.mktemp("mlx_lm_models")
    for name in MODEL_FILES:
        shutil.copyfile(MODELS_DIR / name, directory / name)
        assert (directory / name).read_bytes() == (MODELS_DIR / name).read_bytes()
    return directory


def _env() -> dict:
    # no colours or terminal tricks from rich in captured output
    return dict(os.environ, NO_COLOR="1", TERM="dumb", COLUMNS="200", PYTHONUNBUFFERED="1",
                TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", TRANSFORMERS_VERBOSITY="error")


def _driver(dropin: Path, mode: str, spec, cwd: Path, timeout: int = 600) -> list[dict]:
    spec_file = cwd / f"{mode}.json"
    spec_file.write_text(json.dumps(spec))
    proc = subprocess.run(
        [sys.executable, str(DRIVER), str(dropin), mode, str(spec_file)],
        capture_output=True, text=True, timeout=timeout, env=_env(), cwd=cwd,
    )
    out = proc.stdout
    if proc.returncode != 0 or "=== results" not in out:
        pytest.fail(f"mlx_lm_dropin.py {mode} failed (exit {proc.returncode}):\n{out[-4000:]}\n{proc.stderr[-4000:]}")
    results = [json.loads(line) for line in out.split("=== results", 1)[1].splitlines() if line.strip()]
    assert not any(r["phiflash_mlx_imported"] for r in results), "the drop-in run imported phiflash_mlx"
    return results


# --- Python API ------------------------------------------------------------------------------


def _golden(name: str) -> dict:
    return dict(np.load(golden_path(name) / "vectors.npz"))


def _demo_prompts() -> list[list[int]]:
    from phiflash_mlx.tokenizer import load_tokenizer

    tok = load_tokenizer(DEMO)
    questions = [QUESTION, SUBTRACTION, "What is 57 * 6?", "Tom has 12 apples. Tom gets 5 more apples. How many "
                 "apples does Tom have now?"]
    return [tok.apply_chat_template([{"role": "user", "content": q}]) for q in questions]


@pytest.fixture(scope="module")
def api(dropin, tmp_path_factory) -> dict:
    """Every API check in one subprocess (one start of mlx + transformers)."""
    cwd = tmp_path_factory.mktemp("mlx_lm_api")
    checks = []
    for name in GOLDEN_MODELS:
        g = _golden(name)
        prompt = g["decode_prompt_ids"][0].tolist()
        n = g["decode_greedy_ids"].shape[1]
        checks.append({"check": "greedy", "model": str(golden_path(name)), "prompt": prompt, "n": n})
        checks.append({"check": "quantized_kv", "model": str(golden_path(name)), "prompt": prompt, "n": n,
                       "bits": 8, "group_size": 32})
        checks.append({"check": "prompt_cache_file", "model": str(golden_path(name)), "prompt": prompt, "n": n,
                       "file": str(cwd / f"{name}.safetensors")})
        # lengths 40, 23 and 9 around sliding windows of 8 / 16; outputs of 16, 5 and 12 tokens
        checks.append({"check": "batch", "model": str(golden_path(name)),
                       "prompts": [prompt, prompt[3:26], prompt[20:29]], "max_tokens": [16, 5, 12],
                       "late": prompt[5:18]})
    prompts = _demo_prompts()
    checks.append({"check": "greedy", "model": str(DEMO), "prompt": prompts[0], "n": 60})
    checks.append({"check": "batch", "model": str(DEMO), "prompts": prompts[:3], "max_tokens": [60, 8, 60],
                   "late": prompts[3]})
    checks.append({"check": "batch_generate", "model": str(DEMO), "prompts": prompts, "max_tokens": 80})
    results = _driver(dropin, "api", checks, cwd)
    by_key = {}
    for spec, r in zip(checks, results):
        assert "error" not in r, f"{spec['check']} on {spec['model']}:\n{r.get('error')}"
        by_key[(spec["check"], Path(spec["model"]).name)] = r["result"]
    return by_key


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_mlx_lm_greedy_decode_matches_golden(api, name):
    """mlx-lm's generate_step with the dropped-in file continues the golden prompt as the reference did."""
    assert api[("greedy", name)] == _golden(name)["decode_greedy_ids"][0].tolist()


def test_mlx_lm_greedy_on_demo_matches_ours(api):
    """Same greedy tokens as phiflash_mlx.generate, and the right answer."""
    import phiflash_mlx
    from phiflash_mlx.generate import stream_generate

    model, tok = phiflash_mlx.load(str(DEMO))
    pieces = list(stream_generate(model, tok, [{"role": "user", "content": QUESTION}], max_tokens=60, temp=0))
    assert pieces[-1].finish_reason == "stop"  # ours stopped at an end token, which it does not yield
    ours = [p.token for p in pieces if p.token is not None]
    theirs = api[("greedy", "model")]  # generate_step does not stop: the end token, then more
    assert theirs[: len(ours)] == ours and theirs[len(ours)] in tok.eos_token_ids
    assert tok.decode(ours) == ANSWER


@pytest.mark.parametrize("name", [*GOLDEN_MODELS, "model"])
def test_mlx_lm_batch_generator_equals_single_sequences(api, name):
    """BatchGenerator: left-padded prompts of different lengths, sequences finishing at different steps
    (filter), one joining mid-generation (merge/extend): each equals its single-sequence run."""
    r = api[("batch", name)]
    assert r["batched"] == r["single"]
    if name != "model":
        assert r["single"][0] == _golden(name)["decode_greedy_ids"][0].tolist()


def test_mlx_lm_batch_generate_on_demo(api):
    """batch_generate equals stream_generate one prompt at a time, and the answers are right."""
    r = api[("batch_generate", "model")]
    assert r["batched"] == r["single"]
    answers = [t.rsplit("</think>", 1)[-1].strip() for t in r["texts"]]
    assert answers == ["525", "335", "342", "17"], r["texts"]


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_mlx_lm_prompt_cache_file_round_trip(api, name):
    r = api[("prompt_cache_file", name)]
    assert r["loaded_types"] == r["types"] and r["meta"] == {"note": "phi4flash"}
    golden = _golden(name)["decode_greedy_ids"][0].tolist()
    assert r["from_loaded"] == r["from_original"] == golden


# --- command-line tools ----------------------------------------------------------------------


def _tiny_lora_data(directory: Path) -> Path:
    from phiflash_mlx.demo import tasks

    directory.mkdir()
    for split, seed in (("train", 1), ("valid", 2)):
        with open(directory / f"{split}.jsonl", "w") as f:
            for p in tasks.problems(8, seed=seed):
                messages = [*p.messages, {"role": "assistant", "content": p.response}]
                f.write(json.dumps({"messages": messages}) + "\n")
    return directory


@pytest.fixture(scope="module")
def cli(dropin, tmp_path_factory) -> dict:
    """mlx-lm's command-line entry points on the demo, in one subprocess, each with its own argv."""
    cwd = tmp_path_factory.mktemp("mlx_lm_cli")
    demo = str(DEMO)
    data = _tiny_lora_data(cwd / "data")
    greedy = ["--max-tokens", "80", "--temp", "0"]
    steps = [
        {"name": "generate", "argv": ["mlx_lm.generate", "--model", demo, "--prompt", QUESTION, *greedy]},
        {"name": "generate-system", "argv": ["mlx_lm.generate", "--model", demo, "--prompt", SUBTRACTION,
                                             "--system-prompt", "You are a calculator.", *greedy]},
        # the cached prefix ends inside the number, so both parts tokenize as the whole question does
        {"name": "cache_prompt", "argv": ["mlx_lm.cache_prompt", "--model", demo, "--prompt", "What is 45",
                                          "--prompt-cache-file", str(cwd / "prefix.safetensors")]},
        {"name": "generate-cached", "argv": ["mlx_lm.generate", "--model", demo, "--prompt-cache-file",
                                             str(cwd / "prefix.safetensors"), "--prompt", "7 + 68?", *greedy]},
        {"name": "kv-bits", "argv": ["mlx_lm.generate", "--model", demo, "--prompt", QUESTION, "--kv-bits", "8",
                                     "--quantized-kv-start", "0", *greedy]},
        {"name": "benchmark", "argv": ["mlx_lm.benchmark", "--model", demo, "-p", "24", "-g", "8", "-b", "4",
                                       "-n", "1"]},
        {"name": "lora", "argv": ["mlx_lm.lora", "--model", demo, "--train", "--data", str(data), "--iters", "2",
                                  "--batch-size", "2", "--num-layers", "8", "--val-batches", "1",
                                  "--steps-per-report", "1", "--steps-per-eval", "2",
                                  "--adapter-path", str(cwd / "adapters")]},
        {"name": "generate-adapter", "argv": ["mlx_lm.generate", "--model", demo, "--adapter-path",
                                              str(cwd / "adapters"), "--prompt", QUESTION, *greedy]},
        {"name": "chat", "argv": ["mlx_lm.chat", "--model", demo, "--max-tokens", "80"],
         "stdin": f"{QUESTION}\nr\n{SUBTRACTION}\nq\n"},
        {"name": "convert", "argv": ["mlx_lm.convert", "--hf-path", demo, "--mlx-path", str(cwd / "converted")]},
        {"name": "convert-q4", "argv": ["mlx_lm.convert", "--hf-path", demo, "--mlx-path", str(cwd / "q4"),
                                        "-q", "--q-bits", "4", "--q-group-size", "32"]},
        {"name": "generate-q4", "argv": ["mlx_lm.generate", "--model", str(cwd / "q4"), "--prompt", QUESTION,
                                         *greedy]},
    ]
    results = {r["name"]: r for r in _driver(dropin, "steps", steps, cwd)}
    results["_cwd"] = cwd
    return results


def _ok(cli: dict, name: str) -> str:
    r = cli[name]
    assert r["rc"] == 0, f"{name} exited {r['rc']}:\n{r['out'][-3000:]}\n{r['err'][-3000:]}"
    return r["out"]


def _generated(out: str) -> str:
    """The response mlx_lm.generate prints between its ========== lines."""
    parts = out.split("==========")
    assert len(parts) >= 3, out
    return parts[1].strip()


def test_mlx_lm_generate(cli):
    assert _generated(_ok(cli, "generate")) == ANSWER
    assert _generated(_ok(cli, "generate-system")).endswith("</think>335")


def test_mlx_lm_generate_with_prompt_cache_file(cli):
    _ok(cli, "cache_prompt")
    assert (cli["_cwd"] / "prefix.safetensors").is_file()
    assert _generated(_ok(cli, "generate-cached")) == ANSWER


def test_mlx_lm_benchmark_batch_4(cli):
    out = _ok(cli, "benchmark")
    assert "batch_size=4" in out and "generation_tps=" in out


def test_mlx_lm_lora_train_two_iterations(cli):
    out = _ok(cli, "lora")
    adapters = cli["_cwd"] / "adapters"
    assert (adapters / "adapters.safetensors").is_file() and (adapters / "adapter_config.json").is_file()
    assert "Trainable parameters" in out
    # two steps at lr 1e-5 barely move the LoRA weights: the answer stays
    assert _generated(_ok(cli, "generate-adapter")) == ANSWER


def test_mlx_lm_chat(cli):
    out = _ok(cli, "chat")
    assert ANSWER in out and "</think>335" in out, out[-2000:]


def test_mlx_lm_convert_then_phiflash_load(cli):
    """mlx_lm.convert rewrites the tokenizer files (tokenizer.json only, no tokenizer.model); our
    loader reads the result and gives the demo's tokens and answer."""
    import phiflash_mlx

    _ok(cli, "convert")
    out = cli["_cwd"] / "converted"
    assert not (out / "tokenizer.model").exists() and (out / "tokenizer.json").is_file()
    model, tok = phiflash_mlx.load(str(out))
    _, demo_tok = phiflash_mlx.load(str(DEMO))
    messages = [{"role": "user", "content": QUESTION}]
    assert tok.apply_chat_template(messages) == demo_tok.apply_chat_template(messages)
    assert phiflash_mlx.generate(model, tok, messages, temp=0, max_tokens=80) == ANSWER


def test_mlx_lm_convert_quantized_generates(cli):
    _ok(cli, "convert-q4")
    config = json.loads((cli["_cwd"] / "q4" / "config.json").read_text())
    assert config["quantization"]["bits"] == 4 and config["quantization"]["group_size"] == 32
    assert _generated(_ok(cli, "generate-q4")).endswith("525")


def test_mlx_lm_kv_bits_refused_with_mlx_lms_message(cli):
    """--kv-bits: mlx-lm quantizes every cache that has to_quantized; its RotatingKVCache (the
    sliding-window layers) has no quantized form, so it stops with its own message, as for every
    sliding-window model in mlx-lm (README). The growing shared K/V can be quantized: next test."""
    r = cli["kv-bits"]
    assert r["rc"] != 0 and "RotatingKVCache Quantization NYI" in r["err"], r


@pytest.mark.parametrize("name", GOLDEN_MODELS)
def test_mlx_lm_quantized_shared_kv_decodes(api, name):
    """The full-attention layer's KVCache turned into mlx-lm's QuantizedKVCache (8 bits) after the
    prefill: greedy decode still gives the golden continuation, step logits within 8-bit noise."""
    r = api[("quantized_kv", name)]
    golden = _golden(name)
    assert len(r["quantized_layers"]) == 1 and "QuantizedKVCache" in r["types"]
    assert r["tokens"] == golden["decode_greedy_ids"][0].tolist()
    err = np.abs(np.array(r["step_logits"]) - golden["decode_step_logits"][0]).max()
    assert err < 0.05, err


# --- server ----------------------------------------------------------------------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_mlx_lm_server_chat(dropin, tmp_path):
    port = _free_port()
    log = open(tmp_path / "server.log", "w")
    proc = subprocess.Popen(
        [sys.executable, str(DRIVER), str(dropin), "run", "mlx_lm.server", "--model", str(DEMO),
         "--host", "127.0.0.1", "--port", str(port)],
        stdout=log, stderr=subprocess.STDOUT, env=_env(), cwd=tmp_path,
    )
    try:
        body = json.dumps({"messages": [{"role": "user", "content": QUESTION}], "max_tokens": 80,
                           "temperature": 0}).encode()
        deadline = time.monotonic() + 120
        while True:
            try:
                request = urllib.request.Request(f"http://127.0.0.1:{port}/v1/chat/completions", data=body,
                                                 headers={"Content-Type": "application/json"})
                with urllib.request.urlopen(request, timeout=60) as response:
                    reply = json.loads(response.read())
                break
            except (ConnectionError, urllib.error.URLError):
                if proc.poll() is not None or time.monotonic() > deadline:
                    log.flush()
                    pytest.fail("mlx_lm.server did not answer:\n" + (tmp_path / "server.log").read_text()[-3000:])
                time.sleep(0.3)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()
    message = reply["choices"][0]["message"]
    assert reply["choices"][0]["finish_reason"] == "stop"
    # mlx-lm separates the <think> section (the demo's vocabulary has the tags) as "reasoning"
    assert message["content"].strip() == "525", reply
    assert message.get("reasoning", "").strip() == "457+68: u:7+8+0=15, t:5+6+1=12, h:4+0+1=05. so 525", reply
