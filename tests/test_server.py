"""``phiflash serve``: the OpenAI-compatible server, exercised with the official ``openai`` client.

The server runs as a ``phiflash serve`` subprocess on a free 127.0.0.1 port (generation runs on its
main thread, as in real use). The reasoning split is checked in-process against a scripted engine,
since the tiny test model never writes <think> sections.
"""

import json
import os
import re
import subprocess
import sys
import threading
import time

import pytest

pytest.importorskip("fastapi", reason="the server tests need the 'server' extra (fastapi)")
pytest.importorskip("uvicorn", reason="the server tests need the 'server' extra (uvicorn)")
openai = pytest.importorskip("openai", reason="the server tests need the openai client")
httpx = pytest.importorskip("httpx", reason="the server tests need httpx")

from chat_fixture import build_chat_model_dir  # noqa: E402
from conftest import ROOT  # noqa: E402

MAX_CONTEXT = 512
QUESTION = [{"role": "user", "content": "what is 3 plus 4?"}]


def _start_server(model_dir, log_file, *extra, max_context=MAX_CONTEXT):
    cmd = [sys.executable, "-m", "phiflash_mlx.cli", "serve", "--model", str(model_dir), "--host", "127.0.0.1",
           "--port", "0", "--log-level", "warning", "--max-context", str(max_context), *extra]
    env = dict(os.environ, PYTHONUNBUFFERED="1")
    log = open(log_file, "w")
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.time() + 60
    while time.time() < deadline:
        match = re.search(r"at (http://127\.0\.0\.1:\d+)/v1", log_file.read_text())
        if match:
            return proc, match.group(1)
        if proc.poll() is not None:
            break
        time.sleep(0.1)
    proc.kill()
    raise AssertionError(f"the server did not start:\n{log_file.read_text()}")


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return build_chat_model_dir(tmp_path_factory.mktemp("servemodel") / "tiny-chat")


def _served(model_dir, tmp_path_factory, log_name, *args, **kwargs):
    """Run `phiflash serve` for a fixture: yields its URL; SIGTERM at the end must exit 0."""
    log_file = tmp_path_factory.mktemp("servelog") / log_name
    proc, url = _start_server(model_dir, log_file, *args, **kwargs)
    yield url
    proc.terminate()
    try:
        assert proc.wait(timeout=15) == 0, log_file.read_text()
    finally:
        if proc.poll() is None:
            proc.kill()


@pytest.fixture(scope="module")
def server(model_dir, tmp_path_factory):
    yield from _served(model_dir, tmp_path_factory, "serve.log")


@pytest.fixture
def client(server):
    return openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)


def _health(server):
    return httpx.get(server + "/health", timeout=10).json()


