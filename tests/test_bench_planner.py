"""benchmarks/bench_planner.py: the --quick sweep runs on a CPU and writes one tagged row per valid configuration."""
import itertools
import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow     # end to end: the fast lane is -m "not slow"

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "benchmarks" / "bench_planner.py"


def run(tmp_path, *args) -> list[dict]:
    out = subprocess.run([sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "torch threads: 1" in out.stdout
    jsons, csvs = sorted(tmp_path.glob("planner-*.json")), sorted(tmp_path.glob("planner-*.csv"))
    assert len(jsons) == 1 and len(csvs) == 1
    rows = json.loads(jsons[0].read_text())
    assert len(csvs[0].read_text().strip().splitlines()) == len(rows) + 1
    return rows


def test_quick_sweep_rows(tmp_path):
    rows = run(tmp_path, "--quick")
    expected = {(n, b, w, c) for n, b, w, c in itertools.product([1000, 4000], [16, 64], [1, 8], [1, 4])}
    got = [(r["n"], r["batch"], r["world"], r["chunk"]) for r in rows]
    assert sorted(got) == sorted(expected)              # one row per valid configuration, no duplicates
    for r in rows:
        assert r["device"].startswith("cpu") and r["versions"]["torch"] and r["date"] and r["threads"] == 1
        assert r["bench"] == "planner" and r["dim"] == 256
        assert "skipped" not in r, r                     # the default budget is ample for the quick sweep
        assert r["micro"] == r["batch"] // r["world"] and r["k_batches"] >= 1
        assert r["ms_batch"] > 0 and r["ms_batch_rank"] > 0
        assert abs(r["ms_batch_rank"] * r["world"] - r["ms_batch"]) < 1e-6 * r["ms_batch"]
        assert r["rounds_batch"] >= 1 + (r["micro"] - 1) / r["chunk"] - 1e-9
        assert r["step_ms"] is None and "step_frac" not in r     # no --step-ms: column left empty


def test_invalid_configurations_not_run_and_budget_skips_recorded(tmp_path):
    # batch 2000 > N and batch 16 // world 32 < 1: not valid; a zero budget skips everything after the first
    rows = run(tmp_path, "--n", "1000", "--batch", "16", "64", "2000", "--world", "1", "32", "--chunk", "4",
               "--dim", "16", "--budget-s", "0", "--target-s", "0.05", "--step-ms", "80")
    assert sorted((r["batch"], r["world"]) for r in rows) == [(16, 1), (64, 1), (64, 32)]
    first = rows[0]
    assert (first["batch"], first["world"]) == (16, 1) and first["ms_batch"] > 0 and "over budget" in first["note"]
    skipped = [r for r in rows if "skipped" in r]
    assert [(r["batch"], r["world"]) for r in skipped] == [(64, 1)]   # same world and chunk, larger batch
    assert all("budget" in r["skipped"] and "ms_batch" not in r for r in skipped)
    assert all(r["step_ms"] == 80 for r in rows)
    assert all(abs(r["step_frac"] - r["ms_batch_rank"] / 80) < 1e-9 for r in rows if "ms_batch" in r)
    assert all("step_frac" not in r for r in skipped)
