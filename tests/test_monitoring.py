"""Telemetry without a GPU stays quiet; the curve plot reads a run's CSVs."""
import subprocess
import sys
from pathlib import Path

import torch

from sclslt.telemetry import GpuTelemetry
from sclslt.ui import Reporter

ROOT = Path(__file__).resolve().parents[1]


def test_no_gpu_means_no_telemetry_and_no_error():
    t = GpuTelemetry(torch.device("cpu"))
    assert t.handle is None and t.sample() == {}


def test_plot_command_writes_a_png_from_the_run_csvs(tmp_path):
    run = tmp_path / "run"
    rep = Reporter(enabled=True, log_every=1000)
    for stage, n in (("stage1", 5), ("stage2", 3)):
        rep.start_stage(stage, n, 0, 8, run / stage / "metrics.csv")
        for step in range(1, n + 1):
            rep.step(step, {"loss": 3.0 / step, "ce": 2.0 / step}, 1e-3 / step, 0)
        rep.telemetry(n, [{"gpu_util": 90.0, "gpu_mem_gb": 10.0, "gpu_power_w": 300.0, "gpu_temp_c": 60.0}, {}])
        rep.end_stage(stage, n)
    assert (run / "stage1" / "telemetry.csv").read_text().splitlines()[1].startswith("5,0,90.0")
    out = subprocess.run([sys.executable, "tools/plot_metrics.py", "--run", str(run)], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run([sys.executable, "tools/plot_metrics.py", "--run", str(tmp_path / "nothing")], cwd=ROOT,
                         capture_output=True, text=True, timeout=120)
    assert bad.returncode == 2 and "metrics.csv" in bad.stderr


def test_tensorboard_events_follow_the_csv_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator
    run = tmp_path / "run"
    rep = Reporter(enabled=True, log_every=1000)
    rep.start_stage("stage1", 6, 0, 8, run / "stage1" / "metrics.csv")
    for step in range(1, 6):                              # steps 4 and 5 come after the last checkpoint
        rep.step(step, {"loss": 10.0 - step}, 1e-3, 0)
    rep.close_tensorboard()                               # the job dies here
    rep = Reporter(enabled=True, log_every=1000)
    rep.start_stage("stage1", 6, 3, 8, run / "stage1" / "metrics.csv")      # resumed at step 3
    for step in range(4, 7):
        rep.step(step, {"loss": 100.0 + step}, 1e-3, 0)
    rep.scalars({"v2t_r1": 42.0, "split": "dev"}, "retrieval_dev")
    rep.end_stage("stage1", 6)
    rep.close_tensorboard()
    acc = EventAccumulator(str(run / "tensorboard" / "stage1"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert [(e.step, e.value) for e in acc.Scalars("retrieval_dev/v2t_r1")] == [(6, 42.0)]
    import csv
    with open(run / "stage1" / "metrics.csv") as f:
        assert [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)] == got
