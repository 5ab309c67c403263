"""``phiflash eval-demo``: accuracy of the shipped demo model (or another checkpoint) on arithmetic."""

from __future__ import annotations

import argparse


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "eval-demo",
        help="measure the demo model's exact-answer accuracy on fresh arithmetic word problems",
        description=(
            "Generate held-out arithmetic word problems (addition and subtraction up to three digits, "
            "a two- or three-digit number times a one-digit number), answer each greedily through the "
            "chat template, and print the exact-answer accuracy per problem type."
        ),
        epilog=(
            "examples:\n"
            "  phiflash eval-demo                        # the shipped demo model, 200 per type\n"
            "  phiflash eval-demo --n 50 --types add,sub\n"
            "  phiflash eval-demo --model ./my-demo --json\n"
            "retrain the model with: python -m phiflash_mlx.demo.train --out ./my-demo"
        ),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    from ..demo.evaluate import add_arguments

    add_arguments(parser)
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..demo.evaluate import run as evaluate

    return evaluate(args)
