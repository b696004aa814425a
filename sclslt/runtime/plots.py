"""A run's training curves as one PNG (`curves.png`): loss and its parts and the learning rate per stage, from
`<run>/<stage>/metrics.csv`, and GPU utilisation per rank from `<stage>/telemetry.csv` when present. Made at
the end of a run for the trackers, and by `tools/plot_metrics.py` for any run."""

from __future__ import annotations

import csv
from pathlib import Path


def read_csv(path: Path) -> list[dict]:
    with open(path) as f:
        return [{k: (float(v) if k != "stage" else v) for k, v in r.items() if v != ""} for r in csv.DictReader(f)]


def metric_stages(run: Path) -> list[Path]:
    return sorted(d for d in Path(run).iterdir() if (d / "metrics.csv").is_file()) if Path(run).is_dir() else []


def plot_curves(run: Path, out: Path | None = None) -> Path | None:
    """Write the curves of `run` to `out` (default `<run>/curves.png`); None when the run logged no steps."""
    stages = metric_stages(run)
    stages = [d for d in stages if read_csv(d / "metrics.csv")]
    if not stages:
        return None
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
    out = Path(out) if out else Path(run) / "curves.png"
    fig.savefig(out, dpi=100)
    plt.close(fig)
    return out
