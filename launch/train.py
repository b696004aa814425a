"""Entry point: `deepspeed launch/train.py --deepspeed configs/zero2.json [--config X.yaml] [--resume]
[--section.key value ...]` (also `mpirun -np N python launch/train.py ...`, `python launch/train.py ...`,
and `sclslt train ...`). A thin wrapper of `sclslt.train.main`, runnable from a checkout.
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run from a checkout

from sclslt.train.main import DEFAULT_DS, EXIT_PEER_FAILED, EXIT_PREEMPTED, main, parse_args  # noqa: E402

__all__ = ["DEFAULT_DS", "EXIT_PEER_FAILED", "EXIT_PREEMPTED", "main", "parse_args"]

if __name__ == "__main__":
    sys.exit(main())
