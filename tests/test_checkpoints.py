"""Checkpoints: a request resumed from a snapshot equals a fresh full prefill.

The oracle is a fresh prefill of the whole prompt through the same model (whose prefill and decode
are checked against the NumPy reference in test_mlx_model.py) — and, for one case, the reference's
own logits. Cut points sit inside the sliding window, at its end and past it; batch 1 (the library
path) and batched (mlx-lm's BatchGenerator, as the server runs it).
"""

import mlx.core as mx
import numpy as np
import pytest

from model_factory import model_pair
from phiflash_mlx.cpu import kernels as cpu_kernels
from phiflash_mlx.serving.checkpoints import CheckpointStore, cache_nbytes, copy_cache

WINDOW = 5
CONFIG = {
    "model_type": "phi4flash", "vocab_size": 40, "hidden_size": 16, "intermediate_size": 24,
    "num_hidden_layers": 8, "num_attention_heads": 4, "num_key_value_heads": 2, "sliding_window": WINDOW,
    "mamba_d_state": 3, "mamba_d_conv": 3, "mamba_expand": 2, "mb_per_layer": 2, "layer_norm_eps": 1e-5,
    "tie_word_embeddings": True,
}
PROMPT_LEN = 23
CUTS = [WINDOW - 2, WINDOW - 1, WINDOW, WINDOW + 1, 2 * WINDOW + 1, PROMPT_LEN - 1]


@pytest.fixture(scope="module")
def models():
    reference, model, _ = model_pair(CONFIG, seed=3)
    return reference, model


def _prompt(seed, n=PROMPT_LEN):
    return [int(t) for t in np.random.default_rng(seed).integers(0, CONFIG["vocab_size"], n)]


def _feed(model, ids, cache, chunk=4):
    """Logits (l, V) of every position, fed `chunk` tokens at a time."""
    out = []
    for i in range(0, len(ids), chunk):
        out.append(model(mx.array([ids[i:i + chunk]]), cache=cache)[0])
    logits = mx.concatenate(out, axis=0).astype(mx.float32)
    mx.eval(logits)
    return np.array(logits)


def _greedy(model, cache, logits_last, steps=8):
    tokens = []
    token = int(np.argmax(logits_last))
    for _ in range(steps):
        tokens.append(token)
        logits = model(mx.array([[token]]), cache=cache)[0, -1]
        token = int(mx.argmax(logits).item())
    return tokens


def test_a_snapshot_stays_intact_while_its_continuation_writes(models):
    """MLX arrays are values, but ``a[i] = x`` rebinds the *object*: a snapshot must hold its own
    array nodes over the buffers (what copy_cache does), never the live cache's objects."""
    _, model = models
    ids = _prompt(0)
    cache = model.make_cache()
    _feed(model, ids[:9], cache)
    before = [np.array(c.state[0]) if not hasattr(c, "cache") else np.array(c.cache[1]) for c in cache]
    snapshot = copy_cache(cache)
    same_objects = [c.keys if hasattr(c, "keys") else None for c in cache]
    _feed(model, ids[9:], cache, chunk=1)                             # writes into the K/V buffers
    after = [np.array(c.state[0]) if not hasattr(c, "cache") else np.array(c.cache[1]) for c in snapshot]
    for b, a in zip(before, after):
        np.testing.assert_array_equal(a, b)
    # the live cache's own key arrays did change in place: holding those would not have been a snapshot
    full = next(i for i, c in enumerate(cache) if type(c).__name__ == "KVCache")
    assert same_objects[full] is cache[full].keys or cache[full].offset > 9


@pytest.mark.parametrize("cut", CUTS)
def test_resumed_equals_fresh_prefill_batch_1(models, cut):
    reference, model = models
    ids = _prompt(cut)
    fresh_cache = model.make_cache()
    fresh = _feed(model, ids, fresh_cache)
    if cut == CUTS[0]:               # a fresh prefill against the oracle, float32 K/V (the CPU's 16-bit
        previous = cpu_kernels.set_kv16(False)          # shared cache moves logits by more than 1e-4)
        try:
            exact = _feed(model, ids, model.make_cache())
        finally:
            cpu_kernels.set_kv16(previous)
        np.testing.assert_allclose(exact, reference.forward(np.array([ids]))[0], atol=1e-4, rtol=1e-4)

    store = CheckpointStore()
    cache = model.make_cache()
    _feed(model, ids[:cut], cache)
    assert store.save(ids[:cut], cache)
    _feed(model, [1, 2, 3], cache)                                     # the saver moves on: no effect
    for branch in range(2):                                            # the same snapshot, resumed twice
        n, resumed = store.lookup(ids + [7] * branch)
        assert n == cut
        rest = _feed(model, ids[cut:], resumed)
        np.testing.assert_allclose(rest, fresh[cut:], atol=1e-4, rtol=1e-4)
        assert _greedy(model, resumed, rest[-1]) == _greedy(model, _copy_fresh(model, ids), fresh[-1])