def _chat(client, messages=QUESTION, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    return client.chat.completions.create(model="tiny-chat", messages=messages, **kw)


def _stream_chat(client, messages=QUESTION, **kw):
    kw = {"max_tokens": 12, "temperature": 0, **kw}
    content, reasoning, finish, usage = [], [], None, None
    for chunk in client.chat.completions.create(model="tiny-chat", messages=messages, stream=True,
                                                stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            content.append(choice.delta.content or "")
            reasoning.append(getattr(choice.delta, "reasoning_content", None) or "")
            assert getattr(choice.delta, "reasoning", None) == getattr(choice.delta, "reasoning_content", None)
            finish = choice.finish_reason or finish
    return "".join(content), "".join(reasoning), finish, usage


# --- the endpoints ----------------------------------------------------------------------------

def test_models_lists_the_loaded_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny-chat"]
    assert client.models.retrieve("tiny-chat").id == "tiny-chat"


def test_chat_non_streaming_and_streaming_agree(client, model_dir):
    import phiflash_mlx
    _, tokenizer = phiflash_mlx.load(str(model_dir))
    prompt_tokens = len(tokenizer.apply_chat_template(QUESTION, add_generation_prompt=True))

    whole = _chat(client, max_tokens=10)
    choice = whole.choices[0]
    assert whole.object == "chat.completion" and whole.model == "tiny-chat"
    assert choice.message.role == "assistant" and isinstance(choice.message.content, str)
    assert choice.finish_reason in ("stop", "length")
    assert whole.usage.prompt_tokens == prompt_tokens
    assert whole.usage.total_tokens == prompt_tokens + whole.usage.completion_tokens
    if choice.finish_reason == "length":
        assert whole.usage.completion_tokens == 10

    content, reasoning, finish, usage = _stream_chat(client, max_tokens=10)
    assert content == choice.message.content
    assert finish == choice.finish_reason
    assert usage is not None
    assert (usage.prompt_tokens, usage.completion_tokens, usage.total_tokens) == \
        (whole.usage.prompt_tokens, whole.usage.completion_tokens, whole.usage.total_tokens)


def test_max_completion_tokens_and_length_finish(client):
    out = client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_completion_tokens=3,
                                         temperature=0, extra_body={"ignore_eos": True})
    assert out.choices[0].finish_reason == "length"
    assert out.usage.completion_tokens == 3


def test_completions_streaming_usage_and_stop(client):
    kw = dict(model="tiny-chat", prompt="what is 3 plus", max_tokens=16, temperature=0,
              extra_body={"ignore_eos": True})
    whole = client.completions.create(**kw)
    text = whole.choices[0].text
    assert whole.object == "text_completion" and whole.choices[0].finish_reason == "length"
    assert whole.usage.completion_tokens == 16
    assert whole.usage.total_tokens == whole.usage.prompt_tokens + 16

    pieces, usage, finish = [], None, None
    for chunk in client.completions.create(stream=True, stream_options={"include_usage": True}, **kw):
        usage = chunk.usage or usage
        for c in chunk.choices:
            pieces.append(c.text)
            finish = c.finish_reason or finish
    assert "".join(pieces) == text and finish == "length"
    assert usage.completion_tokens == 16 and usage.prompt_tokens == whole.usage.prompt_tokens

    # a stop sequence from the middle of that answer ends it just before it
    stop = next((text[i:i + 3] for i in range(2, len(text) - 3) if text[i:i + 3].strip()), None)
    if stop is not None:
        for stops in (stop, [stop, "\u2603never"]):
            cut = client.completions.create(stop=stops, **kw).choices[0]
            assert cut.text == text[:text.index(stop)] and cut.finish_reason == "stop"


def test_seed_makes_sampling_reproducible(client):
    a = _chat(client, temperature=1.0, top_p=1.0, seed=11, max_tokens=10).choices[0].message.content
    b = _chat(client, temperature=1.0, top_p=1.0, seed=11, max_tokens=10).choices[0].message.content
    assert a == b


# --- queueing and disconnects -------------------------------------------------------------------

def test_concurrent_requests_each_match_running_alone(client):
    other = [{"role": "user", "content": "what is 12 plus 30?"}]
    alone_a = _chat(client, max_tokens=14).choices[0].message.content
    alone_b = _stream_chat(client, other, max_tokens=14)[0]
    results = {}

    def run(name, fn):
        results[name] = fn()

    threads = [threading.Thread(target=run, args=("a", lambda: _chat(client, max_tokens=14).choices[0].message.content)),
               threading.Thread(target=run, args=("b", lambda: _stream_chat(client, other, max_tokens=14)[0]))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert results == {"a": alone_a, "b": alone_b}


def test_disconnect_mid_stream_stops_the_generation(client, server):
    before = _health(server)
    stream = client.chat.completions.create(model="tiny-chat", messages=QUESTION, stream=True, max_tokens=400,
                                            temperature=0, extra_body={"ignore_eos": True})
    received = 0
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            received += 1
            if received == 3:
                break
    stream.close()
    deadline = time.time() + 20
    while time.time() < deadline:
        status = _health(server)
        if status["cancelled"] > before["cancelled"] and not status["busy"]:
            break
        time.sleep(0.05)
    assert status["cancelled"] == before["cancelled"] + 1, status
    assert status["last"]["outcome"] == "cancelled"
    assert status["last"]["generation_tokens"] < 100, status     # stopped long before 400
    # and the server keeps serving
    start = time.time()
    assert _chat(client, max_tokens=4).choices[0].finish_reason in ("stop", "length")
    assert time.time() - start < 15


# --- malformed requests -------------------------------------------------------------------------

@pytest.mark.parametrize("path, body, status, param", [
    ("/v1/chat/completions", b'{"messages": [', 400, None),
    ("/v1/chat/completions", {"model": "gpt-4o", "messages": QUESTION}, 404, "model"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": -5}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_completion_tokens": 0}, 400, "max_completion_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "max_tokens": "ten"}, 400, "max_tokens"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": "hot"}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "temperature": -1}, 400, "temperature"),
    ("/v1/chat/completions", {"messages": QUESTION, "top_p": 0}, 400, "top_p"),
    ("/v1/chat/completions", {"messages": QUESTION, "stop": 3}, 400, "stop"),
    ("/v1/chat/completions", {"messages": QUESTION, "n": 2}, 400, "n"),
    ("/v1/chat/completions", {"max_tokens": 5}, 400, "messages"),
    ("/v1/chat/completions", {"messages": []}, 400, "messages"),
    ("/v1/chat/completions", {"messages": [{"role": "wizard", "content": "hi"}]}, 400, "messages.0.role"),
    ("/v1/chat/completions", [1, 2], 400, None),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "what is 1 plus 2? " * 200}]}, 400, None),
    ("/v1/completions", {"prompt": "what is 1 plus 2? " * 200}, 400, None),
    ("/v1/completions", {"prompt": [1, 2, 9999]}, 400, "prompt"),
    ("/v1/completions", {"prompt": "hi", "max_tokens": -1}, 400, "max_tokens"),
    ("/v1/completions", {"max_tokens": 3}, 400, "prompt"),
])
def test_malformed_requests_get_openai_errors(server, path, body, status, param):
    kw = {"content": body, "headers": {"Content-Type": "application/json"}} if isinstance(body, bytes) else {"json": body}
    r = httpx.post(server + path, timeout=30, **kw)
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["param"] == param
    if "1 plus 2? " * 200 in str(body):
        assert error["code"] == "context_length_exceeded"
    assert _health(server)["status"] == "ok"


