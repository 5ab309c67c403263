"""The HTTP layer: an OpenAI-compatible API (``/v1/models``, ``/v1/chat/completions``,
``/v1/completions``, ``/health``) over the serving :class:`~phiflash_mlx.serving.engine.Engine`.

    from phiflash_mlx import load
    from phiflash_mlx.serving.http import serve
    model, tokenizer = load("microsoft/Phi-4-mini-flash-reasoning")
    serve(model, tokenizer, "microsoft/Phi-4-mini-flash-reasoning", port=8080)

Needs the ``server`` extra (FastAPI and uvicorn): ``pip install 'phiflash-mlx[server]'``.

What the layer does besides translating: request bodies are limited (`max_body_bytes`, 413 beyond);
parsing, validation, the chat template and tokenization run in a worker thread, never on the event
loop; ``Host`` and ``Origin`` headers are checked against the bound address (a web page cannot reach
a loopback server through DNS rebinding or a cross-site request); a full queue or a stopping server
answers 503. :func:`serve` stops on SIGTERM or Ctrl-C: it closes the listening socket, answers queued
requests with 503, gives running generations `shutdown_grace` seconds and cancels what is left.

Reasoning
    The model writes its reasoning between ``<think>`` and ``</think>``. Chat completions return it
    in ``message.reasoning_content`` and, the same text, ``message.reasoning`` (vLLM and llama.cpp
    clients read the first, mlx-lm clients the second); only the answer is in ``content``. Text
    completions return the text as the model wrote it, tags included. ``max_thinking_tokens`` closes
    the reasoning after that many tokens.

Extensions to OpenAI's request fields: ``top_k``, ``min_p``, ``ignore_eos`` (keep generating past
the end-of-text token until ``max_tokens``) and ``max_thinking_tokens``. Responses carry
``usage.prompt_tokens_details.cached_tokens`` (prompt tokens restored from a checkpoint) and
llama-server's ``timings``.
"""

from __future__ import annotations

import asyncio
import ipaddress
import json
import signal
import socket
import sys
import threading
import time
import uuid
from contextlib import asynccontextmanager
from typing import Any, AsyncIterator, Callable, Iterable, List, Literal, Optional, Union
from urllib.parse import urlsplit

import anyio
import pydantic
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, StrictBool, StrictFloat, StrictInt, StrictStr
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import PhiflashError
from ..generate import DEFAULT_MAX_CONTEXT, THINK_CLOSE, THINK_OPEN, GenerationResponse, SamplingParams
from .checkpoints import CheckpointStore, message_cuts
from .engine import Engine, QueueFull, Request as Job, ShuttingDown

__all__ = ["APIError", "create_app", "serve", "allowed_hosts_for", "DEFAULT_MAX_BODY"]

DEFAULT_MAX_TOKENS = 8192
DEFAULT_MAX_BODY = 4 << 20          # 4 MiB: about a million tokens of text, far beyond the context


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


def _validation_error(errors: list, body) -> APIError:
    if not errors:
        return APIError(400, "invalid request")
    first = errors[0]
    if not isinstance(body, dict):
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
    stream: Optional[StrictBool] = None              # null is false, as OpenAI's API takes it
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
    max_thinking_tokens: Optional[StrictInt] = None


class ChatCompletionRequest(_Sampling):
    messages: List[ChatMessage]
    max_completion_tokens: Optional[StrictInt] = None
    logprobs: Optional[StrictBool] = None


class CompletionRequest(_Sampling):
    prompt: Union[StrictStr, List[StrictStr], List[StrictInt], List[List[StrictInt]]]
    logprobs: Optional[StrictInt] = None
    echo: StrictBool = False
    suffix: Optional[StrictStr] = None



def _bad_text_path(node, path=()) -> Optional[str]:
    """The first string in a parsed JSON body that is not valid Unicode (a lone surrogate from a
    ``\\ud800`` escape), as a dotted path; None when all are valid."""
    if isinstance(node, str):
        try:
            node.encode("utf-8")
        except UnicodeEncodeError:
            return ".".join(map(str, path)) or "body"
        return None
    items = node.items() if isinstance(node, dict) else enumerate(node) if isinstance(node, list) else ()
    for key, value in items:
        if isinstance(key, str):
            try:
                key.encode("utf-8")
            except UnicodeEncodeError:
                return ".".join(map(str, path + (key,)))
        found = _bad_text_path(value, path + (key,))
        if found:
            return found
    return None


