"""``phiflash serve``: an OpenAI-compatible HTTP server for the model."""

from __future__ import annotations

import argparse
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
  GET  /health                status, queue length and counts of finished generations

Both POST endpoints stream server-sent events with "stream": true, and take max_tokens
(max_completion_tokens for chat), temperature, top_p, seed, stop and stream_options.include_usage;
also top_k, min_p and ignore_eos. The sampling options below are the defaults for requests that
leave them out. Requests are queued and run one at a time.

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
    from ..server import serve
    if not 0 <= args.port <= 65535:
        raise PhiflashError(f"--port must be in 0..65535, got {args.port}")
    model, tokenizer, path = load_model(args.model)
    sampling = sampling_from_args(args, path)
    serve(model, tokenizer, model_id_for(args.model, path), args.host, args.port, log_level=args.log_level,
          max_context=args.max_context, prefill_step_size=args.prefill_step_size,
          default_max_tokens=args.max_tokens, default_sampling=sampling)
    return 0
