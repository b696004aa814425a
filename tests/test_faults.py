"""Faults a cluster job meets: a diverging loss, and a scheduler's SIGTERM/SIGUSR1 before preemption."""
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sclslt.runtime.checkpoints import latest_tag, load_module_state
from sclslt.train.loop import NonFiniteGuard

pytestmark = pytest.mark.slow     # end to end: the fast lane is -m "not slow"

ROOT = Path(__file__).resolve().parents[1]


def test_guard_skips_isolated_non_finite_steps_and_stops_after_k_in_a_row(tmp_path):
    g = NonFiniteGuard(3, tmp_path)
    assert g.check(True, 0, "s") and not g.check(False, 1, "s") and not g.check(False, 1, "s")
    assert g.check(True, 1, "s")                      # a good step resets the count
    assert not g.check(False, 2, "s") and not g.check(False, 2, "s")
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row.*max_nonfinite=3"):
        g.check(False, 2, "s")
    assert g.skipped == 5


def test_a_diverging_run_stops_with_a_clear_error_and_its_checkpoint_intact(cfg_path, tmp_path, train_env):
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "launch/train.py", "--config", str(cfg_path), "--train.run_dir", str(run),
                           "--stage1.lr", "1e30", "--train.max_nonfinite", "3", "--checkpoint.every_epochs", "1",
                           "--stage2.enabled", "false"], cwd=ROOT, env=train_env, capture_output=True, text=True,
                          timeout=600)
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3 non-finite losses in a row" in proc.stderr and "update skipped" in proc.stdout
    ckpt = run / "stage1" / "checkpoints"
    assert latest_tag(ckpt) == "epoch0000"
    state = load_module_state(ckpt)                   # the last good checkpoint loads
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