def test_errors_reach_the_openai_client_and_the_server_keeps_serving(client, server):
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=QUESTION)
    with pytest.raises(openai.BadRequestError) as info:
        client.chat.completions.create(model="tiny-chat", messages=QUESTION, max_tokens=-3)
    assert info.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):                              # streaming requests too
        list(client.chat.completions.create(model="tiny-chat", messages=QUESTION, temperature=-2, stream=True))
    assert httpx.get(server + "/v1/nothing-here", timeout=10).json()["error"]["code"] == "not_found"
    assert _chat(client, max_tokens=3).choices[0].finish_reason in ("stop", "length")


# --- the reasoning split, in-process with a scripted engine ---------------------------------------

class ScriptedEngine:
    """Stands in for the engine: answers every job with fixed pieces, as the generator yields them
    for "<think> add the ones </think>\n\nthe answer is 7."."""
    max_context = 4096
    PIECES = [(" add", True), (" the ones ", True), ("", True), ("\n\n", False), ("the answer", False), (" is 7.", False)]

    def submit(self, job):
        from phiflash_mlx.generate import GenerationResponse
        for n, (text, reasoning) in enumerate(self.PIECES, 1):
            last = n == len(self.PIECES)
            job.emit(("piece", GenerationResponse(text, n, reasoning, prompt_tokens=len(job.ids), generation_tokens=n,
                                                  finish_reason="stop" if last else None)))
        job.emit(("end",))

    def status(self):
        return {}


def test_reasoning_goes_to_reasoning_content(model_dir):
    from fastapi.testclient import TestClient
    import phiflash_mlx
    from phiflash_mlx.server import create_app
    model, tokenizer = phiflash_mlx.load(str(model_dir))
    app = create_app(model, tokenizer, "tiny-chat", engine=ScriptedEngine())
    with TestClient(app) as http:
        client = openai.OpenAI(base_url="http://testserver/v1", api_key="unused", http_client=http, max_retries=0)
        message = _chat(client).choices[0].message
        assert message.content == "the answer is 7."
        assert message.reasoning_content == "add the ones "
        assert message.reasoning == "add the ones "                 # mlx-lm clients read this name
        content, reasoning, finish, usage = _stream_chat(client)
        assert (content, reasoning, finish) == ("the answer is 7.", "add the ones ", "stop")
        assert usage.completion_tokens == len(ScriptedEngine.PIECES)
        raw = client.completions.create(model="tiny-chat", prompt="what is 3 plus 4?").choices[0].text
        assert raw == "<think> add the ones </think>\n\nthe answer is 7."


# --- the command line ---------------------------------------------------------------------------

