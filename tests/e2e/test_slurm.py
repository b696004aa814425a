"""The sbatch templates in launch/slurm/ on a real Slurm stood up on this machine.

A module fixture starts munged, slurmctld and two slurmd "nodes" (both on 127.0.0.1, distinct ports,
2 CPUs each; see /work/shared/LOCAL_CLUSTER.md) in a temporary directory, and stops them by PID at
the end. The templates run unedited: cluster-specific values are overridden on the sbatch command
line (`--gpus-per-node=0`, `--ntasks-per-node=2`, ...) and through the environment (PYTHON, CONFIG,
RUN_DIR). The trainer runs on CPU ranks (DeepSpeed's CPU accelerator, gloo):
  - one node, two tasks: a short stage-1 run succeeds in a world of 2;
  - two nodes, one task each: the same through the multi-node template;
  - preemption: `scancel --signal=USR1` (what `#SBATCH --signal=USR1@N` does before the time limit)
    makes every rank checkpoint and exit 75; the job requeues itself, restarts with --resume and
    finishes, with every step logged exactly once.
Needs root (slurmd) and the Debian packages slurmctld slurmd slurm-client munge, which are
installed with apt-get when missing.
"""

from __future__ import annotations

import csv
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
import yaml

from tests.helpers import ROOT

PACKAGES = ["slurmctld", "slurmd", "slurm-client", "munge"]
SBIN_PATH = os.pathsep.join([os.environ.get("PATH", ""), "/usr/sbin", "/sbin", "/usr/bin", "/bin"])
BINARIES = ("slurmctld", "slurmd", "munged", "munge", "sbatch", "srun", "scontrol", "scancel", "squeue", "sinfo")
JOB_TIMEOUT = 480  # outer bound on one sbatch --wait (a first run may build DeepSpeed ops: ~3 min)
REQUEUE_DELAY = 5  # AuthInfo cred_expire: a requeued job waits cred_expire + 1 s (default 120 s)

pytestmark = pytest.mark.skipif(sys.platform != "linux", reason="Slurm daemons need Linux")


def _which(name: str) -> str | None:
    return shutil.which(name, path=SBIN_PATH)


def _ensure_installed() -> str | None:
    """None when the daemons are there (installing them if possible), else why the tests skip."""
    if all(_which(b) for b in BINARIES):
        return None
    if os.geteuid() != 0 or not _which("apt-get"):
        return (
            "Slurm is not installed (slurmctld, slurmd, slurm-client, munge) and cannot be installed "
            "here: installing needs root and apt-get"
        )
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    subprocess.run([_which("apt-get"), "update"], env=env, capture_output=True, text=True, timeout=600)
    p = subprocess.run(
        [_which("apt-get"), "install", "-y", "--no-install-recommends", *PACKAGES],
        env=env,
        capture_output=True,
        text=True,
        timeout=900,
    )
    missing = [b for b in BINARIES if not _which(b)]
    if p.returncode or missing:
        pytest.fail(
            f"apt-get install {' '.join(PACKAGES)} failed (exit {p.returncode}, missing {missing}):\n"
            f"{(p.stdout + p.stderr)[-3000:]}"
        )
    return None


def _port_free(port: int) -> bool:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("0.0.0.0", port))
        except OSError:
            return False
    return True


def _ports(n: int) -> list[int]:
    """Slurm's default ports (6817 controller, 6818 and up for the slurmds) when free, else free ones."""
    default = list(range(6817, 6817 + n))
    if all(_port_free(p) for p in default):
        return default
    socks, ports = [], []
    try:
        for _ in range(n):
            s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
            s.bind(("0.0.0.0", 0))
            socks.append(s)
            ports.append(s.getsockname()[1])
    finally:
        for s in socks:
            s.close()
    return ports


