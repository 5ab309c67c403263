"""`phiflash generate`: one prompt in, one answer out, for scripts."""

from __future__ import annotations

import argparse
import json
import sys

from ..errors import PhiflashError
from ..generate import Generator
from ..progress import PrefillProgress
from ._common import (NOT_UTF8, add_model_option, add_sampling_options, clean_text, load_model, read_text_input,
                      sampling_from_args)
from .chat import Printer

EXAMPLES = """\
examples:
  phiflash generate --prompt "What is 27 + 58?"
  echo "What is 305 - 127?" | phiflash generate --temp 0
  phiflash generate --model microsoft/Phi-4-mini-flash-reasoning --prompt "Solve x^2 = 9" --max-tokens 4096
  phiflash generate --prompt "What is 12 * 7?" --json
"""


def register(sub) -> None:
    p = sub.add_parser("generate", help="generate one answer to a prompt (or stdin)",
                       description="Generate one answer. The prompt goes through the chat template as a user "
                                   "turn unless --raw is given.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_model_option(p)
    p.add_argument("--prompt", "-p", default=None, help="the prompt; read from stdin when omitted or '-'")
    p.add_argument("--system", default=None, help="an optional system message")
    p.add_argument("--raw", action="store_true", help="encode the prompt as plain text, without the chat template")
    p.add_argument("--json", action="store_true",
                   help="print one JSON object: text, reasoning, answer, token counts and speeds")
    p.add_argument("--hide-reasoning", action="store_true", help="do not print the <think> section")
    p.add_argument("--stop", action="append", default=[], metavar="TEXT", help="stop at this text (repeatable)")
    p.add_argument("--max-thinking-tokens", type=int, default=None, metavar="N",
                   help="close the <think> section after N tokens and let the model answer (0 skips thinking)")
    add_sampling_options(p, max_tokens=1024)
    p.set_defaults(func=run)


def run(args) -> int:
    prompt = args.prompt
    if prompt is None or prompt == "-":
        if sys.stdin is None or sys.stdin.isatty():
            raise PhiflashError("no prompt: pass --prompt TEXT or pipe the prompt on stdin")
        prompt, replaced = read_text_input(sys.stdin)
    else:
        prompt, replaced = clean_text(prompt)
    if replaced:
        print(f"phiflash generate: warning: the prompt {NOT_UTF8}", file=sys.stderr)
    if args.system is not None:
        args.system, replaced = clean_text(args.system)
        if replaced:
            print(f"phiflash generate: warning: --system {NOT_UTF8}", file=sys.stderr)
    args.stop = [clean_text(s)[0] for s in args.stop]
    if not prompt.strip():
        raise PhiflashError("the prompt is empty")
    if args.max_thinking_tokens is not None and args.max_thinking_tokens < 0:
        raise PhiflashError(f"--max-thinking-tokens must be >= 0 (0 skips thinking), got {args.max_thinking_tokens}")
    model, tok, path = load_model(args.model, quiet=args.json)
    sampling = sampling_from_args(args, path)
    if args.raw:
        ids = tok.encode(prompt)
    else:
        messages = ([{"role": "system", "content": args.system}] if args.system else []) + \
                   [{"role": "user", "content": prompt}]
        ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    gen = Generator(model, tok, args.max_context, args.prefill_step_size)
    stream = gen.stream(ids, args.max_tokens, sampling, args.stop, progress=PrefillProgress(),
                        max_thinking_tokens=args.max_thinking_tokens)
    if args.json:
        reasoning, answer, last = [], [], None
        for piece in stream:
            (reasoning if piece.reasoning else answer).append(piece.text)
            last = piece
        out = {
            "text": ("<think>" + "".join(reasoning) + "</think>" if reasoning else "") + "".join(answer),
            "reasoning": "".join(reasoning).strip(), "answer": "".join(answer).strip(),
            "finish_reason": last.finish_reason,
            "prompt_tokens": last.prompt_tokens, "generation_tokens": last.generation_tokens,
            "prompt_tps": round(last.prompt_tps, 2), "generation_tps": round(last.generation_tps, 2),
            "peak_memory_gb": round(last.peak_memory, 3),
        }
        print(json.dumps(out, ensure_ascii=False))
        return 0
    printer = Printer(sys.stdout, hide_reasoning=args.hide_reasoning)
    last = None
    for piece in stream:
        printer.write(piece)
        last = piece
    printer.end()
    print(f"[{last.prompt_tokens} prompt tokens, {last.prompt_tps:.1f} tok/s; {last.generation_tokens} generated, "
          f"{last.generation_tps:.1f} tok/s; peak memory {last.peak_memory:.2f} GB]", file=sys.stderr)
    return 0
