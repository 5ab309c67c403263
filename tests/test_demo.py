"""The demo model: its problems and traces, a short training run, and the shipped checkpoint."""

import json
import random
import re

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import phiflash_mlx
import reference
from phiflash_mlx.cli import main as cli_main
from phiflash_mlx.demo import DEMO_MODEL_DIR, demo_model_path, tasks
from phiflash_mlx.generate import split_reasoning

SHIPPED = (DEMO_MODEL_DIR / "model.safetensors").exists()
needs_shipped = pytest.mark.skipif(not SHIPPED, reason="the demo checkpoint has not been trained yet")


# --- problems and traces ---------------------------------------------------------------------

COLUMN = re.compile(r"([uthk]):(\d+)([+\-*])(\d+)[+\-](\d)=(\d+)")


def replay(trace: str, kind: str) -> int:
    """Check every column of a trace and rebuild the result from it, least significant first."""
    head, _, tail = trace.partition(": ")
    body, _, final = tail.rpartition(". so ")
    digits, carry = [], 0
    for i, col in enumerate(body.split(", ")):
        place, x, op, y, c, r = COLUMN.fullmatch(col).groups()
        assert place == tasks.PLACES[i] and int(c) == carry
        x, y, r = int(x), int(y), int(r)
        if kind == "sub":
            assert x - y - carry == r and 0 <= r <= 9
            carry = x // 10                      # a borrowed minuend is written as 1x
        else:
            assert (x + y + carry if kind == "add" else x * y + carry) == r
            carry = r // 10
        digits.append(r % 10)
    value = sum(d * 10 ** i for i, d in enumerate(digits)) + carry * 10 ** len(digits) * (kind != "sub")
    assert int(final) == value
    return value


@given(a=st.integers(0, 999), b=st.integers(0, 999), kind=st.sampled_from(tasks.KINDS))
def test_traces_compute_the_answer(a, b, kind):
    if kind == "sub" and a < b:
        a, b = b, a
    if kind == "mul":
        a, b = max(a, 10), b % 8 + 2
    p = tasks.make_problem(kind, a, b, random.Random(0))
    assert replay(p.trace, kind) == p.answer == tasks.RESULTS[kind](a, b)
    assert split_reasoning(p.response) == (p.trace, str(p.answer))


def test_problem_lists_are_reproducible_and_cover_every_kind():
    first, again = tasks.problems(60, seed=3), tasks.problems(60, seed=3)
    assert first == again
    assert first != tasks.problems(60, seed=4)
    assert {p.kind for p in first} == set(tasks.KINDS)
    for p in first:
        assert p.a < 1000 and p.b < 1000 and p.answer >= 0
        assert str(p.a) in p.question and str(p.b) in p.question


# --- a short training run ----------------------------------------------------------------------

TINY = dict(hidden_size=32, intermediate_size=64, num_attention_heads=4, num_key_value_heads=2,
            mamba_d_state=4, mamba_expand=1, sliding_window=8)


@pytest.fixture(scope="module")
def smoke_checkpoint(tmp_path_factory):
    from phiflash_mlx.demo import train

    out = tmp_path_factory.mktemp("demo")
    losses = []
    summary = train.train(out, steps=4, batch=4, length=88, warmup=1, log_every=1,
                          config=dict(train.MODEL_CONFIG, **TINY), log=losses.append)
    return out, summary, losses


def test_training_steps_run_and_write_a_loadable_checkpoint(smoke_checkpoint):
    out, summary, log = smoke_checkpoint
    assert summary["steps"] == 4 and np.isfinite(summary["final_loss"])
    assert sum(line.startswith("step ") for line in log) == 4
    for name in ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json",
                 "generation_config.json"):
        assert (out / name).is_file(), name
    config = json.loads((out / "config.json").read_text())
    assert config["model_type"] == "phi4flash" and config["num_hidden_layers"] == 8
    model, tok = phiflash_mlx.load(str(out))
    assert model.args.layer_kinds[:6] == ["mamba", "swa", "mamba", "swa", "mamba_mem", "global"]
    text = phiflash_mlx.generate(model, tok, [{"role": "user", "content": "What is 12 + 34?"}],
                                 max_tokens=4, temp=0)
    assert isinstance(text, str)


def test_smoke_checkpoint_is_hugging_face_layout(smoke_checkpoint):
    out = smoke_checkpoint[0]
    store = reference.open_checkpoint(str(out))
    conv = [n for n in store.names() if n.endswith("conv1d.weight")]
    assert len(conv) == 3 and all(store.shape(n) == (TINY["hidden_size"], 1, 4) for n in conv)
    ref = reference.load(str(out))
    model, _ = phiflash_mlx.load(str(out))
    ids = np.array([[5, 9, 40, 41, 42, 60, 61, 70, 80, 100, 120, 8]])
    np.testing.assert_allclose(np.array(model(mx.array(ids))), ref.forward(ids), atol=1e-4, rtol=0)


