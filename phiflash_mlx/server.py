"""An OpenAI-compatible HTTP server: ``/v1/models``, ``/v1/chat/completions``, ``/v1/completions``.

    from phiflash_mlx import load
    from phiflash_mlx.server import serve
    model, tokenizer = load("microsoft/Phi-4-mini-flash-reasoning")
    serve(model, tokenizer, "microsoft/Phi-4-mini-flash-reasoning", port=8080)

Needs the ``server`` extra (FastAPI and uvicorn): ``pip install 'phiflash-mlx[server]'``.

How requests are run
    Generations are queued and run one at a time, in arrival order, by an :class:`Engine`. Each
    request gets its own :class:`~phiflash_mlx.generate.Generator` (a fresh cache), dropped when the
    request ends. The engine checks between tokens whether the request is still wanted: a client
    that disconnects (mid-stream or while waiting for a whole answer) stops its generation and frees
    its cache, and a request that disconnects while queued is never started.

    MLX keeps its streams per thread, so :func:`serve` runs the engine on the calling (main) thread
    and uvicorn's event loop in a background thread. :func:`create_app` without an engine starts one
    in a worker thread instead, for embedding the app in another ASGI server; that works, but with
    MLX releases that do not yet join per-thread streams at exit (ml-explore/mlx#3126) the process
    may abort as it exits.

Reasoning
    The model writes its reasoning between ``<think>`` and ``</think>``. Chat completions return it
    in ``message.reasoning_content`` (``delta.reasoning_content`` when streaming) and only the answer
    in ``content``. Text completions return the text as the model wrote it, tags included.

Extensions to OpenAI's request fields: ``top_k``, ``min_p`` and ``ignore_eos`` (keep generating past
the end-of-text token until ``max_tokens``).
"""

from __future__ import annotations

import asyncio
import json
import queue
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Callable, List, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from .errors import PhiflashError
from .generate import (DEFAULT_MAX_CONTEXT, THINK_CLOSE, THINK_OPEN, GenerationResponse, Generator,
                       SamplingParams)

__all__ = ["Engine", "create_app", "serve"]

DEFAULT_MAX_TOKENS = 8192


# ---------------------------------------------------------------------------------------------
# Errors in OpenAI's shape
# ---------------------------------------------------------------------------------------------

