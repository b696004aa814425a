"""Entry point: `deepspeed launch/train.py --deepspeed configs/zero2.json [--config X.yaml] [--resume]
[--section.key value ...]`.

With no experiment file it runs the embedded default (synthetic corpus, stage 1, stage 2,
evaluation). Runs under the `deepspeed` launcher (any number of ranks and nodes), under
`mpirun -np N python launch/train.py ...` (ranks found through mpi4py), or as a single `python`
process. On a machine without a GPU, DeepSpeed's CPU accelerator and gloo are selected
automatically.
"""
from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

EXIT_PREEMPTED = 75     # EX_TEMPFAIL: checkpointed after SIGTERM/SIGUSR1; run again with --resume
EXIT_PEER_FAILED = 76   # another rank died or hung past train.dist_timeout_s; run again with --resume
DEFAULT_DS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs", "zero2.json")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter,
                                epilog="Any other --section.key value pair overrides the config "
                                       "(e.g. --train.max_steps 50); unknown keys are errors.")
    p.add_argument("--deepspeed", "--deepspeed_config", dest="ds_config", default=DEFAULT_DS,
                   help="DeepSpeed JSON (engine matters only: ZeRO stage, comms); default configs/zero2.json")
    p.add_argument("--config", default=None, help="experiment YAML (default: the embedded synthetic default)")
    p.add_argument("--resume", action="store_true", help="continue from the latest checkpoint of the run dir")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p.parse_known_args(argv)


def main(argv=None) -> int:
    from sclslt.preempt import install_signal_handlers
    install_signal_handlers()                 # before the heavy imports: an early SIGUSR1 is not fatal
    args, rest = parse_args(argv)
    from sclslt.engine import setup_accelerator
    setup_accelerator()                       # before anything imports deepspeed
    from sclslt.config import ConfigError, load_config
    from sclslt.trainer import Preempted, RunError, run
    try:
        cfg = load_config(args.config, rest)
    except ConfigError as e:
        print(f"config error: {e}", file=sys.stderr)
        return 2
    from sclslt.engine import peer_failure
    try:
        run(cfg, args.ds_config, resume=args.resume)
    except Preempted as e:
        print(f"preempted: {e}", file=sys.stderr)
        return EXIT_PREEMPTED
    except RunError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except Exception as e:
        if not peer_failure(e):
            raise
        # another rank died or hung: say so and leave at once (a clean shutdown would wait on the dead
        # peer); the last published checkpoint is intact and `--resume` continues from it
        print(f"error: rank {os.environ.get('RANK', '?')}: a collective with the other ranks failed: another rank "
              f"died or stopped answering within train.dist_timeout_s={cfg.train.dist_timeout_s} s "
              f"({type(e).__name__}: {str(e).splitlines()[0][:300]}); run again with --resume", file=sys.stderr)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(EXIT_PEER_FAILED)
    return 0


if __name__ == "__main__":
    sys.exit(main())
