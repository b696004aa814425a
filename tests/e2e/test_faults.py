"""Faults a cluster job meets: a diverging loss, a scheduler's SIGTERM before preemption, kill -9, a crash
while saving, a dead or hung rank; with the recipe's dropout where a resume must restore the random state."""

import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from sclslt.runtime.checkpoints import latest_tag, load_module_state
from sclslt.train.verdict import NonFiniteGuard
from tests.helpers import ROOT, TRAIN_ENV


def test_guard_skips_isolated_non_finite_steps_and_stops_after_k_in_a_row(tmp_path):
    g = NonFiniteGuard(3, tmp_path)
    assert g.check(True, 0, "s") and not g.check(False, 1, "s") and not g.check(False, 1, "s")
    assert g.check(True, 1, "s")  # a good step resets the count
    assert not g.check(False, 2, "s") and not g.check(False, 2, "s")
    with pytest.raises(RuntimeError, match="3 non-finite losses in a row.*max_nonfinite=3"):
        g.check(False, 2, "s")
    assert g.skipped == 5


def test_a_diverging_run_stops_with_a_clear_error_and_its_checkpoint_intact(cfg_path, tmp_path, train_env):
    run = tmp_path / "run"
    proc = subprocess.run(
        [
            sys.executable,
            "launch/train.py",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(run),
            "--stage1.lr",
            "1e30",
            "--train.max_nonfinite",
            "3",
            "--checkpoint.every_epochs",
            "1",
            "--stage2.enabled",
            "false",
        ],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "3 non-finite losses in a row" in proc.stderr and "update skipped" in proc.stdout
    ckpt = run / "stage1" / "checkpoints"
    assert latest_tag(ckpt) == "epoch0000"
    state = load_module_state(ckpt)  # the last good checkpoint loads
    assert all(v.isfinite().all() for v in state.values() if v.is_floating_point())


DEEPSPEED = Path(sys.executable).with_name("deepspeed")
TWO_RANKS = [str(DEEPSPEED) if DEEPSPEED.exists() else "deepspeed", "--num_accelerators", "2"]
CLEAN_STEPS = 20


def _preemptible_args(cfg: Path) -> list[str]:
    """A long 2-rank stage 1 with the recipe's dropout: every step draws from the generators a resume restores."""
    return [
        "launch/train.py",
        "--deepspeed",
        "configs/zero2.json",
        "--config",
        str(cfg),
        "--stage1.epochs",
        "60",
        "--stage2.enabled",
        "false",
        "--model.dropout",
        "0.1",
    ]


def _losses(run: Path) -> list[tuple[int, float]]:
    import csv

    with open(run / "stage1" / "metrics.csv") as f:
        return [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]


@pytest.fixture(scope="module")
def uninterrupted(tiny_cfg_dict, tmp_path_factory):
    """The same run, never interrupted, for CLEAN_STEPS steps (max_steps truncates; the LR schedule is the
    60 epochs'): the losses the interrupted runs below must continue with."""
    import yaml

    d = tmp_path_factory.mktemp("uninterrupted")
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48
    (d / "exp.yaml").write_text(yaml.safe_dump(cfg))
    proc = subprocess.run(
        TWO_RANKS
        + [
            "--master_port",
            "29645",
            *_preemptible_args(d / "exp.yaml"),
            "--train.run_dir",
            str(d / "run"),
            "--train.max_steps",
            str(CLEAN_STEPS),
        ],
        cwd=ROOT,
        env=TRAIN_ENV,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    return _losses(d / "run")


def _started(run: Path, rows: int, proc, log: Path | None = None) -> None:
    """Wait until the run has logged more than `rows` steps (or its process ended)."""
    metrics = run / "stage1" / "metrics.csv"
    deadline = time.time() + 300
    while (
        (not metrics.is_file() or len(metrics.read_text().splitlines()) <= rows)
        and time.time() < deadline
        and proc.poll() is None
    ):
        time.sleep(0.2)
    if not metrics.is_file() or proc.poll() is not None:
        said = proc.communicate()[0][-3000:] if proc.stdout else (log.read_text()[-3000:] if log else "")
        raise AssertionError(f"the run ended (exit {proc.poll()}) or logged nothing: {said}")


def test_sigterm_checkpoints_at_a_step_boundary_and_resume_continues_the_uninterrupted_losses(
    cfg_path, tmp_path, train_env, uninterrupted
):
    """SIGTERM to every rank (what a scheduler sends before it kills the job; Slurm's --signal USR1 is the Slurm
    test's), dropout 0.1: a checkpoint at the step boundary, exit 75, and the resumed run's losses are the
    uninterrupted run's. Mutations caught: SIGTERM left unhandled (signals.py: SIGUSR1 only: the job dies with
    no checkpoint; checked), the per-rank RNG restore deleted from Engine.load (the dropout masks after the
    resume differ, so do the losses; checked)."""
    run = tmp_path / "run"
    args = _preemptible_args(cfg_path) + ["--train.run_dir", str(run)]
    launcher = subprocess.Popen(
        TWO_RANKS + ["--master_port", "29641", *args],
        cwd=ROOT,
        env=train_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    _started(run, 3, launcher)
    ranks = subprocess.run(["pgrep", "-f", f"train.py --local_rank=.*{run}"], capture_output=True, text=True)
    pids = [int(p) for p in ranks.stdout.split()]
    assert len(pids) == 2
    for pid in pids:
        os.kill(pid, signal.SIGTERM)
    out, _ = launcher.communicate(timeout=300)
    assert "preempted" in out and "--resume" in out, out[-3000:]
    done = len(_losses(run))
    assert latest_tag(run / "stage1" / "checkpoints") == f"step{done:08d}" and done < CLEAN_STEPS - 2
    assert launcher.returncode == 75  # EX_TEMPFAIL: run me again with --resume
    proc = subprocess.run(
        TWO_RANKS + ["--master_port", "29642", *args, "--resume", "--train.max_steps", str(done + 2)],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    assert f"resumed at step {done}" in proc.stdout
    resumed = _losses(run)
    assert [s for s, _ in resumed] == list(range(1, done + 3))  # nothing lost or repeated
    assert [x for _, x in resumed] == pytest.approx([x for _, x in uninterrupted[: done + 2]], rel=1e-6)


def test_kill_9_of_the_whole_job_then_resume_matches_an_uninterrupted_run(cfg_path, tmp_path, train_env, uninterrupted):
    """kill -9 of the launcher and every rank mid-epoch, dropout 0.1, the newest checkpoint then damaged on disk:
    the resume names it, falls back to the one before, and continues with the uninterrupted run's losses.
    Mutation caught: the per-rank RNG restore deleted from Engine.load (checked: the losses leave the
    uninterrupted run's after the resume)."""
    killed = tmp_path / "killed"
    args = _preemptible_args(cfg_path) + ["--checkpoint.every_steps", "2", "--train.run_dir", str(killed)]
    log = tmp_path / "killed.log"
    with open(log, "w") as out:
        job = subprocess.Popen(
            TWO_RANKS + ["--master_port", "29643", *args],
            cwd=ROOT,
            env=train_env,
            stdout=out,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
    _started(killed, 7, job, log)
    os.killpg(job.pid, signal.SIGKILL)  # the launcher and every rank, mid-epoch, no warning
    job.wait()
    ckpt = killed / "stage1" / "checkpoints"
    last = latest_tag(ckpt)
    done = int(last.removeprefix("step"))
    assert done >= 4 and len(_losses(killed)) >= done
    # and the newest checkpoint was damaged later (a bit flipped on disk): the resume names it and
    # falls back to the one before, which loses two more steps and changes nothing else
    biggest = max((f for f in (ckpt / last).rglob("*.pt")), key=lambda f: f.stat().st_size)
    data = bytearray(biggest.read_bytes())
    data[len(data) // 2] ^= 0x10
    biggest.write_bytes(bytes(data))
    target = min(done + 4, CLEAN_STEPS)
    proc = subprocess.run(
        TWO_RANKS + ["--master_port", "29644", *args, "--train.max_steps", str(target), "--resume"],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert proc.returncode == 0, proc.stdout[-3000:]
    out = proc.stdout + proc.stderr
    before = f"step{done - 2:08d}"
    assert f"checkpoint {ckpt}/{last} is damaged: {biggest.relative_to(ckpt / last)} changed" in out, out[-3000:]
    assert f"resuming from {ckpt}/{before}" in out and f"resumed at step {done - 2}" in out
    resumed = _losses(killed)
    assert [s for s, _ in resumed] == list(range(1, target + 1))  # lost steps redone once, not twice
    assert [x for _, x in resumed] == pytest.approx([x for _, x in uninterrupted[:target]], rel=1e-6)


ONE_RANK_NAN = """
import os, runpy, sys
import sclslt.train.stage as loop
real, calls = loop.step_loss, [0]
def poisoned(*args, **kwargs):          # rank 1's loss alone is NaN at its NAN_AT-th step
    loss, parts = real(*args, **kwargs)
    calls[0] += 1
    if os.environ.get("RANK") == "1" and calls[0] == int(os.environ["NAN_AT"]):
        loss = loss * float("nan")
    return loss, parts
loop.step_loss = poisoned
sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
"""


def test_one_ranks_non_finite_loss_is_every_ranks_skipped_step(cfg_path, tmp_path, train_env):
    """2 ranks, dropout 0.1, rank 1's loss alone NaN at its 3rd step: every rank skips that update (the verdict is
    all-reduced), the run goes on and ends with every step logged once. Mutation caught: the verdict taken from
    the local loss (rank 1 skips backward while rank 0 waits in its gradient all-reduce: the job hangs and the
    test's timeout fails it; checked)."""
    import csv

    script = tmp_path / "one_rank_nan.py"
    script.write_text(ONE_RANK_NAN)
    run = tmp_path / "run"
    proc = subprocess.run(
        TWO_RANKS
        + [
            "--master_port",
            "29646",
            str(script),
            "--deepspeed",
            "configs/zero2.json",
            "--config",
            str(cfg_path),
            "--train.run_dir",
            str(run),
            "--model.dropout",
            "0.1",
            "--stage2.enabled",
            "false",
            "--train.max_steps",
            "5",
        ],
        cwd=ROOT,
        env={**train_env, "NAN_AT": "3"},
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert proc.stdout.count("non-finite loss after step 2: update skipped") == 2, proc.stdout[-3000:]  # both ranks
    with open(run / "stage1" / "metrics.csv") as f:
        rows = list(csv.DictReader(f))
    assert [int(float(r["step"])) for r in rows] == [1, 2, 3, 4, 5]
    assert all(math.isfinite(float(r["loss"])) for r in rows)


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
    args = [
        "--config",
        str(cfg_path),
        "--stage1.epochs",
        "2",
        "--stage2.enabled",
        "false",
        "--checkpoint.every_steps",
        "2",
    ]
    crashed = subprocess.run(
        [sys.executable, "-c", CRASH_IN_SAVE, *args, "--train.run_dir", str(run)],
        cwd=ROOT,
        env={**train_env, "CRASH_TAG": "step00000004"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert crashed.returncode == -signal.SIGKILL, crashed.stderr[-2000:]
    ckpt = run / "stage1" / "checkpoints"
    assert latest_tag(ckpt) == "step00000002"  # not pointing at the half-written one
    assert (ckpt / "step00000004.partial").is_dir() and not (ckpt / "step00000004").exists()
    out = {}
    for d, extra in ((run, ["--resume"]), (clean, [])):
        proc = subprocess.run(
            [sys.executable, "launch/train.py", *args, "--train.run_dir", str(d), *extra],
            cwd=ROOT,
            env=train_env,
            capture_output=True,
            text=True,
            timeout=600,
        )
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
        out[d] = proc.stdout
    assert "resumed at step 2 " in out[run]

    def rows(d):
        with open(d / "stage1" / "metrics.csv") as f:
            return [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(f)]

    got, want = rows(run), rows(clean)
    assert [s for s, _ in got] == [s for s, _ in want]  # the lost steps redone once
    assert [x for _, x in got] == pytest.approx([x for _, x in want], rel=1e-6)
    assert not (ckpt / "step00000004.partial").exists() and latest_tag(ckpt) == latest_tag(
        clean / "stage1" / "checkpoints"
    )


def test_checkpoint_files_load_without_unpickling_arbitrary_objects(tmp_path):
    import random

    import numpy as np
    import torch

    from sclslt.runtime.checkpoints import rng_state, safe_load, set_rng_state

    torch.save(rng_state(), tmp_path / "rng.pt")
    draws = (random.random(), np.random.rand(), torch.rand(1).item())
    set_rng_state(safe_load(tmp_path / "rng.pt"))  # RNG states are plain tensors and ints
    assert (random.random(), np.random.rand(), torch.rand(1).item()) == draws

    import argparse

    torch.save({"module": {"w": torch.ones(2)}, "args": argparse.Namespace(x=1)}, tmp_path / "evil.pt")
    with pytest.raises(RuntimeError, match="evil.pt: refused to unpickle.*argparse.Namespace"):
        safe_load(tmp_path / "evil.pt")


class _Planted:
    """Unpickled, it runs `touch <marker>`: what a malicious checkpoint would do with a shell."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


def test_a_malicious_pickle_planted_in_a_real_checkpoint_is_refused_by_resume_and_export(cfg_path, tmp_path, train_env):
    """A real checkpoint's model file rewritten with an object that runs a command when unpickled, its checksum
    updated as an attacker would: `--resume` (DeepSpeed's load through the trainer's hook) and
    `load_module_state` (stage hand-over, export) refuse it, naming the file and the global, and the command never
    runs. Mutation caught: the weights-only hook removed from Engine (DeepSpeed's torch.load(weights_only=False)
    runs the command; checked)."""
    import hashlib
    import json

    import torch

    from sclslt.runtime.checkpoints import safe_load

    run, marker = tmp_path / "run", tmp_path / "pwned"
    args = [
        sys.executable,
        "launch/train.py",
        "--config",
        str(cfg_path),
        "--train.run_dir",
        str(run),
        "--stage2.enabled",
        "false",
        "--checkpoint.every_steps",
        "2",
    ]
    first = subprocess.run(
        args + ["--train.max_steps", "2"], cwd=ROOT, env=train_env, capture_output=True, text=True, timeout=600
    )
    assert first.returncode == 0, first.stdout[-2000:] + first.stderr[-2000:]
    ckpt = run / "stage1" / "checkpoints"
    tag = latest_tag(ckpt)
    model_file = next((ckpt / tag).glob("*model_states.pt"))
    states = safe_load(model_file)
    states["planted"] = _Planted(marker)
    torch.save(states, model_file)
    record = ckpt / tag / "checksums.json"
    sums = json.loads(record.read_text())
    sums[model_file.name] = [model_file.stat().st_size, hashlib.sha256(model_file.read_bytes()).hexdigest()]
    record.write_text(json.dumps(sums))
    resumed = subprocess.run(
        args + ["--train.max_steps", "4", "--resume"],
        cwd=ROOT,
        env=train_env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert resumed.returncode != 0 and not marker.exists()
    said = resumed.stdout + resumed.stderr
    assert f"{model_file.name}: refused to unpickle it: it holds posix.system" in said, said[-3000:]
    with pytest.raises(RuntimeError, match="refused to unpickle it: it holds posix.system"):
        load_module_state(ckpt, tag)
    assert not marker.exists()


@pytest.mark.parametrize("fault", ["killed", "hung"])
def test_when_one_rank_dies_or_hangs_the_others_exit_in_bounded_time(cfg_path, tmp_path, fault, train_env):
    """Ranks started by hand (as srun or a hand-rolled launcher would; no launcher to kill the rest):
    rank 1 is killed (SIGKILL) or frozen (SIGSTOP) mid-run; rank 0 must exit with a clear message and
    code 76, at once for a dead peer and within train.dist_timeout_s for a silent one."""
    run = tmp_path / "run"
    port = {"killed": "29651", "hung": "29652"}[fault]
    env = {**train_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": "2", "LOCAL_SIZE": "2"}
    procs = [
        subprocess.Popen(
            [
                sys.executable,
                "launch/train.py",
                "--config",
                str(cfg_path),
                "--train.run_dir",
                str(run),
                "--stage1.epochs",
                "60",
                "--stage2.enabled",
                "false",
                "--train.dist_timeout_s",
                "10",
            ],
            cwd=ROOT,
            env={**env, "RANK": str(r), "LOCAL_RANK": str(r)},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )
        for r in range(2)
    ]
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


def test_a_rendezvous_port_in_use_is_named_not_reported_as_a_dead_peer(cfg_path, tmp_path, train_env):
    """A second job on the machine whose port is taken: the error names the port and --master_port, exit 1.
    Mutation caught: the port check dropped from main (it read "another rank died or stopped answering" with
    exit 76; checked)."""
    import socket

    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run(
            [sys.executable, "launch/train.py", "--config", str(cfg_path), "--train.run_dir", str(tmp_path / "run")],
            cwd=ROOT,
            env={**train_env, "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)},
            capture_output=True,
            text=True,
            timeout=300,
        )
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert f"the rendezvous port 127.0.0.1:{port} is in use" in proc.stderr and "--master_port" in proc.stderr
    assert "another rank died" not in proc.stderr