def _copy_fresh(model, ids):
    cache = model.make_cache()
    _feed(model, ids, cache)
    return cache


def test_resumed_equals_fresh_prefill_batched(models):
    """Rows resumed from different cut points (inside, at the end of and past the window) and a
    fresh row, in one BatchGenerator, give the logprobs (1e-4) and greedy tokens of each row alone."""
    from mlx_lm.generate import BatchGenerator
    _, model = models
    prompts = [_prompt(100 + i, PROMPT_LEN + 3 * i) for i in range(4)]
    cuts = [WINDOW - 1, WINDOW, 2 * WINDOW + 1, 0]
    store = CheckpointStore()
    for ids, cut in zip(prompts, cuts):
        if cut:
            cache = model.make_cache()
            _feed(model, ids[:cut], cache)
            store.save(ids[:cut], cache)
    caches, cached = [], []
    for ids, cut in zip(prompts, cuts):
        n, cache = store.lookup(ids)
        assert n == cut
        caches.append(cache if cache is not None else model.make_cache())
        cached.append(ids[:n])
    steps = 6
    gen = BatchGenerator(model, max_tokens=steps, prefill_step_size=4, completion_batch_size=4)
    uids = gen.insert([ids[len(c):] for ids, c in zip(prompts, cached)], caches=caches, all_tokens=cached)
    tokens = {u: [] for u in uids}
    logprobs = {u: [] for u in uids}
    while any(len(t) < steps for t in tokens.values()):
        for r in gen.next_generated():
            tokens[r.uid].append(r.token)
            logprobs[r.uid].append(np.array(r.logprobs.astype(mx.float32)))
    gen.close()
    for uid, ids in zip(uids, prompts):
        cache = model.make_cache()
        logits = _feed(model, ids, cache)[-1]
        want_tokens, want_lp = [], []
        for _ in range(steps):
            lp = logits - np.log(np.exp(logits - logits.max()).sum()) - logits.max()
            want_lp.append(lp)
            token = int(np.argmax(logits))
            want_tokens.append(token)
            logits = np.array(model(mx.array([[token]]), cache=cache)[0, -1].astype(mx.float32))
        assert tokens[uid] == want_tokens
        np.testing.assert_allclose(np.stack(logprobs[uid]), np.stack(want_lp), atol=1e-4, rtol=1e-4)


def test_store_keeps_the_longest_prefix_and_stays_within_its_budget(models):
    _, model = models
    ids = _prompt(7)
    cache = model.make_cache()
    sizes = {}
    store = CheckpointStore()
    for cut in (4, 9, 15):
        _feed(model, ids[len(sizes) and max(sizes):cut] if sizes else ids[:cut], cache)
        store.save(ids[:cut], cache)
        sizes[cut] = cache_nbytes(cache)
    assert store.lookup(ids)[0] == 15
    assert store.lookup(ids[:15])[0] == 9                             # a token must be left to feed
    assert store.lookup(ids[:3] + [0])[0] == 0
    assert store.lookup([ids[0] + 1] + ids[1:])[0] == 0
    budget = sizes[9] + sizes[15]
    small = CheckpointStore(max_bytes=budget)
    for cut in (4, 9, 15, 20):
        snap = model.make_cache()
        _feed(model, ids[:cut], snap)
        small.save(ids[:cut], snap)
        assert small.nbytes <= budget
    assert small.evictions >= 2 and small.lookup(ids)[0] == 20 and small.lookup(ids[:5])[0] == 0
    assert not CheckpointStore(max_bytes=10).save(ids[:4], snap)      # alone over the budget: not kept
    lru = CheckpointStore(max_entries=2)                               # least recently *used* goes first
    for cut in (4, 9):
        lru.save(ids[:cut], snap)
    assert lru.lookup(ids[:5])[0] == 4
    lru.save(ids[:15], snap)
    assert lru.keys() == [tuple(ids[:4]), tuple(ids[:15])]


def test_chat_sessions_share_checkpoints():
    import phiflash_mlx
    from phiflash_mlx.demo import demo_model_path
    model, tokenizer = phiflash_mlx.load(demo_model_path())
    store = CheckpointStore()
    system = "You add and subtract numbers."

    def session_tokens(store_or_none, questions):
        chat = phiflash_mlx.ChatSession(model, tokenizer, system=system, prompt_cache=store_or_none)
        out = []
        for q in questions:
            pieces = list(chat.send(q, temp=0, max_tokens=40))
            out.append(([p.token for p in pieces], pieces[-1].cached_tokens))
        return out

    first = session_tokens(store, ["What is 457 + 68?", "What is 12 + 30?"])
    assert first[0][1] == 0 and len(store) > 0
    again = session_tokens(store, ["What is 457 + 68?", "What is 9 + 9?"])
    fresh = session_tokens(None, ["What is 457 + 68?", "What is 9 + 9?"])
    assert again[0][1] > 0                                            # resumed from the first session
    assert [t for t, _ in again] == [t for t, _ in fresh]
