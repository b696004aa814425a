"""benchmarks/bench_planner.py: the --quick sweep runs on a CPU and writes one tagged row per valid configuration."""

import itertools
import json
import subprocess
import sys

import pytest

from tests.helpers import ROOT

SCRIPT = ROOT / "benchmarks" / "bench_planner.py"


def run(tmp_path, *args) -> list[dict]:
    out = subprocess.run(
        [sys.executable, str(SCRIPT), *args, "--out", str(tmp_path)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stdout[-2000:] + out.stderr[-2000:]
    assert "torch threads: 1" in out.stdout
    jsons, csvs = sorted(tmp_path.glob("planner-*.json")), sorted(tmp_path.glob("planner-*.csv"))
    assert len(jsons) == 1 and len(csvs) == 1
    rows = json.loads(jsons[0].read_text())
    assert len(csvs[0].read_text().strip().splitlines()) == len(rows) + 1
    return rows


def test_quick_sweep_rows(tmp_path):
    rows = run(tmp_path, "--quick")
    cost = [r for r in rows if r.get("kind", "cost") == "cost"]
    expected = set(itertools.product([1000, 4000], [16, 64], [1, 4], [1, 4]))
    assert sorted((r["n"], r["batch"], r["pools"], r["chunk"]) for r in cost) == sorted(expected)  # one row each
    for r in cost:
        assert r["device"].startswith("cpu") and r["versions"]["torch"] and r["date"] and r["threads"] == 1
        assert r["bench"] == "planner" and r["dim"] == 256 and r["pool_size"] == r["n"] // r["pools"]
        assert "skipped" not in r, r  # the default budget is ample for the quick sweep
        assert r["k_batches"] >= 1 and r["ms_pool_batch"] > 0
        for w in (1, 8):  # ranks share the pools out
            assert r[f"ms_batch_rank_w{w}"] == pytest.approx(r["ms_pool_batch"] * -(-r["pools"] // w) / r["pools"])
        assert r["step_ms"] is None and "step_frac_w1" not in r  # no --step-ms: column left empty
    fid = [r for r in rows if r.get("kind") == "fidelity"]
    assert sorted((r["pools"], r["chunk"], r["epoch"]) for r in fid) == sorted(
        (p, c, e) for p in (1, 4) for c in (1, 4) for e in (1, 3)
    )
    for r in fid:
        exact = (r["pools"], r["chunk"]) == (1, 1)  # exact greedy against itself: the metrics' zero
        assert (r["ks_vs_exact"] == 0 and r["pair_overlap"] == 1) if exact else r["pair_overlap"] < 1
        assert r["q25"] <= r["q50"] <= r["q75"] and r["pair_overlap_random"] == pytest.approx(15 / 511)


def test_budget_skips_are_recorded(tmp_path):
    rows = run(
        tmp_path,
        "--n",
        "1000",
        "--batch",
        "16",
        "64",
        "--pools",
        "1",
        "--dim",
        "16",
        "--budget-s",
        "0",
        "--step-ms",
        "80",
    )
    assert sorted(r["batch"] for r in rows) == [16, 64]
    assert all("budget" in r["skipped"] and "ms_pool_batch" not in r for r in rows)
    assert all(r["step_ms"] == 80 for r in rows)
    ok = run(
        tmp_path / "ok",
        "--n",
        "1000",
        "--batch",
        "16",
        "--pools",
        "2",
        "--dim",
        "16",
        "--step-ms",
        "80",
        "--world",
        "2",
    )
    assert ok[0]["step_frac_w2"] == pytest.approx(ok[0]["ms_batch_rank_w2"] / 80)
