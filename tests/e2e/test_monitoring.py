"""Telemetry without a GPU stays quiet; the curve plot reads a run's CSVs."""

import subprocess
import sys

import torch

from sclslt.runtime.telemetry import GpuTelemetry
from sclslt.runtime.ui import Reporter
from tests.helpers import ROOT, TRAIN_ENV


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
    out = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", "--run", str(run)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 0, out.stderr
    assert (run / "curves.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    bad = subprocess.run(
        [sys.executable, "tools/plot_metrics.py", "--run", str(tmp_path / "nothing")],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert bad.returncode == 2 and "metrics.csv" in bad.stderr


def test_tensorboard_events_follow_the_csv_across_a_resume(tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = tmp_path / "run"
    rep = Reporter(enabled=True, log_every=1000)
    rep.open_trackers(run, ["tensorboard"], {}, "test")
    rep.start_stage("stage1", 6, 0, 8, run / "stage1" / "metrics.csv")
    for step in range(1, 6):  # steps 4 and 5 come after the last checkpoint
        rep.step(step, {"loss": 10.0 - step}, 1e-3, 0)
    rep.finish_trackers(None)  # the job dies here
    rep = Reporter(enabled=True, log_every=1000)
    rep.open_trackers(run, ["tensorboard"], {}, "test")
    rep.start_stage("stage1", 6, 3, 8, run / "stage1" / "metrics.csv")  # resumed at step 3
    for step in range(4, 7):
        rep.step(step, {"loss": 100.0 + step}, 1e-3, 0)
    rep.scalars({"v2t_r1": 42.0, "split": "dev"}, "retrieval_dev")
    rep.end_stage("stage1", 6)
    rep.finish_trackers(None)
    acc = EventAccumulator(str(run / "tensorboard" / "stage1"))
    acc.Reload()
    got = [(e.step, e.value) for e in acc.Scalars("train/loss")]
    assert got == [(1, 9.0), (2, 8.0), (3, 7.0), (4, 104.0), (5, 105.0), (6, 106.0)]
    assert [(e.step, e.value) for e in acc.Scalars("retrieval_dev/v2t_r1")] == [(6, 42.0)]
    import csv

    with open(run / "stage1" / "metrics.csv") as f:
        assert [(int(r["step"]), float(r["loss"])) for r in csv.DictReader(f)] == got


def test_step_time_breakdown_is_sampled_into_a_csv_and_summarised(cfg_path, train_env, tmp_path):
    import csv

    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(run),
            "--stage2.enabled",
            "false",
            "--train.timing_every",
            "2",
            "--train.max_steps",
            "5",
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    with open(run / "stage1" / "timing.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["step"]) for r in rows] == [2, 4]  # sampled steps only
    phases = [f"{p}_ms" for p in ("data", "h2d", "forward", "loss", "backward", "optimizer")]
    for r in rows:
        parts = [float(r[p]) for p in phases]
        assert all(x >= 0 for x in parts) and float(r["forward_ms"]) > 0 and float(r["backward_ms"]) > 0
    assert "step time over 2 sampled steps: data" in proc.stdout


def test_the_step_timer_times_each_phase_from_the_end_of_the_one_before():
    """StepTimer on a clock whose readings are written out: each phase is the time since the previous mark (the
    first since `begin`), step_ms the whole step, only every `every`-th step sampled, a step missing a phase
    not reported. Mutations caught (checked): phases timed from the step's start (cumulative), step_ms
    without the data wait, sampling at steps 1, 3, ... instead of 2, 4, ..."""
    import torch

    from sclslt.runtime.telemetry import StepTimer

    readings = iter([10.0, 10.5, 10.75, 11.75, 12.0, 14.0, 14.25])  # seconds: begin, then 6 marks
    timer = StepTimer(torch.device("cpu"), every=2, clock=lambda: next(readings))
    timer.begin(1)
    for phase in StepTimer.PHASES:
        timer.mark(phase)  # step 1 is not sampled: no clock reading taken
    assert timer.end() is None
    timer.begin(2)
    for phase in StepTimer.PHASES:
        timer.mark(phase)
    assert timer.end() == {
        "data_ms": 500.0,
        "h2d_ms": 250.0,
        "forward_ms": 1000.0,
        "loss_ms": 250.0,
        "backward_ms": 2000.0,
        "optimizer_ms": 250.0,
        "step_ms": 4250.0,
    }
    readings = iter([0.0, 1.0, 2.0])
    timer.clock = lambda: next(readings)
    timer.begin(4)
    timer.mark("data")
    timer.mark("forward")  # h2d, loss, backward, optimizer never marked
    assert timer.end() is None


def test_gpu_smoke_script_writes_tagged_rows_per_stage(tmp_path):
    """benchmarks/gpu_smoke.py --quick: the script a GPU session runs, checked on whatever device is here."""
    import json

    env = {**TRAIN_ENV, "SCLSLT_CACHE": str(tmp_path / "cache")}
    proc = subprocess.run(
        [sys.executable, "benchmarks/gpu_smoke.py", "--quick", "--out", str(tmp_path / "out")],
        cwd=ROOT,
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    rows = json.loads(next((tmp_path / "out").glob("gpu_smoke-*.json")).read_text())
    assert [r["stage"] for r in rows] == ["stage1", "stage2"]
    for r in rows:
        assert r["device"] and r["clips_per_s"] > 0 and r["steps"] == 6 and r["sampled_steps"] >= 2
        assert r["forward_ms"] > 0 and r["backward_ms"] > 0 and r["step_ms"] >= r["forward_ms"]