def test_sigusr1_checkpoints_at_a_step_boundary_and_resume_continues(cfg_path, tmp_path, train_env):
    run = tmp_path / "run"
    deepspeed = Path(sys.executable).with_name("deepspeed")
    args = ["--config", str(cfg_path), "--train.run_dir", str(run), "--stage1.epochs", "60", "--stage2.enabled", "false"]
    launcher = subprocess.Popen([str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_accelerators", "2",
                                 "--master_port", "29641", "launch/train.py", "--deepspeed", "configs/zero2.json",
                                 *args], cwd=ROOT, env=train_env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                                text=True)
    metrics = run / "stage1" / "metrics.csv"
    deadline = time.time() + 300
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 4) and time.time() < deadline:
        time.sleep(0.5)
    assert metrics.is_file(), launcher.communicate()[0][-3000:]
    ranks = subprocess.run(["pgrep", "-f", f"train.py --local_rank=.*{run}"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    assert len(pids) == 2
    for pid in pids:                                   # what Slurm's --signal does to every task
        os.kill(pid, signal.SIGUSR1)
    out, _ = launcher.communicate(timeout=300)
    assert "preempted" in out and "--resume" in out, out[-3000:]
    done = len(metrics.read_text().splitlines()) - 1
    tag = latest_tag(run / "stage1" / "checkpoints")
    assert tag == f"step{done:08d}" and done < 6 * 60    # saved at the step boundary it stopped at
    assert launcher.returncode == 75                  # EX_TEMPFAIL: run me again with --resume
    proc = subprocess.run([str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_accelerators", "2",
                           "--master_port", "29642", "launch/train.py", "--deepspeed", "configs/zero2.json", *args,
                           "--resume", "--train.max_steps", str(done + 2)],
                          cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed at step {done}" in proc.stdout
    import csv
    with open(metrics) as f:
        steps = [int(float(r["step"])) for r in csv.DictReader(f)]
    assert steps == list(range(1, done + 3))          # continued, with nothing lost or repeated


def test_kill_9_of_the_whole_job_then_resume_matches_an_uninterrupted_run(cfg_path, tmp_path, train_env):
    import csv
    deepspeed = Path(sys.executable).with_name("deepspeed")
    ds = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_accelerators", "2"]
    args = ["launch/train.py", "--deepspeed", "configs/zero2.json", "--config", str(cfg_path), "--stage1.epochs", "60",
            "--stage2.enabled", "false", "--checkpoint.every_steps", "2"]

    def rows(run):
        with open(run / "stage1" / "metrics.csv") as f:
            return [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]

    killed = tmp_path / "killed"
    job = subprocess.Popen(ds + ["--master_port", "29643"] + args + ["--train.run_dir", str(killed)], cwd=ROOT,
                           env=train_env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    metrics = killed / "stage1" / "metrics.csv"
    deadline = time.time() + 300
    while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 8) and time.time() < deadline:
        time.sleep(0.2)
    os.killpg(job.pid, signal.SIGKILL)                 # the launcher and every rank, mid-epoch, no warning
    job.wait()
    ckpt = killed / "stage1" / "checkpoints"
    last = latest_tag(ckpt)
    done = int(last.removeprefix("step"))
    assert done >= 4 and len(rows(killed)) >= done
    # and the newest checkpoint was damaged later (a bit flipped on disk): the resume names it and
    # falls back to the one before, which loses two more steps and changes nothing else
    biggest = max((f for f in (ckpt / last).rglob("*.pt")), key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x10
    biggest.write_bytes(bytes(data))
    target = done + 4
    outs = []
    for run, port, extra in ((killed, "29644", ["--resume"]), (tmp_path / "clean", "29645", [])):
        proc = subprocess.run(ds + ["--master_port", port] + args + ["--train.run_dir", str(run),
                              "--train.max_steps", str(target), *extra], cwd=ROOT, env=train_env,
                              capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-3000:]
        outs.append(proc.stdout + proc.stderr)
    before = f"step{done - 2:08d}"
    assert f"checkpoint {ckpt}/{last} is damaged: {biggest.relative_to(ckpt / last)} changed" in outs[0], outs[0][-3000:]
    assert f"resuming from {ckpt}/{before}" in outs[0] and f"resumed at step {done - 2}" in outs[0]
    resumed, clean = rows(killed), rows(tmp_path / "clean")
    assert [s for s, _ in resumed] == list(range(1, target + 1))     # lost steps redone once, not twice
    assert [x for _, x in resumed] == pytest.approx([x for _, x in clean], rel=1e-6)


CRASH_IN_SAVE = """
import os, runpy, signal, sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
save = TorchCheckpointEngine.save
def crashing_save(self, state_dict, path):
    save(self, state_dict, path)          # one file of the checkpoint is on disk, the rest is not
    if os.environ["CRASH_TAG"] in str(path):
        os.kill(os.getpid(), signal.SIGKILL)
TorchCheckpointEngine.save = crashing_save
sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
"""


def test_a_crash_while_saving_leaves_the_previous_checkpoint_to_resume_from(cfg_path, tmp_path, train_env):
    import csv
    run, clean = tmp_path / "run", tmp_path / "clean"
    args = ["--config", str(cfg_path), "--stage1.epochs", "2", "--stage2.enabled", "false",
            "--checkpoint.every_steps", "2"]
    crashed = subprocess.run([sys.executable, "-c", CRASH_IN_SAVE, *args, "--train.run_dir", str(run)], cwd=ROOT,
                             env={**train_env, "CRASH_TAG": "step00000004"}, capture_output=True, text=True, timeout=600)
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    ckpt = run / "stage1" / "checkpoints"
    assert latest_tag(ckpt) == "step00000002"                 # not pointing at the half-written one
    assert (ckpt / "step00000004.partial").is_dir() and not (ckpt / "step00000004").exists()
    out = {}
    for d, extra in ((run, ["--resume"]), (clean, [])):
        proc = subprocess.run([sys.executable, "launch/train.py", *args, "--train.run_dir", str(d), *extra],
                              cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=600)
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out[d] = proc.stdout
    assert "resumed at step 2 " in out[run]

    def rows(d):
        with open(d / "stage1" / "metrics.csv") as f:
            return [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]
    got, want = rows(run), rows(clean)
    assert [s for s, _ in got] == [s for s, _ in want]                 # the lost steps redone once
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-6)
    assert not (ckpt / "step00000004.partial").exists() and latest_tag(ckpt) == latest_tag(clean / "stage1" / "checkpoints")


def test_checkpoint_files_load_without_unpickling_arbitrary_objects(tmp_path):
    import random

    import numpy as np
    import torch

    from sclslt.runtime.checkpoints import rng_state, safe_load, set_rng_state
    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(safe_load(tmp_path / "rng.pt"))              # RNG states are plain tensors and ints
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws

    import argparse
    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="evil.pt: refused to unpickle.*argparse.Namespace"):
        safe_load(tmp_path / "evil.pt")


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_when_one_rank_dies_or_hangs_the_others_exit_in_bounded_time(cfg_path, tmp_path, fault, train_env):
    """Ranks started by hand (as srun or a hand-rolled launcher would; no launcher to kill the rest):
    rank 1 is killed (SIGKILL) or frozen (SIGSTOP) mid-run; rank 0 must exit with a clear message and
    code 76, at once for a dead peer and within train.dist_timeout_s for a silent one."""
    run = tmp_path / "run"
    port = {"killed": "29651", "hung": "29652"}[fault]
    env = {**train_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    procs = [subprocess.Popen([sys.executable, "launch/train.py", "--config", str(cfg_path), "--train.run_dir", str(run),
                               "--stage1.epochs", "60", "--stage2.enabled", "false", "--train.dist_timeout_s", "10"],
                              cwd=ROOT, env={**env, "RANK": str(r), "LOCAL_RANK": str(r)}, stdout=subprocess.PIPE,
                              stderr=subprocess.STDOUT, text=True) for r in range(2)]
    try:
        metrics = run / "stage1" / "metrics.csv"
        deadline = time.time() + 300
        while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 3) and time.time() < deadline:
            time.sleep(0.2)
        procs[1].send_signal(signal.SIGKILL if fault == "killed" else signal.SIGSTOP)
        t0 = time.time()
        out, _ = procs[0].communicate(timeout=120)
        waited = time.time() - t0
    finally:
        for p in procs:
            p.kill()
            p.wait()
    assert procs[0].returncode == 76, out[-3000:]
    assert "another rank died or stopped answering" in out and "--resume" in out
    assert waited < (5 if fault == "killed" else 10 + 30)