def _parse(raw: bytes, model_cls):
    """Body bytes -> validated request model, or an APIError (400) naming the field."""
    try:
        data = json.loads(raw)
    except (ValueError, RecursionError):
        raise APIError(400, "the request body is not valid JSON", code="invalid_json") from None
    if not isinstance(data, dict):
        raise APIError(400, "the request body must be a JSON object", code="invalid_value")
    bad = _bad_text_path(data)
    if bad is not None:
        raise APIError(400, f"{bad}: the text holds a lone surrogate (an unpaired \\ud800-\\udfff escape), "
                            "which is not valid Unicode; send UTF-8 text", param=bad, code="invalid_value")
    try:
        return model_cls.model_validate(data), data
    except pydantic.ValidationError as exc:
        raise _validation_error([dict(e, loc=("body",) + tuple(e.get("loc", ()))) for e in exc.errors()],
                                data) from None


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


def _usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens,
            "prompt_tokens_details": {"cached_tokens": cached_tokens}}


def _timings(last: GenerationResponse) -> dict:
    """llama-server's `timings`: prompt and generation counts, milliseconds and tokens per second;
    `cache_n` prompt tokens came from a checkpoint."""
    prompt_n = max(last.prompt_tokens - last.cached_tokens, 0)
    prompt_ms = 1000.0 * prompt_n / last.prompt_tps if last.prompt_tps else 0.0
    predicted_ms = 1000.0 * last.generation_tokens / last.generation_tps if last.generation_tps else 0.0
    return {"cache_n": last.cached_tokens, "prompt_n": prompt_n, "prompt_ms": round(prompt_ms, 3),
            "prompt_per_second": round(last.prompt_tps, 3), "predicted_n": last.generation_tokens,
            "predicted_ms": round(predicted_ms, 3), "predicted_per_second": round(last.generation_tps, 3)}


def _sse(payload: Any) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


# ---------------------------------------------------------------------------------------------
# Host / Origin checks and the body limit (plain ASGI, before FastAPI sees the request)
# ---------------------------------------------------------------------------------------------

LOOPBACK_NAMES = ("localhost", "127.0.0.1", "::1")


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def _is_wildcard(host: str) -> bool:
    return host in ("", "0.0.0.0", "::")


def allowed_hosts_for(bound_host: str, extra: Iterable[str] = ()) -> Optional[frozenset]:
    """Host names a request's ``Host`` (and ``Origin``, when sent) may name, or None for no check.

    Bound to a loopback address: the loopback names and the bound address. Bound to one other
    address: that address. Bound to every interface (0.0.0.0, ::): no check, since the machine's
    names are not known, unless names are given. `extra` adds names; ``*`` turns the check off."""
    extra = [h.strip().lower().strip("[]") for h in extra if h and h.strip()]
    if "*" in extra:
        return None
    host = bound_host.strip().lower().strip("[]")
    if _is_wildcard(host):
        return frozenset(extra) if extra else None
    names = {host, *extra}
    if _is_loopback(host):
        names.update(LOOPBACK_NAMES)
    return frozenset(names)


def _hostname(value: str) -> Optional[str]:
    """The host part of a Host header (``name``, ``name:port``, ``[v6]:port``), lower case."""
    value = value.strip().lower()
    if not value:
        return None
    if value.startswith("["):
        end = value.find("]")
        return value[1:end] if end > 0 else None
    if value.count(":") == 1:
        value = value.split(":", 1)[0]
    return value


