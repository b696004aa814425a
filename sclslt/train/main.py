"""Training entry: `sclslt train ...`, `deepspeed launch/train.py --deepspeed configs/zero2.json ...`,
`mpirun -np N python launch/train.py ...` or one `python` process; all take

    [--deepspeed zeroN | configs/zeroN.json] [--config X.yaml] [--resume] [--section.key value ...]

With no experiment file it runs the embedded default (synthetic corpus, stage 1, stage 2,
evaluation). Ranks come from the deepspeed launcher, mpi4py or Slurm. On a machine without a GPU,
DeepSpeed's CPU accelerator and gloo are selected automatically. Exit codes: 0 done, 1 error,
2 config error, 75 preempted and checkpointed, 76 another rank died or hung (run again with --resume).
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

EXIT_PREEMPTED = 75  # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; run again with --resume
EXIT_PEER_FAILED = 76  # another rank died or hung past train.dist_timeout_s; run again with --resume
PACKAGED_DS = Path(__file__).resolve().parents[1] / "configs"  # zero1/2/3(_offload).json, installed with sclslt
DEFAULT_DS = str(PACKAGED_DS / "zero2.json")


def ds_config_path(value: str) -> str:
    """`--deepspeed`: a packaged config by its name (zero1, zero2, zero3, zero3_offload) or a JSON file's path."""
    named = PACKAGED_DS / f"{value}.json"
    if "/" not in value and not value.endswith(".json") and named.is_file():
        return str(named)
    if not Path(value).is_file():
        names = ", ".join(sorted(p.stem for p in PACKAGED_DS.glob("*.json")))
        raise argparse.ArgumentTypeError(
            f"{value}: no such DeepSpeed config file; name a packaged one ({names}) or give a JSON file's path"
        )
    return value


def parse_args(argv=None, prog: str | None = None):
    from sclslt.config import field_help

    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="Any config field below overrides the experiment file as --section.key value "
        "(e.g. --train.max_steps 50); unknown keys are errors.\n\nconfig fields:\n" + "\n".join(field_help()),
    )
    p.add_argument(
        "--deepspeed",
        "--deepspeed_config",
        dest="ds_config",
        default=DEFAULT_DS,
        type=ds_config_path,
        help="DeepSpeed config: zero1, zero2 (default), zero3, zero3_offload (packaged with sclslt) or a "
        "JSON file's path (the engine part matters only: ZeRO stage, communication)",
    )
    p.add_argument("--config", default=None, help="experiment YAML (default: the embedded synthetic default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv=None, prog: str | None = None) -> int:
    from sclslt.runtime.signals import install_signal_handlers

    install_signal_handlers()  # before the heavy imports: an early SIGUSR1 is not fatal
    args, rest = parse_args(argv, prog)
    from sclslt.runtime.distributed import setup_accelerator

    setup_accelerator()  # before anything imports deepspeed
    from sclslt.config import ConfigError, load_config
    from sclslt.runtime.context import Preempted
    from sclslt.runtime.rundir import RunError
    from sclslt.train.run import run

    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from sclslt.runtime.distributed import peer_failure, port_in_use

    try:
        run(cfg, args.ds_config, resume=args.resume)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if port_in_use(e):
            where = f"{os.environ.get('MASTER_ADDR', '?')}:{os.environ.get('MASTER_PORT', '?')}"
            print(
                f"error: the rendezvous port {where} is in use (another job on this machine?): pick a free one "
                f"with the launcher's --master_port (or MASTER_PORT) ({str(e).splitlines()[0][:200]})",
                file=sys.stderr,
            )
            return 1
        if not peer_failure(e):
            raise
        # another rank died or hung: say so and leave at once (a clean shutdown would wait on the dead
        # peer); the last published checkpoint is intact and `--resume` continues from it
        print(
            f"error: rank {os.environ.get('RANK', '?')}: a collective with the other ranks failed: another rank "
            f"died or stopped answering within train.dist_timeout_s={cfg.train.dist_timeout_s} s "
            f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); run again with --resume",
            file=sys.stderr,
        )
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER_FAILED)
    return 0
