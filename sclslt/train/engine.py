"""The only module that imports deepspeed: distributed init, engine construction, step, checkpoints.

Everything DeepSpeed-specific stays behind `Engine`, so the training loop reads the same for both
stages and a future engine change touches one file.

Config ownership: the DeepSpeed JSON holds engine matters (ZeRO stage, communication); this module
writes in what the experiment config owns (batch sizes from `stageN.global_batch`, gradient
clipping from `train.grad_clip` - DeepSpeed would otherwise clip at 1.0 silently - and precision:
bf16 on GPUs, fp32 on CPU unless `train.precision` says otherwise). A JSON that sets a batch size
is an error rather than a silent conflict.

Checkpoints are DeepSpeed's (ZeRO shards + module) plus our client state, a small `sclslt.json`
(step, epoch, data position, world size) and each rank's RNG states. They are written under
`<tag>.partial` and published by a rename plus an atomic `latest` update, so a crash while saving
leaves the previous checkpoint loadable. Loading goes through torch's weights-only unpickler with
DeepSpeed's few state classes allowed. A checkpoint written at another world size is converted
once to DeepSpeed's universal format and re-partitioned for the current one.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from sclslt.atomic import write_text

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def setup_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: cpu when there is no GPU."""
    if not os.environ.get("DS_ACCELERATOR") and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


@dataclass(frozen=True)
class DistInfo:
    """This process's place in the job, as `init_distributed` found it."""
    rank: int
    world: int
    local_rank: int
    device: torch.device
    accelerator: str            # DeepSpeed's accelerator name: "cuda" or "cpu"


def init_distributed(timeout_s: int = 1800) -> DistInfo:
    """Initialise torch.distributed through DeepSpeed (launcher env, MPI or a lone process)."""
    from datetime import timedelta
    setup_accelerator()
    srun_task = "SLURM_STEP_ID" in os.environ and "SLURM_PROCID" in os.environ
    launched = "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or \
        ("PMI_SIZE" in os.environ and not srun_task)     # srun's pmi2 plugin sets PMI_SIZE too: Slurm's ranks win
    if not launched and srun_task:
        os.environ.update(slurm_env(os.environ))          # `srun python launch/train.py`: one task per GPU
        launched = True
    if not launched:   # plain `python launch/train.py`: a world of one
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
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    if acc.device_name() == "cpu":
        release_shm_buffer(rank)
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cuda":
        # a task bound to its own GPU (--gpus-per-task, --gpu-bind) sees one device: index 0
        index = local_rank % torch.cuda.device_count()
        torch.cuda.set_device(index)
        device = torch.device("cuda", index)
    else:
        device = torch.device("cpu")
    return DistInfo(rank=rank, world=world, local_rank=local_rank, device=device, accelerator=acc.device_name())


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


