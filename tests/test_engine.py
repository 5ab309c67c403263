"""The serving engine without HTTP: batching, cancellation during prefill, checkpoints over many
requests, the thinking budget, shutdown. On the bundled demo model.

MLX keeps streams per thread, so the engine runs on the test's own thread and the "clients" on
helper threads, as `phiflash serve` does it.
"""

import re
import subprocess
import sys
import threading

import mlx.core as mx
import pytest

import phiflash_mlx
from conftest import ROOT
from phiflash_mlx.demo import demo_model_path
from phiflash_mlx.generate import SamplingParams
from phiflash_mlx.serving import CheckpointStore, Engine, QueueFull, Request, ShuttingDown

GREEDY = SamplingParams(temp=0)


@pytest.fixture(scope="module")
def demo():
    return phiflash_mlx.load(demo_model_path())


def _ids(tokenizer, question):
    return list(tokenizer.apply_chat_template([{"role": "user", "content": question}], add_generation_prompt=True))


def drive(engine, client):
    """Run `client()` on a helper thread while the engine runs here; returns what it returned."""
    out, done = {}, threading.Event()

    def run():
        try:
            out["value"] = client()
        except BaseException as exc:  # re-raised on the test thread
            out["error"] = exc
        finally:
            done.set()

    threading.Thread(target=run, daemon=True).start()
    engine.run(done.is_set)
    if "error" in out:
        raise out["error"]
    return out.get("value")


def _text(pieces):
    return "".join(p.text for p in pieces)


QUESTIONS = ["What is 457 + 68?", "Subtract 68 from 403.", "What is 57 * 6?", "What is 12 + 30?",
             "What is 9 + 9?", "What is 300 - 45?", "What is 81 * 3?", "What is 7 + 615?"]


def test_importing_the_engine_needs_no_fastapi():
    code = "import sys, phiflash_mlx.serving; print('fastapi' in sys.modules, 'uvicorn' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and out.stdout.split() == ["False", "False"], out.stderr


def test_batched_greedy_equals_each_request_alone(demo):
    model, tokenizer = demo
    prompts = [_ids(tokenizer, q) for q in QUESTIONS]
    alone = [list(phiflash_mlx.stream_generate(model, tokenizer, p, max_tokens=50, temp=0)) for p in prompts]
    engine = Engine(model, tokenizer, max_batch=8, prefill_step_size=8)
    results = [None] * len(prompts)

    def clients():
        threads = [threading.Thread(target=lambda i=i: results.__setitem__(
            i, list(engine.generate(prompts[i], 50, GREEDY)))) for i in range(len(prompts))]
        for t in threads:
            t.start()
        for t in threads:
            t.join(120)

    steps = []
    engine.on_step = lambda info: steps.append(info["running"])
    drive(engine, clients)
    assert max(steps) > 1                                              # they did share decode steps
    for got, want in zip(results, alone):
        assert [p.token for p in got] == [p.token for p in want]
        assert _text(got) == _text(want)
        assert got[-1].finish_reason == want[-1].finish_reason


def test_cancel_during_prefill_stops_after_the_current_chunk(demo):
    model, tokenizer = demo
    long_prompt = _ids(tokenizer, "What is 12 + 30? " * 40)
    chunk = 16
    assert len(long_prompt) > 10 * chunk
    engine = Engine(model, tokenizer, prefill_step_size=chunk)
    job = Request(long_prompt, 20, GREEDY)
    chunks = []

    def on_step(info):
        if info["prompt"]:
            chunks.append(info["prompt"])
            job.cancelled.set()                                        # the client leaves after the first chunk

    engine.on_step = on_step
    ended = threading.Event()
    job.emit = lambda item: ended.set() if item[0] == "end" else None
    drive(engine, lambda: (engine.submit(job), ended.wait(60)))
    assert ended.is_set()
    assert len(chunks) <= 2, chunks
    assert engine.status()["cancelled"] == 1 and engine.status()["last"]["generation_tokens"] == 0


def test_checkpoints_stay_within_budget_over_200_requests(demo):
    model, tokenizer = demo
    probe = CheckpointStore()
    engine = Engine(model, tokenizer, checkpoints=probe, max_batch=8)
    drive(engine, lambda: list(engine.generate(_ids(tokenizer, QUESTIONS[0]), 4, GREEDY)))
    one = probe.nbytes / max(len(probe), 1)
    budget = int(3.5 * one)                                            # room for about three snapshots
    store = CheckpointStore(max_bytes=budget)
    engine = Engine(model, tokenizer, checkpoints=store, max_batch=8)
    seen = []
    engine.on_step = lambda info: seen.append(store.nbytes)
    memory = {}

    def clients():
        for group in range(25):
            threads = [threading.Thread(target=lambda k=k: list(engine.generate(
                _ids(tokenizer, f"What is {group} + {k + 10 * group}?"), 4, GREEDY))) for k in range(8)]
            for t in threads:
                t.start()
            for t in threads:
                t.join(60)
            if group == 2:
                memory["early"] = mx.get_active_memory()
        memory["late"] = mx.get_active_memory()

    drive(engine, clients)
    status = engine.status()
    assert status["completed"] == 200 and status["failed"] == 0
    assert max(seen) <= budget and store.nbytes <= budget
    assert store.evictions > 0 and store.saved == 2 * 200                # end of prompt, end of answer
    assert memory["late"] - memory["early"] <= budget + (1 << 20), memory


