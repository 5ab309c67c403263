"""Synthetic arithmetic word problems with a column-by-column reasoning trace.

Three kinds of problem: addition and subtraction of numbers with up to three digits, and
multiplication of a two- or three-digit number by a one-digit number. Each is phrased by one of a
few short templates, and answered in the chat format of the released model: a ``<think>`` section
that works the sum column by column from the least significant digit, then the bare number.

The trace names each column (``u`` units, ``t`` tens, ``h`` hundreds, ``k`` thousands), writes the
two digits, the carry or borrow coming in, and the result, and finally reads the digits back from
the most significant column::

    457 + 68   ->  <think>457+68: u:7+8+0=15, t:5+6+1=12, h:4+0+1=05. so 525</think>525
    403 - 68   ->  <think>403-68: u:13-8-0=5, t:10-6-1=3, h:4-0-1=3. so 335</think>335
    457 * 6    ->  <think>457*6: u:7*6+0=42, t:5*6+4=34, h:4*6+3=27. so 2742</think>2742

Every column has the same shape, the carry or borrow going out is visible in the column itself
(the tens digit of a sum or product, the leading 1 of a borrowed minuend), and the labels let the
read-back find each column by content rather than by counting.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

KINDS = ("add", "sub", "mul")
PLACES = "uthk"                     # units, tens, hundreds, thousands
THINK_OPEN, THINK_CLOSE = "<think>", "</think>"

NAMES = ["Tom", "Ana", "Sam", "Mia", "Leo", "Zoe", "Max", "Eva", "Ben", "Ivy"]
ITEMS = ["apples", "books", "coins", "cards", "stamps", "marbles", "shells", "pens"]
BOXES = ["boxes", "bags", "shelves", "rows", "crates"]

ADD_TEMPLATES = [
    "{n} has {a} {x}. {n} gets {b} more {x}. How many {x} does {n} have now?",
    "A shop sold {a} {x} on Monday and {b} {x} on Tuesday. How many {x} did it sell in all?",
    "There are {a} {x} in one pile and {b} {x} in another. How many {x} are there altogether?",
    "What is {a} + {b}?",
    "Add {a} and {b}.",
]
SUB_TEMPLATES = [
    "{n} has {a} {x} and gives away {b} of them. How many {x} are left?",
    "A shop had {a} {x} and sold {b}. How many {x} does it have now?",
    "There were {a} {x} in a jar. {n} took {b} out. How many {x} are in the jar?",
    "What is {a} - {b}?",
    "Subtract {b} from {a}.",
]
MUL_TEMPLATES = [
    "{n} has {b} {y} with {a} {x} in each. How many {x} is that in all?",
    "Each of {b} {y} holds {a} {x}. How many {x} are there?",
    "A box holds {a} {x}. How many {x} are in {b} boxes?",
    "What is {a} * {b}?",
    "Multiply {a} by {b}.",
]
TEMPLATES = {"add": ADD_TEMPLATES, "sub": SUB_TEMPLATES, "mul": MUL_TEMPLATES}
SYMBOL = {"add": "+", "sub": "-", "mul": "*"}


@dataclass(frozen=True)
class Problem:
    kind: str          # "add", "sub" or "mul"
    a: int
    b: int
    question: str      # the user's message
    trace: str         # the text inside <think> ... </think>
    answer: int

    @property
    def response(self) -> str:
        """The assistant's whole message: the reasoning section, then the number."""
        return f"{THINK_OPEN}{self.trace}{THINK_CLOSE}{self.answer}"

    @property
    def messages(self) -> list[dict]:
        return [{"role": "user", "content": self.question}]


def _digits(n: int, width: int) -> list[int]:
    """Digits of n from the least significant, zero-padded to `width`."""
    return [(n // 10 ** i) % 10 for i in range(width)]


def add_trace(a: int, b: int) -> str:
    width = max(len(str(a)), len(str(b)))
    da, db = _digits(a, width), _digits(b, width)
    carry, cols = 0, []
    for i in range(width):
        s = da[i] + db[i] + carry
        cols.append(f"{PLACES[i]}:{da[i]}+{db[i]}+{carry}={s:02d}")
        carry = s // 10
    return f"{a}+{b}: " + ", ".join(cols) + f". so {a + b}"


def sub_trace(a: int, b: int) -> str:
    width = len(str(a))
    da, db = _digits(a, width), _digits(b, width)
    borrow, cols = 0, []
    for i in range(width):
        top = da[i]
        out = 1 if top - db[i] - borrow < 0 else 0
        top += 10 * out
        cols.append(f"{PLACES[i]}:{top}-{db[i]}-{borrow}={top - db[i] - borrow}")
        borrow = out
    return f"{a}-{b}: " + ", ".join(cols) + f". so {a - b}"


def mul_trace(a: int, b: int) -> str:
    width = len(str(a))
    da = _digits(a, width)
    carry, cols = 0, []
    for i in range(width):
        p = da[i] * b + carry
        cols.append(f"{PLACES[i]}:{da[i]}*{b}+{carry}={p:02d}")
        carry = p // 10
    return f"{a}*{b}: " + ", ".join(cols) + f". so {a * b}"


TRACES = {"add": add_trace, "sub": sub_trace, "mul": mul_trace}
RESULTS = {"add": lambda a, b: a + b, "sub": lambda a, b: a - b, "mul": lambda a, b: a * b}


def _number(rng: random.Random, max_digits: int, min_digits: int = 1) -> int:
    """A number whose digit count is uniform in [min_digits, max_digits], then uniform in range."""
    d = rng.randint(min_digits, max_digits)
    return rng.randint(0 if d == 1 else 10 ** (d - 1), 10 ** d - 1)


def operands(kind: str, rng: random.Random, max_digits: int = 3) -> tuple[int, int]:
    if kind == "add":
        return _number(rng, max_digits), _number(rng, max_digits)
    if kind == "sub":
        a, b = _number(rng, max_digits), _number(rng, max_digits)
        return (a, b) if a >= b else (b, a)
    if kind == "mul":
        return _number(rng, max_digits, min_digits=2), rng.randint(2, 9)
    raise ValueError(f"unknown problem kind {kind!r}; expected one of {KINDS}")


def make_problem(kind: str, a: int, b: int, rng: random.Random) -> Problem:
    template = rng.choice(TEMPLATES[kind])
    question = template.format(a=a, b=b, n=rng.choice(NAMES), x=rng.choice(ITEMS), y=rng.choice(BOXES))
    return Problem(kind, a, b, question, TRACES[kind](a, b), RESULTS[kind](a, b))


def sample(rng: random.Random, kinds=KINDS, max_digits: int = 3, weights=None) -> Problem:
    kind = rng.choice(list(kinds)) if weights is None else rng.choices(list(kinds), weights)[0]
    a, b = operands(kind, rng, max_digits)
    return make_problem(kind, a, b, rng)


def problems(n: int, seed: int, kinds=KINDS, max_digits: int = 3) -> list[Problem]:
    """`n` problems drawn with `seed` (the same seed gives the same list)."""
    rng = random.Random(seed)
    return [sample(rng, kinds, max_digits) for _ in range(n)]


def parse_answer(text: str):
    """The integer a response's answer part states, or None (the last number in it)."""
    import re

    numbers = re.findall(r"-?\d+", text)
    return int(numbers[-1]) if numbers else None
