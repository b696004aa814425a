"""Plot a run's training curves to PNG: loss (and its parts) and learning rate per stage, from
<run>/<stage>/metrics.csv; GPU utilisation and memory per rank from <stage>/telemetry.csv when present
(`sclslt.runtime.plots`; a run makes the same figure at its end for its trackers).

  python tools/plot_metrics.py --run runs/default [--out runs/default/curves.png]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> int:
    from sclslt.runtime.plots import plot_curves

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <run>/curves.png")
    args = p.parse_args(argv)
    out = plot_curves(args.run, args.out)
    if out is None:
        print(f"error: no <stage>/metrics.csv under {args.run}", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
