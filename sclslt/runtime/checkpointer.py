"""The checkpoint policy of a stage, in one place: when it saves, what a checkpoint is called, what is kept.

The engine writes and loads (`Engine.save`, `Engine.load`, `checkpoints`); the stage reports its
boundaries to `Checkpointer.at` and nothing else decides:

- `start`  the stage's first step is about to run: `epoch0000` when `checkpoint.every_epochs` (the
           reference run's early view)
- `epoch`  an epoch ended: `epochNNNN` every `checkpoint.every_epochs` epochs
- `step`   an optimizer step ended: a step checkpoint every `checkpoint.every_steps` steps, not at the last
- `best`   the dev score improved: a step checkpoint now, protected from rotation while it is the best
- `stop`   a preemption signal: a step checkpoint before the job exits
- `end`    the stage is complete: a step checkpoint, unless this very state is published already

Names: `stepNNNNNNNN` (zero-padded: sortable) and `epochNNNN` (`step_tag`, `epoch_tag`). Retention keeps
the newest `checkpoint.keep` step checkpoints, the protected ones (the selected best) and every epoch
checkpoint (reference runs read them). A new retention rule is a change to `retained` alone.
"""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Callable

from sclslt.runtime.checkpoints import checkpoint_meta

EVENTS = ("start", "epoch", "step", "best", "stop", "end")


def step_tag(step: int) -> str:
    return f"step{step:08d}"


def epoch_tag(epoch: int) -> str:
    return f"epoch{epoch:04d}"


def retained(tags: list[str], keep: int, protect: set[str], newest: str) -> set[str]:
    """Which of a stage's published tags survive a save of `newest`: every non-step tag, the newest `keep`
    step tags (all when `keep` is 0), `newest` itself and `protect`."""
    steps = sorted(t for t in tags if t.startswith("step"))
    kept = set(steps[-keep:] if keep > 0 else steps)
    return {t for t in tags if not t.startswith("step")} | kept | ({newest} | set(protect)) & set(tags)


class Checkpointer:
    """Decides a stage's saves (see the module docstring) and has the engine write them.

    `record()` is the client record of the state to save (stage, position, world, dev selection): a
    save whose record equals the newest published one's is skipped. `protect()` names the tags that
    rotation must keep. `config` travels in every checkpoint."""

    def __init__(
        self,
        engine,
        ckpt_dir: Path,
        every_steps: int,
        every_epochs: int,
        keep: int,
        record: Callable[[], dict],
        protect: Callable[[], set],
        config: dict,
    ):
        self.engine, self.dir = engine, Path(ckpt_dir)
        self.every_steps, self.every_epochs, self.keep = every_steps, every_epochs, keep
        self.record, self.protect, self.config = record, protect, config

    def at(self, event: str, step: int, epoch: int = 0, total: int = 0) -> str | None:
        """The stage reached boundary `event` at (`step`, `epoch`) of `total` steps; the tag saved, if any."""
        if event not in EVENTS:
            raise ValueError(f"checkpoint boundary {event!r}: one of {EVENTS}")
        if event == "start":
            return self.save(epoch_tag(0)) if self.every_epochs and step == 0 else None
        if event == "epoch":
            return self.save(epoch_tag(epoch)) if self.every_epochs and epoch % self.every_epochs == 0 else None
        if event == "step":
            due = self.every_steps and step % self.every_steps == 0 and step < total
            return self.save(step_tag(step), dedupe=True) if due else None
        return self.save(step_tag(step), dedupe=True)

    def save(self, tag: str, dedupe: bool = False) -> str | None:
        """Have the engine write `tag`; `dedupe`: skip it when the newest published state is this one."""
        record = self.record()
        meta = checkpoint_meta(self.dir)
        if dedupe and meta is not None and all(meta.get(k) == v for k, v in record.items()):
            return None  # this very state is published already (e.g. the new best at the end)
        self.engine.save(self.dir, tag, {"sclslt": {**record, "config": self.config}})
        if self.engine.rank == 0:
            self.prune(tag)
        return tag

    def prune(self, newest: str) -> None:
        """Remove the published tags `retained` does not keep (rank 0, after a save)."""
        tags = [
            p.name
            for p in self.dir.iterdir()
            if p.is_dir() and not p.name.endswith((".partial", ".stale")) and p.name != "universal"
        ]
        keep = retained(tags, self.keep, self.protect(), newest)
        for t in tags:
            if t not in keep:
                shutil.rmtree(self.dir / t, ignore_errors=True)
