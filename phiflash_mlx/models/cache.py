"""Caches of the SambaY model (SAMBAY.md 5.1-5.4), with mlx-lm's ``state`` / ``offset`` protocol.

Only the GLOBAL layer's cache grows with the context; Mamba and sliding-window caches have a fixed size.
"""

from __future__ import annotations

from typing import Optional

import mlx.core as mx


class _Cache:
    """What every cache shares: the token count (`offset`) and mlx-lm's `meta_state` for saving."""

    def __init__(self):
        self.offset = 0

    @property
    def meta_state(self):
        return str(self.offset)

    @meta_state.setter
    def meta_state(self, value):
        self.offset = int(value)

    def is_trimmable(self):
        return False

    @property
    def nbytes(self) -> int:
        return sum(x.nbytes for x in self.state if x is not None)


class MambaCache(_Cache):
    """conv_state (b, K, Di): the last K raw (pre-conv) inputs, time on axis 1; ssm_state (b, Di, n)."""

    def __init__(self):
        super().__init__()
        self.conv_state: Optional[mx.array] = None
        self.ssm_state: Optional[mx.array] = None

    @property
    def state(self):
        return [self.conv_state, self.ssm_state]

    @state.setter
    def state(self, value):
        self.conv_state, self.ssm_state = value

    def empty(self):
        return self.conv_state is None


class _KVBase(_Cache):
    """Shared by both attention caches: keys (b, nkv, s, hd) and values (b, nkv/2, s, 2hd), in the
    striped layout of `DiffAttention.stripe`, and, after a padded prefill, which stored keys are real
    tokens (b, s)."""

    def __init__(self):
        super().__init__()
        self.keys: Optional[mx.array] = None
        self.values: Optional[mx.array] = None
        self.key_valid: Optional[mx.array] = None

    def empty(self):
        return self.keys is None

    def _valid(self, valid, b, l, dtype=mx.bool_):
        if valid is None and self.key_valid is None:
            return None
        return mx.ones((b, l), dtype=dtype) if valid is None else valid.astype(dtype)


class SlidingWindowCache(_KVBase):
    """Keeps exactly the last ``window`` positions (the clean semantics of DESIGN.md, SAMBAY.md 5.3)."""

    def __init__(self, window: int):
        super().__init__()
        self.window = window

    def update_and_fetch(self, k, v, valid=None):
        """Append this call's keys; return (keys, values, position of the first key, key validity)
        covering the stored past and the new keys, then keep only the last `window` of them."""
        b, _, l, _ = k.shape
        new_valid = self._valid(valid, b, l)
        if self.keys is not None:
            k = mx.concatenate([self.keys, k], axis=2)
            v = mx.concatenate([self.values, v], axis=2)
            if new_valid is not None:
                new_valid = mx.concatenate([self.key_valid, new_valid], axis=1)
        key_start = self.offset + l - k.shape[2]
        self.keys, self.values = k[:, :, -self.window:], v[:, :, -self.window:]
        self.key_valid = None if new_valid is None else new_valid[:, -self.window:]
        self.offset += l
        return k, v, key_start, new_valid

    @property
    def state(self):
        return [x for x in (self.keys, self.values, self.key_valid) if x is not None]

    @state.setter
    def state(self, value):
        self.keys, self.values = value[0], value[1]
        self.key_valid = value[2] if len(value) > 2 else None



class FullKVCache(_KVBase):
    """The GLOBAL layer's K/V, every position so far; the cross-attention layers read it.
    Preallocated in steps so decoding does not copy the whole cache every token."""

    step = 256

    def __init__(self):
        super().__init__()
        self._valid_buf: Optional[mx.array] = None

    def update_and_fetch(self, k, v, valid=None):
        b, _, l, _ = k.shape
        end = self.offset + l
        if self.keys is None or end > self.keys.shape[2]:
            grow = ((end + self.step - 1) // self.step) * self.step - (0 if self.keys is None else self.keys.shape[2])
            new_k = mx.zeros((b, k.shape[1], grow, k.shape[3]), dtype=k.dtype)
            new_v = mx.zeros((b, v.shape[1], grow, v.shape[3]), dtype=v.dtype)
            if self.keys is None:
                self.keys, self.values = new_k, new_v
            else:
                self.keys = mx.concatenate([self.keys[:, :, :self.offset], new_k], axis=2)
                self.values = mx.concatenate([self.values[:, :, :self.offset], new_v], axis=2)
            if self.key_valid is not None:
                self.key_valid = mx.concatenate(
                    [self.key_valid[:, :self.offset], mx.ones((b, self.keys.shape[2] - self.offset), mx.bool_)], axis=1)
        self.keys[:, :, self.offset:end] = k
        self.values[:, :, self.offset:end] = v
        if valid is not None:
            if self.key_valid is None:
                self.key_valid = mx.ones((b, self.keys.shape[2]), mx.bool_)
            self.key_valid[:, self.offset:end] = valid.astype(mx.bool_)
        self.offset = end
        key_valid = None if self.key_valid is None else self.key_valid[:, :end]
        return self.keys[:, :, :end], self.values[:, :, :end], 0, key_valid

    @property
    def state(self):
        if self.keys is None:
            return []
        out = [self.keys[:, :, :self.offset], self.values[:, :, :self.offset]]
        if self.key_valid is not None:
            out.append(self.key_valid[:, :self.offset])
        return out

    @state.setter
    def state(self, value):
        self.keys, self.values = value[0], value[1]
        self.key_valid = value[2] if len(value) > 2 else None
        self.offset = self.keys.shape[2]

