"""Exact-answer accuracy of the demo model on freshly generated problems.

    python -m phiflash_mlx.demo.evaluate                    # the shipped model, 200 problems per type
    python -m phiflash_mlx.demo.evaluate --model DIR --n 50 --seed 7

The problems come from a seed the training never uses (training draws with seeds 1 and 2 above its
own seed, 0 by default), one list per problem type. Each is answered greedily through the ordinary
generation path (``phiflash_mlx.generate``, the chat template, eos on ``<|end|>``), and the answer part
that ``split_reasoning`` separates from the ``<think>`` section must state exactly the right number.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("OPENBLAS_NUM_THREADS", "1")      # see train.py

from . import demo_model_path, tasks

DEFAULT_SEED = 12345
MAX_TOKENS = 96


def evaluate(model, tokenizer, n: int = 200, seed: int = DEFAULT_SEED, kinds=tasks.KINDS, max_digits: int = 3,
             progress=None) -> dict:
    """{kind: {"n", "correct", "accuracy", "trace_ok", "failures"}} over `n` problems per kind."""
    from ..generate import generate, split_reasoning

    results = {}
    for k, kind in enumerate(kinds):
        problems = tasks.problems(n, seed=seed + 1000 * k, kinds=[kind], max_digits=max_digits)
        correct = trace_ok = 0
        failures = []
        for i, p in enumerate(problems):
            text = generate(model, tokenizer, p.messages, max_tokens=MAX_TOKENS, temp=0.0)
            reasoning, answer = split_reasoning(text)
            ok = tasks.parse_answer(answer) == p.answer and answer.strip() == str(p.answer)
            correct += ok
            trace_ok += reasoning == p.trace
            if not ok and len(failures) < 5:
                failures.append({"question": p.question, "expected": p.answer, "got": text})
            if progress is not None:
                progress(kind, i + 1, n)
        results[kind] = {"n": n, "correct": correct, "accuracy": correct / max(n, 1),
                         "trace_ok": trace_ok / max(n, 1), "failures": failures}
    return results


def format_table(results: dict) -> str:
    names = {"add": "addition", "sub": "subtraction", "mul": "multiplication"}
    rows = [f"{'type':<16}{'n':>6}{'correct':>9}{'accuracy':>10}{'exact trace':>13}"]
    total = right = 0
    for kind, r in results.items():
        rows.append(f"{names.get(kind, kind):<16}{r['n']:>6}{r['correct']:>9}{100 * r['accuracy']:>9.1f}%"
                    f"{100 * r['trace_ok']:>12.1f}%")
        total += r["n"]
        right += r["correct"]
    rows.append(f"{'all':<16}{total:>6}{right:>9}{100 * right / max(total, 1):>9.1f}%")
    return "\n".join(rows)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None,
                   help="checkpoint directory (default: the demo model shipped with the package)")
    p.add_argument("--n", type=int, default=200, help="problems per type (default 200)")
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help=f"seed of the problems (default {DEFAULT_SEED})")
    p.add_argument("--types", default=",".join(tasks.KINDS),
                   help="comma-separated problem types among add,sub,mul (default all)")
    p.add_argument("--json", action="store_true", help="print the results as JSON instead of a table")
    p.add_argument("--show-failures", action="store_true", help="print a few wrong answers per type")


def run(args) -> int:
    from .. import load
    from ..errors import PhiflashError

    kinds = [k.strip() for k in args.types.split(",") if k.strip()]
    bad = [k for k in kinds if k not in tasks.KINDS]
    if bad or not kinds:
        raise PhiflashError(f"unknown problem type {bad[0] if bad else ''!r}; choose among {', '.join(tasks.KINDS)}")
    if args.n < 1:
        raise PhiflashError(f"--n must be at least 1, got {args.n}")
    path = Path(args.model) if args.model else demo_model_path()
    model, tokenizer = load(str(path))
    if tokenizer is None:
        raise PhiflashError(f"{path} has no tokenizer files; the evaluation needs the chat tokenizer")
    t0 = time.perf_counter()

    def progress(kind, i, n):
        if not args.json and sys.stderr.isatty():
            print(f"\r{kind}: {i}/{n}", end="", file=sys.stderr, flush=True)

    results = evaluate(model, tokenizer, args.n, args.seed, kinds, progress=progress)
    if not args.json and sys.stderr.isatty():
        print("\r" + " " * 30 + "\r", end="", file=sys.stderr)
    elapsed = time.perf_counter() - t0
    if args.json:
        json.dump({"model": str(path), "seed": args.seed, "seconds": round(elapsed, 1), "results": results},
                  sys.stdout, indent=2)
        print()
        return 0
    print(f"model: {path}\nseed {args.seed}, greedy, {args.n} problems per type, {elapsed:.0f} s\n")
    print(format_table(results))
    if args.show_failures:
        for kind, r in results.items():
            for f in r["failures"]:
                print(f"\n[{kind}] {f['question']}\n  expected {f['expected']}\n  got      {f['got']}")
    return 0


def main(argv=None) -> int:
    from ..errors import PhiflashError

    p = argparse.ArgumentParser(prog="python -m phiflash_mlx.demo.evaluate",
                                description=__doc__.split("\n\n")[0])
    add_arguments(p)
    try:
        return run(p.parse_args(argv))
    except PhiflashError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
