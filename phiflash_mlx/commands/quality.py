"""`phiflash quality`: how much a converted (quantized) checkpoint differs from its source."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..convert import quality_report, quality_sequences
from ..errors import PhiflashError
from ..loader import load

EXAMPLES = """\
examples:
  phiflash quality ./Phi-4-mini-flash-reasoning ./phi4flash-4bit
  phiflash quality ./ckpt ./ckpt-q --text my_corpus.txt --json

Reports, teacher-forced over each text: the mean KL divergence of the quantized model's next-token
distribution from the reference's, how often their top-1 tokens agree, and each model's perplexity.
Without a tokenizer (random test checkpoints), random token sequences are used.
"""


def register(sub) -> None:
    p = sub.add_parser("quality", help="compare a quantized checkpoint with its source (KL, top-1, perplexity)",
                       description="Measure what quantization costs: KL divergence, top-1 agreement, perplexity.",
                       epilog=EXAMPLES, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("ref", help="the unquantized checkpoint")
    p.add_argument("quant", help="the converted checkpoint")
    p.add_argument("--text", action="append", default=[], metavar="FILE",
                   help="a text file to evaluate on (repeatable; default: built-in samples)")
    p.add_argument("--seed", type=int, default=0, help="seed for random sequences (no tokenizer)")
    p.add_argument("--json", action="store_true", help="print the report as JSON")
    p.set_defaults(func=run)


def run(args) -> int:
    texts = []
    for f in args.text:
        try:
            if not Path(f).is_file():
                raise PhiflashError(f"--text {f} is not a regular file; give a UTF-8 text file")
            texts.append(Path(f).read_text(encoding="utf-8"))
        except OSError as exc:
            raise PhiflashError(f"cannot read --text {f}: {exc.strerror or exc}") from None
        except UnicodeDecodeError as exc:
            raise PhiflashError(f"--text {f} is not UTF-8 text (byte {exc.start} is invalid); convert it to "
                                "UTF-8, e.g. with iconv") from None
    ref, tok = load(args.ref)
    quant, _ = load(args.quant, tokenizer=False)
    if ref.args.vocab_size != quant.args.vocab_size or ref.args.num_hidden_layers != quant.args.num_hidden_layers:
        raise PhiflashError(f"{args.quant} is not a conversion of {args.ref}: their configs differ")
    report = quality_report(ref, quant, quality_sequences(tok, ref.args.vocab_size, texts or None, seed=args.seed))
    if args.json:
        print(json.dumps(report))
        return 0
    print(f"{'positions':>10} {'mean KL':>10} {'top-1 agree':>12} {'ppl ref':>10} {'ppl quant':>10}")
    print(f"{report['positions']:>10} {report['mean_kl']:>10.5f} {report['top1_agreement']:>12.2%} "
          f"{report['ppl_ref']:>10.3f} {report['ppl_quant']:>10.3f}")
    return 0
