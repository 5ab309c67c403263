"""The serving engine: a queue, continuous batching on mlx-lm's ``BatchGenerator``, checkpoints.

    from phiflash_mlx.serving import Engine, Request
    engine = Engine(model, tokenizer, max_batch=8)
    threading.Thread(target=engine.run, daemon=True).start()     # or engine.run() on this thread
    for piece in engine.generate(ids, max_tokens=64, sampling=SamplingParams(temp=0)):
        print(piece.text, end="")

How requests run
    Submitted requests wait in a queue (at most `max_queue`; beyond that :meth:`Engine.submit`
    raises :class:`QueueFull`). Between decode steps the engine moves waiting requests into mlx-lm's
    ``BatchGenerator`` while fewer than `max_batch` are running: each one's prompt is prefilled in
    chunks of `prefill_step_size` tokens (several prompts side by side, right-padded; the model's
    masks make padding exact), one chunk per step, interleaved with the decode steps of the requests
    already generating, then it joins the decode batch. A request leaves the batch when it meets
    end-of-text, its max tokens, one of its stop strings, or when it is cancelled (its client went
    away); the others carry on undisturbed. Each request keeps its own sampler (temperature, top-p,
    top-k, min-p, seed), stop strings, max tokens and thinking budget.

    Cancellation is checked before every step, so a request cancelled while its prompt is being
    prefilled stops after the current chunk.

Checkpoints
    With a :class:`~phiflash_mlx.serving.checkpoints.CheckpointStore`, a request resumes from the
    longest snapshot that is a prefix of its prompt and prefills only the rest. Snapshots are taken
    at the message boundaries given with the request (``Request.cuts``: before the last user
    message), before the prompt's last token, and at the end of the generation.

MLX keeps streams per thread: everything touching the model happens on the thread that calls
:meth:`Engine.run`.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, List, Optional, Sequence

import mlx.core as mx

from ..errors import PhiflashError
from ..generate import (DEFAULT_MAX_CONTEXT, GenerationResponse, ReasoningSplitter, Sampler, SamplingParams,
                        StopStringFilter, peak_memory_gb)
from .checkpoints import CheckpointStore
from .thinking import ThinkingBudget

__all__ = ["Engine", "Request", "Job", "QueueFull", "ShuttingDown", "default_max_batch"]


class QueueFull(PhiflashError):
    """The engine's queue is full; retry later."""


class ShuttingDown(PhiflashError):
    """The engine is stopping and takes no new requests."""


def default_max_batch() -> int:
    """8: a decode step reads the weights once for the whole batch, so on the 2-core CPU we measured
    a step of 8 streams took 1.4x a step of one (110 vs 79 ms under cProfile, bench_serve.py's
    8 layers x 512 model); the constant-size Mamba and window states keep 8 long generations small."""
    return 8


@dataclass
class Request:
    """One generation. `emit` receives ``("piece", GenerationResponse)``, ``("error", status,
    message)`` and finally ``("end",)``, on the engine's thread."""
    ids: list
    max_tokens: int
    sampling: SamplingParams
    stop: list = field(default_factory=list)
    stop_on_eos: bool = True
    emit: Callable[[tuple], None] = lambda item: None
    cancelled: threading.Event = field(default_factory=threading.Event)
    max_thinking_tokens: Optional[int] = None
    thinking_message: str = ""
    cuts: Sequence[int] = ()                        # prompt positions worth a checkpoint


Job = Request                                       # the name the first server used


