"""What every benchmark script shares: the device/version tag on each row, and writing the rows
as JSON and CSV under a results directory (one file pair per run, named by prefix and UTC time)."""
from __future__ import annotations

import csv
import datetime as dt
import json
import os
import platform
from pathlib import Path

import torch


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
    return {"device": device_name(), "versions": versions,
            "date": dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds"), **extra}


def write_rows(rows: list[dict], out: Path, prefix: str, tag: dict) -> Path:
    """Tagged rows to <out>/<prefix>-<time>.json and .csv; returns the path without suffix."""
    out.mkdir(parents=True, exist_ok=True)
    stamp = tag["date"].replace(":", "").replace("-", "")[:15]
    rows = [{**tag, **r} for r in rows]
    base = out / f"{prefix}-{stamp}"
    base.with_suffix(".json").write_text(json.dumps(rows, indent=1))
    fields = list(dict.fromkeys(k for r in rows for k in r if not isinstance(r[k], dict)))
    with open(base.with_suffix(".csv"), "w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=fields, extrasaction="ignore")
        w.writeheader()
        w.writerows(rows)
    return base
