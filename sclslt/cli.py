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
    from sclslt.data import sharding
    from sclslt.eval import demo, export, offline, translate
    from sclslt.selection import reference

    p = argparse.ArgumentParser(
        prog="sclslt",
        description="Gloss-free sign language translation (SCL-SLT).",
        epilog="Several ranks: deepspeed / mpirun / srun ... launch/train.py, or deepspeed --module "
        "sclslt.cli COMMAND ... (docs/launching.md).",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, module, help: str) -> None:
        """A subcommand from its module: the docstring's first paragraph describes it, the rest is the epilog;
        the module's add_arguments and run_command are its options and what it does."""
        doc = module.__doc__.split("\n\n")
        c = sub.add_parser(
            name,
            help=help,
            description=doc[0],
            epilog="\n\n".join(doc[1:]),
            formatter_class=argparse.RawDescriptionHelpFormatter,
        )
        module.add_arguments(c)
        c.set_defaults(func=module.run_command)

    command(
        "shard", sharding, "a corpus in its own layout (PHOENIX-2014T, CSL-Daily, How2Sign, a CSV) to WebDataset shards"
    )
    sub.add_parser(
        "train", help="train a run (stage 1, stage 2, evaluation); --help lists every config field", add_help=False
    )
    command("reference", reference, "a Pair Selection reference table from two checkpoints of a reference run")
    command("evaluate", offline, "score a run's checkpoint (the selected one, or any) on any split, without training")
    command("translate", translate, "translate sign videos or frame folders with a trained run or an export")
    command("export", export, "a run's selected checkpoint as a Hugging Face model folder with a model card")
    command("demo", demo, "a Gradio page on 127.0.0.1 to try a run or an exported model")
    return p


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0].startswith(("--local_rank", "--local-rank")):  # `deepspeed --module sclslt.cli ...` puts
        argv = argv[1 if "=" in argv[0] else 2 :]  # it first; LOCAL_RANK says the same
    if argv[:1] == ["train"]:  # the trainer's own parser: config overrides pass through
        from sclslt.train.main import main as train_main

        return train_main(argv[1:], prog="sclslt train")
    args = build_parser().parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