class _Guard:
    """ASGI middleware: Host/Origin allow-list (403) and a request-body limit (413)."""

    def __init__(self, app, max_body: int, allowed: Optional[frozenset]):
        self.app, self.max_body, self.allowed = app, max_body, allowed

    def __getattr__(self, name):                     # app.state, app.routes, ... of the FastAPI app
        return getattr(self.app, name)

    async def _reject(self, send, error: "APIError") -> None:
        body = json.dumps(error.body()).encode()
        await send({"type": "http.response.start", "status": error.status,
                    "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                                (b"connection", b"close")]})
        await send({"type": "http.response.body", "body": body})

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = {}
        for k, v in scope.get("headers", ()):
            headers.setdefault(k.decode("latin-1").lower(), v.decode("latin-1"))
        if self.allowed is not None:
            host = _hostname(headers.get("host", ""))
            if host not in self.allowed:
                return await self._reject(send, APIError(
                    403, f"Host {headers.get('host', '')!r} is not one this server answers to; "
                         "use its address, or start it with --allowed-hosts", code="host_not_allowed"))
            origin = headers.get("origin")
            if origin is not None:
                try:
                    origin_host = urlsplit(origin).hostname if origin != "null" else None
                except ValueError:
                    origin_host = None
                if origin_host not in self.allowed:
                    return await self._reject(send, APIError(
                        403, f"requests from the web page at {origin!r} are not allowed; "
                             "start the server with --allowed-hosts to allow that origin", code="origin_not_allowed"))
        length = headers.get("content-length")
        if length is not None:
            try:
                too_big = int(length) > self.max_body
            except ValueError:
                return await self._reject(send, APIError(400, "the Content-Length header is not a number"))
            if too_big:
                return await self._reject(send, APIError(
                    413, f"the request body has {length} bytes; the limit is {self.max_body} "
                         "(raise it with --max-body-bytes)", code="request_too_large"))
        seen = 0
        limit = self.max_body

        async def limited_receive():
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > limit:
                    raise APIError(413, f"the request body is over the limit of {limit} bytes "
                                        "(raise it with --max-body-bytes)", code="request_too_large")
            return message

        return await self.app(scope, limited_receive, send)


# ---------------------------------------------------------------------------------------------
# The app
# ---------------------------------------------------------------------------------------------

def create_app(model, tokenizer, model_id: str, *, engine: Optional[Engine] = None,
               max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512,
               default_max_tokens: int = DEFAULT_MAX_TOKENS,
               default_sampling: Optional[SamplingParams] = None,
               default_max_thinking_tokens: Optional[int] = None, thinking_message: str = "",
               max_body_bytes: int = DEFAULT_MAX_BODY, allowed_hosts: Optional[Iterable[str]] = None,
               **engine_options) -> FastAPI:
    """The ASGI app. `default_sampling` holds the temperature, top_p, top_k, min_p and seed used
    when a request leaves them out. Without `engine`, one is made (`engine_options`: max_batch,
    max_queue, checkpoints) and run in a worker thread while the app is up; :func:`serve` passes its
    own, driven from the main thread. `allowed_hosts`: host names a request may address (None: no
    check; :func:`serve` derives them from the bound address)."""
    if tokenizer is None:
        raise PhiflashError("serving needs a tokenizer; this checkpoint has no tokenizer files")
    defaults = default_sampling or SamplingParams()
    defaults.validate()
    own_engine = engine is None
    engine = engine or Engine(model, tokenizer, max_context, prefill_step_size, **engine_options)
    max_context = engine.max_context
    created = int(time.time())
    allowed = frozenset(h.lower() for h in allowed_hosts) if allowed_hosts is not None else None

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

    def job_for(body: _Sampling, ids: list, max_tokens: Optional[int], max_tokens_param: str, cuts=()) -> dict:
        if body.n not in (None, 1):
            raise APIError(400, "n: only one choice per request is supported", param="n", code="invalid_value")
        if max_tokens is not None and max_tokens < 1:
            raise APIError(400, f"{max_tokens_param}: must be at least 1, got {max_tokens}",
                           param=max_tokens_param, code="invalid_value")
        budget = default_max_thinking_tokens if body.max_thinking_tokens is None else body.max_thinking_tokens
        if budget is not None and budget < 0:
            raise APIError(400, f"max_thinking_tokens: must be >= 0 (0 skips thinking), got {budget}",
                           param="max_thinking_tokens", code="invalid_value")
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
        if len(ids) >= max_context:
            raise APIError(400, f"this model's context is {max_context} tokens, but the prompt has {len(ids)}; "
                           "shorten it", param=None, code="context_length_exceeded")
        limit = default_max_tokens if max_tokens is None else max_tokens
        return dict(ids=ids, max_tokens=limit, sampling=params, stop=stop, stop_on_eos=not body.ignore_eos,
                    max_thinking_tokens=budget, thinking_message=thinking_message, cuts=list(cuts))

    def prepare_chat(raw: bytes):
        """Parse, validate, template and tokenize a chat request (runs in a worker thread)."""
        body, _ = _parse(raw, ChatCompletionRequest)
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
        cuts = message_cuts(tokenizer, messages, ids) if getattr(engine, "checkpoints", None) is not None else ()
        return body, job_for(body, ids, max_tokens, param, cuts)

    def prepare_completion(raw: bytes):
        body, _ = _parse(raw, CompletionRequest)
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
        return body, job_for(body, ids, body.max_tokens, "max_tokens")

    async def prepared(request: Request, prepare):
        raw = await request.body()
        return await anyio.to_thread.run_sync(prepare, raw)

    async def start(job_args: dict, request: Request):
        """Submit the job; returns an async iterator of its pieces whose first piece has arrived, so
        an error before any output (queue full, shutting down, bad prompt) is a proper status code.
        Leaving early (disconnect, cancellation) cancels the job."""
        loop = asyncio.get_running_loop()
        inbox: asyncio.Queue = asyncio.Queue()
        job = Job(emit=lambda item: None, **job_args)

        def emit(item):
            try:
                loop.call_soon_threadsafe(inbox.put_nowait, item)
            except RuntimeError:                     # the event loop is gone: nobody is listening
                job.cancelled.set()

        job.emit = emit

        async def watch():
            while True:
                message = await request.receive()
                if message["type"] == "http.disconnect":
                    job.cancelled.set()
                    inbox.put_nowait(("disconnected",))
                    return

        try:
            engine.submit(job)
        except (QueueFull, ShuttingDown) as exc:
            raise APIError(503, str(exc), type="server_error",
                           code="queue_full" if isinstance(exc, QueueFull) else "shutting_down") from None
        watcher = asyncio.create_task(watch())
        try:
            first = await inbox.get()
        except BaseException:
            job.cancelled.set()
            watcher.cancel()
            raise
        if first[0] == "error":
            job.cancelled.set()
            watcher.cancel()
            raise APIError(first[1], first[2], type="invalid_request_error" if first[1] < 500 else "server_error",
                           code="shutting_down" if first[1] == 503 else None)

        async def pieces() -> AsyncIterator[GenerationResponse]:
            item = first
            try:
                while True:
                    kind = item[0]
                    if kind in ("end", "disconnected"):
                        return
                    if kind == "error":
                        raise APIError(item[1], item[2],
                                       type="invalid_request_error" if item[1] < 500 else "server_error")
                    yield item[1]
                    item = await inbox.get()
            finally:
                job.cancelled.set()                  # no effect once the job has finished
                watcher.cancel()

        return pieces()

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
    async def chat_completions(request: Request):
        body, job_args = await prepared(request, prepare_chat)
        prompt_len = len(job_args["ids"])
        cid, now = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        pieces = await start(job_args, request)

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
                async for piece in pieces:
                    last = piece
                    for key, part in text.feed(piece):
                        yield _sse(chunk({key: part, "reasoning": part} if key == "reasoning_content" else {key: part}))
                if last is None:
                    return
                final = chunk({}, last.finish_reason or "stop")
                final["timings"] = _timings(last)
                yield _sse(final)
                if include_usage:
                    yield _sse({"id": cid, "object": "chat.completion.chunk", "created": now, "model": model_id,
                                "choices": [], "usage": _usage(prompt_len, last.generation_tokens,
                                                               last.cached_tokens)})
            return stream_response(events())

        text = _ChatText()
        parts = {"reasoning_content": [], "content": []}
        last = None
        async for piece in pieces:
            last = piece
            for key, part in text.feed(piece):
                parts[key].append(part)
        if last is None or last.finish_reason is None:    # the client went away
            return JSONResponse({}, status_code=499)
        reasoning = "".join(parts["reasoning_content"]) or None
        message = {"role": "assistant", "content": "".join(parts["content"]),
                   "reasoning_content": reasoning, "reasoning": reasoning}
        return {"id": cid, "object": "chat.completion", "created": now, "model": model_id,
                "choices": [{"index": 0, "message": message, "logprobs": None,
                             "finish_reason": last.finish_reason or "stop"}],
                "usage": _usage(prompt_len, last.generation_tokens, last.cached_tokens),
                "timings": _timings(last)}

    @app.post("/v1/completions")
    async def completions(request: Request):
        body, job_args = await prepared(request, prepare_completion)
        prompt_len = len(job_args["ids"])
        cid, now = f"cmpl-{uuid.uuid4().hex}", int(time.time())
        include_usage = bool(body.stream_options and body.stream_options.include_usage)
        pieces = await start(job_args, request)

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
                async for piece in pieces:
                    last = piece
                    text = raw.feed(piece)
                    if text:
                        yield _sse(chunk(text))
                if last is None:
                    return
                final = chunk("", last.finish_reason or "stop")
                final["timings"] = _timings(last)
                yield _sse(final)
                if include_usage:
                    yield _sse({"id": cid, "object": "text_completion", "created": now, "model": model_id,
                                "choices": [], "usage": _usage(prompt_len, last.generation_tokens,
                                                               last.cached_tokens)})
            return stream_response(events())

        raw = _RawText()
        out, last = [], None
        async for piece in pieces:
            last = piece
            out.append(raw.feed(piece))
        if last is None or last.finish_reason is None:
            return JSONResponse({}, status_code=499)
        return {"id": cid, "object": "text_completion", "created": now, "model": model_id,
                "choices": [choice("".join(out), last.finish_reason or "stop")],
                "usage": _usage(prompt_len, last.generation_tokens, last.cached_tokens),
                "timings": _timings(last)}

    return _Guard(app, max_body_bytes, allowed) if (max_body_bytes or allowed is not None) else app


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
          max_batch: Optional[int] = None, max_queue: int = 64, checkpoint_bytes: int = 2 << 30,
          shutdown_grace: float = 10.0, allowed_hosts: Iterable[str] = (), **app_options) -> None:
    """Serve until Ctrl-C or SIGTERM: uvicorn in a background thread, the engine on this thread.

    On SIGTERM/Ctrl-C the socket stops accepting, queued requests get 503, running generations have
    `shutdown_grace` seconds to finish and are then cancelled (their clients get a 503 error event).
    `checkpoint_bytes`: the checkpoint store's budget (0 turns checkpoints off). `app_options` go to
    :func:`create_app` (max_context, prefill_step_size, default_max_tokens, default_sampling,
    default_max_thinking_tokens, thinking_message, max_body_bytes)."""
    import uvicorn

    store = CheckpointStore(checkpoint_bytes) if checkpoint_bytes > 0 else None
    engine = Engine(model, tokenizer, app_options.pop("max_context", DEFAULT_MAX_CONTEXT),
                    app_options.pop("prefill_step_size", 512), max_batch=max_batch, max_queue=max_queue,
                    checkpoints=store)
    allowed = allowed_hosts_for(host, allowed_hosts)
    app = create_app(model, tokenizer, model_id, engine=engine, allowed_hosts=allowed, **app_options)
    sock = _listen(host, port)
    bound = sock.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, log_level=log_level,
                                           timeout_graceful_shutdown=max(1, int(shutdown_grace) + 2)))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, name="phiflash-http", daemon=True)
    thread.start()
    shown = f"[{host}]" if ":" in host else host
    announce(f"serving {model_id} at http://{shown}:{bound}/v1 (Ctrl-C to stop)")

    def stop(*_):
        server.should_exit = True                    # uvicorn closes the socket and lets responses end
        engine.shutdown(shutdown_grace)

    previous = {}
    if threading.current_thread() is threading.main_thread():
        previous[signal.SIGTERM] = signal.signal(signal.SIGTERM, stop)
    try:
        engine.run(lambda: not thread.is_alive())
    except KeyboardInterrupt:
        stop()
    finally:
        server.should_exit = True
        thread.join(timeout=shutdown_grace + 5)
        sock.close()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
