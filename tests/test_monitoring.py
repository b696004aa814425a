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