def _clean_env() -> dict:
    """os.environ without anything that would make a client or a task think it is inside another job
    or another torch.distributed world (a pytest run may itself be a Slurm job)."""
    drop = ("SLURM_", "SBATCH_", "SRUN_", "SALLOC_")
    skip = {"RANK", "LOCAL_RANK", "WORLD_SIZE", "LOCAL_SIZE", "MASTER_ADDR", "MASTER_PORT", "CROSS_RANK", "CROSS_SIZE"}
    return {k: v for k, v in os.environ.items() if not k.startswith(drop) and k not in skip}


def _tail(path: Path, n: int = 4000) -> str:
    try:
        return path.read_text(errors="replace")[-n:]
    except OSError:
        return f"({path} unreadable)"


class LocalSlurm:
    """munged + slurmctld + one slurmd per node, all children of this process."""

    def __init__(self, base: Path, nodes: list[str], ports: list[int]):
        self.dir, self.nodes = base, nodes
        self.conf = base / "etc" / "slurm.conf"
        self.env = {**_clean_env(), "SLURM_CONF": str(self.conf)}
        self.procs: list[tuple[str, subprocess.Popen]] = []
        self.hosts_line: str | None = None
        self.ctld_port, self.node_ports = ports[0], ports[1:]

    # --- stand-up --------------------------------------------------------------------------------
    def write_config(self) -> None:
        d = self.dir
        for sub in ("etc", "state", "log", "run"):
            (d / sub).mkdir(parents=True, exist_ok=True)
        host = socket.gethostname().split(".")[0]
        node_lines = "\n".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={p} CPUs=2 State=UNKNOWN"
            for n, p in zip(self.nodes, self.node_ports)
        )
        self.conf.write_text(f"""\
ClusterName=sclslttest
SlurmctldHost={host}(127.0.0.1)
SlurmctldPort={self.ctld_port}
SlurmUser=root
AuthType=auth/munge
AuthInfo=socket={d}/munge/munge.sock,cred_expire={REQUEUE_DELAY}
StateSaveLocation={d}/state
SlurmdSpoolDir={d}/spool-%n
SlurmctldPidFile={d}/run/slurmctld.pid
SlurmdPidFile={d}/run/slurmd-%n.pid
SlurmctldLogFile={d}/log/slurmctld.log
SlurmdLogFile={d}/log/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
MailProg=/bin/true
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
SchedulerParameters=sched_interval=1,bf_interval=1
# sbatch --wait polls every 2 s when MinJobAge < 8 (else 2, 8, 32, 32 ... s)
MinJobAge=5
{node_lines}
PartitionName=debug Nodes={",".join(self.nodes)} Default=YES MaxTime=INFINITE State=UP
""")

    def add_hosts(self) -> None:
        """Every node name must resolve (rank 0's node is MASTER_ADDR), else rendezvous hangs."""
        unresolved = []
        for n in self.nodes:
            try:
                socket.gethostbyname(n)
            except OSError:
                unresolved.append(n)
        if unresolved:
            self.hosts_line = f"127.0.0.1 {' '.join(unresolved)}  # sclslt tests/e2e/test_slurm.py pid {os.getpid()}\n"
            with open("/etc/hosts", "a") as f:
                f.write(self.hosts_line)

    def start_munge(self) -> None:
        import pwd

        md = self.dir / "munge"
        md.mkdir()
        md.chmod(0o755)  # munged: the socket directory must be traversable by all
        key = md / "munge.key"
        key.write_bytes(os.urandom(128))  # what `mungekey --create` writes: 1024 random bits
        key.chmod(0o600)
        try:
            pw = pwd.getpwnam("munge")
            uid, gid = pw.pw_uid, pw.pw_gid
        except KeyError:  # no munge user: munged as root (needs --force)
            uid = gid = None
        if uid is not None:
            os.chown(md, uid, gid)
            os.chown(key, uid, gid)
        cmd = [
            _which("munged"),
            "--foreground",
            f"--socket={md}/munge.sock",
            f"--key-file={key}",
            f"--pid-file={md}/munged.pid",
            f"--log-file={md}/munged.log",
            f"--seed-file={md}/munged.seed",
        ]
        if uid is None:
            cmd.append("--force")
        self._spawn("munged", cmd, user=uid, group=gid)
        self._wait(
            lambda: (
                subprocess.run(
                    [_which("munge"), "-n", f"--socket={md}/munge.sock"], capture_output=True, timeout=10
                ).returncode
                == 0
            ),
            20,
            "munged",
        )

    def start_slurm(self) -> None:
        self._spawn("slurmctld", [_which("slurmctld"), "-D", "-i"])
        for n in self.nodes:
            self._spawn(f"slurmd-{n}", [_which("slurmd"), "-D", "-N", n])

        def idle():
            out = self.cmd("sinfo", "-h", "-N", "-o", "%N %T", check=False).stdout.split("\n")
            states = dict(line.split() for line in out if line.strip())
            return sorted(states) == sorted(self.nodes) and set(states.values()) == {"idle"}

        self._wait(idle, 60, "both nodes idle")

    def _spawn(self, name: str, cmd: list[str], user=None, group=None) -> None:
        log = open(self.dir / "log" / f"{name}.stdout", "w")
        kw = {"user": user, "group": group} if user is not None else {}
        p = subprocess.Popen(
            cmd,
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kw,
        )
        log.close()
        self.procs.append((name, p))

    def _wait(self, ok, timeout: float, what: str) -> None:
        deadline = time.time() + timeout
        while time.time() < deadline:
            for name, p in self.procs:
                if p.poll() is not None:
                    raise RuntimeError(f"{name} exited with {p.returncode} while waiting for {what}:\n{self.logs()}")
            try:
                if ok():
                    return
            except (OSError, subprocess.SubprocessError, ValueError):
                pass
            time.sleep(0.2)
        raise RuntimeError(f"timed out after {timeout}s waiting for {what}:\n{self.logs()}")

    # --- use -------------------------------------------------------------------------------------
    def cmd(self, *args: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess:
        return subprocess.run(
            [_which(args[0]), *args[1:]], env=self.env, capture_output=True, text=True, check=check, timeout=timeout
        )

    def job(self, job_id: str) -> dict:
        """`scontrol show job` as a dict (JobState, Restarts, ExitCode, ...); {} once it is gone."""
        p = self.cmd("scontrol", "show", "job", "-o", job_id, check=False)
        return dict(kv.split("=", 1) for kv in p.stdout.split() if "=" in kv) if p.returncode == 0 else {}

    def job_id(self, name: str, timeout: float = 30) -> str:
        deadline = time.time() + timeout
        while time.time() < deadline:
            ids = self.cmd("squeue", "-h", "-n", name, "-o", "%i", check=False).stdout.split()
            if ids:
                return ids[0]
            time.sleep(0.2)
        raise AssertionError(f"no job named {name} in the queue after {timeout}s:\n{self.logs()}")

    def logs(self) -> str:
        parts = [
            f"--- {p.name}\n{_tail(p, 1500)}"
            for p in sorted((self.dir / "log").glob("*"))
            if p.is_file() and p.stat().st_size
        ]
        return "\n".join(parts)

    # --- tear-down -------------------------------------------------------------------------------
    def stop(self) -> None:
        if any(n == "slurmctld" and p.poll() is None for n, p in self.procs):
            ids = self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.split()
            if ids:
                self.cmd("scancel", *ids, check=False)
                deadline = time.time() + 40
                while time.time() < deadline and self.cmd("squeue", "-h", "-o", "%i", check=False).stdout.strip():
                    time.sleep(0.5)
        for name, p in reversed(self.procs):  # slurmds, then slurmctld, then munged
            if p.poll() is None:
                p.terminate()
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                    p.wait(timeout=15)
        self._kill_leftovers()
        if self.hosts_line:
            try:
                lines = Path("/etc/hosts").read_text().splitlines(keepends=True)
                with open("/etc/hosts", "w") as f:  # in place: /etc/hosts may be a bind mount
                    f.writelines(line for line in lines if line != self.hosts_line)
            except OSError:
                pass

    def _kill_leftovers(self) -> None:
        """Processes this cluster started (slurmstepd, tasks) carry our SLURM_CONF: end them by PID."""
        marker = f"SLURM_CONF={self.conf}".encode()
        for d in Path("/proc").iterdir():
            if not d.name.isdigit() or int(d.name) == os.getpid():
                continue
            try:
                if marker in (d / "environ").read_bytes().split(b"\0"):
                    os.kill(int(d.name), signal.SIGKILL)
            except (OSError, ProcessLookupError):
                pass


@pytest.fixture(scope="module")
def slurm():
    why = _ensure_installed()
    if why:
        pytest.skip(why)
    if os.geteuid() != 0:
        pytest.skip("standing up slurmd (which starts jobs as their user) needs root")
    base = Path(tempfile.mkdtemp(prefix="sclslt-slurm-"))
    base.chmod(0o755)  # munged runs as user munge and needs to get through
    tag = f"{os.getpid() % 100000}"
    cluster = LocalSlurm(base, [f"sclslt{tag}n1", f"sclslt{tag}n2"], _ports(3))
    try:
        cluster.write_config()
        cluster.add_hosts()
        cluster.start_munge()
        cluster.start_slurm()
        yield cluster
    finally:
        cluster.stop()
        shutil.rmtree(base, ignore_errors=True)


@pytest.fixture(scope="module")
def exp_yaml(tiny_cfg_dict, tmp_path_factory) -> Path:
    cfg = yaml.safe_load(yaml.safe_dump(tiny_cfg_dict))
    cfg["data"]["synthetic"]["n_train"] = 48  # 6 steps of 8 clips per epoch
    p = tmp_path_factory.mktemp("slurm_exp") / "exp.yaml"
    p.write_text(yaml.safe_dump(cfg))
    return p


def _job_env(slurm: LocalSlurm, config: Path, run_dir: Path) -> dict:
    env = {
        **slurm.env,
        "DS_ACCELERATOR": "cpu",
        "SCLSLT_PLAIN_LOG": "1",
        "OMP_NUM_THREADS": "1",
        "PYTHON": sys.executable,
        "CONFIG": str(config),
        "RUN_DIR": str(run_dir),
    }
    if "TRITON_INTERPRET" in os.environ:  # conftest sets it when there is no GPU
        env["TRITON_INTERPRET"] = os.environ["TRITON_INTERPRET"]
    return env


def _submit(
    slurm: LocalSlurm, template: str, name: str, out: Path, env: dict, opts: list[str], train_args: list[str]
) -> subprocess.Popen:
    """`sbatch --wait` of an unedited template, cluster values overridden on the command line."""
    cmd = [
        _which("sbatch"),
        "--wait",
        f"--job-name={name}",
        f"--chdir={ROOT}",
        "--export=ALL",
        f"--output={out}",
        "--gpus-per-node=0",
        "--cpus-per-task=1",
        "--time=20",
        *opts,
        str(ROOT / "launch" / "slurm" / template),
        *train_args,
    ]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(slurm: LocalSlurm, proc: subprocess.Popen, name: str, out: Path, timeout: float = JOB_TIMEOUT):
    try:
        sb, _ = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        slurm.cmd("scancel", "-n", name, check=False)
        proc.kill()
        sb, _ = proc.communicate()
        pytest.fail(f"job {name} did not finish in {timeout}s\n--- job output\n{_tail(out)}\n{slurm.logs()}")
    return proc.returncode, sb, _tail(out, 10**6)


def _steps(metrics: Path) -> list[int]:
    with open(metrics) as f:
        return [int(float(r["step"])) for r in csv.DictReader(f)]


def test_templates_share_one_body_and_request_what_the_requeue_cycle_needs():
    """Static checks (no Slurm needed): the two templates differ only in their #SBATCH header."""
    bodies = []
    for name in ("single_node.sbatch", "multi_node.sbatch"):
        path = ROOT / "launch" / "slurm" / name
        head, body = path.read_text().split("\nset -uo pipefail\n", 1)
        opts = re.findall(r"^#SBATCH (\S+)", head, re.M)
        for want in (
            "--requeue",
            "--open-mode=append",
            "--signal=USR1@",
            "--ntasks-per-node=",
            "--gpus-per-node=",
            "--cpus-per-task=",
            "--time=",
        ):
            assert any(o.startswith(want) for o in opts), f"{name}: no #SBATCH {want}"
        assert os.access(path, os.X_OK)
        assert subprocess.run(["bash", "-n", str(path)], capture_output=True).returncode == 0
        bodies.append(body)
    assert bodies[0] == bodies[1], "keep the bodies of single_node.sbatch and multi_node.sbatch identical"


def test_single_node_two_tasks(slurm, exp_yaml, tmp_path):
    run, out, name = tmp_path / "run", tmp_path / "job.out", f"sclslt-one-{os.getpid()}"
    proc = _submit(
        slurm,
        "single_node.sbatch",
        name,
        out,
        _job_env(slurm, exp_yaml, run),
        ["--nodes=1", "--ntasks-per-node=2"],
        ["--stage2.enabled", "false", "--train.max_steps", "4"],
    )
    rc, sb, log = _finish(slurm, proc, name, out)
    assert rc == 0 and "srun exited with 0" in log, f"{sb}\n--- job output\n{log[-4000:]}\n{slurm.logs()}"
    assert "world 2 x cpu" in log and "2 tasks" in log
    assert _steps(run / "stage1" / "metrics.csv") == [1, 2, 3, 4]
    assert (run / "results.json").is_file()


def test_two_nodes_one_task_each(slurm, exp_yaml, tmp_path):
    run, out, name = tmp_path / "run", tmp_path / "job.out", f"sclslt-two-{os.getpid()}"
    proc = _submit(
        slurm,
        "multi_node.sbatch",
        name,
        out,
        _job_env(slurm, exp_yaml, run),
        ["--nodes=2", "--ntasks-per-node=1"],
        ["--stage2.enabled", "false", "--train.max_steps", "4"],
    )
    rc, sb, log = _finish(slurm, proc, name, out)
    assert rc == 0 and "srun exited with 0" in log, f"{sb}\n--- job output\n{log[-4000:]}\n{slurm.logs()}"
    assert "world 2 x cpu" in log
    nodelist = re.search(r"sclslt: job \d+ \(restart 0\) on (\S+): 2 tasks, master (\S+):", log)
    assert nodelist, log[-3000:]
    hosts = slurm.cmd("scontrol", "show", "hostnames", nodelist.group(1)).stdout.split()
    assert sorted(hosts) == sorted(slurm.nodes) and nodelist.group(2) == hosts[0]
    assert _steps(run / "stage1" / "metrics.csv") == [1, 2, 3, 4]
    assert (run / "results.json").is_file()


def test_usr1_checkpoints_exits_75_requeues_and_resumes(slurm, exp_yaml, tmp_path):
    from sclslt.runtime.checkpoints import latest_tag

    config = tmp_path / "exp.yaml"  # edited between the two runs (max_steps)
    shutil.copy(exp_yaml, config)
    run, out, name = tmp_path / "run", tmp_path / "job.out", f"sclslt-preempt-{os.getpid()}"
    proc = _submit(
        slurm,
        "single_node.sbatch",
        name,
        out,
        _job_env(slurm, config, run),
        ["--nodes=1", "--ntasks-per-node=2"],
        ["--stage1.epochs", "60", "--stage2.enabled", "false"],
    )
    try:
        job = slurm.job_id(name)
        metrics = run / "stage1" / "metrics.csv"
        deadline = time.time() + JOB_TIMEOUT
        while (not metrics.is_file() or len(metrics.read_text().splitlines()) < 4) and time.time() < deadline:
            assert proc.poll() is None, f"the job ended early:\n{_tail(out)}"
            time.sleep(0.2)
        assert metrics.is_file(), f"no steps logged in {JOB_TIMEOUT}s:\n{_tail(out)}\n{slurm.logs()}"
        # what `#SBATCH --signal=USR1@N` does before the time limit: USR1 to every task of every step
        slurm.cmd("scancel", "--signal=USR1", job)
        # the ranks checkpoint and exit 75, the script requeues the job: PENDING (BeginTime) for a
        # few seconds; hold it there while the config gets a step cap for the resumed run
        # (COMPLETING with Restarts=1 while Slurm ends the batch shell, then PENDING)
        deadline, info = time.time() + 180, {}
        while time.time() < deadline:
            info = slurm.job(job)
            restarted = info.get("Restarts", "0") != "0"
            if restarted and info.get("JobState") == "PENDING":
                break
            assert not (restarted and info.get("JobState") == "RUNNING"), "missed the requeued job's pending time"
            assert proc.poll() is None, f"the job ended without a requeue:\n{_tail(out)}"
            time.sleep(0.1)
        assert info.get("JobState") == "PENDING", f"not requeued in time: {info}\n{_tail(out)}\n{slurm.logs()}"
        slurm.cmd("scontrol", "hold", job)
        tag = latest_tag(run / "stage1" / "checkpoints")
        assert tag and tag.startswith("step"), tag
        done = int(tag.removeprefix("step"))
        assert 3 <= done < 6 * 60 and _steps(metrics) == list(range(1, done + 1))
        cfg = yaml.safe_load(config.read_text())
        cfg["train"]["max_steps"] = done + 2
        config.write_text(yaml.safe_dump(cfg))
        slurm.cmd("scontrol", "release", job)
        rc, sb, log = _finish(slurm, proc, name, out)
    finally:
        if proc.poll() is None:
            slurm.cmd("scancel", "-n", name, check=False)
            proc.kill()
            proc.wait()
    assert rc == 0, f"{sb}\n--- job output\n{log[-5000:]}\n{slurm.logs()}"
    first, second = log.split("(restart 1)", 1)  # --open-mode=append: both runs in one file
    assert f"stopped by a signal at step {done}" in first and "srun exited with 75" in first
    assert "requeueing job" in first
    assert f"resumed at step {done}" in second and "srun exited with 0" in second
    assert "world 2 x cpu" in second and "(restart 2)" not in second
    assert _steps(metrics) == list(range(1, done + 3))  # continued: nothing lost, nothing repeated
    assert latest_tag(run / "stage1" / "checkpoints") == f"step{done + 2:08d}"


def test_rank_mapping_from_slurm_task_variables():
    from sclslt.runtime.distributed import expand_tasks_per_node, slurm_env

    assert expand_tasks_per_node("2(x3),1") == [2, 2, 2, 1] and expand_tasks_per_node("4") == [4]
    env = {
        "SLURM_STEP_ID": "0",
        "SLURM_PROCID": "6",
        "SLURM_NTASKS": "7",
        "SLURM_STEP_NUM_TASKS": "7",
        "SLURM_LOCALID": "0",
        "SLURM_NODEID": "3",
        "SLURM_STEP_TASKS_PER_NODE": "2(x3),1",
        "SLURM_JOB_ID": "123456",
        "MASTER_ADDR": "node001",
    }
    got = slurm_env(env)
    assert got == {
        "RANK": "6",
        "WORLD_SIZE": "7",
        "LOCAL_RANK": "0",
        "LOCAL_SIZE": "1",
        "MASTER_PORT": str(15000 + 123456 % 20000),
    }  # MASTER_ADDR given: kept
    no_master = {k: v for k, v in env.items() if k != "MASTER_ADDR"}
    with pytest.raises(RuntimeError, match="export MASTER_ADDR"):  # no node list to ask scontrol about
        slurm_env(no_master)
