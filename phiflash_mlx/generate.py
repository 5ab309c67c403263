"""Text generation: chunked prefill, cached decoding, sampling, stop conditions, streaming, multi-turn.

    model, tokenizer = phiflash_mlx.load("path/or/hub-id")
    text = phiflash_mlx.generate(model, tokenizer, [{"role": "user", "content": "What is 17 + 25?"}])
    for piece in phiflash_mlx.stream_generate(model, tokenizer, "Once upon", max_tokens=20, temp=0):
        print(piece.text, end="", flush=True)

A prompt is a string (encoded as plain text), a list of chat messages (the chat template is applied
with the generation prompt), or a list of token ids.
"""

from __future__ import annotations

import math
import numbers
import time
from dataclasses import dataclass, field
from typing import Iterator, Optional, Sequence, Union

import mlx.core as mx
import numpy as np

from .errors import PhiflashError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"
DEFAULT_MAX_CONTEXT = 65536          # the released model's context (SAMBAY.md 1.5)

Prompt = Union[str, Sequence[dict], Sequence[int]]


# ---------------------------------------------------------------------------------------------
# Sampling
# ---------------------------------------------------------------------------------------------

@dataclass
class SamplingParams:
    temp: float = 0.6
    top_p: float = 0.95
    top_k: int = 0
    min_p: float = 0.0
    seed: Optional[int] = None

    def validate(self):
        """Refuse what would sample garbage (NaN/inf temperature, ...). A seed may be any integer: it is
        reduced modulo 2^64 (so -1 is 2^64 - 1), the range of MLX's random keys."""
        for name, value in (("temperature", self.temp), ("top_p", self.top_p), ("min_p", self.min_p)):
            if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value):
                raise PhiflashError(f"{name} must be a finite number, got {value!r}")
        if isinstance(self.top_k, bool) or not isinstance(self.top_k, numbers.Integral):
            raise PhiflashError(f"top_k must be an integer, got {self.top_k!r}")
        if self.seed is not None:
            if isinstance(self.seed, bool) or not isinstance(self.seed, numbers.Integral):
                raise PhiflashError(f"seed must be an integer, got {self.seed!r}")
            self.seed = int(self.seed) % 2**64
        if self.temp < 0:
            raise PhiflashError(f"temperature must be >= 0, got {self.temp}")
        if not 0 < self.top_p <= 1:
            raise PhiflashError(f"top_p must be in (0, 1], got {self.top_p}")
        if self.top_k < 0:
            raise PhiflashError(f"top_k must be >= 0 (0 turns it off), got {self.top_k}")
        if not 0 <= self.min_p < 1:
            raise PhiflashError(f"min_p must be in [0, 1), got {self.min_p}")


