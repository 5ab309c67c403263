"""`phiflash chat`: an interactive, multi-turn chat in the terminal."""

from __future__ import annotations

import argparse
import sys

from ..errors import PhiflashError
from ..generate import ChatSession
from ..progress import PrefillProgress
from ._common import (NOT_UTF8, add_model_option, add_sampling_options, clean_text, lenient_stdin, load_model,
                      sampling_from_args)

EXAMPLES = """\
examples:
  phiflash chat                                   # the bundled demo model
  phiflash chat --model microsoft/Phi-4-mini-flash-reasoning --max-tokens 32768
  phiflash chat --hide-reasoning --temp 0

in the chat:
  /reset         forget the conversation
  /system TEXT   set a system message (starts a new conversation)
  /exit          leave (or Ctrl-D); Ctrl-C stops the current answer
"""

DIM, ITALIC, RESET = "\033[2m", "\033[3m", "\033[0m"


class Printer:
    """Writes streamed pieces: the <think> section dimmed (or marked) and set apart, or hidden."""

    def __init__(self, out, hide_reasoning=False, color=None):
        self.out = out
        self.hide = hide_reasoning
        self.color = out.isatty() if color is None else color
        self.mode = None                      # None, "reasoning" or "answer"

    def write(self, piece):
        mode = "reasoning" if piece.reasoning else "answer"
        if not piece.text:
            return
        if mode != self.mode:
            self._switch(mode)
        if mode == "reasoning" and self.hide:
            return
        self.out.write(piece.text)
        self.out.flush()

    def _switch(self, mode):
        if self.mode == "reasoning" and not self.hide:
            self.out.write(RESET if self.color else "")
            self.out.write("\n" if self.color else "\n[/thinking]\n")
        if mode == "reasoning" and not self.hide:
            self.out.write(DIM + ITALIC if self.color else "[thinking]\n")
        self.mode = mode

    def end(self):
        if self.mode == "reasoning" and not self.hide:
            self.out.write(RESET if self.color else "\n[/thinking]")
        self.out.write("\n")
        self.out.flush()
        self.mode = None


def register(sub) -> None:
    p = sub.add_parser("chat", help="chat with the model in the terminal (multi-turn, streaming)",
                       description="Interactive chat. Every earlier turn is remembered (kept in the cache, not "
                                   "re-read). The reasoning (<think> section) is shown dimmed before the answer.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    p.add_argument("--system", default=None, help="a system message for the conversation")
    p.add_argument("--hide-reasoning", action="store_true", help="do not show the <think> section")
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="close the <think> section after N tokens and let the model answer (0 skips thinking)")
    add_sampling_options(p, max_tokens=8192)
    p.set_defaults(func=run)


def run(args) -> int:
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise PhiflashError(f"--max-thinking-tokens must be >= 0 (0 skips thinking), got {args.max_thinking_tokens}")
    model, tok, path = load_model(args.model)
    sampling = sampling_from_args(args, path)
    session = ChatSession(model, tok, system=clean_text(args.system)[0] if args.system else None, max_context=args.max_context,
                          prefill_step_size=args.prefill_step_size)
    out = sys.stdout
    lenient_stdin(sys.stdin)
    interactive = sys.stdin.isatty()
    print("Type a message; /reset, /system TEXT, /exit. Ctrl-C stops an answer.", file=sys.stderr)
    while True:
        try:
            if interactive:
                line = input(">>> ")
            else:
                out.write(">>> ")
                out.flush()
                line = sys.stdin.readline()
                if not line:
                    raise EOFError
                line = line.rstrip("\n")
                out.write(clean_text(line)[0] + "\n")
        except EOFError:
            out.write("\n")
            return 0
        except KeyboardInterrupt:
            out.write("\n")
            continue
        line, replaced = clean_text(line)
        if replaced:
            print(f"[the message {NOT_UTF8}]", file=out, flush=True)
        text = line.strip()
        if not text:
            continue
        if text.startswith("/"):
            command, _, rest = text.partition(" ")
            if command in ("/exit", "/quit", "/bye"):
                return 0
            if command == "/reset":
                session.reset(session.system)
                print("[conversation reset]", file=out, flush=True)
                continue
            if command == "/system":
                session.reset(rest.strip() or None)
                print(f"[system message {'set' if rest.strip() else 'cleared'}; conversation reset]", file=out, flush=True)
                continue
            if command == "/help":
                print(EXAMPLES.split("in the chat:\n", 1)[1], file=out, flush=True)
                continue
            print(f"[unknown command {command}; try /help]", file=out, flush=True)
            continue
        printer = Printer(out, hide_reasoning=args.hide_reasoning)
        last = None
        bar = PrefillProgress()
        try:
            for piece in session.send(text, progress=bar, max_tokens=args.max_tokens, temp=sampling.temp, top_p=sampling.top_p,
                                      top_k=sampling.top_k, min_p=sampling.min_p, seed=sampling.seed,
                                      max_thinking_tokens=args.max_thinking_tokens):
                printer.write(piece)
                last = piece
        except KeyboardInterrupt:
            printer.end()
            print("[stopped]", file=out, flush=True)
            continue
        except PhiflashError as exc:
            printer.end()
            print(f"[error: {exc}]", file=out, flush=True)
            continue
        bar.close()
        printer.end()
        if last is not None:
            note = " (max tokens reached)" if last.finish_reason == "length" else ""
            print(f"[{last.generation_tokens} tokens, {last.generation_tps:.1f} tok/s; prompt {last.prompt_tokens} "
                  f"tokens, {last.prompt_tps:.1f} tok/s]{note}", file=out, flush=True)
