"""Generation: sampling, stop strings, the <think> split, chunked prefill and multi-turn cache reuse."""

import importlib

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

import phiflash_mlx
import reference
from phiflash_mlx.errors import PhiflashError
from phiflash_mlx.generate import (ChatSession, Generator, ReasoningSplitter, SamplingParams, Sampler,
                                   StopStringFilter, _pick, filter_logprobs, nucleus_host, split_reasoning)
from chat_fixture import build_chat_model_dir
from conftest import GOLDEN_MODELS, golden_path

generate_module = importlib.import_module("phiflash_mlx.generate")   # (the package's `generate` is the function)


@pytest.fixture(scope="module")
def chat_model_dir(tmp_path_factory):
    return build_chat_model_dir(tmp_path_factory.mktemp("chatmodel"))


@pytest.fixture(scope="module")
def chat_model(chat_model_dir):
    return phiflash_mlx.load(str(chat_model_dir))


# --- sampling ---------------------------------------------------------------------------------

def test_greedy_matches_reference_argmax():
    name = GOLDEN_MODELS[0]
    ref = reference.load(str(golden_path(name)))
    model, _ = phiflash_mlx.load(str(golden_path(name)))
    prompt = list(range(3, 30))
    got = [p.token for p in phiflash_mlx.stream_generate(model, None, prompt, max_tokens=8, temp=0) if p.token is not None]
    ids = list(prompt)
    for _ in range(8):
        ids.append(int(ref.forward(np.array([ids]))[0, -1].argmax()))
    assert got == ids[len(prompt):]


def _allowed(lp, top_k, top_p, min_p):
    """The tokens the filters allow, written out independently in NumPy: each filter on its own keeps
    a set; the nucleus is computed over the renormalised survivors of the others."""
    V = lp.shape[0]
    order = np.argsort(-lp, kind="stable")
    allowed = np.ones(V, bool)
    if 0 < top_k < V:
        allowed &= lp >= np.sort(lp)[V - top_k]
    if min_p > 0:
        allowed &= lp >= lp.max() + np.log(min_p)
    if top_p < 1:
        probs = np.exp(lp)
        probs = np.where(allowed, probs, 0) / np.where(allowed, probs, 0).sum()
        ranked = [i for i in order if allowed[i]]
        mass, nucleus = 0.0, set()
        for i in ranked:
            if mass >= top_p - 1e-6 and nucleus:
                break
            nucleus.add(i)
            mass += probs[i]
        allowed &= np.isin(np.arange(V), list(nucleus))
    return allowed


def _log_softmax(logits):
    return logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()


@settings(max_examples=30)
@given(seed=st.integers(0, 2**20), V=st.integers(2, 40), top_k=st.integers(0, 10),
       top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.05, 0.3]))
def test_filters_never_emit_excluded_tokens(seed, V, top_k, top_p, min_p):
    rng = np.random.default_rng(seed)
    logits = rng.normal(0, 3, V).astype(np.float32)
    allowed = _allowed(_log_softmax(logits), top_k, top_p, min_p)
    filtered = np.array(filter_logprobs(mx.array(_log_softmax(logits)[None]), top_p, top_k, min_p))[0]
    kept = np.isfinite(filtered)
    assert kept.any()
    assert not (kept & ~allowed).any(), "a token outside the allowed set survived"
    sampler = Sampler(SamplingParams(temp=1.0, top_p=top_p, top_k=top_k, min_p=min_p, seed=seed))
    for _ in range(5):
        assert kept[int(sampler(mx.array(logits[None])).item())]


@settings(max_examples=40)
@given(seed=st.integers(0, 2**20), V=st.integers(2, 3000), top_k=st.integers(0, 50),
       top_p=st.floats(0.05, 1.0), min_p=st.sampled_from([0.0, 0.01, 0.3]), spread=st.sampled_from([0.5, 3.0, 12.0]),
       sort_limit=st.sampled_from([0, 5, 2048]))
def test_host_nucleus_is_the_allowed_set(seed, V, top_k, top_p, min_p, spread, sort_limit):
    """nucleus_host (the CPU sampler's filters, which sort only the tokens that can be in the
    nucleus, or only one bucket of them) keeps exactly the tokens the written-out filters allow;
    the buckets are forced for every example by a low sort limit."""
    rng = np.random.default_rng(seed)
    lp = _log_softmax(rng.normal(0, spread, V))
    want = _allowed(lp, top_k, top_p, min_p)
    old = generate_module._SORT_AT_MOST
    generate_module._SORT_AT_MOST = sort_limit
    try:
        ids = nucleus_host(np.exp(lp - lp.max()), top_p, top_k, min_p)
    finally:
        generate_module._SORT_AT_MOST = old
    got = np.zeros(V, bool)
    got[ids] = True
    assert len(ids) == got.sum() and (got == want).all(), (np.flatnonzero(got ^ want), len(ids))