class APIError(Exception):
    def __init__(self, status: int, message: str, param: Optional[str] = None, code: Optional[str] = None,
                 type: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.type = status, message, param, code, type

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        return JSONResponse(self.body(), status_code=self.status)


_TYPE_TAGS = {"str", "int", "float", "bool", "none", "list", "dict"}


def _param_of(loc, body) -> Optional[str]:
    """The request field an error is about: its location in the body, without pydantic's union tags
    (``stop.str``, ``prompt.list[int]``)."""
    path, node = [], body
    for part in loc:
        if part == "body" and not path:
            continue
        if isinstance(node, dict) and part in node:
            node = node[part]
        elif isinstance(node, list) and isinstance(part, int) and 0 <= part < len(node):
            node = node[part]
        elif isinstance(part, str) and (part in _TYPE_TAGS or not part.isidentifier() or part[:1].isupper()):
            continue                                 # a union member's tag
        elif isinstance(node, dict) and isinstance(part, str):
            path.append(part)                        # a missing field
            break
        else:
            break
        path.append(str(part))
    return ".".join(path) or None


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON", code="invalid_json")
    body = getattr(exc, "body", None)
    if body is None or not isinstance(body, dict):
        return APIError(400, "the request body must be a JSON object", code="invalid_value")
    param = _param_of(first.get("loc", ()), body)
    messages = []
    for err in errors:
        if _param_of(err.get("loc", ()), body) == param and err.get("msg") not in messages:
            messages.append(err.get("msg"))
    text = "; ".join(m for m in messages if m) or "invalid value"
    return APIError(400, f"{param}: {text}" if param else text, param=param, code="invalid_value")


# ---------------------------------------------------------------------------------------------
# Request bodies (unknown OpenAI fields are accepted and ignored)
# ---------------------------------------------------------------------------------------------

Number = Optional[StrictFloat]


class _Body(BaseModel):
    model_config = ConfigDict(extra="allow")


class ContentPart(_Body):
    type: StrictStr
    text: Optional[StrictStr] = None


class ChatMessage(_Body):
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: Union[StrictStr, List[ContentPart], None] = None


class StreamOptions(_Body):
    include_usage: StrictBool = False


class _Sampling(_Body):
    model: Optional[StrictStr] = None
    stream: StrictBool = False
    stream_options: Optional[StreamOptions] = None
    max_tokens: Optional[StrictInt] = None
    temperature: Number = None
    top_p: Number = None
    top_k: Optional[StrictInt] = None
    min_p: Number = None
    seed: Optional[StrictInt] = None
    stop: Union[StrictStr, List[StrictStr], None] = None
    n: Optional[StrictInt] = None
    ignore_eos: StrictBool = False


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None


# ---------------------------------------------------------------------------------------------
# The engine: one generation at a time, on one thread
# ---------------------------------------------------------------------------------------------

@dataclass
class Job:
    ids: list
    max_tokens: int
    sampling: SamplingParams
    stop: list
    stop_on_eos: bool
    emit: Callable[[tuple], None]                       # ("piece", response) | ("error", status, msg) | ("end",)
    cancelled: threading.Event = field(default_factory=threading.Event)


class Engine:
    """Runs queued generation jobs one after another on the thread that calls :meth:`run`."""

    def __init__(self, model, tokenizer, max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_context, self.prefill_step_size = max_context, prefill_step_size
        self._jobs: queue.Queue = queue.Queue()
        self._lock = threading.Lock()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0}
        self.busy = False
        self.last: Optional[dict] = None                 # outcome of the latest finished job

    def submit(self, job: Job) -> None:
        self._jobs.put(job)

    def status(self) -> dict:
        with self._lock:
            return {"busy": self.busy, "queued": self._jobs.qsize(), **self.counts, "last": self.last}

    def run(self, should_stop: Callable[[], bool] = lambda: False, poll: float = 0.1) -> None:
        """Serve jobs until `should_stop()` is true (checked at least every `poll` seconds when idle)."""
        while not should_stop():
            try:
                job = self._jobs.get(timeout=poll)
            except queue.Empty:
                continue
            self.run_job(job)

    def _finish(self, outcome: str, tokens: int) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.busy = False
            self.last = {"outcome": outcome, "generation_tokens": tokens}

    def run_job(self, job: Job) -> None:
        if job.cancelled.is_set():                    # the client left while the job was queued
            self._finish("cancelled", 0)
            job.emit(("end",))
            return
        with self._lock:
            self.busy = True
        outcome, tokens = "completed", 0
        generator = Generator(self.model, self.tokenizer, self.max_context, self.prefill_step_size)
        pieces = generator.stream(job.ids, job.max_tokens, job.sampling, job.stop, stop_on_eos=job.stop_on_eos)
        try:
            for piece in pieces:
                tokens = piece.generation_tokens
                if job.cancelled.is_set():
                    outcome = "cancelled"
                    break
                job.emit(("piece", piece))
        except PhiflashError as exc:
            outcome = "failed"
            job.emit(("error", 400, str(exc)))
        except Exception as exc:  # keep serving; the client gets a 500
            outcome = "failed"
            job.emit(("error", 500, f"generation failed: {type(exc).__name__}: {exc}"))
        finally:
            pieces.close()
            del pieces, generator                       # the request's cache goes with them
            self._finish(outcome, tokens)
            job.emit(("end",))


# ---------------------------------------------------------------------------------------------
# Turning pieces into OpenAI text
# ---------------------------------------------------------------------------------------------

class _ChatText:
    """Routes pieces to `reasoning_content` or `content`, dropping whitespace at each section's start."""

    def __init__(self):
        self.started = {"reasoning_content": False, "content": False}

    def feed(self, piece: GenerationResponse) -> list:
        key = "reasoning_content" if piece.reasoning else "content"
        text = piece.text
        if not self.started[key]:
            text = text.lstrip()
            if not text:
                return []
            self.started[key] = True
        return [(key, text)] if text else []


class _RawText:
    """The text as the model wrote it: the <think> tags the generator consumed are put back."""

    def __init__(self):
        self.inside = False

    def feed(self, piece: GenerationResponse) -> str:
        prefix = ""
        if piece.text and piece.reasoning != self.inside:
            prefix = THINK_OPEN if piece.reasoning else THINK_CLOSE
            self.inside = piece.reasoning
        return prefix + piece.text


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

def create_app(model, tokenizer, model_id: str, *, engine: Optional[Engine] = None,
               max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512,
               default_max_tokens: int = DEFAULT_MAX_TOKENS,
               default_sampling: Optional[SamplingParams] = None) -> FastAPI:
    """The FastAPI app. `default_sampling` holds the temperature, top_p, top_k, min_p and seed used
    when a request leaves them out. Without `engine`, one is made and run in a worker thread while
    the app is up; :func:`serve` passes its own, driven from the main thread."""
    if tokenizer is None:
        raise PhiflashError("serving needs a tokenizer; this checkpoint has no tokenizer files")
    defaults = default_sampling or SamplingParams()
    defaults.validate()
    own_engine = engine is None
    engine = engine or Engine(model, tokenizer, max_context, prefill_step_size)
    max_context = engine.max_context
    created = int(time.time())

    @asynccontextmanager
    async def lifespan(app):
        stop = threading.Event()
        worker = None
        if own_engine:
            worker = threading.Thread(target=engine.run, args=(stop.is_set,), name="phiflash-engine", daemon=True)
            worker.start()
        try:
            yield
        finally:
            stop.set()
            if worker is not None:
                worker.join(timeout=5)

    app = FastAPI(title="phiflash-mlx", lifespan=lifespan)
    app.state.engine = engine
    app.state.model_id = model_id

    @app.exception_handler(APIError)
    async def _api_error(request, exc: APIError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request, exc: RequestValidationError):
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request, exc: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code)
        return APIError(exc.status_code, f"{request.method} {request.url.path}: {exc.detail}", code=code).response()

    @app.exception_handler(Exception)
    async def _unexpected(request, exc: Exception):
        return APIError(500, f"internal error: {type(exc).__name__}: {exc}", type="server_error").response()

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "phiflash-mlx"}

    def check_model(name: Optional[str]) -> None:
        if name is not None and name != model_id:
            raise APIError(404, f"the model `{name}` does not exist; this server serves `{model_id}`",
                           param="model", code="model_not_found")

    def sampling_for(body: _Sampling, max_tokens: Optional[int], max_tokens_param: str, prompt_len: int):
        if body.n not in (None, 1):
            raise APIError(400, "n: only one choice per request is supported", param="n", code="invalid_value")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_param}: must be at least 1, got {max_tokens}",
                           param=max_tokens_param, code="invalid_value")
        params = SamplingParams(
            temp=defaults.temp if body.temperature is None else body.temperature,
            top_p=defaults.top_p if body.top_p is None else body.top_p,
            top_k=defaults.top_k if body.top_k is None else body.top_k,
            min_p=defaults.min_p if body.min_p is None else body.min_p,
            seed=defaults.seed if body.seed is None else body.seed)
        if params.seed is not None and not 0 <= params.seed < 2**63:
            raise APIError(400, f"seed: must be in [0, 2**63), got {params.seed}", param="seed", code="invalid_value")
        try:
            params.validate()
        except PhiflashError as exc:
            param = str(exc).split(" ", 1)[0]           # "temperature must be ...", "top_p must ..."
            raise APIError(400, str(exc), param=param, code="invalid_value") from None
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if prompt_len >= max_context:
            raise APIError(400, f"this model's context is {max_context} tokens, but the prompt has {prompt_len}; "
                           "shorten it", param=None, code="context_length_exceeded")
        limit = default_max_tokens if max_tokens is None else max_tokens
        return params, stop, limit

    async def pieces(job_args: dict, request: Request, watch_disconnect: bool) -> AsyncIterator[GenerationResponse]:
        """Queue the job and yield its pieces; leaving early (disconnect, cancellation) cancels it."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        cancelled = threading.Event()

        def emit(item):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:                     # the event loop is gone: nobody is listening
                cancelled.set()

        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    cancelled.set()
                    inbox.put_nowait(("disconnected",))
                    return

        engine.submit(Job(emit=emit, cancelled=cancelled, **job_args))
        watcher = asyncio.create_task(watch()) if watch_disconnect else None
        try:
            while True:
                item = await inbox.get()
                kind = item[0]
                if kind in ("end", "disconnected"):
                    return
                if kind == "error":
                    raise APIError(item[1], item[2], type="invalid_request_error" if item[1] < 500 else "server_error")
                yield item[1]
        finally:
            cancelled.set()                          # no effect once the job has finished
            if watcher is not None:
                watcher.cancel()

    def stream_response(events: AsyncIterator[str]) -> StreamingResponse:
        async def body():
            try:
                async for event in events:
                    yield event
            except APIError as exc:                  # headers are sent: report it as an event
                yield _sse(exc.body())
            yield "data: [DONE]\n\n"
        return StreamingResponse(body(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.get("/health")
    async def health():
        return {"status": "ok", "model": model_id, **engine.status()}

    @app.get("/v1/models")
    async def list_models():
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def get_model(name: str):
        check_model(name)
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        check_model(body.model)
        if body.logprobs:
            raise APIError(400, "logprobs: not supported by this server", param="logprobs", code="unsupported")
        if not body.messages:
            raise APIError(400, "messages: at least one message is needed", param="messages", code="invalid_value")
        messages = []
        for i, m in enumerate(body.messages):
            if isinstance(m.content, list):
                texts = []
                for part in m.content:
                    if part.type != "text" or part.text is None:
                        raise APIError(400, f"messages.{i}.content: only text parts are supported, got {part.type!r}",
                                       param=f"messages.{i}.content", code="unsupported")
                    texts.append(part.text)
                content = "".join(texts)
            else:
                content = m.content or ""
            messages.append({"role": "system" if m.role == "developer" else m.role, "content": content})
        try:
            ids = list(tokenizer.apply_chat_template(messages, add_generation_prompt=True))
        except PhiflashError as exc:
            raise APIError(400, str(exc), param="messages", code="invalid_value") from None
        if body.max_completion_tokens is not None:          # the newer name wins
            max_tokens, param = body.max_completion_tokens, "max_completion_tokens"
        else:
            max_tokens, param = body.max_tokens, "max_tokens"
        params, stop, limit = sampling_for(body, max_tokens, param, len(ids))
        job_args = dict(ids=ids, max_tokens=limit, sampling=params, stop=stop, stop_on_eos=not body.ignore_eos)
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        if body.stream:
            def chunk(delta: dict, finish: Optional[str] = None) -> dict:
                out = {"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                       "choices": [{"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}]}
                if include_usage:
                    out["usage"] = None
                return out

            async def events():
                text = _ChatText()
                yield _sse(chunk({"role": "assistant", "content": ""}))
                last = None
                async for piece in pieces(job_args, request, watch_disconnect=False):
                    last = piece
                    for key, part in text.feed(piece):
                        yield _sse(chunk({key: part}))
                if last is None:
                    return
                yield _sse(chunk({}, last.finish_reason or "stop"))
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                "choices": [], "usage": _usage(len(ids), last.generation_tokens)})
            return stream_response(events())

        text = _ChatText()
        parts = {"reasoning_content": [], "content": []}
        last = None
        async for piece in pieces(job_args, request, watch_disconnect=True):
            last = piece
            for key, part in text.feed(piece):
                parts[key].append(part)
        if last is None:                                 # the client went away
            return JSONResponse({}, status_code=499)
        reasoning = "".join(parts["reasoning_content"])
        message = {"role": "assistant", "content": "".join(parts["content"]),
                   "reasoning_content": reasoning or None}
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": last.finish_reason or "stop"}],
                "usage": _usage(len(ids), last.generation_tokens)}

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        check_model(body.model)
        for name, unsupported in (("logprobs", body.logprobs is not None), ("echo", body.echo),
                                  ("suffix", body.suffix is not None)):
            if unsupported:
                raise APIError(400, f"{name}: not supported by this server", param=name, code="unsupported")
        prompt = body.prompt
        if isinstance(prompt, list) and prompt and isinstance(prompt[0], (str, list)):
            if len(prompt) != 1:
                raise APIError(400, "prompt: only one prompt per request is supported", param="prompt",
                               code="invalid_value")
            prompt = prompt[0]
        if isinstance(prompt, str):
            ids = tokenizer.encode(prompt)
        else:
            ids = list(prompt)
            vocab = model.args.vocab_size
            bad = [t for t in ids if not 0 <= t < vocab]
            if bad:
                raise APIError(400, f"prompt: token id {bad[0]} is outside the vocabulary (0..{vocab - 1})",
                               param="prompt", code="invalid_value")
        if not ids:
            raise APIError(400, "prompt: the prompt is empty", param="prompt", code="invalid_value")
        params, stop, limit = sampling_for(body, body.max_tokens, "max_tokens", len(ids))
        job_args = dict(ids=ids, max_tokens=limit, sampling=params, stop=stop, stop_on_eos=not body.ignore_eos)
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def choice(text: str, finish: Optional[str]) -> dict:
            return {"index": 0, "text": text, "logprobs": None, "finish_reason": finish}

        if body.stream:
            def chunk(text: str, finish: Optional[str] = None, usage: Optional[dict] = None) -> dict:
                out = {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                       "choices": [choice(text, finish)]}
                if include_usage:
                    out["usage"] = usage
                return out

            async def events():
                raw = _RawText()
                last = None
                async for piece in pieces(job_args, request, watch_disconnect=False):
                    last = piece
                    text = raw.feed(piece)
                    if text:
                        yield _sse(chunk(text))
                if last is None:
                    return
                yield _sse(chunk("", last.finish_reason or "stop"))
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": now, "model": model_id,
                                "choices": [], "usage": _usage(len(ids), last.generation_tokens)})
            return stream_response(events())

        raw = _RawText()
        out, last = [], None
        async for piece in pieces(job_args, request, watch_disconnect=True):
            last = piece
            out.append(raw.feed(piece))
        if last is None:
            return JSONResponse({}, status_code=499)
        return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                "choices": [choice("".join(out), last.finish_reason or "stop")],
                "usage": _usage(len(ids), last.generation_tokens)}

    return app


# ---------------------------------------------------------------------------------------------
# Running it
# ---------------------------------------------------------------------------------------------

def _listen(host: str, port: int) -> socket.socket:
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    sock = socket.socket(family, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError as exc:
        sock.close()
        raise PhiflashError(f"cannot listen on {host}:{port}: {exc.strerror or exc}; "
                            "pick another --port or --host") from None
    sock.listen(128)
    return sock


def serve(model, tokenizer, model_id: str, host: str = "127.0.0.1", port: int = 8080, *,
          log_level: str = "info", announce: Callable[[str], None] = lambda line: print(line, file=sys.stderr),
          **app_options) -> None:
    """Serve until Ctrl-C or SIGTERM: uvicorn in a background thread, generation on this thread.
    `app_options` go to :func:`create_app` (max_context, prefill_step_size, default_max_tokens,
    default_sampling)."""
    import uvicorn

    engine = Engine(model, tokenizer, app_options.pop("max_context", DEFAULT_MAX_CONTEXT),
                    app_options.pop("prefill_step_size", 512))
    app = create_app(model, tokenizer, model_id, engine=engine, **app_options)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level, timeout_graceful_shutdown=2))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="phiflash-http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model_id} at http://{shown}:{bound}/v1 (Ctrl-C to stop)")
    stop = threading.Event()
    previous = None
    if threading.current_thread() is threading.main_thread():
        previous = signal.signal(signal.SIGTERM, lambda signum, frame: stop.set())
    try:
        engine.run(lambda: stop.is_set() or not thread.is_alive())
    except KeyboardInterrupt:
        pass
    finally:
        server.should_exit = True
        thread.join(timeout=5)
        sock.close()
        if previous is not None:
            signal.signal(signal.SIGTERM, previous)
