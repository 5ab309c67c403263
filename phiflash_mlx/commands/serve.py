"""``phiflash serve``: an OpenAI-compatible HTTP server for the model."""

from __future__ import annotations

import argparse
import math
from pathlib import Path

from ..errors import PhiflashError
from ._common import add_model_option, add_sampling_options, load_model, sampling_from_args

EPILOG = """\
examples:
  phiflash serve                                   # the bundled demo model on http://127.0.0.1:8080/v1
  phiflash serve --model microsoft/Phi-4-mini-flash-reasoning --port 8000
  phiflash serve --model ./my-checkpoint --host 0.0.0.0 --max-context 16384 --temp 0

endpoints:
  GET  /v1/models             the loaded model (its id: the hub id, or the checkpoint directory's name)
  POST /v1/chat/completions   chat; the reasoning comes in message.reasoning_content, the answer in content
  POST /v1/completions        plain text continuation, <think> tags included as written
  GET  /health                status, queue length, batch, checkpoint store and counts of finished generations

Both POST endpoints stream server-sent events with "stream": true, and take max_tokens
(max_completion_tokens for chat), temperature, top_p, seed, stop and stream_options.include_usage;
also top_k, min_p, ignore_eos and max_thinking_tokens. The sampling options below are the defaults
for requests that leave them out. Up to --max-batch requests generate together (continuous
batching); more wait in a queue of --max-queue, beyond which requests get 503. Conversations resume
from checkpoints of earlier turns (--checkpoint-mb of memory); usage.prompt_tokens_details.cached_tokens
says how many prompt tokens were restored.

Shutdown (SIGTERM or Ctrl-C): the socket closes, queued requests get 503, running generations
get --shutdown-grace seconds to finish and are then cancelled. Requests must name this server's
address in Host (and Origin, from browsers); --allowed-hosts adds names (* turns the check off).

  curl http://127.0.0.1:8080/v1/chat/completions -H 'Content-Type: application/json' \\
       -d '{"messages": [{"role": "user", "content": "What is 17 + 25?"}]}'
"""

INSTALL_HINT = "phiflash serve needs FastAPI and uvicorn; install them with: pip install 'phiflash-mlx[server]'"


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "serve",
        help="serve the model over an OpenAI-compatible HTTP API",
        description=("Serve the model over HTTP with OpenAI's /v1/models, /v1/chat/completions and "
                     "/v1/completions, so OpenAI clients and tools can use it. Needs the 'server' extra."),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_model_option(parser)
    parser.add_argument("--host", default="127.0.0.1",
                        help="address to listen on (default 127.0.0.1; 0.0.0.0 exposes it to the network)")
    parser.add_argument("--port", type=int, default=8080, help="port to listen on (default 8080; 0 picks a free one)")
    parser.add_argument("--log-level", default="info", choices=("critical", "error", "warning", "info", "debug"),
                        help="uvicorn's log level (default info: one line per request)")
    add_sampling_options(parser, max_tokens=8192)
    g = parser.add_argument_group("serving")
    g.add_argument("--max-batch", type=int, default=None,
                   help="most requests generating at once (default 8; a CPU step reads the weights once for all)")
    g.add_argument("--max-queue", type=int, default=64, help="requests waiting beyond the batch before 503 (default 64)")
    g.add_argument("--checkpoint-mb", type=float, default=2048,
                   help="memory for cache checkpoints of earlier turns, in MB (default 2048; 0 turns them off)")
    g.add_argument("--max-thinking-tokens", type=int, default=None,
                   help="default budget for the <think> section: closed after this many tokens (0 skips "
                        "thinking; requests may set max_thinking_tokens)")
    g.add_argument("--thinking-message", default="",
                   help="short text written before the forced </think> when the budget runs out")
    g.add_argument("--shutdown-grace", type=float, default=10.0,
                   help="seconds running generations may finish after SIGTERM (default 10)")
    g.add_argument("--max-body-bytes", type=int, default=4 << 20, help="largest request body (default 4 MiB; 413 beyond)")
    g.add_argument("--allowed-hosts", default="",
                   help="comma-separated host names requests may address besides the bound one (* allows any)")
    parser.set_defaults(func=run)


def model_id_for(given: str | None, path: Path) -> str:
    """The id clients see: the hub id when one was given, else the checkpoint directory's name."""
    if given is not None and not Path(given).expanduser().exists():
        return given
    if given is None:
        return "phiflash-demo"                      # the bundled demo model
    return Path(path).resolve().name


def run(args) -> int:
    try:
        import fastapi  # noqa: F401
        import uvicorn  # noqa: F401
    except ImportError:
        raise PhiflashError(INSTALL_HINT) from None
    from ..serving.http import serve
    if not 0 <= args.port <= 65535:
        raise PhiflashError(f"--port must be in 0..65535, got {args.port}")
    for name, value, low in (("--max-batch", args.max_batch, 1), ("--max-queue", args.max_queue, 0),
                             ("--max-thinking-tokens", args.max_thinking_tokens, 0),
                             ("--max-body-bytes", args.max_body_bytes, 1)):
        if value is not None and value < low:
            raise PhiflashError(f"{name} must be at least {low}, got {value}")
    for name, value in (("--checkpoint-mb", args.checkpoint_mb), ("--shutdown-grace", args.shutdown_grace)):
        if not math.isfinite(value) or value < 0:
            raise PhiflashError(f"{name} must be a finite number >= 0, got {value}")
    model, tokenizer, path = load_model(args.model)
    sampling = sampling_from_args(args, path)
    serve(model, tokenizer, model_id_for(args.model, path), args.host, args.port, log_level=args.log_level,
          max_context=args.max_context, prefill_step_size=args.prefill_step_size,
          default_max_tokens=args.max_tokens, default_sampling=sampling, max_batch=args.max_batch,
          max_queue=args.max_queue, checkpoint_bytes=int(args.checkpoint_mb * 2**20),
          default_max_thinking_tokens=args.max_thinking_tokens, thinking_message=args.thinking_message,
          shutdown_grace=args.shutdown_grace, max_body_bytes=args.max_body_bytes,
          allowed_hosts=[h for h in args.allowed_hosts.split(",") if h.strip()])
    return 0