def test_help_has_examples():
    out = subprocess.run([sys.executable, "-m", "phiflash_mlx.cli", "serve", "--help"], cwd=ROOT,
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0
    assert "examples:" in out.stdout and "phiflash serve --model" in out.stdout and "--port" in out.stdout


def test_missing_extra_says_how_to_install(tmp_path, model_dir):
    (tmp_path / "fastapi.py").write_text("raise ImportError('No module named fastapi')\n")
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(tmp_path), str(ROOT)]))
    out = subprocess.run([sys.executable, "-m", "phiflash_mlx.cli", "serve", "--model", str(model_dir)],
                         cwd=ROOT, capture_output=True, text=True, timeout=60, env=env)
    assert out.returncode == 1
    assert out.stderr.strip().count("\n") == 0 and "pip install 'phiflash-mlx[server]'" in out.stderr


def test_port_in_use_is_a_clear_error(server, model_dir):
    port = server.rsplit(":", 1)[1]
    out = subprocess.run([sys.executable, "-m", "phiflash_mlx.cli", "serve", "--model", str(model_dir),
                          "--port", port], cwd=ROOT, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in out.stderr


@pytest.fixture(scope="module")
def queued_server(model_dir, tmp_path_factory):
    """One generation at a time and a queue of one: the queueing and shutdown cases."""
    yield from _served(model_dir, tmp_path_factory, "serve1.log", "--max-batch", "1", "--max-queue", "1",
                       max_context=16384)


def _wait_health(server, predicate, timeout=20):
    deadline = time.time() + timeout
    status = _health(server)
    while time.time() < deadline and not predicate(status):
        time.sleep(0.05)
        status = _health(server)
    return status


def test_a_request_that_leaves_while_queued_never_runs(queued_server):
    server = queued_server
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    before = _health(server)
    stream = client.chat.completions.create(model="tiny-chat", messages=QUESTION, stream=True, max_tokens=15000,
                                            temperature=0, extra_body={"ignore_eos": True})
    for chunk in stream:                                                 # the first request is running
        if chunk.choices and chunk.choices[0].delta.content:
            break
    with pytest.raises(httpx.TimeoutException):                          # the second waits in the queue
        httpx.post(server + "/v1/chat/completions", timeout=0.5,
                   json={"messages": QUESTION, "max_tokens": 50, "ignore_eos": True})
    stream.close()
    status = _wait_health(server, lambda s: s["cancelled"] == before["cancelled"] + 2 and not s["busy"]
                          and not s["queued"])
    assert status["cancelled"] == before["cancelled"] + 2, status
    assert status["completed"] == before["completed"], status
    assert status["last"] == {"outcome": "cancelled", "generation_tokens": 0}


def test_a_full_queue_answers_503(queued_server):
    server = queued_server
    client = openai.OpenAI(base_url=server + "/v1", api_key="unused", max_retries=0, timeout=60)
    stream = client.chat.completions.create(model="tiny-chat", messages=QUESTION, stream=True, max_tokens=15000,
                                            temperature=0, extra_body={"ignore_eos": True})
    for chunk in stream:
        if chunk.choices and chunk.choices[0].delta.content:
            break
    waiting = threading.Thread(target=lambda: httpx.post(server + "/v1/chat/completions", timeout=30,
                                                         json={"messages": QUESTION, "max_tokens": 2}))
    waiting.start()
    _wait_health(server, lambda s: s["queued"] == 1)
    r = httpx.post(server + "/v1/chat/completions", timeout=10, json={"messages": QUESTION, "max_tokens": 2})
    assert r.status_code == 503 and r.json()["error"]["code"] == "queue_full", r.text
    stream.close()
    waiting.join(timeout=30)


# --- client compatibility ------------------------------------------------------------------------

def test_stream_null_is_false_and_usage_reports_cached_tokens_and_timings(server):
    body = {"messages": QUESTION, "max_tokens": 6, "temperature": 0, "stream": None}
    first = httpx.post(server + "/v1/chat/completions", json=body, timeout=30)
    assert first.status_code == 200, first.text
    out = first.json()
    assert out["object"] == "chat.completion"
    assert set(out["timings"]) >= {"prompt_n", "prompt_ms", "prompt_per_second", "predicted_n", "predicted_ms",
                                   "predicted_per_second", "cache_n"}
    assert out["timings"]["predicted_n"] == out["usage"]["completion_tokens"]
    # the next turn of the same conversation (the answer sent back as content) resumes from a checkpoint
    answer = out["choices"][0]["message"]["content"]
    turn2 = QUESTION + [{"role": "assistant", "content": answer}, {"role": "user", "content": "and 5 plus 6?"}]
    second = httpx.post(server + "/v1/chat/completions", json=dict(body, messages=turn2), timeout=30).json()
    cached = second["usage"]["prompt_tokens_details"]["cached_tokens"]
    assert 0 < cached < second["usage"]["prompt_tokens"], second["usage"]
    assert second["timings"]["cache_n"] == cached
    assert second["timings"]["prompt_n"] == second["usage"]["prompt_tokens"] - cached


def test_a_lone_surrogate_is_a_400(server):
    raw = b'{"messages": [{"role": "user", "content": "hi \\ud800 there"}], "max_tokens": 2}'
    r = httpx.post(server + "/v1/chat/completions", content=raw, headers={"Content-Type": "application/json"},
                   timeout=30)
    assert r.status_code == 400, r.text
    assert r.json()["error"]["param"] == "messages.0.content" and "surrogate" in r.json()["error"]["message"]
    r = httpx.post(server + "/v1/completions", content=b'{"prompt": "\\udfff", "max_tokens": 2}',
                   headers={"Content-Type": "application/json"}, timeout=30)
    assert r.status_code == 400 and r.json()["error"]["param"] == "prompt", r.text


def test_eight_concurrent_streams_each_get_their_sequential_text(client, server):
    questions = [[{"role": "user", "content": f"what is {a} plus {b}?"}] for a, b in
                 [(3, 4), (12, 30), (7, 9), (21, 3), (5, 5), (30, 6), (1, 2), (18, 27)]]
    alone = [_stream_chat(client, q, max_tokens=24)[0] for q in questions]
    results = [None] * len(questions)

    def run(i):
        results[i] = _stream_chat(client, questions[i], max_tokens=24)[0]

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(questions))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == alone


