"""Options and model loading shared by chat, generate and serve (names follow mlx-lm's)."""

from __future__ import annotations

import argparse
import json
import math
import sys
from pathlib import Path

from ..errors import PhiflashError
from ..generate import DEFAULT_MAX_CONTEXT, SamplingParams


def terminate_cleanly() -> None:
    """SIGTERM unwinds like Ctrl-C (SystemExit 143), so writers remove their partial output."""
    import signal
    import threading
    if threading.current_thread() is threading.main_thread():
        def handler(signum, frame):
            raise SystemExit(128 + signum)
        signal.signal(signal.SIGTERM, handler)


def add_model_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", default=None, metavar="PATH_OR_ID",
                        help="checkpoint directory or Hugging Face id (default: the bundled demo model)")


def add_sampling_options(parser: argparse.ArgumentParser, max_tokens: int) -> None:
    g = parser.add_argument_group("sampling (defaults from the model's generation_config.json, else 0.6 / 0.95)")
    g.add_argument("--max-tokens", "-m", type=int, default=max_tokens, help=f"most tokens to generate (default {max_tokens})")
    g.add_argument("--temp", type=float, default=None, help="temperature; 0 is greedy")
    g.add_argument("--top-p", type=float, default=None, help="nucleus sampling mass")
    g.add_argument("--top-k", type=int, default=0, help="keep only the k most likely tokens (0: off)")
    g.add_argument("--min-p", type=float, default=0.0, help="drop tokens below min-p times the top probability")
    g.add_argument("--seed", type=int, default=None, help="random seed for reproducible sampling")
    g.add_argument("--max-context", type=int, default=DEFAULT_MAX_CONTEXT,
                   help=f"context limit in tokens, history included (default {DEFAULT_MAX_CONTEXT})")
    g.add_argument("--prefill-step-size", type=int, default=512, help="prompt tokens per prefill chunk (default 512)")


def generation_defaults(model_path: Path) -> dict:
    """temperature / top_p from generation_config.json when it sets them (the released one does not;
    the model card recommends 0.6 / 0.95, SAMBAY.md 6.4). A value that is not a finite number is
    refused with one line naming the file and the field."""
    from ..checkpoints import read_json
    defaults = {"temperature": 0.6, "top_p": 0.95}
    file = Path(model_path) / "generation_config.json"
    if not file.exists():
        return defaults
    cfg = read_json(file, "generation_config.json", 1 << 20)
    if not isinstance(cfg, dict):
        raise PhiflashError(f"{file} must hold a JSON object; fix or delete it")
    for key in defaults:
        value = cfg.get(key)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise PhiflashError(f"{file}: {key} must be a finite number, got {json.dumps(value)[:40]}; fix or "
                                f"delete it (or override it with --{'temp' if key == 'temperature' else 'top-p'})")
        defaults[key] = float(value)
    return defaults


def clean_text(text: str) -> tuple[str, bool]:
    """Text that is valid Unicode: bytes that were not UTF-8 (kept by Python as lone surrogates, from argv
    or stdin) become U+FFFD, one per byte. Returns (text, whether anything was replaced)."""
    try:
        text.encode("utf-8")
        return text, False
    except UnicodeEncodeError:
        pass
    try:
        raw = text.encode("utf-8", "surrogateescape")
    except UnicodeEncodeError:
        raw = text.encode("utf-8", "surrogatepass")
    return raw.decode("utf-8", "replace"), True


def read_text_input(stream) -> tuple[str, bool]:
    """All of a text stream (stdin), decoded as UTF-8 with invalid bytes replaced."""
    buffer = getattr(stream, "buffer", None)
    if buffer is None:
        return clean_text(stream.read())
    data = buffer.read()
    try:
        return data.decode("utf-8"), False
    except UnicodeDecodeError:
        return data.decode("utf-8", "replace"), True


def lenient_stdin(stream) -> None:
    """Undecodable input lines reach the program (as lone surrogates, for clean_text) instead of raising."""
    reconfigure = getattr(stream, "reconfigure", None)
    if reconfigure is not None:
        try:
            reconfigure(errors="surrogateescape")
        except (ValueError, OSError):
            pass


NOT_UTF8 = "was not valid UTF-8; the invalid bytes were replaced by U+FFFD"


def sampling_from_args(args, model_path: Path) -> SamplingParams:
    d = generation_defaults(model_path)
    params = SamplingParams(temp=d["temperature"] if args.temp is None else args.temp,
                            top_p=d["top_p"] if args.top_p is None else args.top_p,
                            top_k=args.top_k, min_p=args.min_p, seed=args.seed)
    params.validate()
    if args.max_tokens < 1:
        raise PhiflashError(f"--max-tokens must be at least 1, got {args.max_tokens}")
    if args.max_context < 2:
        raise PhiflashError(f"--max-context must be at least 2, got {args.max_context}")
    return params


def load_model(model: str | None, quiet: bool = False):
    """(model, tokenizer, path). Without --model, the bundled demo model, with a one-line notice."""
    from ..loader import load
    if model is None:
        try:
            from ..demo import demo_model_path
        except ImportError:
            demo_model_path = None
        path = demo_model_path() if demo_model_path is not None else None
        if path is None or not Path(path).exists():
            raise PhiflashError("no --model given and the bundled demo model is not installed; "
                                "pass --model PATH_OR_ID (e.g. microsoft/Phi-4-mini-flash-reasoning)")
        if not quiet:
            print("Using the bundled demo model (a tiny SambaY trained on arithmetic). For the real one: "
                  "--model microsoft/Phi-4-mini-flash-reasoning", file=sys.stderr)
        model = str(path)
    m, tok = load(model)
    if tok is None:
        raise PhiflashError(f"{model} has no tokenizer files (tokenizer.json, vocab.json + merges.txt or "
                            "tokenizer.model); copy them into the checkpoint directory")
    return m, tok, Path(m.path)
