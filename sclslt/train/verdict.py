"""Every rank's word on a training step: whether its loss is finite everywhere and whether some rank was
asked to stop, from one small all-reduce; and the guard that skips non-finite steps and stops a run that
keeps making them. All ranks skip or stop together, so none waits in a collective the others left.
"""

from __future__ import annotations

import math
from pathlib import Path

import torch

from sclslt.model.losses import all_reduce_sum
from sclslt.runtime.checkpoints import latest_tag
from sclslt.runtime.context import RunError
from sclslt.runtime.signals import PREEMPT


class NonFiniteGuard:
    """A step whose loss is not finite on some rank is skipped by all ranks and counted; after
    `limit` in a row the run stops with an error (the last checkpoint stays as it was)."""

    def __init__(self, limit: int, ckpt_dir: Path):
        self.limit, self.ckpt_dir, self.in_a_row, self.skipped = limit, ckpt_dir, 0, 0

    def check(self, finite: bool, step: int, stage: str) -> bool:
        if finite:
            self.in_a_row = 0
            return True
        self.in_a_row += 1
        self.skipped += 1
        print(
            f"sclslt: {stage}: non-finite loss after step {step}: update skipped "
            f"({self.in_a_row} in a row, {self.skipped} in this run)",
            flush=True,
        )
        if self.in_a_row >= self.limit:
            raise RunError(
                f"{stage}: {self.in_a_row} non-finite losses in a row after step {step} "
                f"(train.max_nonfinite={self.limit}); the last good checkpoint is in {self.ckpt_dir} "
                f"({latest_tag(self.ckpt_dir)}); lower the learning rate or check the data"
            )
        return False


def verdict(loss: torch.Tensor, parts: dict, world: int) -> tuple[dict, bool, bool]:
    """Every rank's word on this step, from one small all-reduce and the step's one device read: the global
    loss and its parts (for the log), whether all are finite (else every rank skips the step), and whether
    some rank was asked to stop (a preemption signal)."""
    flag = torch.tensor([float(PREEMPT.is_set())], device=loss.device)
    summed = all_reduce_sum(torch.cat([torch.stack([loss.detach(), *parts.values()]).float(), flag])).tolist()
    logged = {k: v / world for k, v in zip(["loss", *parts], summed[:-1])}
    return logged, all(math.isfinite(v) for v in logged.values()), summed[-1] > 0
