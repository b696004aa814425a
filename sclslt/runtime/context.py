"""What every part of a run shares: the stage names, the run's context (config, distributed facts,
directories, tokenizer, reporter), its preemption error, and the rank-0 helper. `RunError` (the run cannot
go on) lives with the run directory below it (`sclslt.runtime.rundir`), whose reading raises it too."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch.distributed as dist

from sclslt.config import Config
from sclslt.runtime.distributed import DistInfo
from sclslt.runtime.rundir import RunDir, RunError
from sclslt.runtime.ui import Reporter

STAGES = ("stage1", "stage2")


class Preempted(RunError):
    """SIGTERM/SIGUSR1 (a scheduler's warning): checkpointed at a step boundary; resume with --resume."""


@dataclass
class Context:
    cfg: Config
    ds_config_path: str
    dist: DistInfo
    run_dir: Path
    shards_dir: Path | str  # a local directory or a remote prefix (data/storage.py)
    tokenizer: object
    reporter: Reporter

    @property
    def run(self) -> RunDir:
        """The run directory's paths."""
        return RunDir(self.run_dir)

    @property
    def rank(self) -> int:
        return self.dist.rank

    @property
    def world(self) -> int:
        return self.dist.world

    @property
    def decode(self) -> str:
        """Where `jpg` frames are decoded: "cpu" (loader workers) or "device" (`data.devdecode`)."""
        from sclslt.data.devdecode import resolve

        return resolve(self.cfg.data.decode, self.dist.device)


def enabled_stages(cfg: Config) -> list[str]:
    return [s for s in STAGES if getattr(cfg, s).enabled and getattr(cfg, s).epochs > 0]


def stage_seed(cfg: Config, name: str) -> int:
    return cfg.train.seed * 1000 + STAGES.index(name)


def on_rank0(work, what: str) -> None:
    """Run `work` on rank 0 while the others wait; a failure there stops every rank with its message
    (instead of leaving them in a barrier until the collective timeout)."""
    error, exc = None, None
    if dist.get_rank() == 0:
        try:
            work()
        except Exception as e:  # noqa: BLE001 - re-raised on every rank below
            error, exc = f"{type(e).__name__}: {e}", e
    box = [error]
    dist.broadcast_object_list(box, src=0)
    if box[0] is not None:
        raise RunError(f"{what} failed on rank 0: {box[0]}") from exc
