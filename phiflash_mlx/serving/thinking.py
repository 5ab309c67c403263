"""A budget for the ``<think>`` section: after N reasoning tokens the reasoning is closed for the model.

The released tokenizer has no think token: the model writes ``<think>`` and ``</think>`` as text
(SAMBAY.md 6.2). :class:`ThinkingBudget` watches the generated text; once the section has used its
budget it forces the tokens of an optional short sentence followed by ``</think>`` (a single id where
the tokenizer has ``</think>`` as an added token, as the demo model's does, else the ids of the plain
text), one per step, and then lets the model write its answer. A budget of 0 closes the section as
soon as it opens.

It is a logits processor: ``apply(logits)`` sets every logit but the forced token's to -inf while a
close is being forced, so it works with any sampler, greedy or not, batched or alone.
"""

from __future__ import annotations

from typing import List, Optional

import mlx.core as mx

from ..errors import PhiflashError

THINK_OPEN, THINK_CLOSE = "<think>", "</think>"


def close_ids(tokenizer, message: str = "") -> List[int]:
    """Token ids that end the reasoning: `message` (as plain text) then ``</think>``."""
    added = getattr(tokenizer, "added_tokens", None) or {}
    tag = added.get(THINK_CLOSE) if isinstance(added, dict) else None
    tag_ids = [tag.id] if tag is not None and hasattr(tag, "id") else list(tokenizer.encode(THINK_CLOSE))
    return (list(tokenizer.encode(message)) if message else []) + tag_ids


def validate_budget(value, name: str = "max_thinking_tokens") -> Optional[int]:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise PhiflashError(f"{name} must be a whole number >= 0 (0 skips thinking), got {value!r}")
    return value


class ThinkingBudget:
    """Per-sequence state: feed it every generated token with :meth:`observe`, and pass the logits
    of the next step through :meth:`apply`.

    `inside` says whether the prompt already opened the section (a template ending in ``<think>``).
    """

    def __init__(self, tokenizer, budget: int, message: str = "", inside: bool = False):
        self.budget = validate_budget(budget)
        self.close = close_ids(tokenizer, message)
        self._detok = tokenizer.detokenizer()
        self._tail = ""                      # the last few characters of the generated text
        self.inside = inside
        self.spent = 0                       # tokens generated inside the section
        self._forcing: List[int] = []
        self.forced_close = False            # the budget ran out and the close was forced
        self.closed = False                  # the section has ended (by the model or forced)

    def observe(self, token: int) -> None:
        if self._forcing and token == self._forcing[0]:
            self._forcing.pop(0)
        text = self._detok.add_token(int(token))
        self._tail = (self._tail + text)[-(len(THINK_CLOSE) + 8):]
        if self.closed:
            return
        if not self.inside:
            if THINK_OPEN in self._tail:
                self.inside = True
                self._tail = self._tail[self._tail.rindex(THINK_OPEN) + len(THINK_OPEN):]
            return
        if THINK_CLOSE in self._tail:
            self.inside, self.closed, self._forcing = False, True, []
            return
        if not self.forced_close:
            self.spent += 1
        if self.spent >= self.budget and not self.forced_close:
            self.forced_close = True
            self._forcing = list(self.close)

    def _check_open_now(self) -> None:
        if self.inside and not self.closed and self.spent >= self.budget and not self.forced_close:
            self.forced_close = True
            self._forcing = list(self.close)

    @property
    def forced(self) -> Optional[int]:
        """The token the next step must produce, or None."""
        self._check_open_now()
        return self._forcing[0] if self._forcing else None

    def apply(self, logits: mx.array) -> mx.array:
        token = self.forced
        if token is None:
            return logits
        keep = mx.arange(logits.shape[-1]) == token
        return mx.where(keep, mx.zeros_like(logits), mx.array(-float("inf"), dtype=logits.dtype))

    def processor(self):
        """The budget as an mlx-lm logits processor ``(tokens, logits) -> logits`` (BatchGenerator):
        its first call follows the prompt's last token, every later one a generated token."""
        first = [True]

        def process(tokens, logits):
            if first[0]:
                first[0] = False
            else:
                self.observe(int(tokens[-1].item()))
            return self.apply(logits)

        return process
