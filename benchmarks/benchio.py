"""What every benchmark script shares: the device/version tag on each row, and writing the rows.

Results, not runs (Liger-Kernel's convention): each benchmark has ONE append-only CSV,
`<out>/<benchmark>.csv` (`benchmarks/results/planner.csv`, `loader.csv`, `memory.csv`, ...). Every run
appends its rows there, each carrying `time` (the run's UTC start), `commit` (`git rev-parse --short
HEAD` of this checkout, "" outside git), `command` (`python benchmarks/x.py ...args`, as typed), `device`,
the library versions flattened into `torch`, `triton`, `python`, `numpy`, then the run's own tag fields
and the row's fields. The header is written when the file is new; a run that brings new columns
rewrites the file with the union of columns (older rows empty there). Docs cite a run by the CSV and
its `time` value.

Each run also writes its own pair, `<prefix>-<time>.json` (the rows as JSON, with the `versions` dict
and `date`) and `.csv`: the tests, `benchmarks/gpu_check.py` (which collects a script's rows from its
parts folder) and one-off runs read these. Where it goes: into `out` itself when `out` is anything but
the committed `benchmarks/results/` (a test's tmp folder, a device run's `$OUT`), so callers find the
run where they asked for it; for the default `benchmarks/results/` it goes to `benchmarks/results/runs/`,
a scratch folder that .gitignore covers, so the committed folder holds the per-benchmark CSVs and the
curated reports only and no longer accumulates per-run files."""

from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
import shlex
import subprocess
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "benchmarks" / "results"  # committed: one CSV per benchmark
RUNS = RESULTS / "runs"  # per-run JSON/CSV of default-folder runs (git-ignored)
FRONT = ("time", "commit", "command", "device")  # first columns of every benchmark CSV, then the versions


def device_name() -> str:
    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    return f"cpu ({platform.processor() or platform.machine()}, {os.cpu_count()} cores)"


def run_tag(**extra) -> dict:
    """Device, library versions and date, added to every row a benchmark writes."""
    import numpy

    versions = {"torch": torch.__version__, "python": platform.python_version(), "numpy": numpy.__version__}
    try:
        import triton

        versions["triton"] = triton.__version__
    except ImportError:
        versions["triton"] = None
    return {
        "device": device_name(),
        "versions": versions,
        "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"),
        **extra,
    }


def git_commit(root: Path = ROOT) -> str:
    """`git rev-parse --short HEAD` of the checkout, or "" outside git (or without git)."""
    try:
        out = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=30
        )
    except (OSError, subprocess.SubprocessError):
        return ""
    return out.stdout.strip() if out.returncode == 0 else ""


def command_line(argv: list[str] | None = None) -> str:
    """The command that ran: `python benchmarks/x.py ...args` (the script relative to the checkout)."""
    argv = list(sys.argv if argv is None else argv)
    if argv and argv[0] not in ("", "-c", "-m"):
        try:
            argv[0] = Path(argv[0]).resolve().relative_to(ROOT).as_posix()
        except ValueError:
            pass
    return "python " + shlex.join(argv)


def flat_row(row: dict, commit: str, command: str) -> dict:
    """One CSV row: time, commit, command, device, the versions flattened, then the other fields; nested
    dicts other than `versions` are left out, as before (they stay in the run's JSON)."""
    out = {"time": row.get("date", ""), "commit": commit, "command": command, "device": row.get("device", "")}
    versions = row.get("versions") or {}
    for k in ("torch", "triton", "python", "numpy", *versions):
        out[k] = versions.get(k)
    out.update(
        {
            k: v
            for k, v in row.items()
            if k not in ("date", "device", "versions") and k not in out and not isinstance(v, dict)
        }
    )
    return out


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append flat rows to a benchmark's CSV: header when new; with new columns, the whole file rewritten
    with the union of columns (older rows empty there)."""
    fields = list(dict.fromkeys(k for r in rows for k in r))
    old_fields: list[str] = []
    if path.exists() and path.stat().st_size:
        with open(path, newline="") as f:
            old_fields = next(csv.reader(f), [])
    if old_fields and not set(fields) - set(old_fields):
        with open(path, "a", newline="") as f:
            csv.DictWriter(f, fieldnames=old_fields, extrasaction="ignore").writerows(rows)
        return
    union = list(dict.fromkeys([*old_fields, *fields]))
    old_rows = []
    if old_fields:
        with open(path, newline="") as f:
            old_rows = list(csv.DictReader(f))
    tmp = path.with_name(path.name + ".tmp")
    with open(tmp, "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=union, extrasaction="ignore")
        w.writeheader()
        w.writerows(old_rows)
        w.writerows(rows)
    os.replace(tmp, path)


def write_rows(rows: list[dict], out: Path, prefix: str, tag: dict) -> Path:
    """Tagged rows appended to <out>/<prefix>.csv, and the run's own <prefix>-<time>.json and .csv in `out`
    (under benchmarks/results/runs/ when `out` is benchmarks/results itself); returns the run's path
    without suffix."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    stamp = tag["date"].replace(":", "").replace("-", "")[:15]
    rows = [{**tag, **r} for r in rows]
    runs = RUNS if out.resolve() == RESULTS else out
    runs.mkdir(parents=True, exist_ok=True)
    base = runs / f"{prefix}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    fields = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict)))
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    commit, command = git_commit(), command_line()
    append_rows(out / f"{prefix}.csv", [flat_row(r, commit, command) for r in rows])
    print(f"appended {len(rows)} rows to {out / f'{prefix}.csv'}")
    return base