class _Running:
    """A request inside the BatchGenerator, with its text state."""

    def __init__(self, job: Request, uid: int, tokenizer, cached: int, budget: Optional[ThinkingBudget]):
        self.job, self.uid = job, uid
        self.detok = tokenizer.detokenizer()
        self.stops = StopStringFilter(job.stop)
        self.think = ReasoningSplitter()
        self.budget = budget
        self.cached = cached
        self.generated = 0
        self.t_start = time.perf_counter()
        self.t_first: Optional[float] = None

    def stats(self) -> dict:
        now = time.perf_counter()
        first = self.t_first or now
        prefilled = len(self.job.ids) - self.cached
        return dict(prompt_tokens=len(self.job.ids), cached_tokens=self.cached,
                    prompt_tps=prefilled / max(first - self.t_start, 1e-9), generation_tokens=self.generated,
                    generation_tps=self.generated / max(now - first, 1e-9), peak_memory=peak_memory_gb())

    def pieces(self, text: str, token: Optional[int], finish: Optional[str] = None) -> List[GenerationResponse]:
        stats = self.stats()
        out = [GenerationResponse(part, token, reasoning, **stats) for reasoning, part in
               (self.think.feed(text) if text else [])]
        if finish is not None:
            out += [GenerationResponse(part, token, r, **stats) for r, part in self.think.flush()]
        if not out:
            out.append(GenerationResponse("", token, self.think.inside, **stats))
        return out


