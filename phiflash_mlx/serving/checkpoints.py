"""Checkpoints: snapshots of a model's caches keyed by the token prefix they cover, in an LRU store
with a byte budget.

A recurrent (Mamba) state cannot be rolled back, and a sliding window forgets, so a cache can only
be reused from a position where a snapshot was taken in advance. The server takes them at message
boundaries (before the last user message, at the end of the prompt) and at the end of each
generation; a new request resumes from the longest snapshot whose tokens are a prefix of its prompt
and prefills only the rest.

What a snapshot costs (SAMBAY.md 5.1: Mamba layers keep conv and SSM states, sliding-window layers
the last W keys/values, the one full-attention layer all keys/values):

- Mamba and window states are small and constant-size; a snapshot holds them as they are.
- The growing full-attention K/V is not copied when a snapshot is taken: MLX arrays are values and
  the snapshot holds its own array nodes over the same buffers. The continuation's next write into
  a buffer a snapshot also holds makes MLX copy that buffer (copy-on-write), so the snapshot stays
  intact. Holding the *same* ``mx.array`` object would not be safe: ``a[i] = x`` rebinds that object
  in place, so a snapshot must never keep the live cache's array objects, only new nodes on them.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from typing import List, Optional, Sequence, Tuple

import mlx.core as mx

__all__ = ["CheckpointStore", "copy_cache", "cache_nbytes"]

DEFAULT_BUDGET = 2 << 30            # 2 GiB


def _fresh(value):
    """A new array node over the same data (no copy), or the value itself when it is not an array."""
    if isinstance(value, mx.array):
        return value[...]
    if isinstance(value, list):
        return [_fresh(v) for v in value]
    if isinstance(value, tuple):
        return tuple(_fresh(v) for v in value)
    return value


def copy_cache(cache: Sequence) -> list:
    """An independent copy of a list of mlx-lm caches (KVCache, RotatingKVCache, ArraysCache, ...)
    that shares the arrays' buffers: writes into either side leave the other unchanged."""
    out = []
    for c in cache:
        new = c.__class__.__new__(c.__class__)
        new.__dict__.update({k: _fresh(v) for k, v in vars(c).items()})
        out.append(new)
    return out


def cache_nbytes(cache: Sequence) -> int:
    total = 0
    for c in cache:
        try:
            total += int(c.nbytes)
        except (AttributeError, NotImplementedError):
            pass
    return total


class CheckpointStore:
    """Snapshots of caches keyed by the tokens they cover; least recently used ones are dropped to
    stay within `max_bytes`. Thread-safe.

        store = CheckpointStore(max_bytes=1 << 30)
        store.save(tokens, cache)                    # a snapshot of `cache` after `tokens`
        n, cache = store.lookup(prompt)              # longest snapshot covering prompt[:n], n < len(prompt)
    """

    def __init__(self, max_bytes: int = DEFAULT_BUDGET, max_entries: Optional[int] = None):
        if max_bytes < 0:
            raise ValueError(f"max_bytes must be >= 0, got {max_bytes}")
        self.max_bytes, self.max_entries = int(max_bytes), max_entries
        self._entries: "OrderedDict[Tuple[int, ...], Tuple[list, int]]" = OrderedDict()
        self._lock = threading.Lock()
        self.nbytes = 0
        self.hits = self.misses = self.evictions = self.saved = 0

    def __len__(self) -> int:
        return len(self._entries)

    def keys(self) -> List[Tuple[int, ...]]:
        with self._lock:
            return list(self._entries)

    def save(self, tokens: Sequence[int], cache: Sequence) -> bool:
        """Store a snapshot of `cache`, which holds exactly `tokens`. False when it alone exceeds the
        budget (nothing is stored then)."""
        key = tuple(int(t) for t in tokens)
        if not key:
            return False
        snapshot = copy_cache(cache)
        size = cache_nbytes(snapshot)
        if size > self.max_bytes:
            return False
        with self._lock:
            if key in self._entries:
                self.nbytes -= self._entries.pop(key)[1]
            self._entries[key] = (snapshot, size)
            self.nbytes += size
            self.saved += 1
            self._evict()
        return True

    def _evict(self) -> None:
        while self._entries and (self.nbytes > self.max_bytes or
                                 (self.max_entries is not None and len(self._entries) > self.max_entries)):
            _, (_, size) = self._entries.popitem(last=False)
            self.nbytes -= size
            self.evictions += 1

    def lookup(self, tokens: Sequence[int]) -> Tuple[int, Optional[list]]:
        """(n, cache): a copy of the longest snapshot whose tokens are tokens[:n] with n < len(tokens)
        (at least one token is left to feed, so there are logits to sample from); (0, None) if none."""
        tokens = tuple(int(t) for t in tokens)
        best = None
        with self._lock:
            for key in self._entries:
                n = len(key)
                if n < len(tokens) and (best is None or n > len(best)) and tokens[:n] == key:
                    best = key
            if best is None:
                self.misses += 1
                return 0, None
            self._entries.move_to_end(best)
            self.hits += 1
            snapshot = self._entries[best][0]
        return len(best), copy_cache(snapshot)

    def clear(self) -> None:
        with self._lock:
            self._entries.clear()
            self.nbytes = 0

    def stats(self) -> dict:
        with self._lock:
            return {"entries": len(self._entries), "bytes": self.nbytes, "max_bytes": self.max_bytes,
                    "hits": self.hits, "misses": self.misses, "saved": self.saved, "evictions": self.evictions}


def message_cuts(tokenizer, messages: Sequence[dict], ids: Sequence[int]) -> List[int]:
    """Positions in `ids` (the templated prompt of `messages`) where a checkpoint is worth taking:
    the start of the last user message (what the next turn of the same conversation shares). Only
    positions where the template of the earlier messages is a token prefix of `ids`."""
    cuts = []
    last_user = max((i for i, m in enumerate(messages) if m.get("role") == "user"), default=None)
    if last_user:
        try:
            head = list(tokenizer.apply_chat_template(list(messages[:last_user]), add_generation_prompt=False))
        except Exception:  # a template that needs the whole conversation: no cut
            head = []
        if 0 < len(head) < len(ids) and list(ids[:len(head)]) == head:
            cuts.append(len(head))
    return cuts
