"""`phiflash convert`: a Hugging Face checkpoint to an MLX one (float dtype or quantized)."""

from __future__ import annotations

import argparse
import sys

from ..convert import convert, directory_size
from ._common import terminate_cleanly

EXAMPLES = """\
examples:
  phiflash convert microsoft/Phi-4-mini-flash-reasoning phi4flash-4bit -q
  phiflash convert ./Phi-4-mini-flash-reasoning phi4flash-8bit -q --q-bits 8 --q-group-size 64
  phiflash convert ./Phi-4-mini-flash-reasoning phi4flash-mixed -q --recipe mixed
  phiflash convert ./ckpt ./ckpt-q -q --q-override 'model.layers.17.*=8' --q-override 'model.embed_tokens=6:32'
  phiflash convert ./ckpt ./ckpt-mxfp4 -q --q-mode mxfp4
  phiflash convert ./ckpt ./ckpt-fp32 --dtype float32
  phiflash convert ./ckpt ./ckpt-q8 -q --q-bits 8 --scales-dtype float32

The output is written into a hidden sibling directory and renamed into place when complete. An existing
destination is replaced (with --force, after the new one is whole) only when it is empty or an earlier
output of phiflash convert (it holds phiflash-convert.json); the source, a directory inside it or
containing it, files and any other directory are refused.

Norms, the Mamba conv, A_log, D and the differential-attention lambdas are never quantized; A_log, D
and the lambdas stay float32. The recipe is recorded in config.json ("quantization", mlx-lm layout).
Quantization scales and biases are computed in float32 and stored as float16 (--scales-dtype).
"""


def register(sub) -> None:
    p = sub.add_parser("convert", help="convert / quantize a checkpoint for MLX",
                       description="Convert a Hugging Face phi4flash checkpoint (directory or hub id) into an MLX "
                                   "checkpoint directory, optionally quantized. Streams tensor by tensor.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("src", help="source checkpoint directory or Hugging Face id")
    p.add_argument("dst", help="destination directory: new, empty, or (with --force) an earlier output of "
                               "phiflash convert; never the source, inside it, or any other directory")
    p.add_argument("--dtype", choices=["float32", "float16", "bfloat16"], default=None,
                   help="dtype of the tensors kept unquantized (default: the source's)")
    p.add_argument("-q", "--quantize", action="store_true", help="quantize the linear and embedding weights")
    p.add_argument("--q-bits", type=int, default=None, help="bits per weight: 2, 3, 4, 5, 6 or 8 (default 4)")
    p.add_argument("--q-group-size", type=int, default=None, help="group size: 32, 64 or 128 (default 64)")
    p.add_argument("--q-mode", default="affine", help="affine (default), mxfp4 or mxfp8")
    p.add_argument("--scales-dtype", default=None, metavar="DTYPE",
                   help="how the quantization scales and biases are stored: float16 (default), bfloat16 or "
                        "float32 (computed in float32, rounded once)")
    p.add_argument("--recipe", default="uniform", choices=["uniform", "mixed"],
                   help="mixed: embeddings and the full-attention layer at 8 bits, the rest at --q-bits")
    p.add_argument("--q-override", action="append", default=[], metavar="PATTERN=BITS[:GROUP]",
                   help="quantize modules matching a glob differently, or PATTERN=none to keep them (repeatable)")
    p.add_argument("--max-shard-size", type=float, default=5.0, metavar="GB", help="output shard size (default 5)")
    p.add_argument("--force", action="store_true",
                   help="replace an existing destination written by phiflash convert (only once the new one is "
                        "complete); other directories are never replaced")
    p.set_defaults(func=run)


def run(args) -> int:
    terminate_cleanly()
    out = convert(args.src, args.dst, dtype=args.dtype, quantize=args.quantize, q_bits=args.q_bits,
                  q_group_size=args.q_group_size, q_mode=args.q_mode, recipe=args.recipe,
                  overrides=args.q_override, max_shard_size_gb=args.max_shard_size, force=args.force,
                  scales_dtype=args.scales_dtype)
    print(f"wrote {out} ({directory_size(out) / 1e6:.1f} MB of weights)", file=sys.stderr)
    return 0
