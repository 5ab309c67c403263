"""``phiflash golden``: write a golden set (checkpoint + reference vectors) for testing a port."""

from __future__ import annotations

import argparse
import sys

EPILOG = """\
examples:
  phiflash golden --config tiny --out golden/tiny-s1 --seed 1
  phiflash golden --config full --layers 4 --dtype bfloat16 --out golden/full4-bf16
  phiflash golden --model path/to/Phi-4-mini-flash-reasoning --dtype bfloat16 --out golden/released

The set holds config.json and model.safetensors (random weights, released format; not written with
--model), vectors.npz (the reference's outputs, keys as in the golden vectors) and README.md.
Check another implementation against it with `phiflash verify --model DIR --outputs FILE`.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "golden",
        help="write a random-weight checkpoint and the reference's outputs for it (golden vectors)",
        description=(
            "Write a golden set for checking another implementation: a random-weight checkpoint in the "
            "released model's format and the NumPy reference's outputs for fixed prompts (no-cache logits, "
            "per-layer states, GMU memory, cached greedy decode, the original's sliding-cache quirk). "
            "The same seed gives byte-identical files."),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--config", metavar="CONFIG_OR_PRESET",
                        help="preset tiny, small or full (the released shape), or a config.json / checkpoint "
                             "directory whose config to use with random weights")
    source.add_argument("--model", metavar="DIR",
                        help="an existing checkpoint (e.g. the released weights): write only vectors + README")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output directory: new, empty or an earlier golden set (replaced once the new one is "
                             "complete); never the --config/--model directory or any other directory")
    parser.add_argument("--seed", type=int, default=0, help="seed of the weights and prompts (default 0)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="bfloat16: weights stored as bf16 (A_log and lambdas stay float32, as in the "
                             "release) and vectors computed with the reference's bf16 mode (default float32)")
    parser.add_argument("--layers", type=int, metavar="N",
                        help="number of layers (a multiple of 4), e.g. to cut the full shape down to laptop size")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..errors import PhiflashError
    from ..verify import make_golden
    from ._common import terminate_cleanly

    if not 0 <= args.seed < 2**63:
        raise PhiflashError(f"--seed must be an integer in 0..2^63-1, got {args.seed}")
    terminate_cleanly()

    def log(msg):
        print(msg, file=sys.stderr)

    vectors = make_golden(args.out, config=args.config, model_dir=args.model, seed=args.seed, dtype=args.dtype,
                          layers=args.layers, log=log)
    print(f"wrote {args.out}: " + ("" if args.model else "config.json, model.safetensors, ")
          + f"vectors.npz ({len(vectors)} arrays), README.md")
    return 0
