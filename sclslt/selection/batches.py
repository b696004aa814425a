"""Where a stage's global batches come from each epoch: the seeded shuffle (random), or batches planned
by Pair Selection from a reference table (ps) or from embeddings the job takes of itself (self); and
each rank's stream of its slice of them."""

from __future__ import annotations

import json

import torch
import torch.distributed as dist

from sclslt.atomic import write_text
from sclslt.config import Config, StageConfig, eval_batch
from sclslt.data.loader import GlobalStream, epoch_order
from sclslt.data.shards import frame_format, manifest_rows, read_manifest
from sclslt.eval.retrieval import embed_split
from sclslt.runtime.context import Context, stage_seed
from sclslt.runtime.rundir import RunError
from sclslt.selection.planner import Planner
from sclslt.selection.scoring import Table
from sclslt.selection.table import (
    load_snapshot,
    load_table,
    save_snapshot,
    table_from_snapshots,
    table_info,
)


class BatchSource:
    """A stage's global batches, epoch by epoch, and each rank's stream of its slice of them.

    random: `epoch_order` (the shuffle of (seed, epoch)); ps: the Pair Selection plan from a reference
    table; self: the plan from embeddings the job takes of itself (random until it has a late view).
    Global batches are a function of the config and the seed only (sclslt/data/loader.py): a run at any
    world size and worker count, and a resume at another world size, train on the same sequence."""

    def __init__(self, ctx: Context, name: str):
        self.ctx, self.name = ctx, name
        st: StageConfig = getattr(ctx.cfg, name)
        check_world(st, name, ctx.world)
        self.manifest = read_manifest(ctx.shards_dir, "train")  # read once a stage, not once an epoch
        self.keys = [r.key for r in manifest_rows(self.manifest)]
        self.fmt = frame_format(self.manifest)
        if len(self.keys) < st.global_batch:
            raise RunError(
                f"the training split has {len(self.keys)} samples, fewer than one global batch "
                f"({name}.global_batch={st.global_batch}): lower it"
            )
        self.global_batch, self.seed = st.global_batch, stage_seed(ctx.cfg, name)
        self.per_epoch = len(self.keys) // st.global_batch
        sel = ctx.cfg.selection
        self.mode = sel.mode if st.contrastive_weight > 0 else "random"
        self.dir = ctx.run.selection(name)
        self.table = None
        if self.mode == "ps":
            n, dense = table_info(sel.table)
            rows = "dense CiCo-scored, whole on every rank" if dense else f"{sel.table_dtype} rows of each pool"
            ctx.reporter.info(
                f"{name}: Pair Selection from {sel.table} ({n} samples, {rows}), "
                f"schedule {sel.schedule}, {sel.pools} pool(s), chunk {sel.chunk}"
            )
            self.table = load_table(sel.table, ctx.dist.device) if dense else None

    def _self_table(self, epoch: int, model_fn) -> Table | None:
        """self mode: early = embeddings at the stage's start, late = the latest refresh (every
        `selection.self_interval` epochs); saved in the run dir, so a resumed run reuses them."""
        interval = self.ctx.cfg.selection.self_interval
        early = self._snapshot("early", model_fn, compute=epoch == 0)
        late_epoch = (epoch // interval) * interval
        if late_epoch == 0 or early is None:
            return None  # no late view yet: random batches this epoch
        late = self._snapshot(f"epoch{late_epoch:04d}", model_fn, compute=epoch == late_epoch)
        return table_from_snapshots(early, late, self.ctx.dist.device) if late is not None else None

    def _snapshot(self, tag: str, model_fn, compute: bool):
        path = self.dir / f"{tag}.safetensors"
        if path.is_file():
            return load_snapshot(path)
        if not compute:
            return None
        ctx = self.ctx
        emb = embed_split(
            model_fn(),
            ctx.shards_dir,
            "train",
            ctx.tokenizer,
            ctx.dist.device,
            eval_batch(ctx.cfg),
            max_frames=ctx.cfg.data.max_frames,
            decode=ctx.decode,
        )
        if ctx.rank == 0:
            save_snapshot(path, emb)
        dist.barrier()
        return emb

    def epoch_batches(self, epoch: int, model_fn) -> list[list[str]]:
        """The epoch's global batches (sample keys in global order)."""
        ctx, st, sel = self.ctx, getattr(self.ctx.cfg, self.name), self.ctx.cfg.selection
        if self.mode == "ps":
            whole = self.table
            table_for = (
                (lambda keys: whole)
                if whole is not None
                else (
                    lambda keys: load_table(
                        sel.table, ctx.dist.device, keys=keys, dtype=getattr(torch, sel.table_dtype)
                    )
                )
            )
        elif self.mode == "self":
            table = self._self_table(epoch, model_fn)
            table_for = (lambda keys: table) if table is not None else None
        else:
            table_for = None
        if table_for is None:
            return epoch_order(self.keys, self.seed, epoch, self.global_batch)
        planner = Planner(sel, self.global_batch, self.seed)
        batches = planner.plan_epoch(
            self.keys, epoch, st.epochs, table_for, ctx.rank, ctx.world, dist.all_gather_object
        )
        ctx.reporter.info(
            f"{self.name} epoch {epoch}: planned {len(batches)} batches at quantile "
            f"{planner.quantile(epoch, st.epochs):.3f} ({planner.stats.relaxed} duplicate sentences "
            f"admitted"
            + (
                f"; close pairs at s_early >= {planner.close[0]:.4f} and s_late >= "
                f"{planner.close[1]:.4f} kept apart, {planner.stats.close_relaxed} admitted"
                if planner.close
                else ""
            )
            + ")"
        )
        if ctx.rank == 0:  # the plan, for analysis and the tests
            self.dir.mkdir(parents=True, exist_ok=True)
            write_text(self.dir / f"plan_e{epoch:04d}.json", json.dumps(batches))
        return batches

    def stream(self, batches: list[list[str]], epoch: int, skip: int) -> GlobalStream:
        ctx = self.ctx
        return global_stream(
            ctx.cfg, ctx.shards_dir, batches, ctx.rank, ctx.world, self.seed, epoch, skip, ctx.decode, self.manifest
        )


def check_world(st: StageConfig, name: str, world: int) -> None:
    if st.global_batch % world:
        raise RunError(
            f"{name}.global_batch={st.global_batch} is not divisible by world size {world}: "
            f"use a world size that divides it (the global batch never changes with the GPU count)"
        )


def train_keys(shards_dir) -> list[str]:
    """The training split's sample keys in manifest order."""
    return [r.key for r in manifest_rows(read_manifest(shards_dir, "train"))]


def global_stream(
    cfg: Config,
    shards_dir,
    batches: list[list[str]],
    rank: int,
    world: int,
    seed: int,
    epoch: int,
    skip: int = 0,
    decode: str = "cpu",
    manifest: dict | None = None,
) -> GlobalStream:
    """One rank's training stream over an epoch's global batches (the tests rebuild batches through this)."""
    d = cfg.data
    return GlobalStream(
        shards_dir,
        "train",
        batches,
        rank=rank,
        world=world,
        seed=seed,
        epoch=epoch,
        skip=skip,
        max_frames=d.max_frames,
        decode=decode,
        read_threads=d.read_threads,
        max_bad_fraction=d.max_bad_fraction,
        manifest=manifest,
    )


def random_batches(cfg: Config, name: str, shards_dir, epoch: int) -> list[list[str]]:
    """Random mode's global batches of a stage's epoch (what `BatchSource` trains on without a plan)."""
    return epoch_order(train_keys(shards_dir), stage_seed(cfg, name), epoch, getattr(cfg, name).global_batch)
