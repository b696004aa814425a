"""Plot a run's training curves to PNG: loss (and its parts) and learning rate per stage, from
<run>/<stage>/metrics.csv; GPU utilisation and memory per rank from <stage>/telemetry.csv when present.

  python tools/plot_metrics.py --run runs/default [--out runs/default/curves.png]
"""
from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: (float(v) if k != "stage" else v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", type=Path, default=None, help="default: <run>/curves.png")
    args = p.parse_args(argv)
    stages = sorted(d for d in args.run.iterdir() if (d / "metrics.csv").is_file()) if args.run.is_dir() else []
    if not stages:
        print(f"error: no <stage>/metrics.csv under {args.run}", file=sys.stderr)
        return 2
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    telemetry = {d.name: read_csv(d / "telemetry.csv") for d in stages if (d / "telemetry.csv").is_file()}
    rows = 3 if telemetry else 2
    fig, axes = plt.subplots(rows, len(stages), figsize=(5 * len(stages), 3 * rows), squeeze=False)
    for col, d in enumerate(stages):
        m = read_csv(d / "metrics.csv")
        steps = [r["step"] for r in m]
        for key in [k for k in m[0] if k not in ("step", "lr", "epoch", "stage", "wall_s")]:
            axes[0][col].plot(steps, [r.get(key, float("nan")) for r in m], label=key)
        axes[0][col].set_title(f"{d.name}: loss")
        axes[0][col].legend()
        axes[1][col].plot(steps, [r["lr"] for r in m])
        axes[1][col].set_title(f"{d.name}: learning rate")
        if telemetry:
            for rank in sorted({int(r["rank"]) for r in telemetry.get(d.name, [])}):
                t = [r for r in telemetry[d.name] if int(r["rank"]) == rank]
                axes[2][col].plot([r["step"] for r in t], [r["gpu_util"] for r in t], label=f"rank {rank} util %")
            axes[2][col].set_title(f"{d.name}: GPU utilisation")
            if telemetry.get(d.name):
                axes[2][col].legend()
        for ax in axes[:, col]:
            ax.set_xlabel("step")
    fig.tight_layout()
    out = args.out or args.run / "curves.png"
    fig.savefig(out, dpi=100)
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