def test_a_resumed_conversation_matches_a_fresh_one(demo):
    model, tokenizer = demo
    store = CheckpointStore()
    engine = Engine(model, tokenizer, checkpoints=store)
    conversation = [{"role": "user", "content": QUESTIONS[0]}]

    def turn(messages):
        from phiflash_mlx.serving import message_cuts
        ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        return list(engine.generate(ids, 60, GREEDY, cuts=message_cuts(tokenizer, messages, ids)))

    def clients():
        out = []
        messages = list(conversation)
        for k in range(3):
            pieces = turn(messages)
            out.append((list(messages), pieces))
            answer = "".join(p.text for p in pieces if not p.reasoning)
            messages += [{"role": "assistant", "content": answer}, {"role": "user", "content": QUESTIONS[k + 1]}]
        return out

    turns = drive(engine, clients)
    assert turns[0][1][-1].cached_tokens == 0
    for messages, pieces in turns[1:]:
        assert pieces[-1].cached_tokens > 0
        fresh = list(phiflash_mlx.stream_generate(model, tokenizer, messages, max_tokens=60, temp=0))
        assert [p.token for p in pieces] == [p.token for p in fresh]


@pytest.mark.parametrize("budget", [0, 3, 12])
def test_thinking_budget_closes_the_reasoning_and_the_answer_is_a_number(demo, budget):
    model, tokenizer = demo
    prompt = [{"role": "user", "content": "What is 457 + 68?"}]
    open_id, close_id = tokenizer.added_tokens["<think>"].id, tokenizer.added_tokens["</think>"].id
    pieces = list(phiflash_mlx.stream_generate(model, tokenizer, prompt, max_tokens=80, temp=0,
                                               max_thinking_tokens=budget))
    tokens = [p.token for p in pieces if p.token is not None]
    start = tokens.index(open_id)
    assert tokens.index(close_id) - start - 1 == budget                # closed right at the budget
    text = phiflash_mlx.generate(model, tokenizer, prompt, max_tokens=80, temp=0, max_thinking_tokens=budget)
    assert re.search(r"</think>\d+$", text), text                       # the model still ends with a number
    # the engine applies the same budget to a batched request
    engine = Engine(model, tokenizer)
    got = drive(engine, lambda: list(engine.generate(_ids(tokenizer, prompt[0]["content"]), 80, GREEDY,
                                                     max_thinking_tokens=budget)))
    assert [p.token for p in got] == [p.token for p in pieces]


def test_without_a_budget_the_model_thinks_as_trained(demo):
    model, tokenizer = demo
    text = phiflash_mlx.generate(model, tokenizer, [{"role": "user", "content": "What is 457 + 68?"}], temp=0)
    assert text == "<think>457+68: u:7+8+0=15, t:5+6+1=12, h:4+0+1=05. so 525</think>525"
    with pytest.raises(phiflash_mlx.errors.PhiflashError, match="max_thinking_tokens"):
        phiflash_mlx.generate(model, tokenizer, "hi", max_thinking_tokens=-1)


def test_shutdown_rejects_the_queue_and_cancels_after_the_grace(demo):
    model, tokenizer = demo
    engine = Engine(model, tokenizer, max_batch=1, max_queue=1)
    events = {"running": [], "queued": []}
    running = Request(_ids(tokenizer, QUESTIONS[0]), 10_000, GREEDY, stop_on_eos=False,
                      emit=events["running"].append)
    queued = Request(_ids(tokenizer, QUESTIONS[1]), 5, GREEDY, emit=events["queued"].append)
    started = threading.Event()
    engine.on_step = lambda info: started.set()

    def client():
        engine.submit(running)
        assert started.wait(30)
        engine.submit(queued)
        with pytest.raises(QueueFull):
            engine.submit(Request([1, 2], 5, GREEDY))
        engine.shutdown(grace=0.2)
        with pytest.raises(ShuttingDown):
            engine.submit(Request([1, 2], 5, GREEDY))

    drive(engine, client)
    assert events["queued"][0][:2] == ("error", 503) and events["queued"][-1] == ("end",)
    assert events["running"][-2][:2] == ("error", 503) and events["running"][-1] == ("end",)
    pieces = [e for e in events["running"] if e[0] == "piece"]
    assert 0 < len(pieces) < 10_000


def test_max_thinking_tokens_on_the_command_line():
    demo = str(demo_model_path())
    out = subprocess.run([sys.executable, "-m", "phiflash_mlx.cli", "generate", "--model", demo, "--temp", "0",
                          "--prompt", "What is 457 + 68?", "--json", "--max-thinking-tokens", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    import json
    result = json.loads(out.stdout)
    assert result["reasoning"] == "" and re.search(r"\d+$", result["answer"])
    bad = subprocess.run([sys.executable, "-m", "phiflash_mlx.cli", "chat", "--model", demo,
                          "--max-thinking-tokens", "-2"], cwd=ROOT, capture_output=True, text=True, timeout=120,
                         input="")
    assert bad.returncode != 0 and bad.stderr.strip().count("\n") == 0 and "--max-thinking-tokens" in bad.stderr
