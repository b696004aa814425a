"""Faults at random: N trials of a 2-rank ZeRO-2 job on the synthetic corpus, each hit by one fault drawn
at random, at a random step of either stage, then started again as a user (or Slurm's requeue) would.

  python tests/e2e/chaos.py --trials 50 --seed 0 --out /tmp/chaos      # the table in benchmarks/results/

Faults (`KINDS`): kill -9 of one rank or of the whole job; SIGSTOP of one rank (a hang: the other rank
times out after train.dist_timeout_s and exits 76, the job is then killed as a scheduler would);
SIGTERM or SIGUSR1 to every rank (preemption: checkpoint, exit 75); SIGKILL of a rank inside a save
(after DeepSpeed wrote its first file); the disk filling during a save (the checkpoint engine's write
fails with ENOSPC on every rank, at that save only, as a full file system returns it); the newest
checkpoint truncated or bit-flipped after the job was killed. After the fault the job is run again
with --resume until it exits 0 (at most `--attempts` times).

A trial's outcome: `identical` (every stage's metrics.csv losses within 1e-6 of the uninterrupted run
and the final weights' hash equal), `identical_after_fallback` (the same, after the resume named a
damaged checkpoint and fell back to an earlier one), `clear_error` (the job stopped with an error line
that names what is broken), or `other` (anything else: the goal is none). Rows go to --out/trials.jsonl
as they finish (a rerun with the same --out and --seed continues) and the table's rows are appended to
benchmarks/results/chaos.csv (benchmarks/benchio.py).
"""

from __future__ import annotations

import argparse
import copy
import csv
import hashlib
import json
import os
import random
import signal
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))  # run as a script from anywhere

from tests.helpers import TINY, TRAIN_ENV  # noqa: E402

KINDS = (
    "kill9_rank",
    "kill9_job",
    "sigstop_rank",
    "sigterm",
    "sigusr1",
    "kill_in_save",
    "disk_full_in_save",
    "truncate_newest",
    "bitflip_newest",
)
STAGES = ("stage1", "stage2")
EVERY = 2  # checkpoint.every_steps of the chaos job


def _merged(base: dict, over: dict) -> dict:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merged(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


# the tests' tiny experiment (tests/helpers.py) with the recipe's dropout, two epochs a stage and a checkpoint every
# EVERY steps
CONFIG = _merged(
    TINY,
    {
        "data": {"synthetic": {"n_train": 32, "n_dev": 8, "n_test": 8}, "samples_per_shard": 10},
        "model": {"dropout": 0.1},
        "stage1": {"epochs": 2},
        "stage2": {"epochs": 2},
        "train": {"dist_timeout_s": 20},
        "checkpoint": {"every_steps": EVERY, "keep": 2},
        "eval": {"beam": 1, "max_len": 8, "select": "last"},
    },
)
STEPS = 8  # optimizer steps a stage (32 clips / 8 a batch x 2 epochs)

DRIVER = """
import errno, os, runpy, signal, sys
from deepspeed.runtime.checkpoint_engine.torch_checkpoint_engine import TorchCheckpointEngine
save, fault, target = TorchCheckpointEngine.save, os.environ.get("CHAOS_FAULT", ""), os.environ.get("CHAOS_SAVE", "")
def faulty_save(self, state_dict, path):
    hit = bool(target) and target in str(path)
    if hit and fault == "disk_full_in_save":
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))
    save(self, state_dict, path)
    if hit and fault == "kill_in_save" and os.environ.get("LOCAL_RANK") == os.environ.get("CHAOS_RANK"):
        os.kill(os.getpid(), signal.SIGKILL)
TorchCheckpointEngine.save = faulty_save
sys.argv = ["launch/train.py", *sys.argv[1:]]
runpy.run_path("launch/train.py", run_name="__main__")
"""


def env() -> dict:
    return dict(TRAIN_ENV)


def command(out: Path, run: Path, port: int, resume: bool) -> list[str]:
    deepspeed = Path(sys.executable).with_name("deepspeed")
    return [
        str(deepspeed) if deepspeed.exists() else "deepspeed",
        "--num_accelerators",
        "2",
        "--master_port",
        str(port),
        str(out / "driver.py"),
        "--deepspeed",
        "configs/zero2.json",
        "--config",
        str(out / "exp.yaml"),
        "--train.run_dir",
        str(run),
        *(["--resume"] if resume else []),
    ]


def losses(run: Path) -> dict:
    out = {}
    for st in STAGES:
        f = run / st / "metrics.csv"
        if f.is_file():
            with open(f) as fh:
                out[st] = [(int(float(r["step"])), float(r["loss"])) for r in csv.DictReader(fh)]
    return out


def weights_hash(run: Path) -> str:
    from sclslt.runtime.checkpoints import load_module_state

    state = load_module_state(run / STAGES[-1] / "checkpoints")
    h = hashlib.sha256()
    for k in sorted(state):
        h.update(k.encode())
        h.update(state[k].contiguous().numpy().tobytes())
    return h.hexdigest()


def weights_diff(run: Path, ref: Path) -> float:
    from sclslt.runtime.checkpoints import load_module_state

    a, b = (load_module_state(r / STAGES[-1] / "checkpoints") for r in (run, ref))
    return max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())


