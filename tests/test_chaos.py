"""The chaos run, short (issue 23): 5 trials of tools/chaos.py, each a random fault (seed 6: the disk
filling during a save, a truncated newest checkpoint, a kill inside a save, kill -9 of one rank twice)
in a 2-rank ZeRO-2 job, restarted as a user would. Every trial must end with exactly the uninterrupted
run's losses and weights, or with a clear error; the 50-trial table is benchmarks/results/chaos-*."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.slow

ROOT = Path(__file__).resolve().parents[1]


def test_five_random_faults_recover_exactly_or_stop_with_a_clear_error(tmp_path):
    proc = subprocess.run([sys.executable, "tools/chaos.py", "--trials", "5", "--seed", "6", "--port", "29870", "--out", str(tmp_path),
                           "--results", str(tmp_path / "results")], cwd=ROOT, capture_output=True, text=True,
                          timeout=1800)
    rows = [json.loads(ln) for ln in (tmp_path / "trials.jsonl").read_text().splitlines()]
    assert len(rows) == 5, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.returncode == 0 and all(r["outcome"] != "other" for r in rows), "\n".join(map(json.dumps, rows))
    recovered = [r for r in rows if r["outcome"].startswith("identical")]
    assert recovered and all(r["losses_equal"] and r["weights_equal"] for r in recovered)
    assert all(r["error"].startswith("error: ") for r in rows if r["outcome"] == "clear_error")
    table = json.loads(next((tmp_path / "results").glob("chaos-*.json")).read_text())
    assert table[len({r["kind"] for r in rows})]["kind"] == "all" and table[len({r["kind"] for r in rows})]["trials"] == 5