@pytest.mark.parametrize("n", [1, 7, 1024, 1025, 200064])
def test_pick_follows_the_running_sum(n):
    """_pick (the CPU sampler's draw) returns the index whose share of the running sum holds u, the
    same as a search over the whole running sum, also across its blocks and a partial last block."""
    rng = np.random.default_rng(n)
    w = rng.random(n).astype(np.float32) ** 4
    w[rng.random(n) < 0.2] = 0                       # excluded tokens: weight 0, never picked
    if not w.any():
        w[0] = 1
    cdf = np.cumsum(w, dtype=np.float64)
    for u in np.concatenate([rng.random(200), [0.0, 1 - 1e-12]]):
        j = _pick(w, float(u))
        assert w[j] > 0
        assert cdf[j] - w[j] <= u * cdf[-1] * (1 + 1e-9) + 1e-12 and u * cdf[-1] <= cdf[j] * (1 + 1e-9) + 1e-12


def test_cpu_draws_follow_the_filtered_distribution():
    """The host draw, seeded: over 20000 draws each allowed token comes up in proportion to its
    tempered probability renormalised over the allowed set (within 0.015), others never."""
    logits = np.array([2.0, 1.5, 1.0, 0.2, -1.0, -3.0, 0.9], np.float32)
    temp, top_p = 0.7, 0.9
    lp = _log_softmax(logits / temp)
    allowed = _allowed(lp, 0, top_p, 0.0)
    want = np.where(allowed, np.exp(lp), 0)
    want /= want.sum()
    sampler = Sampler(SamplingParams(temp=temp, top_p=top_p, seed=3))
    draws = np.asarray(sampler(mx.array(np.repeat(logits[None], 20000, axis=0))))
    freq = np.bincount(draws, minlength=len(logits)) / len(draws)
    assert (freq[~allowed] == 0).all()
    assert np.abs(freq - want).max() < 0.015, (freq, want)


def test_seed_is_reproducible(chat_model):
    model, tok = chat_model
    msgs = [{"role": "user", "content": "what is 3 plus 4?"}]
    run = lambda seed: [p.token for p in phiflash_mlx.stream_generate(  # noqa: E731
        model, tok, msgs, max_tokens=12, temp=1.0, top_p=1.0, seed=seed)]
    assert run(7) == run(7)
    assert run(7) != run(8) or run(7) != run(9)


def test_bad_sampling_options_are_clear_errors(chat_model):
    model, tok = chat_model
    for bad in (dict(temp=-1), dict(top_p=0), dict(top_k=-2), dict(min_p=1.5)):
        with pytest.raises(PhiflashError):
            list(phiflash_mlx.stream_generate(model, tok, "hi", max_tokens=2, **bad))


# --- prompt handling, context, chunked prefill ---------------------------------------------------

def test_prompt_longer_than_context_is_a_clear_error(chat_model):
    model, tok = chat_model
    with pytest.raises(PhiflashError, match="limit is 16"):
        list(phiflash_mlx.stream_generate(model, tok, "what is 1 plus 2? " * 10, max_context=16))


def test_out_of_vocabulary_ids_are_a_clear_error(chat_model):
    model, tok = chat_model
    with pytest.raises(PhiflashError, match="outside the model's vocabulary"):
        list(phiflash_mlx.stream_generate(model, tok, [1, 2, 9999]))


@pytest.mark.parametrize("step", [1, 3, 512])
def test_chunked_prefill_gives_the_same_tokens(chat_model, step):
    model, tok = chat_model
    prompt = tok.encode("what is 12 plus 30? the answer is 42. " * 3)
    base = [p.token for p in phiflash_mlx.stream_generate(model, tok, prompt, max_tokens=6, temp=0)]
    got = [p.token for p in phiflash_mlx.stream_generate(model, tok, prompt, max_tokens=6, temp=0,
                                                          prefill_step_size=step)]
    assert got == base


