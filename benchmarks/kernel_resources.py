"""Registers, stack (spills) and shared memory of every kernel configuration and integer variant (aligned /
unaligned: the specialisations Triton's JIT compiles), compiled for sm_90 / sm_80.

No GPU needed: Triton's own back end builds the cubins (kernels/resources.py). Prints a table and
writes CSV/JSON tagged with the triton version under --out. To check another triton (the older end of
the supported range), run this script with a Python that has it, e.g. a virtual environment made with
--system-site-packages plus `pip install triton==3.6.0`.

    python benchmarks/kernel_resources.py [--arch 90 80] [--out benchmarks/results]
"""

from __future__ import annotations

import argparse
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout
import sclslt  # noqa: E402,F401  (sclslt_kernels: this checkout's kernels/)

os.environ.pop("TRITON_INTERPRET", None)  # the interpreter has no compiler to measure
os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")


def main(argv=None) -> int:
    from benchio import run_tag, write_rows
    from rich.console import Console
    from rich.table import Table

    from sclslt_kernels.resources import SHARED_LIMIT, measure

    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--arch", type=int, nargs="+", default=[90, 80])
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = ap.parse_args(argv)
    tag = {**run_tag(), "device": "compiled only (no GPU)"}
    rows = measure(tuple(args.arch))
    table = Table(
        title=f"kernel resources | triton {tag['versions']['triton']} | "
        + ", ".join(f"sm_{a} shared limit {SHARED_LIMIT[a] // 1024} KB" for a in args.arch)
    )
    for c in ("kernel", "dtype", "arch", "variant", "config", "registers", "stack", "shared", "fits"):
        table.add_column(c)
    for r in rows:
        table.add_row(
            r["kernel"],
            r["dtype"],
            f"sm_{r['arch']}",
            r["variant"],
            r["config"],
            str(r.get("registers", "")),
            str(r.get("stack", "")),
            str(r.get("shared", r.get("error", ""))),
            str(r.get("fits", False)),
        )
    Console(width=220).print(table)
    base = write_rows(rows, args.out, "kernel-resources", tag)
    bad = sum(not r.get("fits") for r in rows)
    print(f"{len(rows)} configurations, {bad} that spill or do not fit; wrote {base}.csv and {base}.json")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
