"""The `sclslt` command (installed by setup.py; also `python -m sclslt.cli`).

  sclslt translate --run RUN_DIR INPUT [INPUT ...] [--checkpoint stage2|stage1|PATH] [--tag TAG]
                   [--beam N] [--max-len N] [--device cpu|cuda] [--size N] [--json]

Training itself starts from `launch/train.py` (see README.md). Exit codes: 0 done, 1 error (the
message names the file and what to do), 2 wrong usage.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from . import translate
    p = argparse.ArgumentParser(prog="sclslt", description="Gloss-free sign language translation (SCL-SLT).",
                                epilog="Training: python launch/train.py or deepspeed launch/train.py (README.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    t = sub.add_parser("translate", help="translate sign videos or frame folders with a trained run",
                       description="Translate sign videos or frame folders with a trained run. Frames are decoded, "
                                   "resized and subsampled as the run's training and evaluation data were; the "
                                   "model is the checkpoint the run selected (results.json), else stage 2's "
                                   "latest. Prints the text per input, the parameter count, the model load "
                                   "time and each input's frames and latency.")
    translate.add_arguments(t)
    t.set_defaults(func=translate.run_command)
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
