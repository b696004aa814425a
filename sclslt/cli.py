"""The `sclslt` command (installed by setup.py; also `python -m sclslt.cli`).

  sclslt shard --layout LAYOUT --root CORPUS --out SHARDS [--split S] [--workers N] [--format npy|npy.zst|jpg] ...
  sclslt train [--deepspeed zeroN|FILE.json] [--config X.yaml] [--resume] [--section.key value ...]
               (one process; under a launcher: deepspeed / mpirun / srun ... launch/train.py, README.md)
  sclslt reference --run REF_RUN --early TAG --late TAG --out TABLE [--score pooled|cico] [--resume]
                   (several ranks: deepspeed --module sclslt.cli reference ...)
  sclslt evaluate --run RUN_DIR [--split test|dev|train] [--checkpoint stage2|stage1|DIR] [--tag TAG] [--beam N]
                  [--out FILE]   (several ranks: deepspeed --module sclslt.cli evaluate ...)
  sclslt translate (--run RUN_DIR | --model DIR|HUB_NAME) INPUT [INPUT ...] [--checkpoint stage2|stage1|PATH]
                   [--tag TAG] [--beam N] [--max-len N] [--device cpu|cuda] [--size N] [--json]
  sclslt export --run RUN_DIR --out DIR [--lora merged|adapter] [--license ID] [--name NAME]
  sclslt demo (--run RUN_DIR | --model DIR|HUB_NAME) [--host 127.0.0.1] [--port 7860]

`sclslt train --help` lists every config field with its comment. Exit codes: 0 done, 1 error (the
message names the file and what to do), 2 wrong usage.
"""
from __future__ import annotations

import argparse
import sys


def build_parser() -> argparse.ArgumentParser:
    from sclslt.eval import translate
    p = argparse.ArgumentParser(prog="sclslt", description="Gloss-free sign language translation (SCL-SLT).",
                                epilog="Multi-rank training: deepspeed / mpirun / srun ... launch/train.py (README.md).")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)
    from sclslt.data import sharding
    sh = sub.add_parser("shard", help="a corpus in its own layout (PHOENIX-2014T, CSL-Daily, How2Sign, a CSV) to "
                        "WebDataset shards", description=sharding.__doc__.split("\n\n")[0],
                        epilog="\n\n".join(sharding.__doc__.split("\n\n")[1:]),
                        formatter_class=argparse.RawDescriptionHelpFormatter)
    sharding.add_arguments(sh)
    sh.set_defaults(func=sharding.run_command)
    sub.add_parser("train", help="train a run (stage 1, stage 2, evaluation); --help lists every config field",
                   add_help=False)
    from sclslt.selection import reference
    r = sub.add_parser("reference", help="a Pair Selection reference table from two checkpoints of a reference run",
                       description=reference.__doc__.split("\n\n")[0],
                       epilog="\n\n".join(reference.__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    reference.add_arguments(r)
    r.set_defaults(func=reference.run_command)
    t = sub.add_parser("translate", help="translate sign videos or frame folders with a trained run",
                       description="Translate sign videos or frame folders with a trained run. Frames are decoded, "
                                   "resized and subsampled as the run's training and evaluation data were; the "
                                   "model is the checkpoint the run selected (results.json), else stage 2's "
                                   "latest. Prints the text per input, the parameter count, the model load "
                                   "time and each input's frames and latency.")
    translate.add_arguments(t)
    t.set_defaults(func=translate.run_command)
    from sclslt.eval import offline
    v = sub.add_parser("evaluate", help="score a run's checkpoint (the selected one, or any) on any split, without "
                       "training", description=offline.__doc__.split("\n\n")[0],
                       epilog="\n\n".join(offline.__doc__.split("\n\n")[1:]),
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    offline.add_arguments(v)
    v.set_defaults(func=offline.run_command)
    from sclslt.eval import export
    e = sub.add_parser("export", help="a run's selected checkpoint as a Hugging Face model folder with a model card",
                       description=export.__doc__.split("\n\n")[0])
    export.add_arguments(e)
    e.set_defaults(func=export.run_command)
    from sclslt.eval import demo
    g = sub.add_parser("demo", help="a Gradio page on 127.0.0.1 to try a run or an exported model",
                       description=demo.__doc__.split("\n\n")[0])
    demo.add_arguments(g)
    g.set_defaults(func=demo.run_command)
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith(("--local_rank", "--local-rank")):   # `deepspeed --module sclslt.cli ...` puts
        argv = argv[1 if "=" in argv[0] else 2:]                        # it first; LOCAL_RANK says the same
    if argv[:1] == ["train"]:                 # the trainer's own parser: config overrides pass through
        from sclslt.train.main import main as train_main
        return train_main(argv[1:], prog="sclslt train")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
