"""benchmarks/gpu_check.py, the one prepared script a lent GPU runs first, checked on this CPU with --quick
(toy sizes, kernels in the Triton interpreter): every part runs and reports, one tagged JSON comes out, a
run killed mid-part keeps its finished rows and shows what was running, the total budget caps each part's
timeout (its whole process group is stopped) and skips what cannot start; and the smoke corpus that worker
processes make is the one-process corpus, byte for byte."""

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from tests.helpers import ROOT

PARTS = [
    "kernels",
    "infonce_train",
    "nccl",
    "syncs",
    "decode",
    "smoke_zero3",
    "memory",
    "determinism",
    "sweep_infonce",
    "sweep_cico",
    "smoke",
    "loader",
    "planner",
]


def _check(*args, **kw) -> subprocess.Popen:
    return subprocess.Popen(
        [sys.executable, "benchmarks/gpu_check.py", "--quick", *args],
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        **kw,
    )


def _report(out: Path) -> dict | None:
    files = list(out.glob("gpu-check-*.json"))
    assert len(files) <= 1, files
    return json.loads(files[0].read_text()) if files else None


def _alive_in_group(pgid: int) -> list[str]:
    """Processes (not zombies) of process group `pgid`, from /proc."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            text = stat.read_text()
        except OSError:
            continue
        state, _, pgrp = text.rsplit(")", 1)[1].split()[:3]
        if int(pgrp) == pgid and state != "Z":
            alive.append(text.split(")")[0] + ")")
    return alive


def _kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def test_gpu_check_runs_every_part_and_writes_one_json(tmp_path):
    """--quick runs every part of the plan, in order, each ok; one tagged JSON, finished, nothing running.
    Catches: a part dropped from the plan or run out of order; a part that fails at toy sizes (the
    device run would lose it); the decode part judged by anything but Pillow's pixels on the CPU backend;
    the NCCL part's gather or its backward not returning the values and the gradient."""
    proc = _check("--out", str(tmp_path))
    out, _ = proc.communicate(timeout=1500)
    report = _report(tmp_path)
    assert report is not None, out[-3000:]
    assert list(report["parts"]) == PARTS == report["order"]
    failed = {k: v for k, v in report["parts"].items() if not v["ok"] or v["status"] != "ok"}
    assert not failed and proc.returncode == 0, json.dumps(failed, indent=1)[-4000:]
    assert report["running"] is None and report["finished"] and "triton" in report["versions"]
    parts = report["parts"]
    assert parts["kernels"]["cases"]["infonce_bf16"]["ok"]
    assert {c["ids"] for c in parts["infonce_train"]["cases"].values()} == {True, False}
    assert all(c["shape"][2] == 512 for c in parts["infonce_train"]["cases"].values())
    assert parts["nccl"]["gather_equal"] and parts["nccl"]["grad_equal"] and parts["nccl"]["backend"] == "gloo"
    assert parts["decode"]["max_abs_diff"] == 0 and parts["decode"]["mean_abs_diff"] == 0  # Pillow's pixels
    assert parts["decode"]["backends"]["CPU_ONLY"]["decodes"] and parts["decode"]["decoder"]["library"]
    for head in ("pooled", "cico"):
        assert isinstance(parts["syncs"][head]["host_reads_per_step"], float)
        assert isinstance(parts["syncs"][head]["where"], dict)
    assert [r["stage"] for r in parts["smoke_zero3"]["rows"]] == ["stage1", "stage2"]
    tags = parts["smoke_zero3"]["rows"][0]
    assert (tags["deepspeed"], tags["similarity"], tags["frames"], tags["decode"], tags["precision"]) == (
        "configs/zero3.json",
        "cico",
        "jpg",
        "device",
        "bf16",
    )
    assert all("step_s" in c for c in parts["memory"]["cases"])


