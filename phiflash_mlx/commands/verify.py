"""``phiflash verify``: compare another implementation's outputs with the NumPy reference."""

from __future__ import annotations

import argparse

EPILOG = """\
examples:
  phiflash verify --model golden/tiny --outputs my_port_tiny.npz
  phiflash verify --model golden/full4-bf16 --outputs port.safetensors --dtype bfloat16
  phiflash verify --model path/to/checkpoint --outputs port.npz --inputs vectors.npz --atol 1e-3

The outputs file holds any subset of the golden keys (logits_short, logits_long,
hidden_layer_outputs_long, gmu_memory_long, decode_step_logits, decode_greedy_ids, generate_ids,
quirk_step_logits, ...). Token ids are taken from it when present, else from --inputs
(default MODEL/vectors.npz). Exit status 0 only when every comparison passes.
"""


def register(subparsers) -> None:
    parser = subparsers.add_parser(
        "verify",
        help="compare another implementation's outputs with the reference, per quantity and per layer",
        description=(
            "Run the NumPy reference on the inputs of a golden set, compare another implementation's "
            "outputs with it (max abs and relative error per quantity and per layer), name the first "
            "diverging layer and, when a known mistake reproduces the differences, the likely cause."),
        epilog=EPILOG,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", required=True, metavar="DIR", help="checkpoint the outputs were made with")
    parser.add_argument("--outputs", required=True, metavar="FILE",
                        help="the other implementation's outputs (.npz or .safetensors, golden vector keys)")
    parser.add_argument("--inputs", metavar="VECTORS",
                        help="vectors.npz with the token ids the outputs were made from (default MODEL/vectors.npz)")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="precision of the reference run and of the tolerance profile (default float32)")
    parser.add_argument("--atol", type=float, help="absolute tolerance (default: from the --dtype profile)")
    parser.add_argument("--rtol", type=float, help="relative tolerance (default: from the --dtype profile)")
    parser.add_argument("--no-diagnose", action="store_true",
                        help="skip rerunning the reference with known mistakes to find the likely cause")
    parser.set_defaults(func=run)


def run(args) -> int:
    from ..verify import format_report, verify

    report = verify(args.model, args.outputs, dtype=args.dtype, inputs_path=args.inputs, atol=args.atol,
                    rtol=args.rtol, diagnose_causes=not args.no_diagnose)
    print(format_report(report))
    return 0 if report.ok else 1
