"""The only module that imports deepspeed: distributed init, engine construction, step, checkpoints.

Everything DeepSpeed-specific stays behind `Engine`, so the training loop reads the same for both
stages and a future engine change touches one file.

Config ownership: the DeepSpeed JSON holds engine matters (ZeRO stage, communication); this module
writes in what the experiment config owns (batch sizes from `stageN.global_batch`, gradient
clipping from `train.grad_clip` - DeepSpeed would otherwise clip at 1.0 silently - and precision:
bf16 on GPUs, fp32 on CPU unless `train.precision` says otherwise). A JSON that sets a batch size
is an error rather than a silent conflict.

Checkpoints are DeepSpeed's (ZeRO shards + module) plus our client state; DeepSpeed writes the
`latest` pointer only after a complete save, so an interrupted save leaves the previous one loadable.
Each rank also stores its RNG states next to its shard.
"""
from __future__ import annotations

import json
import os
import random
import shutil
from pathlib import Path

import numpy as np
import torch

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def setup_accelerator() -> str:
    """Pick DeepSpeed's accelerator before deepspeed is imported: cpu when there is no GPU."""
    if not os.environ.get("DS_ACCELERATOR") and not torch.cuda.is_available():
        os.environ["DS_ACCELERATOR"] = "cpu"
    return os.environ.get("DS_ACCELERATOR", "cuda")


def init_distributed(timeout_s: int = 1800) -> dict:
    """Initialise torch.distributed through DeepSpeed (launcher env, MPI or a lone process)."""
    from datetime import timedelta
    setup_accelerator()
    launched = "RANK" in os.environ or "OMPI_COMM_WORLD_SIZE" in os.environ or "PMI_SIZE" in os.environ
    if not launched:   # plain `python launch/train.py`: a world of one
        os.environ.update(RANK="0", LOCAL_RANK="0", WORLD_SIZE="1", LOCAL_SIZE="1")
        os.environ.setdefault("MASTER_ADDR", "127.0.0.1")
        os.environ.setdefault("MASTER_PORT", str(29500 + os.getpid() % 1000))
    import deepspeed
    from deepspeed.accelerator import get_accelerator
    acc = get_accelerator()
    deepspeed.init_distributed(dist_backend=acc.communication_backend_name(), timeout=timedelta(seconds=timeout_s))
    rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    if acc.device_name() == "cuda":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    else:
        device = torch.device("cpu")
    return {"rank": rank, "world": world, "local_rank": local_rank, "device": device,
            "accelerator": acc.device_name()}


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
    st = {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available():
        st["cuda"] = torch.cuda.get_rng_state_all()
    return st


def set_rng_state(st: dict) -> None:
    random.setstate(st["python"])
    np.random.set_state(st["numpy"])
    torch.set_rng_state(st["torch"])
    if "cuda" in st and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(st["cuda"])


class Engine:
    """A DeepSpeed engine around one model and one optimizer/LR schedule."""

    def __init__(self, model: torch.nn.Module, ds_config: dict, lr: float, weight_decay: float, lr_lambda,
                 eps: float = 1e-8):
        import deepspeed
        optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config)
        self.rank = torch.distributed.get_rank()

    @property
    def module(self) -> torch.nn.Module:
        return self.ds.module

    @property
    def device(self) -> torch.device:
        return self.ds.device

    def __call__(self, *args, **kwargs):
        return self.ds(*args, **kwargs)

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        self.ds.backward(loss)

    def step(self) -> None:
        self.ds.step()

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, ckpt_dir: str | os.PathLike, tag: str, client_state: dict, keep: int = 0) -> None:
        ckpt_dir = Path(ckpt_dir)
        (ckpt_dir / tag).mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), ckpt_dir / tag / f"rng_rank{self.rank:05d}.pt")
        self.ds.save_checkpoint(str(ckpt_dir), tag=tag, client_state=client_state)
        torch.distributed.barrier()
        if self.rank == 0 and keep > 0:
            # rotation applies to step tags (zero-padded: sortable); epoch tags of reference runs stay
            tags = sorted(p for p in ckpt_dir.iterdir() if p.is_dir() and p.name.startswith("step"))
            for old in tags[:-keep]:
                if old.name != tag:
                    shutil.rmtree(old, ignore_errors=True)
        torch.distributed.barrier()

    def load(self, ckpt_dir: str | os.PathLike) -> dict | None:
        """Load the latest checkpoint under `ckpt_dir`; returns its client state, or None if none."""
        tag = latest_tag(ckpt_dir)
        if tag is None:
            return None
        path, client = self.ds.load_checkpoint(str(ckpt_dir), tag=tag)
        if path is None:
            raise RuntimeError(f"DeepSpeed could not load checkpoint {ckpt_dir}/{tag}")
        rng = Path(ckpt_dir) / tag / f"rng_rank{self.rank:05d}.pt"
        if rng.is_file():
            set_rng_state(torch.load(rng, weights_only=False))
        return client


def latest_tag(ckpt_dir: str | os.PathLike) -> str | None:
    f = Path(ckpt_dir) / "latest"
    return f.read_text().strip() if f.is_file() else None


def load_module_state(ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict:
    """The full fp32 module state dict of a checkpoint (any ZeRO stage), for stage transfer/inference."""
    from deepspeed.utils.zero_to_fp32 import get_fp32_state_dict_from_zero_checkpoint
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise FileNotFoundError(f"no checkpoint under {ckpt_dir} (no 'latest' file)")
    d = Path(ckpt_dir) / tag
    files = [d / "mp_rank_00_model_states.pt", d / "zero_pp_rank_0_mp_rank_00_model_states.pt"]
    model_file = next((f for f in files if f.is_file()), None)
    if model_file is None:
        raise FileNotFoundError(f"checkpoint {d} has no model states file (looked for {[f.name for f in files]})")
    states = torch.load(model_file, map_location="cpu", weights_only=False)
    zero_stage = int(states.get("ds_config", {}).get("zero_optimization", {}).get("stage", 0))
    if zero_stage == 3:     # parameters live partitioned in the optimizer states: consolidate them
        return get_fp32_state_dict_from_zero_checkpoint(str(ckpt_dir), tag=tag)
    return {k: v.float() if v.is_floating_point() else v for k, v in states["module"].items()}
