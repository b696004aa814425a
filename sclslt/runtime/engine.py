"""The DeepSpeed engine: its config from the experiment's, and the one object the loop trains through.

Everything DeepSpeed-specific stays behind `Engine` (and, on this floor, `distributed` and
`checkpoints`: no module above `sclslt.runtime` imports deepspeed), so the training loop reads the
same for both stages and a future engine change touches this floor only.

Config ownership: the DeepSpeed JSON holds engine matters (ZeRO stage, communication); this module
writes in what the experiment config owns (batch sizes from `stageN.global_batch`, gradient
clipping from `train.grad_clip` - DeepSpeed would otherwise clip at 1.0 silently - and precision:
bf16 on GPUs, fp32 on CPU unless `train.precision` says otherwise). A JSON that sets a batch size
is an error rather than a silent conflict. `Engine.save` writes and publishes one checkpoint
(`checkpoints`); the checkpointer decides when and what is kept.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from types import SimpleNamespace

import torch

from sclslt.runtime.checkpoints import latest_tag, publish, rng_state, safe_load, set_rng_state, write_checksums

_BATCH_KEYS = ("train_batch_size", "train_micro_batch_size_per_gpu", "gradient_accumulation_steps")


def resolve_precision(precision: str, device: torch.device) -> str:
    if precision != "auto":
        return precision
    return "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"


def build_ds_config(
    path: str | os.PathLike, global_batch: int, world: int, grad_clip: float, precision: str, micro_batch: int = 0
) -> dict:
    """DeepSpeed's config: the JSON's engine matters, plus batch sizes (`micro_batch` clips a rank at once,
    0: its whole share; accumulation over the share's micro-batches), clipping and precision."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"DeepSpeed config {p} does not exist (see configs/zero*.json)")
    ds = json.loads(p.read_text())
    clash = [k for k in _BATCH_KEYS if k in ds]
    if clash:
        raise ValueError(
            f"{p} sets {clash}: batch sizes come from the experiment config "
            f"(stage1.global_batch / stage2.global_batch); remove them from the JSON"
        )
    if global_batch % world:
        raise ValueError(
            f"global batch {global_batch} is not divisible by the world size {world}: "
            f"set stageN.global_batch to a multiple of {world}"
        )
    m = micro_batch or global_batch // world
    ds.update(
        train_batch_size=global_batch,
        train_micro_batch_size_per_gpu=m,
        gradient_accumulation_steps=global_batch // (world * m),
        gradient_clipping=float(grad_clip),
    )
    ds["bf16"] = {"enabled": precision == "bf16"}
    ds["fp16"] = {"enabled": precision == "fp16"}
    # buffers stay fp32 (DeepSpeed casts parameters only): BatchNorm's running statistics, whose 0.1-momentum
    # update would vanish below half a bf16 step (sclslt.model.batchnorm handles the mixed dtypes)
    if precision == "bf16" and m < global_batch // world and ds.get("zero_optimization", {}).get("stage", 0) >= 1:
        # micro-batches' gradients summed in bf16 would lose what the unchunked step keeps: fp32 accumulation
        ds.setdefault("data_types", {}).setdefault("grad_accum_dtype", "fp32")
    ds.setdefault("steps_per_print", 10**9)
    ds.setdefault("wall_clock_breakdown", False)
    return ds


def _on_gpu() -> bool:
    """A CUDA device was bound (`distributed.bind_gpu`); False on CPU ranks."""
    return torch.cuda.is_available() and torch.cuda.is_initialized()


def param_groups(model: torch.nn.Module, weight_decay: float) -> list[dict]:
    """AdamW groups: no decay on biases, norms and the logit scale."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
    return [{"params": decay, "weight_decay": weight_decay}, {"params": no_decay, "weight_decay": 0.0}]


class Engine:
    """A DeepSpeed engine around one model and one optimizer/LR schedule."""

    def __init__(
        self,
        model: torch.nn.Module,
        ds_config: dict,
        lr: float,
        weight_decay: float,
        lr_lambda,
        eps: float = 1e-8,
        load_universal: bool = False,
    ):
        """`load_universal`: the checkpoint to resume was written at another world size; it is read
        from its universal form (see `to_universal`), which DeepSpeed re-partitions for this world."""
        import deepspeed

        if load_universal:
            ds_config = {**ds_config, "checkpoint": {**ds_config.get("checkpoint", {}), "load_universal": True}}
        offload = ds_config.get("zero_optimization", {}).get("offload_optimizer", {}).get("device", "none")
        if offload in ("cpu", "nvme"):  # the optimizer steps on the host: DeepSpeed's vectorised CPU AdamW
            from deepspeed.ops.adam import DeepSpeedCPUAdam

            optimizer = DeepSpeedCPUAdam(
                param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=eps, adamw_mode=True
            )
        else:
            optimizer = torch.optim.AdamW(param_groups(model, weight_decay), lr=lr, betas=(0.9, 0.999), eps=eps)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_lambda)
        # on a GPU, the device init_distributed bound (DeepSpeed's engine would bind LOCAL_RANK's)
        args = SimpleNamespace(device_rank=torch.cuda.current_device()) if _on_gpu() else None
        self.ds, self.optimizer, _, self.scheduler = deepspeed.initialize(
            args=args, model=model, optimizer=optimizer, lr_scheduler=scheduler, config=ds_config
        )
        # every file DeepSpeed reads back goes through the weights-only unpickler
        self.ds.checkpoint_engine.load = lambda path, map_location=None: safe_load(path, map_location)
        self.rank = torch.distributed.get_rank()
        self.world = torch.distributed.get_world_size()
        self.universal = load_universal
        self._eval_copy = None  # ZeRO-3's plain model for evaluation (`eval_module`)

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
        gets a plain copy, built by `build()` once a run and refilled from the gathered parameters at each
        call, its parameters in the training precision (bf16 decodes in bf16; BatchNorm's running statistics
        stay fp32); `park_eval_copy` moves it off the device while training runs."""
        if not self.ds.zero_optimization_partition_weights():
            return self.module
        import deepspeed

        if self._eval_copy is None:
            self._eval_copy = build()
            dtype = next(self.module.parameters()).dtype
            for p in self._eval_copy.parameters():
                p.data = p.data.to(dtype)
        with deepspeed.zero.GatheredParameters(list(self.module.parameters()), modifier_rank=None):
            self._eval_copy.to(self.device).load_state_dict(self.module.state_dict(), strict=True)
        return self._eval_copy

    def park_eval_copy(self) -> None:
        """The ZeRO-3 evaluation copy (if any) to host memory: training does not pay for it on the device."""
        if self._eval_copy is not None:
            self._eval_copy.to("cpu")

    def train(self, mode: bool = True):
        self.ds.train(mode)

    def backward(self, loss: torch.Tensor) -> None:
        """Accumulate the gradient of `loss` (a micro-batch's part of this rank's loss: the parts sum to it,
        so DeepSpeed's division by the accumulation steps is off)."""
        self.ds.backward(loss, scale_wrt_gas=False)

    def step(self) -> None:
        """After each micro-batch's backward: DeepSpeed reduces, and steps the optimizer and the LR schedule
        at the last micro-batch of the global batch only."""
        self.ds.step()

    def lr(self) -> float:
        return float(self.ds.get_lr()[0])

    # -- checkpoints ------------------------------------------------------------------------
    def save(self, ckpt_dir: str | os.PathLike, tag: str, client_state: dict) -> None:
        """Write `<tag>.partial`, then publish: rename to `<tag>` and point `latest` at it (rank 0,
        after every rank has written). A crash at any point leaves the previous checkpoint as `latest`.
        Which tags to write and keep: `sclslt.runtime.checkpointer`."""
        ckpt_dir = Path(ckpt_dir)
        partial = ckpt_dir / f"{tag}.partial"
        if self.rank == 0 and partial.exists():
            shutil.rmtree(partial)  # debris of an earlier crash
        torch.distributed.barrier()
        partial.mkdir(parents=True, exist_ok=True)
        torch.save(rng_state(), partial / f"rng_rank{self.rank:05d}.pt")
        self.ds.save_checkpoint(str(ckpt_dir), tag=partial.name, client_state=client_state, save_latest=False)
        torch.distributed.barrier()
        if self.rank == 0:
            meta = {
                "tag": tag,
                "world": self.world,
                "zero_stage": self.ds.zero_optimization_stage(),
                "checksummed": True,
                **{k: v for k, v in client_state.get("sclslt", {}).items() if k != "config"},
            }
            (partial / "sclslt.json").write_text(json.dumps(meta, indent=1))
        torch.distributed.barrier()
        write_checksums(partial, self.rank, self.world)  # every file as written, before it is published
        if self.rank == 0:
            publish(ckpt_dir, tag)
        torch.distributed.barrier()

    def load(self, ckpt_dir: str | os.PathLike, tag: str | None = None) -> dict | None:
        """Load checkpoint `tag` (the latest if None) under `ckpt_dir`; returns its client state, or None
        if there is none. RNG states are restored only at the world size they were saved at."""
        tag = tag or latest_tag(ckpt_dir)
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