def peer_failure(exc: BaseException) -> bool:
    """Whether an exception means another rank died or hung (a collective failed or timed out).
    With NCCL, torch's watchdog aborts the process itself on a timeout (TORCH_NCCL_ASYNC_ERROR_HANDLING),
    so a GPU job ends with SIGABRT rather than code 76 - bounded either way."""
    if isinstance(exc, (torch.distributed.DistBackendError, torch.distributed.DistNetworkError)):
        return True
    text = str(exc)          # gloo reports a dead or silent peer as a plain RuntimeError
    return isinstance(exc, RuntimeError) and any(s in text for s in (
        "Connection closed by peer", "Connection reset by peer", "Timed out waiting"))


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
                host = subprocess.run(["scontrol", "show", "hostnames", nodes], capture_output=True, text=True,
                                      check=True, timeout=30).stdout.split()[0]
            except (OSError, subprocess.SubprocessError, IndexError):
                host = None
        if host is None and int(env["SLURM_NTASKS"]) > 1:
            raise RuntimeError(f"cannot find the master host of Slurm job {env.get('SLURM_JOB_ID')}: "
                               f"`scontrol show hostnames {nodes}` failed; export MASTER_ADDR in the job script")
        out["MASTER_ADDR"] = host or "127.0.0.1"
    if "MASTER_PORT" not in env:
        out["MASTER_PORT"] = str(15000 + int(env.get("SLURM_JOB_ID", "0")) % 20000)
    return out


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(path: str | os.PathLike, global_batch: int, world: int, grad_clip: float,
                    precision: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {p} does not exist (see configs/zero*.json)")
    ds = json.loads(p.read_text())
    clash = [k for k in _BATCH_KEYS if k in ds]
    if clash:
        raise ValueError(f"{p} sets {clash}: batch sizes come from the experiment config "
                         f"(stage1.global_batch / stage2.global_batch); remove them from the JSON")
    if global_batch % world:
        raise ValueError(f"global batch {global_batch} is not divisible by the world size {world}: "
                         f"set stageN.global_batch to a multiple of {world}")
    ds.update(train_batch_size=global_batch, train_micro_batch_size_per_gpu=global_batch // world,
              gradient_accumulation_steps=1, gradient_clipping=float(grad_clip))
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    if precision in ("bf16", "fp16"):
        # DeepSpeed casts parameters only; BatchNorm's running statistics would stay fp32 next to its
        # half-precision weight, and batch_norm refuses the mix: cast buffers with the parameters
        ds.setdefault("data_types", {}).setdefault("buffer_dtype", precision)
    ds.setdefault("steps_per_print", 10 ** 9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


def rng_state() -> dict:
    """This process's RNG states as tensors and ints only (loadable with weights_only=True)."""
    py = random.getstate()
    np_st = np.random.get_state()
    st = {"python": [py[0], list(py[1]), py[2]],
          "numpy": [np_st[0], torch.from_numpy(np_st[1].astype(np.int64)), *np_st[2:]],
          "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state()           # this rank's own device, however GPUs are bound
    return st


def set_rng_state(st: dict) -> None:
    version, internal, gauss = st["python"]
    random.setstate((version, tuple(internal), gauss))
    name, keys, *rest = st["numpy"]
    np.random.set_state((name, keys.numpy().astype(np.uint32), *rest))
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available() and torch.is_tensor(st["cuda"]):
        torch.cuda.set_rng_state(st["cuda"])


def _safe_globals() -> list:
    """The DeepSpeed classes its checkpoints hold, allowed through torch's weights-only unpickler;
    anything else in a checkpoint is refused rather than executed."""
    from deepspeed.runtime.fp16.loss_scaler import DynamicLossScaler, LossScaler
    from deepspeed.runtime.zero.config import ZeroStageEnum
    from deepspeed.utils.tensor_fragment import fragment_address
    return [ZeroStageEnum, LossScaler, DynamicLossScaler, fragment_address]


def safe_load(path: str | os.PathLike, map_location="cpu"):
    """torch.load with weights_only=True (plus DeepSpeed's own state classes): no arbitrary code."""
    import pickle
    with torch.serialization.safe_globals(_safe_globals()):
        try:
            return torch.load(path, map_location=map_location, weights_only=True)
        except pickle.UnpicklingError as e:
            import re
            what = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
            raise RuntimeError(f"{path}: refused to unpickle it: it holds {what.group(1) if what else 'an object'}, "
                               f"outside the allow-list in sclslt/train/engine.py (_safe_globals); add the class there "
                               f"only if you trust the file") from e


class Engine:
    """A DeepSpeed engine around one model and one optimizer/LR schedule."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, lr_lambda,
                 eps: float = 1e-8, load_universal: bool = False):
        """`load_universal`: the checkpoint to resume was written at another world size; it is read
        from its universal form (see `to_universal`), which DeepSpeed re-partitions for this world."""
        import deepspeed
        if load_universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload in ("cpu", "nvme"):      # the optimizer steps on the host: DeepSpeed's vectorised CPU AdamW
            from deepspeed.ops.adam import DeepSpeedCPUAdam
            optimizer = DeepSpeedCPUAdam(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=eps,
                                         adamw_mode=True)
        else:
            optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        # every file DeepSpeed reads back goes through the weights-only unpickler
        self.ds.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.universal = load_universal

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def eval_module(self, build) -> torch.nn.Module:
        """The model for decoding and embedding passes. Under ZeRO-3 each forward all-gathers the
        partitioned parameters, so ranks running different numbers of forwards (uneven evaluation
        slices, beam searches ending at different lengths) would fall out of step: there every rank
        gets a plain copy, built by `build()` and filled from the gathered parameters."""
        if not self.ds.zero_optimization_partition_weights():
            return self.module
        import deepspeed
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            state = {k: v.detach().clone() for k, v in self.module.state_dict().items()}
        plain = build()
        plain.load_state_dict(state, strict=True)
        return plain.to(self.device)

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, ckpt_dir: str | os.PathLike, tag: str, client_state: dict, keep: int = 0,
             protect: set = frozenset()) -> None:
        """Write `<tag>.partial`, then publish: rename to `<tag>` and point `latest` at it (rank 0,
        after every rank has written). A crash at any point leaves the previous checkpoint as `latest`.
        Rotation keeps the newest `keep` step tags and the tags in `protect` (the selected one)."""
        ckpt_dir = Path(ckpt_dir)
        partial = ckpt_dir / f"{tag}.partial"
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)                    # debris of an earlier crash
        torch.distributed.barrier()
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
        self.ds.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            meta = {"tag": tag, "world": self.world, "zero_stage": self.ds.zero_optimization_stage(),
                    **{k: v for k, v in client_state.get("sclslt", {}).items() if k != "config"}}
            (partial / "sclslt.json").write_text(json.dumps(meta, indent=1))
            publish(ckpt_dir, tag)
            if keep > 0:
                # rotation applies to step tags (zero-padded: sortable); epoch tags of reference runs stay
                tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step")
                              and not p.name.endswith(".partial"))
                for old in tags[:-keep]:
                    if old.name != tag and old.name not in protect:
                        shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, ckpt_dir: str | os.PathLike) -> dict | None:
        """Load the latest checkpoint under `ckpt_dir`; returns its client state, or None if none.
        RNG states are restored only at the world size they were saved at."""
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        load_dir = Path(ckpt_dir) / "universal" if self.universal else Path(ckpt_dir)
        path, client = self.ds.load_checkpoint(str(load_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {load_dir}/{tag}")
        rng = Path(ckpt_dir) / tag / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file() and not self.universal:
            set_rng_state(safe_load(rng))
        return client


def publish(ckpt_dir: Path, tag: str) -> None:
    """`<tag>.partial` -> `<tag>`, then `latest` (written to a temporary file and renamed)."""
    final, partial = ckpt_dir / tag, ckpt_dir / f"{tag}.partial"
    if final.exists():                                # the same tag again (a resumed run re-saving it)
        stale = ckpt_dir / f"{tag}.stale"
        shutil.rmtree(stale, ignore_errors=True)
        os.replace(final, stale)
        os.replace(partial, final)
        shutil.rmtree(stale, ignore_errors=True)
    else:
        os.replace(partial, final)
    write_text(ckpt_dir / "latest", tag)


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    f = Path(ckpt_dir) / "latest"
    if not f.is_file():
        return None
    tag = f.read_text().strip()
    final, stale = Path(ckpt_dir) / tag, Path(ckpt_dir) / f"{tag}.stale"
    if not final.is_dir() and stale.is_dir():         # a crash while re-publishing the same tag: the old one
        try:
            os.replace(stale, final)
        except FileNotFoundError:                     # another rank recovered it first
            pass
    return tag


def checkpoint_meta(ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict | None:
    """The small JSON record of a published checkpoint (step, epoch, data position, world, ZeRO stage)."""
    tag = tag or latest_tag(ckpt_dir)
    f = Path(ckpt_dir) / str(tag) / "sclslt.json"
    return json.loads(f.read_text()) if tag and f.is_file() else None


def to_universal(ckpt_dir: str | os.PathLike, tag: str) -> Path:
    """Convert checkpoint `tag` to DeepSpeed's universal format (once; under `<ckpt_dir>/universal/<tag>`),
    from which a job of any world size can resume. Run on one rank; the others wait at a barrier."""
    import subprocess
    import sys
    out = Path(ckpt_dir) / "universal" / tag
    if (out / "zero").is_dir():                       # conversions are renamed into place only when complete
        return out
    tmp = out.with_name(tag + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.parent.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run([sys.executable, "-m", "deepspeed.checkpoint.ds_to_universal", "--input_folder",
                           str(Path(ckpt_dir) / tag), "--output_folder", str(tmp), "--num_extract_workers", "1",
                           "--num_merge_workers", "1", "--inject_missing_state"],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"converting {Path(ckpt_dir) / tag} to a universal checkpoint failed:\n"
                           f"{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    return out


MODEL_FILES = ("mp_rank_00_model_states.pt", "zero_pp_rank_0_mp_rank_00_model_states.pt")   # ZeRO-1/2, ZeRO-3


def load_module_state(ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """The full fp32 module state dict of a checkpoint (any ZeRO stage), for stage transfer/inference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir} (no 'latest' file)")
    d = Path(ckpt_dir) / tag
    files = [d / f for f in MODEL_FILES]
    model_file = next((f for f in files if f.is_file()), None)
    if model_file is None:
        raise FileNotFoundError(f"checkpoint {d} has no model states file (looked for {[f.name for f in files]})")
    states = safe_load(model_file)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    half = any(v.is_floating_point() and v.dtype != torch.float32 for v in states["module"].values())
    if zero_stage == 3 or (half and zero_stage > 0):
        # ZeRO-3: parameters live partitioned in the optimizer states; bf16/fp16 training: the module file
        # holds rounded weights and the fp32 masters are in the optimizer states. Consolidate those.
        return {k: v.detach() for k, v in get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag).items()}
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
