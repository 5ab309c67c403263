"""Progress bars: tqdm when it is installed, otherwise a plain line on stderr."""

from __future__ import annotations

import sys


def progress(items, desc: str, unit: str = "it", min_items: int = 1, total: int | None = None):
    """Iterate over `items`, showing progress when there are at least `min_items` of them and stderr is
    a terminal (so scripts and tests stay quiet)."""
    items = list(items) if total is None else items
    total = len(items) if total is None else total
    if total < min_items or not sys.stderr.isatty():
        yield from items
        return
    try:
        from tqdm import tqdm
    except ImportError:
        for i, item in enumerate(items):
            print(f"\r{desc}: {i}/{total} {unit}", end="", file=sys.stderr, flush=True)
            yield item
        print(f"\r{desc}: {total}/{total} {unit}", file=sys.stderr)
        return
    yield from tqdm(items, desc=desc, unit=unit, total=total, leave=False)


class PrefillProgress:
    """A callback `(done, total)` for long prompts: a bar on stderr when it is a terminal and the prompt
    is longer than `threshold` tokens; silent otherwise. Call `close()` when done."""

    def __init__(self, threshold: int = 2048):
        self.threshold = threshold
        self.bar = None

    def __call__(self, done: int, total: int):
        if total < self.threshold or not sys.stderr.isatty():
            return
        if self.bar is None:
            try:
                from tqdm import tqdm
                self.bar = tqdm(total=total, desc="prefill", unit="tok", leave=False)
            except ImportError:
                self.bar = False
        if self.bar:
            self.bar.update(done - self.bar.n)
        else:
            print(f"\rprefill: {done}/{total} tokens", end="" if done < total else "\n", file=sys.stderr, flush=True)

    def close(self):
        if self.bar:
            self.bar.close()
        self.bar = None
