"""Where a stage's micro-batches come from each epoch: the shuffled stream (random), or batches planned
by Pair Selection from a reference table (ps) or from embeddings the job takes of itself (self)."""
from __future__ import annotations

import json
from pathlib import Path

import torch
import torch.distributed as dist

from sclslt.config import Config, StageConfig
from sclslt.data.loader import PlannedStream, ShardStream, rank_pool_keys, rng_seed
from sclslt.eval.retrieval import embed_split
from sclslt.selection.planner import (
    Planner,
    Table,
    load_snapshot,
    load_table,
    save_snapshot,
    table_info,
    table_from_snapshots,
)
from sclslt.train.context import Context, RunError, stage_seed


class BatchSource:
    """Where a stage's micro-batches come from each epoch: streamed in shuffled order (random), or
    planned by Pair Selection (ps: a reference table; self: embeddings the job takes of itself)."""

    def __init__(self, ctx: Context, name: str, stream: ShardStream):
        self.ctx, self.name, self.stream = ctx, name, stream
        st: StageConfig = getattr(ctx.cfg, name)
        sel = ctx.cfg.selection
        self.mode = sel.mode if st.contrastive_weight > 0 else "random"
        self.dir = ctx.run_dir / name / "selection"
        self.planner, self.table = None, None
        if self.mode == "ps":
            n, dense = table_info(sel.table)
            rows = "dense CiCo-scored, whole on every rank" if dense else f"{sel.table_dtype} rows of each rank's pool"
            ctx.reporter.info(f"{name}: Pair Selection from {sel.table} ({n} samples, {rows}), "
                              f"schedule {sel.schedule}, chunk {sel.chunk}")
            self.table = load_table(sel.table, ctx.dist.device) if dense else None

    def _planner(self, table: Table) -> Planner:
        cfg, st = self.ctx.cfg, getattr(self.ctx.cfg, self.name)
        return Planner(cfg.selection, table, st.global_batch // self.ctx.world, self.ctx.world,
                       stage_seed(cfg, self.name))

    def _self_table(self, epoch: int, model_fn) -> Table | None:
        """self mode: early = embeddings at the stage's start, late = the latest refresh (every
        `selection.self_interval` epochs); saved in the run dir, so a resumed run reuses them."""
        interval = self.ctx.cfg.selection.self_interval
        early = self._snapshot("early", model_fn, compute=epoch == 0)
        late_epoch = (epoch // interval) * interval
        if late_epoch == 0 or early is None:
            return None                               # no late view yet: random batches this epoch
        late = self._snapshot(f"epoch{late_epoch:04d}", model_fn, compute=epoch == late_epoch)
        return table_from_snapshots(early, late, self.ctx.dist.device) if late is not None else None

    def _snapshot(self, tag: str, model_fn, compute: bool):
        path = self.dir / f"{tag}.safetensors"
        if path.is_file():
            return load_snapshot(path)
        if not compute:
            return None
        ctx = self.ctx
        emb = embed_split(model_fn(), ctx.shards_dir, "train", ctx.tokenizer, ctx.dist.device,
                          ctx.cfg.eval.batch_size, max_frames=ctx.cfg.data.max_frames, decode=ctx.decode)
        if ctx.rank == 0:
            save_snapshot(path, emb)
        dist.barrier()
        return emb

    def epoch_stream(self, epoch: int, skip: int, model_fn):
        ctx, st = self.ctx, getattr(self.ctx.cfg, self.name)
        keys = rank_pool_keys(self.stream.manifest, self.stream.seed, epoch, ctx.rank, ctx.world)
        if self.mode == "ps":      # this rank's pool only (the planner never reads another rank's rows)
            table = self.table or load_table(ctx.cfg.selection.table, ctx.dist.device, keys=keys,
                                             dtype=getattr(torch, ctx.cfg.selection.table_dtype))
        else:
            table = self._self_table(epoch, model_fn) if self.mode == "self" else None
        if table is None:
            self.stream.set_epoch(epoch, skip=skip)
            return self.stream
        planner = self._planner(table)
        plan = planner.plan_epoch(table.rows(keys), ctx.rank, epoch, st.epochs, len(self.stream),
                                  dist.all_gather_object)
        ctx.reporter.info(f"{self.name} epoch {epoch}: planned {len(plan)} batches at quantile "
                          f"{planner.quantile(epoch, st.epochs):.3f} ({planner.stats.rejected} re-picks, "
                          f"{planner.stats.relaxed} duplicate sentences admitted)")
        batches = [[table.keys[r] for r in mb] for mb in plan]
        self.dir.mkdir(parents=True, exist_ok=True)      # the plan, for analysis and the tests
        (self.dir / f"plan_e{epoch:04d}_r{ctx.rank:05d}.json").write_text(json.dumps(batches))
        return PlannedStream(ctx.shards_dir, "train", batches, skip, ctx.cfg.data.max_frames,
                             seed=rng_seed(self.stream.seed, epoch), decode=ctx.decode)


def train_stream(cfg: Config, name: str, shards_dir: Path, rank: int, world: int,
                 decode: str = "cpu") -> ShardStream:
    """The training micro-batches of one rank for a stage (the tests rebuild them through this)."""
    st: StageConfig = getattr(cfg, name)
    if st.global_batch % world:
        raise RunError(f"{name}.global_batch={st.global_batch} is not divisible by world size {world}")
    return ShardStream(shards_dir, "train", st.global_batch // world, rank=rank, world=world, train=True,
                       seed=stage_seed(cfg, name), shuffle_buffer=cfg.data.shuffle_buffer,
                       max_frames=cfg.data.max_frames, max_bad_fraction=cfg.data.max_bad_fraction,
                       decode=decode)