def test_a_check_killed_mid_part_keeps_its_finished_rows(tmp_path):
    """SIGKILL while the second part runs: the JSON on disk has the first part's row and names the part
    that was running (when it started, its process). Catches: writing the JSON only at the end (the killed
    run leaves no file); writing it only after a part ends (the running part is invisible)."""
    proc = _check("--only", "nccl", "syncs", "--out", str(tmp_path))
    pid, report, deadline = None, None, time.monotonic() + 300
    try:
        while time.monotonic() < deadline and proc.poll() is None:
            report = _report(tmp_path) or {}
            running = report.get("running") or {}
            if "nccl" in report.get("parts", {}) and running.get("part") == "syncs" and running.get("pid"):
                pid = running["pid"]
                proc.send_signal(signal.SIGKILL)
                break
            time.sleep(0.05)
        proc.wait(timeout=30)
    finally:
        proc.kill()
        if pid:
            _kill_group(pid)  # the part's processes outlive a SIGKILLed check
    assert pid, f"the check never showed nccl finished and syncs running: {report}"
    report = _report(tmp_path)
    assert report["parts"]["nccl"]["ok"] and report["parts"]["nccl"]["status"] == "ok"
    assert "syncs" not in report["parts"] and report["finished"] is None
    assert report["running"]["part"] == "syncs" and report["running"]["started"]
    assert report["order"] == ["nccl", "syncs"]


def test_the_budget_caps_a_parts_timeout_and_skips_what_cannot_start(tmp_path):
    """--budget-s 5 (parts may start with 3 s left): the ZeRO-3 smoke part (9 s at toy sizes on a fast Xeon, a
    DeepSpeed launch of 2 ranks) is stopped at what is left of the total, its whole process group (the trainer
    too), and the next part is skipped with the reason.
    Catches: a part's timeout its own budget alone (the smoke part then finishes ok); stopping only the
    part's process (the trainer it started keeps running); a part started with no time left."""
    proc = _check(
        "--only", "smoke_zero3", "determinism", "--budget-s", "5", "--min-start-s", "3", "--out", str(tmp_path)
    )
    try:
        out, _ = proc.communicate(timeout=300)
    finally:
        proc.kill()
    report = _report(tmp_path)
    smoke, det = report["parts"]["smoke_zero3"], report["parts"]["determinism"]
    try:
        assert smoke["status"] == "timeout" and not smoke["ok"] and smoke["timeout_s"] <= 5, smoke
        deadline = time.monotonic() + 10
        while _alive_in_group(smoke["pid"]) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not _alive_in_group(smoke["pid"])
    finally:
        if "pid" in smoke:
            _kill_group(smoke["pid"])
    assert det["status"] == "skipped" and "budget" in det["reason"] and not det["ok"]
    assert proc.returncode == 1 and report["running"] is None


@pytest.mark.parametrize("fmt", ["npy", "jpg"])
def test_the_smoke_corpus_made_by_workers_is_the_one_process_corpus(tmp_path, fmt):
    """make_synthetic_shards with 3 worker processes writes the same files, byte for byte, as one process
    (benchmarks/gpu_smoke.py makes its corpus so, in seconds). Catches: workers rendering from the wrong
    clip index or in another order, or encoding in another format or with another text normalisation."""
    from sclslt.config import SyntheticConfig
    from sclslt.data.corpus import make_synthetic_shards

    syn = SyntheticConfig(n_train=70, n_dev=9, n_test=5, frame_size=16)
    one, many = tmp_path / "one", tmp_path / "many"
    make_synthetic_shards(syn, one, 16, workers=1, frame_format=fmt)
    make_synthetic_shards(syn, many, 16, workers=3, frame_format=fmt)
    names = sorted(p.name for p in one.iterdir())
    assert names == sorted(p.name for p in many.iterdir()) and len(names) == 5 + 1 + 1 + 3
    for name in names:
        assert (one / name).read_bytes() == (many / name).read_bytes(), name
    assert json.loads((one / "train.json").read_text())["format"] == ("jpg" if fmt == "jpg" else "npy-uint8")