class Engine:
    """Runs requests with continuous batching on the thread that calls :meth:`run`."""

    def __init__(self, model, tokenizer, max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512,
                 *, max_batch: Optional[int] = None, max_queue: int = 64, prefill_batch_size: int = 4,
                 checkpoints: Optional[CheckpointStore] = None):
        if tokenizer is None:
            raise PhiflashError("serving needs a tokenizer; this checkpoint has no tokenizer files")
        self.model, self.tokenizer = model, tokenizer
        self.max_context, self.prefill_step_size = max_context, prefill_step_size
        self.max_batch = max_batch or default_max_batch()
        if self.max_batch < 1:
            raise PhiflashError(f"max_batch must be at least 1, got {self.max_batch}")
        self.max_queue = max_queue
        self.prefill_batch_size = max(1, min(prefill_batch_size, self.max_batch))
        self.checkpoints = checkpoints
        self._inbox: "queue.Queue[Request]" = queue.Queue()
        self._lock = threading.Lock()
        self._running: dict = {}                        # uid -> _Running
        self._wake = threading.Event()
        self._draining: Optional[float] = None          # the deadline once shutdown began
        self._stopped = threading.Event()
        self.counts = {"completed": 0, "cancelled": 0, "failed": 0, "rejected": 0}
        self.last: Optional[dict] = None
        self.steps = 0
        self.on_step: Optional[Callable[[dict], None]] = None   # called after every step (tests, stats)
        self._batch = None

    # --- the outside ------------------------------------------------------------------------------

    def submit(self, job: Request) -> None:
        """Queue a request; raises QueueFull or ShuttingDown instead of queueing it."""
        if self._draining is not None or self._stopped.is_set():
            raise ShuttingDown("the server is shutting down; retry on another instance or later")
        if self._inbox.qsize() >= self.max_queue:
            with self._lock:
                self.counts["rejected"] += 1
            raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
        self._inbox.put(job)
        self._wake.set()

    def status(self) -> dict:
        with self._lock:
            out = {"busy": bool(self._running), "running": len(self._running), "queued": self._inbox.qsize(),
                   "max_batch": self.max_batch, **self.counts, "last": self.last}
        if self.checkpoints is not None:
            out["checkpoints"] = self.checkpoints.stats()
        return out

    def shutdown(self, grace: float = 5.0) -> None:
        """Stop taking requests; queued ones get a 503 error, running ones `grace` seconds to finish
        before they are cancelled. Returns at once; :meth:`run` returns when it is done."""
        if self._draining is None:
            self._draining = time.monotonic() + max(0.0, grace)
        self._wake.set()

    def generate(self, ids: Sequence[int], max_tokens: int = 256, sampling: Optional[SamplingParams] = None,
                 **options) -> Iterator[GenerationResponse]:
        """Submit a request from another thread than the engine's and yield its pieces."""
        box: "queue.Queue[tuple]" = queue.Queue()
        job = Request(list(ids), max_tokens, sampling or SamplingParams(), emit=box.put, **options)
        self.submit(job)
        try:
            while True:
                item = box.get()
                if item[0] == "end":
                    return
                if item[0] == "error":
                    raise PhiflashError(item[2])
                yield item[1]
        finally:
            job.cancelled.set()

    # --- the loop ---------------------------------------------------------------------------------

    def run(self, should_stop: Callable[[], bool] = lambda: False, poll: float = 0.05) -> None:
        """Serve until `should_stop()` is true or a shutdown has drained."""
        from mlx_lm.generate import BatchGenerator

        self._batch = BatchGenerator(self.model, max_tokens=1, completion_batch_size=self.max_batch,
                                     prefill_batch_size=self.prefill_batch_size,
                                     prefill_step_size=self.prefill_step_size)
        try:
            while True:
                if should_stop() and self._draining is None:
                    self.shutdown(0.0)
                if self._draining is not None:
                    self._reject_queued()
                    if not self._running:
                        break
                    if time.monotonic() >= self._draining:
                        for run in list(self._running.values()):
                            self._end(run, "cancelled", error=(503, "the server is shutting down; "
                                                                    "the generation was stopped"))
                        break
                self._reap_cancelled()
                if self._draining is None:
                    self._admit()
                if not self._running:
                    self._wake.wait(poll)
                    self._wake.clear()
                    continue
                self._step()
        finally:
            self._stopped.set()
            self._reject_queued()
            for run in list(self._running.values()):
                self._end(run, "cancelled", error=(503, "the server stopped"))
            self._batch.close()
            self._batch = None

    def _reject_queued(self) -> None:
        while True:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            with self._lock:
                self.counts["rejected"] += 1
            job.emit(("error", 503, "the server is shutting down; retry later"))
            job.emit(("end",))

    def _finish_count(self, outcome: str, tokens: int) -> None:
        with self._lock:
            self.counts[outcome] += 1
            self.last = {"outcome": outcome, "generation_tokens": tokens}

    def _reap_cancelled(self) -> None:
        for run in list(self._running.values()):
            if run.job.cancelled.is_set():
                self._end(run, "cancelled")

    def _end(self, run: _Running, outcome: str, error: Optional[tuple] = None, snapshot: bool = False) -> None:
        """Take `run` out of the batch (a snapshot of its cache first if asked) and close it."""
        if run.uid in self._running:
            del self._running[run.uid]
            if self._batch is not None:
                caches = self._batch.remove([run.uid], return_prompt_caches=snapshot)
                if snapshot and run.uid in caches:
                    self._save(*caches[run.uid])
        self._finish_count(outcome, run.generated)
        if error is not None:
            run.job.emit(("error",) + tuple(error))
        run.job.emit(("end",))

    def _save(self, cache, tokens) -> None:
        if self.checkpoints is not None and cache and tokens:
            self.checkpoints.save(tokens, cache)

    def _admit(self) -> None:
        while len(self._running) < self.max_batch:
            try:
                job = self._inbox.get_nowait()
            except queue.Empty:
                return
            if job.cancelled.is_set():                 # the client left while it waited
                self._finish_count("cancelled", 0)
                job.emit(("end",))
                continue
            try:
                self._insert(job)
            except PhiflashError as exc:
                self._finish_count("failed", 0)
                job.emit(("error", 400, str(exc)))
                job.emit(("end",))
            except Exception as exc:  # keep serving; this client gets a 500
                self._finish_count("failed", 0)
                job.emit(("error", 500, f"generation failed: {type(exc).__name__}: {exc}"))
                job.emit(("end",))

    def _insert(self, job: Request) -> None:
        from mlx_lm.generate import StopSequences

        ids = list(job.ids)
        if not ids:
            raise PhiflashError("the prompt is empty")
        vocab = self.model.args.vocab_size
        bad = next((t for t in ids if not 0 <= t < vocab), None)
        if bad is not None:
            raise PhiflashError(f"token id {bad} is outside the model's vocabulary (0..{vocab - 1})")
        if len(ids) >= self.max_context:
            raise PhiflashError(f"the prompt has {len(ids)} tokens but the context is {self.max_context}; "
                                "shorten it")
        limit = min(job.max_tokens, self.max_context - len(ids))
        sampler = Sampler(job.sampling)
        budget = None
        if job.max_thinking_tokens is not None:
            from .thinking import THINK_OPEN
            opened = self.tokenizer.decode(ids[-8:]).rstrip().endswith(THINK_OPEN)
            budget = ThinkingBudget(self.tokenizer, job.max_thinking_tokens, job.thinking_message, inside=opened)
        cached, cache = 0, None
        if self.checkpoints is not None:
            cached, cache = self.checkpoints.lookup(ids)
        if limit <= 0:
            run = _Running(job, -1, self.tokenizer, cached, budget)
            for piece in run.pieces("", None, "length")[-1:]:
                piece.finish_reason = "length"
                job.emit(("piece", piece))
            self._finish_count("completed", 0)
            job.emit(("end",))
            return
        # segments end at the message boundaries, so their caches can be saved there
        segments, start = [], cached
        cuts = job.cuts if self.checkpoints is not None else ()
        for cut in sorted(set(c for c in cuts if cached < c < len(ids) - 1)):
            segments.append(ids[start:cut])
            start = cut
        segments.append(ids[start:])
        if len(segments[-1]) > 1 and self.checkpoints is not None:
            segments[-1:] = [segments[-1][:-1], segments[-1][-1:]]     # a snapshot before the last token
        eos = sorted(getattr(self.tokenizer, "eos_token_ids", ()) or ()) if job.stop_on_eos else []
        (uid,) = self._batch.insert_segments(
            [segments], max_tokens=[limit], caches=[cache] if cache is not None else None,
            all_tokens=[ids[:cached]], samplers=[sampler],
            logits_processors=[[budget.processor()] if budget is not None else []],
            stop_sequences=[StopSequences([[e] for e in eos]) if eos else StopSequences()])
        self._running[uid] = _Running(job, uid, self.tokenizer, cached, budget)

    def _step(self) -> None:
        try:
            prompt_responses, generation_responses = self._batch.next()
        except Exception as exc:  # a failed step fails the requests in it; the engine keeps serving
            status = 400 if isinstance(exc, PhiflashError) else 500
            for run in list(self._running.values()):
                self._end(run, "failed", error=(status, f"generation failed: {type(exc).__name__}: {exc}"))
            self._reset_batch()
            return
        self.steps += 1
        for r in prompt_responses:
            if r.end_of_segment and not r.end_of_prompt and self.checkpoints is not None:
                extracted = self._batch.extract_cache([r.uid]).get(r.uid)
                if extracted is not None:
                    self._save(*extracted)
        for r in generation_responses:
            run = self._running.get(r.uid)
            if run is None:
                continue
            if run.t_first is None:
                run.t_first = time.perf_counter()
            run.generated += 1
            eos_hit = r.finish_reason == "stop"
            text = "" if eos_hit else run.stops.feed(run.detok.add_token(r.token))
            finish = r.finish_reason
            if run.stops.stopped:
                finish = "stop"
            if finish is None:
                for piece in run.pieces(text, r.token):
                    run.job.emit(("piece", piece))
                continue
            # the same pieces as Generator.stream: the last token's own piece (none for end-of-text),
            # then a closing piece without a token that carries the finish reason
            if not eos_hit:
                for piece in run.pieces(text, r.token, finish if run.stops.stopped else None):
                    run.job.emit(("piece", piece))
            tail = ""
            if not run.stops.stopped:
                tail = run.stops.feed(run.detok.finalize()) + run.stops.flush()
            pieces = run.pieces(tail, None, finish)
            pieces[-1].finish_reason = finish
            for piece in pieces:
                run.job.emit(("piece", piece))
            if r.finish_reason is not None:              # the batch already let it go
                del self._running[r.uid]
                if r.prompt_cache is not None and r.all_tokens is not None:
                    self._save(r.prompt_cache, list(r.all_tokens))
                self._finish_count("completed", run.generated)
                run.job.emit(("end",))
            else:                                        # a stop string: take it out ourselves
                self._end(run, "completed", snapshot=True)
        if self.on_step is not None:
            self.on_step({"step": self.steps, "running": len(self._running),
                          "prompt": [(r.uid, r.progress) for r in prompt_responses],
                          "generated": len(generation_responses)})

    def _reset_batch(self) -> None:
        from mlx_lm.generate import BatchGenerator
        self._batch.close()
        self._batch = BatchGenerator(self.model, max_tokens=1, completion_batch_size=self.max_batch,
                                     prefill_batch_size=self.prefill_batch_size,
                                     prefill_step_size=self.prefill_step_size)
        mx.clear_cache()