def filter_logprobs(logprobs: mx.array, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> mx.array:
    """Set to -inf every token that top-k, min-p or top-p (nucleus) excludes. logprobs: (b, V)."""
    neg_inf = mx.array(-float("inf"), dtype=logprobs.dtype)
    V = logprobs.shape[-1]
    if 0 < top_k < V:
        kth = mx.sort(logprobs, axis=-1)[:, V - top_k][:, None]
        logprobs = mx.where(logprobs < kth, neg_inf, logprobs)
    if min_p > 0:
        threshold = logprobs.max(axis=-1, keepdims=True) + mx.log(mx.array(min_p))
        logprobs = mx.where(logprobs < threshold, neg_inf, logprobs)
    if top_p < 1.0:
        order = mx.argsort(-logprobs, axis=-1)                          # most likely first
        sorted_lp = mx.take_along_axis(logprobs, order, axis=-1)
        probs = mx.softmax(sorted_lp, axis=-1)
        before = mx.cumsum(probs, axis=-1) - probs                      # mass of the tokens ranked higher
        keep_sorted = before < top_p                                    # the first token always stays
        keep = mx.put_along_axis(mx.zeros(keep_sorted.shape, mx.bool_), order, keep_sorted, axis=-1)
        logprobs = mx.where(keep, logprobs, neg_inf)
    return logprobs


def nucleus_host(prob: np.ndarray, top_p: float = 1.0, top_k: int = 0, min_p: float = 0.0) -> np.ndarray:
    """The token ids `filter_logprobs` keeps, from one row of probabilities (V,) (float32 or float64,
    any positive scale), without sorting the vocabulary: top-k and min-p make the survivors S; a
    survivor whose share of S's mass is below (1 - top_p) / |S| cannot be in the nucleus (every token
    ranked at or after it together holds less than 1 - top_p). Of the others, a token stays while the
    mass ranked above it is below top_p: few of them are sorted; many (a flat distribution) are put
    in buckets of log-probability, the bucket where the mass reaches top_p is found from the
    buckets' masses, and only that bucket is sorted. Ids in no particular order."""
    V = prob.shape[0]
    survive = None
    if 0 < top_k < V:
        kth = np.partition(prob, V - top_k)[V - top_k]
        survive = prob >= kth
    if min_p > 0:
        at_least = prob >= prob.max() * min_p
        survive = at_least if survive is None else survive & at_least
    if top_p >= 1.0:
        return np.flatnonzero(survive) if survive is not None else np.arange(V)
    mass = float(prob.sum(dtype=np.float64) if survive is None else prob[survive].sum(dtype=np.float64))
    count = V if survive is None else int(survive.sum())
    cand = prob >= (1.0 - top_p) * mass / count
    if survive is not None:
        cand &= survive
    ids = np.flatnonzero(cand)
    above, sure = 0.0, ids[:0]
    if len(ids) > _SORT_AT_MOST:
        pc = prob[ids].astype(np.float64)
        logs = np.log(pc)
        top, span = logs.max(), max(logs.max() - logs.min(), 1e-30)
        bucket = ((top - logs) * ((_BUCKETS - 1) / span)).astype(np.int64)      # 0: the most likely
        bmass = np.bincount(bucket, weights=pc, minlength=_BUCKETS) / mass
        before = np.cumsum(bmass) - bmass                                   # mass of the buckets above
        last = int(np.flatnonzero(before < top_p)[-1])                      # the bucket where it is reached
        sure, above = ids[bucket < last], float(before[last])
        ids = ids[bucket == last]
    ids = ids[np.argsort(-prob[ids], kind="stable")]
    q = prob[ids].astype(np.float64) / mass
    before = above + np.cumsum(q) - q
    return np.concatenate([sure, ids[before < top_p]])                 # (the most likely always stays)


_SORT_AT_MOST = 2048   # candidates sorted as they are; more go through the buckets
_BUCKETS = 4096


def _pick(weights: np.ndarray, u: float, block: int = 256) -> int:
    """The index i where u (in [0, 1)) of the weights' total falls in their running sum: i with
    probability weights[i] / total. Running sums of blocks first, then within the one block (a
    float64 running sum over 200064 values alone took 2 ms)."""
    n = weights.shape[0]
    if n <= 4 * block:
        cdf = np.cumsum(weights, dtype=np.float64)
        return _nonzero_at(weights, min(int(np.searchsorted(cdf, u * cdf[-1], side="right")), n - 1))
    pad = (-n) % block
    w = np.concatenate([weights, np.zeros(pad, weights.dtype)]) if pad else weights
    sums = np.cumsum(w.reshape(-1, block).sum(axis=1, dtype=np.float64))
    target = u * sums[-1]
    b = min(int(np.searchsorted(sums, target, side="right")), len(sums) - 1)
    inner = np.cumsum(w[b * block:(b + 1) * block], dtype=np.float64)
    j = min(int(np.searchsorted(inner, target - (sums[b - 1] if b else 0.0), side="right")), block - 1)
    return _nonzero_at(weights, min(b * block + j, n - 1))


def _nonzero_at(weights: np.ndarray, i: int) -> int:
    """i, or where rounding put it on a zero weight, the nearest index before it with weight."""
    while i > 0 and weights[i] <= 0:
        i -= 1
    return i


class Sampler:
    """Greedy at temperature 0, else a draw from the filtered, tempered distribution. Seeded draws
    are reproducible: the same seed gives the same tokens; unseeded ones follow `mx.random.seed`.

    On a CPU device the draw is made on the host: the filters of `filter_logprobs` over MLX's CPU ops
    (a sort of the whole vocabulary for top-p, and one random number per token for the draw) took
    ~32 ms per token at the released model's 200064 tokens, a third of a decode step; here only the
    tokens that can be in the nucleus are sorted (`nucleus_host`) and one uniform number per row
    picks the token by the cumulative probabilities: the same distribution."""

    def __init__(self, params: SamplingParams):
        params.validate()
        self.params = params
        self.key = mx.random.key(params.seed) if params.seed is not None else None

    def _uniform(self, rows: int) -> mx.array:
        if self.key is None:
            return mx.random.uniform(shape=(rows,))
        self.key, sub = mx.random.split(self.key)
        return mx.random.uniform(shape=(rows,), key=sub)

    def __call__(self, logits: mx.array) -> mx.array:
        p = self.params
        if p.temp == 0:
            return mx.argmax(logits, axis=-1)
        if mx.default_device().type == mx.DeviceType.cpu and logits.ndim == 2:
            token = self._host(logits)
            if token is not None:
                return token
        return self._ops(logits)

    def _ops(self, logits: mx.array) -> mx.array:
        """The draw through MLX's ops (temperature > 0): `filter_logprobs` and one categorical draw."""
        p = self.params
        logprobs = logits / p.temp
        logprobs = logprobs - mx.logsumexp(logprobs, axis=-1, keepdims=True)
        logprobs = filter_logprobs(logprobs, p.top_p, p.top_k, p.min_p)
        if self.key is None:
            return mx.random.categorical(logprobs)
        self.key, sub = mx.random.split(self.key)
        return mx.random.categorical(logprobs, key=sub)

    def _host(self, logits: mx.array) -> mx.array | None:
        """The draw on the host; None for a row without a finite maximum (NaN or +inf logits: MLX's ops
        decide, as everywhere else)."""
        p = self.params
        x = np.asarray(logits.astype(mx.float32) if logits.dtype != mx.float32 else logits)
        if not np.isfinite(x.max(axis=-1)).all():
            return None
        u = np.asarray(self._uniform(logits.shape[0]), dtype=np.float64)
        out = np.empty((x.shape[0],), dtype=np.uint32)
        for row in range(x.shape[0]):
            prob = np.exp((x[row] - x[row].max()) * np.float32(1.0 / p.temp))
            ids = nucleus_host(prob, p.top_p, p.top_k, p.min_p)
            whole = len(ids) == len(prob)                          # (no filter: every id, in order)
            j = _pick(prob if whole else prob[ids], float(u[row]))
            out[row] = j if whole else ids[j]
        return mx.array(out)


# ---------------------------------------------------------------------------------------------
# Streams of text: stop strings and the <think> section
# ---------------------------------------------------------------------------------------------

class StopStringFilter:
    """Holds back text that may be the start of a stop string; reports when one appears."""

    def __init__(self, stops: Sequence[str]):
        self.stops = [s for s in stops if s]
        self.pending = ""
        self.stopped = False

    def feed(self, text: str) -> str:
        if not self.stops:
            return text
        self.pending += text
        hits = [(self.pending.find(s), s) for s in self.stops if s in self.pending]
        if hits:
            cut = min(h[0] for h in hits)
            out, self.pending, self.stopped = self.pending[:cut], "", True
            return out
        hold = 0
        for s in self.stops:
            for k in range(min(len(s) - 1, len(self.pending)), 0, -1):
                if self.pending.endswith(s[:k]):
                    hold = max(hold, k)
                    break
        out = self.pending[:len(self.pending) - hold]
        self.pending = self.pending[len(out):]
        return out

    def flush(self) -> str:
        out, self.pending = self.pending, ""
        return out


class ReasoningSplitter:
    """Splits streamed text into reasoning (inside <think> ... </think>) and answer pieces.

    The tags are consumed; a tag split across pieces is recognised. The released model writes the
    reasoning trace as plain text starting with <think> (there is no think token, SAMBAY.md 6.2).
    """

    def __init__(self):
        self.inside = False
        self.buffer = ""

    def feed(self, text: str) -> list[tuple[bool, str]]:
        """Returns [(is_reasoning, text), ...] for the text that is now certain."""
        self.buffer += text
        out = []
        while self.buffer:
            tag = THINK_CLOSE if self.inside else THINK_OPEN
            i = self.buffer.find(tag)
            if i >= 0:
                if i:
                    out.append((self.inside, self.buffer[:i]))
                self.buffer = self.buffer[i + len(tag):]
                self.inside = not self.inside
                continue
            hold = next((k for k in range(min(len(tag) - 1, len(self.buffer)), 0, -1)
                         if self.buffer.endswith(tag[:k])), 0)
            emit = self.buffer[:len(self.buffer) - hold]
            if emit:
                out.append((self.inside, emit))
            self.buffer = self.buffer[len(emit):]
            break
        return out

    def flush(self) -> list[tuple[bool, str]]:
        out = [(self.inside, self.buffer)] if self.buffer else []
        self.buffer = ""
        return out


def split_reasoning(text: str) -> tuple[str, str]:
    """(reasoning, answer) of a complete response."""
    s = ReasoningSplitter()
    parts = s.feed(text) + s.flush()
    return ("".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip())


# ---------------------------------------------------------------------------------------------
# Generation
# ---------------------------------------------------------------------------------------------

@dataclass
class GenerationResponse:
    """One streamed piece. `text` may be empty (a token that completes no character yet)."""
    text: str
    token: Optional[int]
    reasoning: bool = False                 # the piece belongs to the <think> section
    prompt_tokens: int = 0
    prompt_tps: float = 0.0
    generation_tokens: int = 0
    generation_tps: float = 0.0
    peak_memory: float = 0.0                # GB
    finish_reason: Optional[str] = None     # "stop", "length" or None while generating
    cached_tokens: int = 0                  # prompt tokens restored from a checkpoint, not prefilled


def peak_memory_gb() -> float:
    for getter in (getattr(mx, "get_peak_memory", None), getattr(getattr(mx, "metal", None), "get_peak_memory", None)):
        if getter is not None:
            try:
                return getter() / 1e9
            except Exception:  # some back-ends do not track it
                continue
    return 0.0


def prompt_ids(tokenizer, prompt: Prompt) -> list[int]:
    if isinstance(prompt, str):
        if tokenizer is None:
            raise PhiflashError("a text prompt needs a tokenizer; this checkpoint has none, so pass token ids")
        return tokenizer.encode(prompt)
    prompt = list(prompt)
    if prompt and isinstance(prompt[0], dict):
        if tokenizer is None:
            raise PhiflashError("chat messages need a tokenizer; this checkpoint has none")
        return list(tokenizer.apply_chat_template(prompt, add_generation_prompt=True))
    return [int(t) for t in prompt]


def prefill(model, ids: Sequence[int], cache, step_size: int = 512, progress=None, cuts: Sequence[int] = (),
            at_cut=None) -> mx.array:
    """Feed `ids` through the model in chunks of `step_size` (no T×T attention for long prompts);
    returns the logits (1, V) of the last token. Chunks also end at each position in `cuts`, where
    `at_cut(position)` is called (a checkpoint can be taken there); the last token is fed alone."""
    if not ids:
        raise PhiflashError("the prompt is empty")
    if step_size < 1:
        raise PhiflashError(f"prefill step size must be positive, got {step_size}")
    ids = list(ids)
    cuts = sorted(c for c in set(cuts) if 0 < c < len(ids))
    done = 0
    while len(ids) - done > 1:
        n = min(step_size, len(ids) - done - 1)
        nxt = next((c for c in cuts if c > done), None)
        if nxt is not None:
            n = min(n, nxt - done)
        model(mx.array([ids[done:done + n]]), cache=cache)
        mx.eval([c.state for c in cache])                    # logits of these chunks are never computed
        done += n
        if progress is not None:
            progress(done, len(ids))
        if at_cut is not None and done in cuts:
            at_cut(done)
    logits = model(mx.array([ids[-1:]]), cache=cache)[:, -1]
    if progress is not None:
        progress(len(ids), len(ids))
    return logits


class Generator:
    """Owns a cache and the tokens it holds, so a conversation can continue without re-prefilling.

    `tokens` are the ids the cache has seen; `pending` ids are known (a sampled final token) but not
    fed yet; they go in front of the next prompt.
    """

    def __init__(self, model, tokenizer, max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512):
        self.model, self.tokenizer = model, tokenizer
        self.max_context = max_context
        self.prefill_step_size = prefill_step_size
        self.reset()

    def reset(self):
        self.cache = self.model.make_cache()
        self.tokens: list[int] = []
        self.pending: list[int] = []

    def _snapshot(self):
        # arrays are immutable values; only containers (ArraysCache's list) need their own copy
        return [{k: list(v) if isinstance(v, list) else v for k, v in vars(c).items()} for c in self.cache], \
            len(self.tokens)

    def _restore(self, saved):
        states, n = saved
        for c, state in zip(self.cache, states):
            vars(c).clear()
            vars(c).update(state)
        del self.tokens[n:]

    @property
    def eos_ids(self) -> set:
        tok = self.tokenizer
        return set(getattr(tok, "eos_token_ids", ()) or ()) if tok is not None else set()

    def stream(self, new_ids: Sequence[int], max_tokens: int = 4096, sampling: SamplingParams | None = None,
               stop: Sequence[str] = (), stop_on_eos: bool = True, progress=None,
               max_thinking_tokens: Optional[int] = None, thinking_message: str = "",
               checkpoints=None, cuts: Sequence[int] = ()) -> Iterator[GenerationResponse]:
        """Generate after feeding `new_ids`. `max_thinking_tokens` closes the <think> section after
        that many tokens (see serving.thinking). `checkpoints` (a serving.CheckpointStore): a fresh
        generator resumes from the longest snapshot that is a prefix of its prompt, and snapshots
        are saved at `cuts` (positions in the prompt), before the prompt's last token and at the end
        of the generation."""
        sampling = sampling or SamplingParams()
        sampler = Sampler(sampling)
        cached = 0
        if checkpoints is not None and not self.tokens and not self.pending:
            cached, restored = checkpoints.lookup(new_ids)
            if restored is not None:
                self.cache, self.tokens = restored, list(new_ids[:cached])
                new_ids = list(new_ids[cached:])
        budget = None
        if max_thinking_tokens is not None:
            from .serving.thinking import THINK_OPEN as _OPEN, ThinkingBudget
            if self.tokenizer is None:
                raise PhiflashError("a thinking budget needs a tokenizer")
            before = list(self.tokens[-8:]) + list(new_ids)
            opened = self.tokenizer.decode(before[-8:]).rstrip().endswith(_OPEN) if before else False
            budget = ThinkingBudget(self.tokenizer, max_thinking_tokens, thinking_message, inside=opened)
        feed = self.pending + list(new_ids)
        if max_tokens < 0:
            raise PhiflashError(f"max_tokens must be >= 0, got {max_tokens}")
        used = len(self.tokens) + len(feed)
        if used >= self.max_context:
            raise PhiflashError(
                f"the prompt needs {used} tokens of context (history included) but the limit is "
                f"{self.max_context}; shorten the prompt, start a new conversation, or raise --max-context")
        vocab = self.model.args.vocab_size
        bad = [t for t in feed if not 0 <= t < vocab]
        if bad:
            raise PhiflashError(f"token id {bad[0]} is outside the model's vocabulary (0..{vocab - 1})")
        detok = self.tokenizer.detokenizer() if self.tokenizer is not None else None
        stops = StopStringFilter(stop)
        think = ReasoningSplitter()
        eos = self.eos_ids if stop_on_eos else set()

        t0 = time.perf_counter()
        saved = self._snapshot()
        base = len(self.tokens)
        prompt_all = list(self.tokens) + feed

        def at_cut(done):
            checkpoints.save(prompt_all[:base + done], self.cache)

        try:
            if checkpoints is not None:
                cut_at = [c - base for c in cuts if base < c < len(prompt_all)] + [len(feed) - 1]
                logits = prefill(self.model, feed, self.cache, self.prefill_step_size, progress, cut_at, at_cut)
            else:
                logits = prefill(self.model, feed, self.cache, self.prefill_step_size, progress)
            token = sampler(budget.apply(logits) if budget is not None else logits)
            mx.eval(token)
        except BaseException:                  # interrupted prefill: the turn never happened
            self._restore(saved)
            raise
        self.tokens += feed
        self.pending = []
        t1 = time.perf_counter()
        prompt_tps = len(feed) / max(t1 - t0, 1e-9)
        n = 0
        stats = dict(prompt_tokens=len(feed) + cached, prompt_tps=prompt_tps, cached_tokens=cached)

        def pieces(text, token_id, finish=None):
            out = []
            for is_reasoning, part in think.feed(text) if text else []:
                out.append(GenerationResponse(part, token_id, is_reasoning, **stats))
            if finish is not None:
                out += [GenerationResponse(part, token_id, r, **stats) for r, part in think.flush()]
            if not out:
                out.append(GenerationResponse("", token_id, think.inside, **stats))
            return out

        finish = None
        while True:
            if n >= max_tokens:
                finish = "length"
                break
            if len(self.tokens) + len(self.pending) >= self.max_context:
                finish = "length"
                break
            tid = int(token.item())
            n += 1
            if tid in eos:
                self.pending = [tid]                              # closes the turn in the history
                finish = "stop"
                break
            # feed this token while the caller reads its text
            saved = self._snapshot()
            try:
                logits = self.model(mx.array([[tid]]), cache=self.cache)[:, -1]
                if budget is not None:
                    budget.observe(tid)
                    logits = budget.apply(logits)
                next_token = sampler(logits)
                mx.async_eval(next_token)
            except BaseException:              # Ctrl-C inside the model call: keep the cache consistent
                self._restore(saved)
                raise
            self.tokens.append(tid)
            text = detok.add_token(tid) if detok is not None else ""
            text = stops.feed(text)
            elapsed = time.perf_counter() - t1
            stats.update(generation_tokens=n, generation_tps=n / max(elapsed, 1e-9), peak_memory=peak_memory_gb())
            if stops.stopped:
                finish = "stop"
                yield from pieces(text, tid, finish)
                break
            yield from pieces(text, tid)
            token = next_token
        tail = ""
        if detok is not None and not stops.stopped:
            tail = stops.feed(detok.finalize()) + stops.flush()
        elapsed = time.perf_counter() - t1
        stats.update(generation_tokens=n, generation_tps=n / max(elapsed, 1e-9), peak_memory=peak_memory_gb())
        if checkpoints is not None:
            checkpoints.save(self.tokens, self.cache)
        final = pieces(tail, None, finish)
        final[-1].finish_reason = finish
        yield from final


def _sampling(temp, top_p, top_k, min_p, seed) -> SamplingParams:
    return SamplingParams(temp=temp, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed)


def stream_generate(model, tokenizer, prompt: Prompt, max_tokens: int = 256, temp: float = 0.6, top_p: float = 0.95,
                    top_k: int = 0, min_p: float = 0.0, seed: Optional[int] = None, stop: Sequence[str] = (),
                    max_context: int = DEFAULT_MAX_CONTEXT, prefill_step_size: int = 512,
                    generator: Optional[Generator] = None, max_thinking_tokens: Optional[int] = None,
                    thinking_message: str = "", prompt_cache=None) -> Iterator[GenerationResponse]:
    """Yield `GenerationResponse` pieces as tokens are produced. Pass a `Generator` to continue a
    conversation in its cache (then `prompt` holds only the new turn's messages or ids).

    `max_thinking_tokens`: close the <think> section after that many tokens (0 skips thinking),
    optionally after `thinking_message`. `prompt_cache`: a `phiflash_mlx.serving.CheckpointStore`;
    the prompt resumes from its longest matching snapshot and new snapshots are saved (before the
    last user message, at the end of the prompt, at the end of the answer)."""
    gen = generator or Generator(model, tokenizer, max_context, prefill_step_size)
    ids = prompt_ids(tokenizer, prompt)
    cuts = ()
    if prompt_cache is not None and tokenizer is not None and not isinstance(prompt, str):
        messages = list(prompt)
        if messages and isinstance(messages[0], dict):
            from .serving.checkpoints import message_cuts
            cuts = message_cuts(tokenizer, messages, ids)
    yield from gen.stream(ids, max_tokens, _sampling(temp, top_p, top_k, min_p, seed), stop,
                          max_thinking_tokens=max_thinking_tokens, thinking_message=thinking_message,
                          checkpoints=prompt_cache, cuts=cuts)


def generate(model, tokenizer, prompt: Prompt, verbose: bool = False, **kwargs) -> str:
    """The whole response as one string (the <think> section included, tags and all, as the model
    wrote it; `split_reasoning` separates it)."""
    out = []
    last = None
    in_think = False
    for piece in stream_generate(model, tokenizer, prompt, **kwargs):
        if piece.reasoning and not in_think:
            out.append(THINK_OPEN)
        if not piece.reasoning and in_think:
            out.append(THINK_CLOSE)
        in_think = piece.reasoning
        out.append(piece.text)
        if verbose:
            print(piece.text, end="", flush=True)
        last = piece
    if in_think and last is not None and last.finish_reason is None:
        out.append(THINK_CLOSE)
    if verbose and last is not None:
        print(f"\n[{last.prompt_tokens} prompt tokens at {last.prompt_tps:.1f} tok/s, "
              f"{last.generation_tokens} generated at {last.generation_tps:.1f} tok/s]")
    return "".join(out)


@dataclass
class ChatSession:
    """A multi-turn conversation that reuses its cache: each turn prefills only its new tokens.
    With `prompt_cache` (a `phiflash_mlx.serving.CheckpointStore`), a new session whose first turn
    starts like an earlier conversation (the same system message, say) resumes from its checkpoint,
    and every turn leaves checkpoints for later sessions."""
    model: object
    tokenizer: object
    system: Optional[str] = None
    max_context: int = DEFAULT_MAX_CONTEXT
    prefill_step_size: int = 512
    messages: list = field(default_factory=list)
    prompt_cache: object = None          # a serving.CheckpointStore shared by sessions (optional)

    def __post_init__(self):
        if self.tokenizer is None:
            raise PhiflashError("chat needs a tokenizer; this checkpoint has no tokenizer files")
        self.generator = Generator(self.model, self.tokenizer, self.max_context, self.prefill_step_size)
        self._primed = False

    def reset(self, system: Optional[str] = None):
        self.system = system
        self.messages = []
        self.generator.reset()
        self._primed = False

    def send(self, text: str, progress=None, **kwargs) -> Iterator[GenerationResponse]:
        """Stream the assistant's answer to a user message. kwargs: max_tokens, temp, top_p, top_k,
        min_p, seed, stop, max_thinking_tokens, thinking_message; `progress(done, total)` is called
        during a long prefill."""
        turn = []
        if not self._primed and self.system:
            turn.append({"role": "system", "content": self.system})
        turn.append({"role": "user", "content": text})
        ids = list(self.tokenizer.apply_chat_template(turn, add_generation_prompt=True))
        gen = self.generator
        if gen.tokens and not gen.pending:
            # the last answer ended without <|end|> (length limit or interruption): close the turn
            end_id = self.tokenizer.added_tokens.get("<|end|>") if hasattr(self.tokenizer, "added_tokens") else None
            if end_id is not None:
                ids = [end_id.id] + ids
        max_tokens = kwargs.pop("max_tokens", 4096)
        stop = kwargs.pop("stop", ())
        budget = dict(max_thinking_tokens=kwargs.pop("max_thinking_tokens", None),
                      thinking_message=kwargs.pop("thinking_message", ""))
        self._primed = True
        self.messages += turn
        answer = []
        for piece in gen.stream(ids, max_tokens, SamplingParams(**kwargs), stop, progress=progress,
                                checkpoints=self.prompt_cache, **budget):
            answer.append(piece)
            yield piece
        self.messages.append({"role": "assistant", "content": "".join(p.text for p in answer)})