def ranks(run: Path) -> list[int]:
    got = subprocess.run(
        ["pgrep", "-f", f"driver.py --local_rank=.*{run}"], capture_output=True, text=True
    ).stdout.split()
    return sorted(int(p) for p in got)


def wait_for_step(run: Path, stage: str, step: int, job: subprocess.Popen, timeout: float = 600) -> bool:
    """Until `stage` has logged `step` steps (True), or the job ended first (False)."""
    f, deadline = run / stage / "metrics.csv", time.time() + timeout
    while time.time() < deadline and job.poll() is None:
        if f.is_file() and len(f.read_text().splitlines()) - 1 >= step:
            return True
        time.sleep(0.1)
    return False


def damage_newest(run: Path, stage: str, how: str, rng: random.Random) -> str:
    from sclslt.runtime.checkpoints import latest_tag

    ckpt = run / stage / "checkpoints"
    tag = latest_tag(ckpt)
    if tag is None:
        return "no checkpoint yet"
    files = sorted(p for p in (ckpt / tag).rglob("*") if p.is_file() and p.stat().st_size > 0)
    f = files[rng.randrange(len(files))]
    data = bytearray(f.read_bytes())
    if how == "truncate_newest":
        data = data[: len(data) // 2]
    else:
        data[rng.randrange(len(data))] ^= 1 << rng.randrange(8)
    f.write_bytes(bytes(data))
    return f"{tag}/{f.relative_to(ckpt / tag)}"


def inject(kind: str, stage: str, step: int, run: Path, out: Path, port: int, rng: random.Random) -> tuple[int, str]:
    """Run the job with the fault; returns (exit code, what was done)."""
    e, what = env(), ""
    if kind in ("kill_in_save", "disk_full_in_save"):
        e.update(
            CHAOS_FAULT=kind,
            CHAOS_SAVE=f"/{stage}/checkpoints/step{step:08d}.partial",
            CHAOS_RANK=str(rng.randrange(2)),
        )
        what = f"{kind} at {stage} step {step}"
    job = subprocess.Popen(
        command(out, run, port, False),
        cwd=ROOT,
        env=e,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    if kind not in ("kill_in_save", "disk_full_in_save"):
        if not wait_for_step(run, stage, step, job):
            job.wait()
            return job.returncode, f"{kind}: the job ended before {stage} step {step}"
        pids, victim = ranks(run), None
        if len(pids) != 2 and kind not in ("kill9_job", "truncate_newest", "bitflip_newest"):
            os.killpg(job.pid, signal.SIGKILL)  # alive: wait_for_step saw it running
            job.wait()
            return job.returncode, f"{kind}: found {len(pids)} rank processes, not 2 (the tool's fault)"
        if kind in ("kill9_job", "truncate_newest", "bitflip_newest"):
            os.killpg(job.pid, signal.SIGKILL)
        elif kind in ("kill9_rank", "sigstop_rank") and pids:
            victim = pids[rng.randrange(len(pids))]
            os.kill(victim, signal.SIGKILL if kind == "kill9_rank" else signal.SIGSTOP)
        else:
            for p in pids:
                os.kill(p, signal.SIGTERM if kind == "sigterm" else signal.SIGUSR1)
        what = f"{kind} at {stage} step {step}"
    try:  # a hang: the peer exits after dist_timeout_s
        job.wait(timeout=CONFIG["train"]["dist_timeout_s"] + 100)
    except subprocess.TimeoutExpired:  # what a scheduler's time limit does to a hung job
        what += "; the job did not end and was killed"
    if job.poll() is None or kind == "sigstop_rank":  # the job, and a frozen rank left behind
        try:
            os.killpg(job.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        for p in ranks(run):
            os.kill(p, signal.SIGKILL)
        job.wait()
    if kind in ("truncate_newest", "bitflip_newest"):
        what += f"; damaged {damage_newest(run, stage, kind, rng)}"
    return job.returncode, what


def trial(i: int, seed: int, out: Path, ref: dict, attempts: int, base_port: int) -> dict:
    rng = random.Random(seed * 1_000_003 + i)
    kind, stage = rng.choice(KINDS), rng.choice(STAGES)
    saves = list(range(EVERY, STEPS, EVERY))
    step = rng.choice(saves) if kind in ("kill_in_save", "disk_full_in_save") else rng.randrange(1, STEPS)
    run, port = out / f"trial{i:03d}", base_port + 10 + (i % 50) * 3
    if run.exists():
        import shutil

        shutil.rmtree(run)
    t0 = time.time()
    code, what = inject(kind, stage, step, run, out, port, rng)
    log, tries = "", 0
    while tries < attempts:
        tries += 1
        proc = subprocess.run(
            command(out, run, port + 1 + tries % 2, True),
            cwd=ROOT,
            env=env(),
            capture_output=True,
            text=True,
            timeout=900,
        )
        log += proc.stdout + proc.stderr
        if proc.returncode == 0 or (proc.returncode == 1 and "\nerror: " in "\n" + proc.stderr):
            break  # done, or a clear error a requeue would not mend
    if "the tool's fault" in what:
        return {"trial": i, "kind": kind, "stage": stage, "step": step, "fault": what, "outcome": "other"}
    row = {
        "trial": i,
        "kind": kind,
        "stage": stage,
        "step": step,
        "fault": what,
        "fault_exit": code,
        "restarts": tries,
        "final_exit": proc.returncode,
        "wall_s": round(time.time() - t0, 1),
    }
    fallback = "is damaged:" in log and "resuming from" in log
    errors = [ln for ln in log.splitlines() if ln.startswith(("error:", "config error:"))]
    if proc.returncode == 0:
        got, same_w = losses(run), weights_hash(run) == ref["weights"]
        same_l = all(
            len(got.get(st, [])) == len(ref["losses"][st])
            and all(
                s == rs and abs(x - rx) <= 1e-6 * max(1.0, abs(rx))
                for (s, x), (rs, rx) in zip(got[st], ref["losses"][st])
            )
            for st in STAGES
        )
        row.update(losses_equal=same_l, weights_equal=same_w, fell_back=fallback)
        if not same_w:
            row["weights_max_abs_diff"] = weights_diff(run, out / "reference")
        row["outcome"] = ("identical_after_fallback" if fallback else "identical") if same_l and same_w else "other"
    else:
        row.update(error=errors[-1] if errors else log.strip().splitlines()[-1:] or "")
        row["outcome"] = "clear_error" if errors else "other"
    return row


def reference(out: Path, base_port: int) -> dict:
    f = out / "reference.json"
    if f.is_file():
        return json.loads(f.read_text())
    run = out / "reference"
    proc = subprocess.run(
        command(out, run, base_port, False), cwd=ROOT, env=env(), capture_output=True, text=True, timeout=900
    )
    if proc.returncode != 0:
        raise SystemExit(f"the uninterrupted run failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}")
    ref = {"losses": losses(run), "weights": weights_hash(run)}
    f.write_text(json.dumps(ref))
    return ref


def table(rows: list[dict]) -> list[dict]:
    kinds = sorted({r["kind"] for r in rows})
    outcomes = ("identical", "identical_after_fallback", "clear_error", "other")
    out = [
        {
            "kind": k,
            "trials": sum(r["kind"] == k for r in rows),
            **{o: sum(r["kind"] == k and r["outcome"] == o for r in rows) for o in outcomes},
        }
        for k in kinds
    ]
    out.append({"kind": "all", "trials": len(rows), **{o: sum(r["outcome"] == o for r in rows) for o in outcomes}})
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--trials", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--attempts", type=int, default=3, help="restarts with --resume after the fault")
    p.add_argument("--out", type=Path, required=True, help="work directory (runs, trials.jsonl)")
    p.add_argument("--port", type=int, default=29690, help="first of the 160 master ports the jobs use")
    p.add_argument("--results", type=Path, default=ROOT / "benchmarks" / "results", help="where the table goes")
    args = p.parse_args(argv)
    import yaml

    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "exp.yaml").write_text(yaml.safe_dump(CONFIG))
    (args.out / "driver.py").write_text(DRIVER)
    ref = reference(args.out, args.port)
    log = args.out / "trials.jsonl"
    done = {r["trial"]: r for r in map(json.loads, log.read_text().splitlines())} if log.is_file() else {}
    for i in range(args.trials):
        if i not in done:
            done[i] = trial(i, args.seed, args.out, ref, args.attempts, args.port)
            with open(log, "a") as f:
                f.write(json.dumps(done[i]) + "\n")
            print(json.dumps(done[i]), flush=True)
    rows = [done[i] for i in range(args.trials)]
    summary = table(rows)
    print(f"{'fault':20} {'trials':>6} {'identical':>9} {'after fallback':>14} {'clear error':>11} {'other':>5}")
    for r in summary:
        print(
            f"{r['kind']:20} {r['trials']:6} {r['identical']:9} {r['identical_after_fallback']:14} "
            f"{r['clear_error']:11} {r['other']:5}"
        )
    from benchmarks.benchio import run_tag, write_rows

    base = write_rows(
        summary + [{"kind": "trial", **r} for r in rows],
        args.results,
        "chaos",
        run_tag(trials=args.trials, seed=args.seed),
    )
    print(f"wrote {base}.json and {base}.csv")
    return 0 if all(r["outcome"] != "other" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
