"""Joining and leaving a job: the accelerator, torch.distributed through DeepSpeed (the `deepspeed`
launcher, mpirun, srun or a lone process), the Slurm environment, and how a dead peer shows.

A CPU run releases DeepSpeed's shared-memory buffer at once; every job ends with `finish_distributed`.
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch


def setup_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported (cpu when there is no GPU), and where its ops
    are built (`extensions_dir`)."""
    if not os.environ.get("DS_ACCELERATOR") and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    os.environ.setdefault("TORCH_EXTENSIONS_DIR", extensions_dir())
    return os.environ.get("DS_ACCELERATOR", "cuda")


def extensions_dir(prefix: str | None = None) -> str:
    """DeepSpeed's JIT-built ops for this Python environment only (TORCH_EXTENSIONS_DIR, unless set): torch's
    default, ~/.cache/torch_extensions/py311_cpu, is shared by every environment of the same Python, so a build
    killed in one left a lock every launch of the others waited on, and their ops came from another
    environment's torch."""
    import hashlib
    import sys

    prefix = prefix or sys.prefix
    tag = hashlib.sha256(os.path.realpath(prefix).encode()).hexdigest()[:12]
    return os.path.join(os.path.expanduser("~"), ".cache", "torch_extensions", f"sclslt-{tag}")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, as `init_distributed` found it."""

    rank: int
    world: int
    local_rank: int
    device: torch.device
    accelerator: str  # DeepSpeed's accelerator name: "cuda" or "cpu"


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (launcher env, MPI or a lone process)."""
    from datetime import timedelta

    setup_accelerator()
    srun_task = "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ
    launched = (
        "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or ("PMI_SIZE" in os.environ and not srun_task)
    )  # srun's pmi2 plugin sets PMI_SIZE too: Slurm's ranks win
    if not launched and srun_task:
        os.environ.update(slurm_env(os.environ))  # `srun python launch/train.py`: one task per GPU
        launched = True
    if not launched:  # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed
    import torch.distributed.distributed_c10d as c10d
    from deepspeed.accelerator import get_accelerator

    # the process groups DeepSpeed creates later (ZeRO's data-parallel group) take torch's module
    # defaults, not init's timeout: without this a silent peer blocks a gradient all-reduce for 30 min
    c10d.default_pg_timeout = c10d.default_pg_nccl_timeout = timedelta(seconds=timeout_s)
    acc = get_accelerator()
    # before DeepSpeed's MPI discovery sets LOCAL_RANK, Open MPI's own names it
    local_rank = int(os.environ.get("LOCAL_RANK", os.environ.get("OMPI_COMM_WORLD_LOCAL_RANK", 0)))
    device = torch.device("cpu")
    if acc.device_name() == "cuda":
        device = bind_gpu(local_rank, timeout_s)
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if acc.device_name() == "cpu":
        release_shm_buffer(rank)
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device, accelerator=acc.device_name())


def bind_gpu(local_rank: int, timeout_s: int) -> torch.device:
    """This task's GPU: `LOCAL_RANK` among the node's GPUs, or, for a task bound to its own GPUs
    (`srun --gpus-per-task`, `--gpu-bind`, a per-task CUDA_VISIBLE_DEVICES), `LOCAL_RANK % visible GPUs`.
    DeepSpeed would bind device `LOCAL_RANK` ("invalid device ordinal" on a bound task): where they differ,
    the process group is made here with the right device (DeepSpeed then adopts it), and `Engine` hands the
    index to DeepSpeed's engine (`device_rank`). MPI launches without RANK in the environment take
    DeepSpeed's discovery and its binding (one task per node-local GPU index)."""
    from datetime import timedelta

    index = local_rank % torch.cuda.device_count()
    torch.cuda.set_device(index)
    if (
        index != local_rank
        and "RANK" in os.environ
        and "WORLD_SIZE" in os.environ
        and not torch.distributed.is_initialized()
    ):
        torch.distributed.init_process_group(
            "nccl", timeout=timedelta(seconds=timeout_s), device_id=torch.device("cuda", index)
        )
    return torch.device("cuda", index)