def test_disconnecting_clients_leave_the_others_undisturbed(client, server):
    questions = [[{"role": "user", "content": f"what is {a} plus {a + 3}?"}] for a in range(4)]
    kw = dict(max_tokens=40, extra_body={"ignore_eos": True})
    alone = [_stream_chat(client, q, **kw)[0] for q in questions[:2]]
    results = {}

    def keep(i):
        results[i] = _stream_chat(client, questions[i], **kw)[0]

    def leave(i):
        stream = client.chat.completions.create(model="tiny-chat", messages=questions[i], stream=True,
                                                max_tokens=400, temperature=0, extra_body={"ignore_eos": True})
        for n, _ in enumerate(stream):
            if n == 3:
                break
        stream.close()

    threads = [threading.Thread(target=f, args=(i,)) for f, i in ((keep, 0), (leave, 2), (keep, 1), (leave, 3))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=120)
    assert results == {0: alone[0], 1: alone[1]}


# --- limits and host checks ----------------------------------------------------------------------

def _content_length(answer: bytes) -> int:
    for line in answer.split(b"\r\n\r\n", 1)[0].split(b"\r\n"):
        if line.lower().startswith(b"content-length:"):
            return int(line.split(b":", 1)[1])
    return 0


def _post_oversized(server: str, chunks, content_length=None) -> int:
    """POST a large body over a raw socket and return the status code. Before each chunk it checks whether
    the server has already answered (it may reject a body early and close the connection; a client that
    only reads after writing everything then meets a reset instead of the answer)."""
    import select
    import socket
    host, port = server.split("//")[1].split(":")
    head = [f"POST /v1/chat/completions HTTP/1.1", f"Host: {host}:{port}", "Content-Type: application/json"]
    head.append(f"Content-Length: {content_length}" if content_length is not None else "Transfer-Encoding: chunked")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(("\r\n".join(head) + "\r\n\r\n").encode())
        try:
            for chunk in chunks:
                if select.select([sock], [], [], 0)[0]:
                    break
                if content_length is None:
                    chunk = f"{len(chunk):x}\r\n".encode() + chunk + b"\r\n"
                sock.sendall(chunk)
            else:
                if content_length is None:
                    sock.sendall(b"0\r\n\r\n")
        except (BrokenPipeError, ConnectionResetError):
            pass
        answer = b""
        while b"\r\n\r\n" not in answer or len(answer.split(b"\r\n\r\n", 1)[1]) < _content_length(answer):
            more = sock.recv(65536)
            if not more:
                break
            answer += more
    status = int(answer.split(b" ", 2)[1])
    assert status != 413 or b"request_too_large" in answer, answer[:300]
    return status


