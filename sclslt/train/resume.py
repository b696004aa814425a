"""Where a stage continues from: whether its checkpoint directory holds a run (and --resume was asked for),
the newest checkpoint whose files match their checksums, and the world size it was written at (converted
to DeepSpeed's universal format by rank 0 when this job's differs)."""

from __future__ import annotations

from pathlib import Path

import torch.distributed as dist

from sclslt.runtime.checkpoints import checkpoint_meta, intact_tag, latest_tag, to_universal
from sclslt.runtime.context import on_rank0
from sclslt.runtime.rundir import RunError


def resume_tag(ckpt_dir: Path, resume: bool, rank: int, world: int) -> str | None:
    """The checkpoint a stage continues from, or None for a fresh stage; checkpoints without --resume are
    an error (a run is never overwritten by accident)."""
    tag = latest_tag(ckpt_dir)
    if tag is not None and not resume:
        raise RunError(
            f"{ckpt_dir} already holds checkpoints: pass --resume to continue this run, "
            f"or choose another --train.run_dir"
        )
    if tag is None:
        return None
    return intact_checkpoint(ckpt_dir, rank, world)


def intact_checkpoint(ckpt_dir: Path, rank: int, world: int) -> str:
    """The newest checkpoint whose files match their checksums (a damaged newer one is passed over)."""
    try:
        return intact_tag(ckpt_dir, rank, world)
    except RuntimeError as e:
        raise RunError(str(e)) from e


def resume_world(ckpt_dir: Path, tag: str, rank: int) -> int:
    """The world size checkpoint `tag` was written at; if it differs from this job's, rank 0 converts
    it to the universal format (the data position is in global batches, so it carries over as is)."""
    meta = checkpoint_meta(ckpt_dir, tag)
    if meta is None:
        raise RunError(f"{ckpt_dir}/{tag} has no sclslt.json: not a complete checkpoint of this trainer")
    world = dist.get_world_size()
    if meta["world"] != world:

        def convert():
            print(
                f"sclslt: {ckpt_dir}/{tag} was written by {meta['world']} ranks, this job has {world}: "
                f"converting it to a universal checkpoint",
                flush=True,
            )
            to_universal(ckpt_dir, tag)

        on_rank0(convert, f"converting {ckpt_dir}/{tag}")
    return int(meta["world"])