def finish_distributed() -> None:
    """End a job's process group in step: every rank reaches the barrier, then the group is destroyed
    before the interpreter tears down (exiting with a live gloo group lets one rank's teardown close
    sockets a peer still holds, and torch warns that the group leaks)."""
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.barrier()
        torch.distributed.destroy_process_group()


def release_shm_buffer(rank: int) -> None:
    """DeepSpeed's CPU backend maps a 66 MiB /dev/shm buffer per rank for its shared-memory inference
    all-reduce, which training never calls, and never unlinks it: every CPU run, killed or not, would
    leave 66 MiB of RAM behind (hundreds of runs filled a 24 GiB machine). Once every rank has mapped
    its peers' buffers (the barrier), the name is removed; the mappings stay valid."""
    import glob

    torch.distributed.barrier()
    addr, port = os.environ.get("MASTER_ADDR", ""), os.environ.get("MASTER_PORT", "")
    for f in glob.glob(f"/dev/shm/deepspeed_allreduce_buffer_*_{glob.escape(addr)}_{port}_{rank}"):
        try:
            os.unlink(f)
        except OSError:
            pass


def port_in_use(exc: BaseException) -> bool:
    """Whether joining the job failed because the rendezvous port is taken (another job on the machine): torch
    raises that as a DistNetworkError too, which is not a dead peer."""
    text = str(exc)
    return isinstance(exc, torch.distributed.DistNetworkError) and any(
        s in text for s in ("failed to listen", "Address already in use", "EADDRINUSE")
    )


def peer_failure(exc: BaseException) -> bool:
    """Whether an exception means another rank died or hung (a collective failed or timed out).
    With NCCL, torch's watchdog aborts the process itself on a timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING),
    so a GPU job ends with SIGABRT rather than code 76 - bounded either way."""
    if isinstance(exc, (torch.distributed.DistBackendError, torch.distributed.DistNetworkError)):
        return True
    text = str(exc)  # gloo reports a dead or silent peer as a plain RuntimeError
    return isinstance(exc, RuntimeError) and any(
        s in text for s in ("Connection closed by peer", "Connection reset by peer", "Timed out waiting")
    )


def expand_tasks_per_node(spec: str) -> list[int]:
    """Slurm's compressed tasks-per-node list: "2(x3),1" -> [2, 2, 2, 1]."""
    out = []
    for part in spec.split(","):
        n, _, rep = part.partition("(x")
        out += [int(n)] * (int(rep.rstrip(")")) if rep else 1)
    return out


def slurm_env(env) -> dict:
    """torch.distributed's variables from an srun task's (deepspeed.init_distributed does not read them;
    a batch shell has no SLURM_STEP_ID and stays a world of one).

    RANK/WORLD_SIZE/LOCAL_RANK from SLURM_PROCID/SLURM_NTASKS/SLURM_LOCALID; MASTER_ADDR is the first
    host of the job (`scontrol show hostnames`) unless set; MASTER_PORT is derived from the job id
    unless set, so two jobs sharing a node do not collide."""
    import subprocess

    world = env.get("SLURM_STEP_NUM_TASKS") or env.get("SLURM_NTASKS", "1")
    out = {"RANK": env["SLURM_PROCID"], "WORLD_SIZE": world, "LOCAL_RANK": env.get("SLURM_LOCALID", "0")}
    per_node = expand_tasks_per_node(env.get("SLURM_STEP_TASKS_PER_NODE") or env.get("SLURM_TASKS_PER_NODE", "1"))
    node = int(env.get("SLURM_NODEID", "0"))
    out["LOCAL_SIZE"] = str(per_node[node] if node < len(per_node) else per_node[-1])
    if "MASTER_ADDR" not in env:
        nodes = env.get("SLURM_JOB_NODELIST") or env.get("SLURM_NODELIST")
        host = None
        if nodes:
            try:
                host = subprocess.run(
                    ["scontrol", "show", "hostnames", nodes], capture_output=True, text=True, check=True, timeout=30
                ).stdout.split()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                host = None
        if host is None and int(env["SLURM_NTASKS"]) > 1:
            raise RuntimeError(
                f"cannot find the master host of Slurm job {env.get('SLURM_JOB_ID')}: "
                f"`scontrol show hostnames {nodes}` failed; export MASTER_ADDR in the job script"
            )
        out["MASTER_ADDR"] = host or "127.0.0.1"
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out