def test_a_body_over_the_limit_is_413(server):
    big = json.dumps({"messages": [{"role": "user", "content": "x" * (5 << 20)}]}).encode()
    pieces = [big[i:i + (64 << 10)] for i in range(0, len(big), 64 << 10)]
    assert _post_oversized(server, pieces, content_length=len(big)) == 413
    # no Content-Length: the body is counted as it comes
    assert _post_oversized(server, [b"x" * (64 << 10)] * 96) == 413
    assert _health(server)["status"] == "ok"


@pytest.mark.parametrize("headers, status", [
    ({"Host": "evil.example:8080"}, 403),
    ({"Host": "localhost"}, 200),
    ({"Origin": "http://evil.example"}, 403),
    ({"Origin": "null"}, 403),
    ({"Origin": "http://localhost:3000"}, 200),
])
def test_host_and_origin_must_name_this_server(server, headers, status):
    r = httpx.get(server + "/v1/models", headers=headers, timeout=10)
    assert r.status_code == status, r.text
    if status == 403:
        assert r.json()["error"]["code"] in ("host_not_allowed", "origin_not_allowed")


def test_allowed_hosts_option():
    from phiflash_mlx.serving.http import allowed_hosts_for
    assert allowed_hosts_for("127.0.0.1") >= {"localhost", "127.0.0.1", "::1"}
    assert "box.lan" in allowed_hosts_for("127.0.0.1", ["box.lan"])
    assert allowed_hosts_for("127.0.0.1", ["*"]) is None
    assert allowed_hosts_for("0.0.0.0") is None and allowed_hosts_for("0.0.0.0", ["a.b"]) == {"a.b"}
    assert allowed_hosts_for("192.168.1.5") == {"192.168.1.5"}


def test_parsing_and_tokenizing_run_off_the_event_loop(model_dir):
    """While a request is stuck in tokenization, other endpoints answer: if the template ran on the
    event loop, /health could not answer and the test would time out."""
    from fastapi.testclient import TestClient
    import phiflash_mlx
    from phiflash_mlx.serving.http import create_app
    model, tokenizer = phiflash_mlx.load(str(model_dir))
    entered, release = threading.Event(), threading.Event()
    template = tokenizer.apply_chat_template

    class SlowTokenizer:
        def __getattr__(self, name):
            return getattr(tokenizer, name)

        def apply_chat_template(self, *a, **kw):
            entered.set()
            assert release.wait(30)
            return template(*a, **kw)

    app = create_app(model, SlowTokenizer(), "tiny-chat", engine=ScriptedEngine())
    with TestClient(app) as http:
        done = {}
        t = threading.Thread(target=lambda: done.setdefault("r", http.post(
            "/v1/chat/completions", json={"messages": QUESTION})))
        t.start()
        assert entered.wait(30)
        assert http.get("/health").status_code == 200            # answered while tokenizing
        release.set()
        t.join(30)
        assert done["r"].status_code == 200


# --- shutdown -----------------------------------------------------------------------------------

def test_sigterm_stops_within_the_grace_and_queued_requests_get_503(model_dir, tmp_path):
    import signal
    log_file = tmp_path / "serve.log"
    proc, url = _start_server(model_dir, log_file, "--max-batch", "1", "--shutdown-grace", "1", max_context=8192)
    try:
        client = openai.OpenAI(base_url=url + "/v1", api_key="unused", max_retries=0, timeout=60)
        stream = client.chat.completions.create(model="tiny-chat", messages=QUESTION, stream=True,
                                                max_tokens=8000, temperature=0, extra_body={"ignore_eos": True})
        next(iter(stream))
        queued = {}
        t = threading.Thread(target=lambda: queued.setdefault("r", httpx.post(
            url + "/v1/chat/completions", json={"messages": QUESTION, "max_tokens": 5}, timeout=30)))
        t.start()
        _wait_health(url, lambda s: s["queued"] == 1)
        start = time.time()
        proc.send_signal(signal.SIGTERM)
        t.join(timeout=30)
        assert queued["r"].status_code == 503, queued["r"].text
        assert queued["r"].json()["error"]["code"] == "shutting_down"
        with pytest.raises(httpx.TransportError):                         # no longer accepting
            time.sleep(0.3)
            httpx.get(url + "/health", timeout=2)
        tail = []
        with pytest.raises(openai.APIError, match="shutting down"):      # the running stream is cancelled
            for chunk in stream:
                tail.append(chunk)
        assert proc.wait(timeout=15) == 0, log_file.read_text()
        assert time.time() - start < 15                                   # seconds, not minutes
        assert len(tail) < 8000
    finally:
        if proc.poll() is None:
            proc.kill()