def test_same_seed_same_first_steps(tmp_path):
    from phiflash_mlx.demo import train

    runs = []
    for name in ("a", "b"):
        log = []
        train.train(tmp_path / name, steps=2, batch=2, length=88, warmup=1, log_every=1,
                    config=dict(train.MODEL_CONFIG, **TINY), log=log.append)
        runs.append([line.split("lr")[0] for line in log if line.startswith("step ")])
    assert runs[0] == runs[1]


# --- the shipped checkpoint ------------------------------------------------------------------------

@needs_shipped
def test_shipped_model_is_small_and_complete():
    path = demo_model_path()
    size = sum(f.stat().st_size for f in path.iterdir() if f.is_file())
    assert size <= 10 * 1024 * 1024
    config = json.loads((path / "config.json").read_text())
    assert config["model_type"] == "phi4flash"
    model, tok = phiflash_mlx.load(str(path))
    kinds = [k if isinstance(k, str) else "gmu" for k in model.args.layer_kinds]
    assert kinds == ["mamba", "swa", "mamba", "swa", "mamba_mem", "global", "gmu", "cross"]
    for special in ("<|system|>", "<|user|>", "<|assistant|>", "<|end|>", "<|endoftext|>", "<think>", "</think>"):
        assert special in tok.added_tokens
        assert tok.encode(special, allow_special=True) == [tok.added_tokens[special].id]
    assert set(tok.eos_token_ids) == {tok.added_tokens["<|end|>"].id, tok.added_tokens["<|endoftext|>"].id}


@needs_shipped
def test_shipped_weights_reference_and_mlx_agree():
    path = demo_model_path()
    ref = reference.load(str(path))
    model, tok = phiflash_mlx.load(str(path))
    p = tasks.problems(1, seed=99)[0]
    ids = tok.apply_chat_template(p.messages) + tok.encode(p.response, allow_special=True)
    ids = np.array([ids])
    np.testing.assert_allclose(np.array(model(mx.array(ids))), ref.forward(ids), atol=1e-4, rtol=0)


@needs_shipped
def test_shipped_model_answers_a_question():
    model, tok = phiflash_mlx.load(str(demo_model_path()))
    p = tasks.make_problem("add", 457, 68, random.Random(0))
    text = phiflash_mlx.generate(model, tok, p.messages, max_tokens=96, temp=0)
    assert text == p.response
    assert split_reasoning(text) == (p.trace, "525")


@needs_shipped
def test_eval_demo_command(capsys):
    assert cli_main(["eval-demo", "--n", "2", "--types", "add,mul"]) == 0
    out = capsys.readouterr().out
    assert "addition" in out and "multiplication" in out and "subtraction" not in out
    assert cli_main(["eval-demo", "--n", "1", "--types", "div"]) == 1


def _accuracy(kind, path=None):
    from phiflash_mlx.demo.evaluate import evaluate

    model, tok = phiflash_mlx.load(str(path or demo_model_path()))
    return evaluate(model, tok, n=200, kinds=[kind])[kind]["accuracy"]


@needs_shipped
@pytest.mark.slow
@pytest.mark.parametrize("kind", ["add", "sub"])
def test_shipped_model_accuracy_add_sub(kind):
    assert _accuracy(kind) >= 0.95


@needs_shipped
@pytest.mark.slow
def test_shipped_model_accuracy_mul():
    assert _accuracy("mul") >= 0.90


@needs_shipped
@pytest.mark.slow
def test_4bit_copy_loses_at_most_two_points(tmp_path):
    """`phiflash convert -q` (4 bits, groups of 64) of the shipped model: held-out accuracy per type
    within 2 points of the unquantized model's."""
    from phiflash_mlx.convert import convert

    q4 = convert(str(demo_model_path()), str(tmp_path / "q4"), quantize=True, q_bits=4, q_group_size=64)
    for kind in ("add", "sub", "mul"):
        assert _accuracy(kind, q4) >= _accuracy(kind) - 0.02, kind


def test_quantization_aware_training_sees_the_rounding_with_identity_gradient():
    import mlx.core as mx
    import mlx.nn as nn
    from phiflash_mlx.demo.train import fake_quantize, quantization_aware

    w = mx.random.normal((8, 64), key=mx.random.key(0))
    q = fake_quantize(w, 4, 64)
    ref = mx.dequantize(*mx.quantize(w, group_size=64, bits=4), group_size=64, bits=4)
    assert mx.allclose(q, ref).item() and not mx.allclose(q, w).item()
    grad = mx.grad(lambda v: (fake_quantize(v, 4, 64) * 3.0).sum())(w)
    assert mx.allclose(grad, mx.full(w.shape, 3.0)).item()           # straight-through
    layer = nn.Linear(64, 8, bias=False)
    layer.weight = w
    x = mx.random.normal((2, 64), key=mx.random.key(1))
    with quantization_aware(4):
        inside = layer(x)
    assert mx.allclose(inside, x @ ref.T, atol=1e-5).item()
    assert mx.allclose(layer(x), x @ w.T, atol=1e-5).item()          # restored afterwards