def test_generation_stops_at_max_tokens_and_reports_stats(chat_model):
    model, tok = chat_model
    pieces = list(phiflash_mlx.stream_generate(model, tok, [{"role": "user", "content": "hi"}], max_tokens=5,
                                               temp=0))
    last = pieces[-1]
    assert last.finish_reason in ("length", "stop")
    assert last.generation_tokens <= 5 and last.prompt_tokens > 0
    assert last.prompt_tps > 0 and last.generation_tps > 0


# --- multi-turn ---------------------------------------------------------------------------------

@pytest.mark.parametrize("ending", ["length", "stop"])
def test_multi_turn_reuses_cache_and_equals_full_rerun(chat_model, ending, monkeypatch):
    model, tok = chat_model
    if ending == "stop":
        # make the third greedy token of the first answer an end-of-turn token, so the turn ends on eos
        probe = ChatSession(model, tok, system="be brief")
        tokens = [p.token for p in probe.send("what is 2 plus 2?", max_tokens=6, temp=0)]
        monkeypatch.setattr(tok, "eos_token_ids", (tokens[2],))
    chat = ChatSession(model, tok, system="be brief")
    first = list(chat.send("what is 2 plus 2?", max_tokens=6, temp=0))
    assert first[-1].finish_reason == ending
    history = list(chat.generator.tokens) + list(chat.generator.pending)
    second = list(chat.send("and 3 plus 3?", max_tokens=6, temp=0))
    new_turn = tok.apply_chat_template([{"role": "user", "content": "and 3 plus 3?"}])
    # an answer cut off by max_tokens is closed with <|end|>; one that ended on eos has it pending
    closing = [] if first[-1].finish_reason == "stop" else [tok.added_tokens["<|end|>"].id]
    # only the new turn (plus the closing token) was prefilled, not the history
    assert second[-1].prompt_tokens == len(new_turn) + 1
    # the same tokens as a fresh run over the whole conversation
    full = history + closing + list(new_turn)
    fresh = Generator(model, tok)
    again = [p.token for p in fresh.stream(full, 6, SamplingParams(temp=0))]
    assert [p.token for p in second] == again
    assert len(chat.messages) == 5          # system, user, assistant, user, assistant


# --- text streams -------------------------------------------------------------------------------

def _chunks(text, cuts):
    cuts = sorted({c % (len(text) + 1) for c in cuts})
    bounds = [0] + cuts + [len(text)]
    return [text[a:b] for a, b in zip(bounds, bounds[1:])]


@settings(max_examples=60)
@given(text=st.text(alphabet="ab<>/thinkSTOP \n", max_size=60), cuts=st.lists(st.integers(0, 60), max_size=8))
def test_stop_filter_and_think_splitter_are_chunking_invariant(text, cuts):
    stops = ["STOP", "\n\n"]
    f = StopStringFilter(stops)
    out = ""
    for piece in _chunks(text, cuts):
        out += f.feed(piece)
        if f.stopped:
            break
    if not f.stopped:
        out += f.flush()
    first = min([text.find(s) for s in stops if s in text], default=len(text))
    assert out == text[:first]
    s = ReasoningSplitter()
    parts = []
    for piece in _chunks(text, cuts):
        parts += s.feed(piece)
    parts += s.flush()
    assert ("".join(t for r, t in parts if r).strip(), "".join(t for r, t in parts if not r).strip()) == \
        split_reasoning(text)


def test_split_reasoning():
    assert split_reasoning("<think>carry the one</think> 42") == ("carry the one", "42")
    assert split_reasoning("no tags") == ("", "no tags")
    assert split_reasoning("<think>unfinished") == ("unfinished", "")


def test_cpu_draws_with_masked_and_broken_logits():
    """-inf logits (what a logits processor uses to forbid tokens) are never drawn, with or without
    top-p; a row with NaN or +inf (broken weights) gives a token id, not an exception."""
    V = 1000
    masked = np.full((1, V), -np.inf, np.float32)
    masked[0, 7], masked[0, 9] = 1.0, 2.0
    for top_p in (0.95, 1.0):
        drawn = {int(Sampler(SamplingParams(temp=1.0, top_p=top_p, seed=s))(mx.array(masked)).item())
                 for s in range(40)}
        assert drawn == {7, 9}, (top_p, drawn)
    for bad in (np.nan, np.inf):
        x = np.zeros((2, V), np.float32)
        x[1, 5] = bad
        for top_p in (0.95, 1.0):
            ids = np.asarray(Sampler(SamplingParams(temp=0.6, top_p=top_p, seed=1))(mx.array(x)))
            assert ids.shape == (2,) and ((0 <= ids) & (ids < V)).all()
