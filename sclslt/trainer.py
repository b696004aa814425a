"""One training loop for both stages, and the run that chains them: stage 1 -> stage 2 -> evaluation.

A stage is data (a `ShardStream`), an `Engine`, and a `StageConfig` saying which losses count:
stage 1 = symmetric InfoNCE over gathered negatives + joint translation CE, stage 2 = translation
only. The loop itself does not change between stages.

Run directory layout:
  config.yaml                resolved config (also inside every checkpoint)
  tokenizer/                 the tokenizer the run trained or loaded
  stage1/checkpoints/<tag>   DeepSpeed checkpoints (+ client state: step, epoch, data position)
  stage2/checkpoints/<tag>
  results.json               metrics, BLEU signature, the trivial baseline
  hypotheses.<split>.jsonl   key, hypothesis, reference
"""
from __future__ import annotations

import json
import math
import os
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from . import engine as eng
from .config import Config, StageConfig, save_config, to_dict
from .data import Collate, PlannedStream, ShardStream, make_loader, rank_pool_keys, resolve_shards_dir, rng_seed
from .evaluate import compute_metrics, decode_loader, most_frequent_sentence, write_report
from .losses import all_reduce_sum, contrastive_loss, translation_loss_sum
from .models import SLTModel
from .preempt import PREEMPT, install_signal_handlers
from .reference import embed_split, retrieval_recall
from .selection import Planner, Table, load_snapshot, load_table, save_snapshot, table_from_snapshots
from .shards import read_manifest
from .telemetry import GpuTelemetry, StepTimer
from .text import load_tokenizer, make_run_tokenizer
from .vocab import record_of
from .ui import Reporter

STAGES = ("stage1", "stage2")
CONTRASTIVE_PARTS = ("text_encoder", "text_proj", "video_proj", "log_logit_scale")


class RunError(RuntimeError):
    """The run cannot go on; the message says what to do."""


class Preempted(RunError):
    """SIGTERM/SIGUSR1 (a scheduler's warning): checkpointed at a step boundary; resume with --resume."""


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
        print(f"sclslt: {stage}: non-finite loss after step {step}: update skipped "
              f"({self.in_a_row} in a row, {self.skipped} in this run)", flush=True)
        if self.in_a_row >= self.limit:
            raise RunError(f"{stage}: {self.in_a_row} non-finite losses in a row after step {step} "
                           f"(train.max_nonfinite={self.limit}); the last good checkpoint is in {self.ckpt_dir} "
                           f"({eng.latest_tag(self.ckpt_dir)}); lower the learning rate or check the data")
        return False


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2 ** 32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to `min_ratio`; a pure function of the step (resume-safe)."""
    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))
    return f


def set_trainable(model: SLTModel, st: StageConfig) -> None:
    """Stage 2 (no contrastive loss) freezes the contrastive parts; stage 1 may freeze the text encoder;
    LoRA's base weights stay frozen in both (`SLTModel.frozen_by_design`)."""
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        frozen = (st.contrastive_weight == 0 and top in CONTRASTIVE_PARTS) or \
                 (st.freeze_text_encoder and top == "text_encoder") or model.frozen_by_design(name)
        p.requires_grad_(not frozen)


def step_loss(out: dict, batch, st: StageConfig, world: int, similarity: str = "pooled",
              tau: float = 0.07) -> tuple[torch.Tensor, dict]:
    """This rank's share of the global-batch loss (the mean over ranks is the global loss)."""
    loss = torch.zeros((), device=batch.frames.device)
    parts = {}
    if st.translation_weight > 0:
        tok = (batch.labels != -100).sum()
        n_global = all_reduce_sum(tok.float())
        tl = translation_loss_sum(out["logits"], batch.labels, st.label_smoothing) * world / n_global
        loss = loss + st.translation_weight * tl
        parts["ce"] = tl.detach()
    if st.contrastive_weight > 0:
        cl = contrastive_loss(out, batch.sentence_ids, similarity, tau)
        loss = loss + st.contrastive_weight * cl
        parts["nce"] = cl.detach()
    return loss, parts


def forward(model_call, batch, st: StageConfig) -> dict:
    return model_call(batch.frames, batch.frame_mask, batch.input_ids, batch.attention_mask, batch.labels,
                      contrastive=st.contrastive_weight > 0, translation=st.translation_weight > 0)


@dataclass
class Context:
    cfg: Config
    ds_config_path: str
    dist: dict
    run_dir: Path
    shards_dir: Path
    tokenizer: object
    reporter: Reporter

    @property
    def rank(self) -> int:
        return self.dist["rank"]

    @property
    def world(self) -> int:
        return self.dist["world"]


def train_stage(ctx: Context, name: str, model: SLTModel, resume: bool) -> SLTModel:
    """Train one stage to completion (or resume it); returns the trained module."""
    cfg, st = ctx.cfg, getattr(ctx.cfg, name)
    ckpt_dir = ctx.run_dir / name / "checkpoints"
    stream = train_stream(cfg, name, ctx.shards_dir, ctx.rank, ctx.world)
    source = BatchSource(ctx, name, stream)
    per_epoch = len(stream)
    schedule_steps = st.epochs * per_epoch       # the LR schedule's length: max_steps only truncates it,
    total = schedule_steps                       # so a run extended with --resume follows the same curve
    if cfg.train.max_steps > 0:
        total = min(total, cfg.train.max_steps)
    set_trainable(model, st)
    precision = eng.resolve_precision(cfg.train.precision, ctx.dist["device"])
    ds_config = eng.build_ds_config(ctx.ds_config_path, st.global_batch, ctx.world, cfg.train.grad_clip, precision)
    tag = eng.latest_tag(ckpt_dir)
    if tag is not None and not resume:
        raise RunError(f"{ckpt_dir} already holds checkpoints: pass --resume to continue this run, "
                       f"or choose another --train.run_dir")
    saved_world = resume_world(ckpt_dir, tag, ctx.rank) if tag is not None else ctx.world
    engine = eng.Engine(model, ds_config, st.lr, st.weight_decay,
                        lr_lambda(schedule_steps, st.warmup_steps, st.min_lr_ratio), eps=st.adam_eps,
                        load_universal=saved_world != ctx.world)

    def eval_model():
        """engine.module, or under ZeRO-3 a plain copy (see Engine.eval_module); RNG untouched."""
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if engine.device.type == "cuda" else []):
            return engine.eval_module(lambda: SLTModel(cfg.model, ctx.tokenizer, cfg.data))

    step, epoch, pos = 0, 0, 0
    selector = DevSelector(ctx, name)
    if tag is not None:
        client = engine.load(ckpt_dir)["sclslt"]
        step, epoch, pos = client["step"], client["epoch"], client["batch_in_epoch"]
        selector.restore(client.get("selection"))
        ctx.reporter.info(f"{name}: resumed at step {step} (epoch {epoch}, batch {pos}) from {ckpt_dir}/{tag}"
                          + (f", written by {saved_world} ranks, now {ctx.world}" if saved_world != ctx.world else ""))
        if saved_world != ctx.world:       # RNG streams are per rank: new ones, a function of the position
            seed_everything(cfg.train.seed * 7919 + step * 104729 + ctx.rank * 15485863)
        if step >= total:
            return eval_model()

    def save(tag: str | None = None):
        record = {"stage": name, "step": step, "epoch": epoch, "batch_in_epoch": pos, "world": ctx.world,
                  "selection": selector.state()}
        meta = eng.checkpoint_meta(ckpt_dir)
        if tag is None and meta is not None and all(meta.get(k) == v for k, v in record.items()):
            return                      # this very state is published already (e.g. the new best at the end)
        client = {"sclslt": {**record, "config": to_dict(cfg)}}
        engine.save(ckpt_dir, tag or f"step{step:08d}", client, keep=cfg.checkpoint.keep,
                    protect={selector.best["tag"]} if selector.best else set())

    def measure_dev():
        if selector.measure(eval_model(), step, epoch):
            save()                      # the new best: published now, never rotated away
        engine.train()

    every_epochs = cfg.checkpoint.every_epochs
    if every_epochs and step == 0:
        save(f"epoch{0:04d}")          # the reference run's early view: the stage's starting point

    collate = Collate(ctx.tokenizer)
    guard = NonFiniteGuard(cfg.train.max_nonfinite, ckpt_dir)
    gpus = GpuTelemetry(ctx.dist["device"])       # the same kind of device on every rank: all or none gather
    engine.train()
    ctx.reporter.start_stage(name, total, step, st.global_batch, ctx.run_dir / name / "metrics.csv")
    timer = StepTimer(engine.device, cfg.train.timing_every)
    while step < total and epoch < st.epochs:
        loader = make_loader(source.epoch_stream(epoch, pos, eval_model), collate, cfg.data.num_workers,
                             cfg.data.prefetch_factor)
        timer.begin(step + 1)
        for batch in loader:
            timer.mark("data")
            batch = batch.to(engine.device)
            timer.mark("h2d")
            out = forward(engine, batch, st)
            timer.mark("forward")
            loss, parts = step_loss(out, batch, st, ctx.world, cfg.model.similarity, cfg.model.cico_tau)
            # one small collective per step: the loss parts for the log, and every rank's verdicts
            # (finite loss, preemption signal), so all ranks skip or stop together
            flag = torch.tensor([float(PREEMPT.is_set())], device=loss.device)
            summed = all_reduce_sum(torch.cat([torch.stack([loss.detach(), *parts.values()]).float(), flag]))
            logged, preempted = summed[:-1] / ctx.world, bool(summed[-1] > 0)
            timer.mark("loss")              # includes the step's one small all-reduce
            pos += 1
            if guard.check(bool(torch.isfinite(logged).all()), step, name):
                engine.backward(loss)
                timer.mark("backward")
                engine.step()
                timer.mark("optimizer")
                step += 1
                ctx.reporter.step(step, dict(zip(["loss", *parts], logged.tolist())), engine.lr(), epoch)
                timed = timer.end()
                if timed is not None:
                    ctx.reporter.timing(step, timed)
                if cfg.checkpoint.every_steps and step % cfg.checkpoint.every_steps == 0 and step < total:
                    save()
                # every rank joins the gather on GPUs (a rank whose NVML failed sends {}), none on CPUs
                if engine.device.type == "cuda" and cfg.train.telemetry_every and step % cfg.train.telemetry_every == 0:
                    per_rank = [None] * ctx.world
                    dist.all_gather_object(per_rank, gpus.sample())
                    ctx.reporter.telemetry(step, per_rank)
            if preempted and step < total:      # at the stage's last step: finish it normally first
                save()
                raise Preempted(f"{name}: stopped by a signal at step {step}; checkpoint saved in {ckpt_dir}: "
                                f"continue with --resume")
            if step >= total:
                break
            timer.begin(step + 1)
        if pos >= per_epoch:
            epoch, pos = epoch + 1, 0
            if every_epochs and epoch % every_epochs == 0:
                save(f"epoch{epoch:04d}")
            if selector.active and epoch % max(cfg.eval.dev_every_epochs, 1) == 0 and step < total:
                measure_dev()
    if selector.active and not selector.measured(step):
        measure_dev()
    save()
    ctx.reporter.end_stage(name, step)
    return eval_model()


class DevSelector:
    """The checkpoint-selection rule (eval.select=dev_bleu4): the last enabled stage that trains
    translation decodes the dev split every `eval.dev_every_epochs` epochs and at its end; the
    checkpoint with the best dev BLEU-4 (then chrF, ROUGE-L; the earliest on full ties) is kept out
    of rotation, evaluated on the test split and used by `sclslt translate`. Its state travels in
    the checkpoints, so a resumed run keeps its best."""

    def __init__(self, ctx: Context, name: str):
        cfg = ctx.cfg
        enabled = enabled_stages(cfg)
        self.ctx, self.name = ctx, name
        self.active = (cfg.eval.select == "dev_bleu4" and bool(enabled) and enabled[-1] == name
                       and getattr(cfg, name).translation_weight > 0)
        self.best: dict | None = None
        self.history: list[dict] = []

    @staticmethod
    def key(row: dict) -> tuple:
        """BLEU-4, then chrF, then ROUGE-L (BLEU-4 ties at 0 early in training); strictly greater wins."""
        return row["dev_bleu4"], row.get("dev_chrf") or 0.0, row["dev_rouge_l"]

    def state(self) -> dict:
        return {"best": self.best, "history": self.history}

    def restore(self, state: dict | None) -> None:
        if state:
            self.best, self.history = state.get("best"), list(state.get("history", []))

    def measured(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    def measure(self, model, step: int, epoch: int) -> bool:
        """Decode dev; True if this step is the new best."""
        res = evaluate(self.ctx, model, "dev", write=False)["model"]
        row = {"step": step, "epoch": epoch, "tag": f"step{step:08d}", "dev_bleu4": res["bleu4"],
               "dev_chrf": res.get("chrf"), "dev_rouge_l": res["rouge_l"]}
        self.history.append(row)
        better = self.best is None or self.key(row) > self.key(self.best)
        if better:
            self.best = row
        self.ctx.reporter.info(f"{self.name} step {step}: dev BLEU-4 {row['dev_bleu4']:.2f}"
                               + (" (best so far)" if better else f" (best {self.best['dev_bleu4']:.2f} "
                                                                  f"at step {self.best['step']})"))
        self.ctx.reporter.scalars({"bleu4": row["dev_bleu4"], "rouge_l": row["dev_rouge_l"]}, "dev")
        return better


def resume_world(ckpt_dir: Path, tag: str, rank: int) -> int:
    """The world size checkpoint `tag` was written at; if it differs from this job's, rank 0 converts
    it to the universal format (the data position is in global batches, so it carries over as is)."""
    meta = eng.checkpoint_meta(ckpt_dir, tag)
    if meta is None:
        raise RunError(f"{ckpt_dir}/{tag} has no sclslt.json: not a complete checkpoint of this trainer")
    world = dist.get_world_size()
    if meta["world"] != world:
        def convert():
            print(f"sclslt: {ckpt_dir}/{tag} was written by {meta['world']} ranks, this job has {world}: "
                  f"converting it to a universal checkpoint", flush=True)
            eng.to_universal(ckpt_dir, tag)
        on_rank0(convert, f"converting {ckpt_dir}/{tag}")
    return int(meta["world"])


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


def enabled_stages(cfg: Config) -> list[str]:
    return [s for s in STAGES if getattr(cfg, s).enabled and getattr(cfg, s).epochs > 0]


def stage_seed(cfg: Config, name: str) -> int:
    return cfg.train.seed * 1000 + STAGES.index(name)


class BatchSource:
    """Where a stage's micro-batches come from each epoch: streamed in shuffled order (random), or
    planned by Pair Selection (ps: a reference table; self: embeddings the job takes of itself)."""

    def __init__(self, ctx: Context, name: str, stream: ShardStream):
        self.ctx, self.name, self.stream = ctx, name, stream
        st: StageConfig = getattr(ctx.cfg, name)
        sel = ctx.cfg.selection
        self.mode = sel.mode if st.contrastive_weight > 0 else "random"
        self.dir = ctx.run_dir / name / "selection"
        self.planner = None
        if self.mode == "ps":
            self.table = load_table(sel.table, ctx.dist["device"])
            ctx.reporter.info(f"{name}: Pair Selection from {sel.table} ({len(self.table.keys)} samples), "
                              f"schedule {sel.schedule}, chunk {sel.chunk}")

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
        return table_from_snapshots(early, late, self.ctx.dist["device"]) if late is not None else None

    def _snapshot(self, tag: str, model_fn, compute: bool):
        path = self.dir / f"{tag}.safetensors"
        if path.is_file():
            return load_snapshot(path)
        if not compute:
            return None
        ctx = self.ctx
        emb = embed_split(model_fn(), ctx.shards_dir, "train", ctx.tokenizer, ctx.dist["device"],
                          ctx.cfg.eval.batch_size, max_frames=ctx.cfg.data.max_frames)
        if ctx.rank == 0:
            save_snapshot(path, emb)
        dist.barrier()
        return emb

    def epoch_stream(self, epoch: int, skip: int, model_fn):
        ctx, st = self.ctx, getattr(self.ctx.cfg, self.name)
        table = self.table if self.mode == "ps" else self._self_table(epoch, model_fn) if self.mode == "self" else None
        if table is None:
            self.stream.set_epoch(epoch, skip=skip)
            return self.stream
        keys = rank_pool_keys(self.stream.manifest, self.stream.seed, epoch, ctx.rank, ctx.world)
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
                             seed=rng_seed(self.stream.seed, epoch))


def train_stream(cfg: Config, name: str, shards_dir: Path, rank: int, world: int) -> ShardStream:
    """The training micro-batches of one rank for a stage (the tests rebuild them through this)."""
    st: StageConfig = getattr(cfg, name)
    if st.global_batch % world:
        raise RunError(f"{name}.global_batch={st.global_batch} is not divisible by world size {world}")
    return ShardStream(shards_dir, "train", st.global_batch // world, rank=rank, world=world, train=True,
                       seed=stage_seed(cfg, name), shuffle_buffer=cfg.data.shuffle_buffer,
                       max_frames=cfg.data.max_frames, max_bad_fraction=cfg.data.max_bad_fraction)


def transfer_weights(model: SLTModel, src_ckpt: Path, reporter: Reporter) -> None:
    """Initialise from a previous stage: report loaded / new / ignored keys; fail on surprises."""
    state = eng.load_module_state(src_ckpt)
    own = model.state_dict()
    loaded = [k for k in state if k in own and own[k].shape == state[k].shape]
    shape_mismatch = [k for k in state if k in own and own[k].shape != state[k].shape]
    missing = [k for k in own if k not in state]
    ignored = [k for k in state if k not in own]
    reporter.info(f"weights from {src_ckpt}: {len(loaded)} loaded, {len(missing)} newly initialised, "
                  f"{len(ignored)} ignored, {len(shape_mismatch)} shape mismatches")
    if shape_mismatch or missing or ignored:
        raise RunError(f"stage transfer from {src_ckpt} does not match the model: missing {missing[:8]}, "
                       f"unexpected {ignored[:8]}, shape mismatch {shape_mismatch[:8]}")
    model.load_state_dict({k: state[k] for k in loaded}, strict=True)


def evaluate(ctx: Context, model: SLTModel, split: str, write: bool = True) -> dict:
    cfg = ctx.cfg
    stream = ShardStream(ctx.shards_dir, split, cfg.eval.batch_size, rank=ctx.rank, world=ctx.world, train=False,
                         max_frames=cfg.data.max_frames)
    loader = make_loader(stream, Collate(ctx.tokenizer), cfg.data.num_workers, cfg.data.prefetch_factor)
    rows = decode_loader(model, loader, ctx.tokenizer, ctx.dist["device"], cfg.eval.beam, cfg.eval.max_len)
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, rows)
    rows = [r for part in gathered for r in part]       # rank order = split order (contiguous slices)
    refs = [r["ref"] for r in rows]
    train_texts = [s[4] for s in read_manifest(ctx.shards_dir, "train")["samples"]]
    trivial = most_frequent_sentence(train_texts)
    result = {"split": split, "model": compute_metrics([r["hyp"] for r in rows], refs, cfg.eval.bleu_tokenize),
              "trivial_baseline": {"sentence": trivial,
                                   **compute_metrics([trivial] * len(refs), refs, cfg.eval.bleu_tokenize)},
              "beam": cfg.eval.beam}
    if ctx.rank == 0 and write:
        write_report(ctx.run_dir / f"report.{split}.json", {**result, "tokenizer": tokenizer_record(ctx.tokenizer)},
                     rows)
        with open(ctx.run_dir / f"hypotheses.{split}.jsonl", "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return result


def tokenizer_record(tokenizer) -> dict:
    """What the run's texts were tokenized with: kind, source, size, whether it was trimmed, the hash
    of the kept ids (trimmed) and of the saved vocabulary, the language code, <unk> counts."""
    v = record_of(tokenizer)
    if v is None:
        return {"dir": str(getattr(tokenizer, "name_or_path", ""))}
    return {k: v[k] for k in ("kind", "source", "size", "trimmed", "sha256", "vocab_sha256", "lang",
                              "heldout_unk") if k in v}


def prepare(cfg: Config, ds_config: str) -> Context:
    """Distributed init, data, run dir, tokenizer: everything before the first stage."""
    d = eng.init_distributed(cfg.train.dist_timeout_s)
    install_signal_handlers()
    reporter = Reporter(enabled=d["rank"] == 0, log_every=cfg.train.log_every)
    run_dir = Path(cfg.train.run_dir).resolve()
    def make_run_dir():
        shards_dir = resolve_shards_dir(cfg.data)       # synthetic corpus made here on first use
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, run_dir / "config.yaml")
        tok_dir = run_dir / "tokenizer"
        if not (tok_dir / "tokenizer_config.json").is_file():      # made once per run, published whole
            texts = {sp: [s[4] for s in read_manifest(shards_dir, sp)["samples"]] for sp in ("train", "dev", "test")}
            make_run_tokenizer(cfg.model, texts.pop("train"), tok_dir, heldout=texts)
    on_rank0(make_run_dir, "preparing the run")
    shards_dir = resolve_shards_dir(cfg.data)
    tokenizer = load_tokenizer(run_dir / "tokenizer")
    reporter.info(f"world {d['world']} x {d['accelerator']}, shards {shards_dir}, run {run_dir}")
    return Context(cfg=cfg, ds_config_path=ds_config, dist=d, run_dir=run_dir,
                   shards_dir=shards_dir, tokenizer=tokenizer, reporter=reporter)


def build_model(ctx: Context) -> SLTModel:
    seed_everything(ctx.cfg.train.seed)     # identical initial weights on every rank and every run
    return SLTModel(ctx.cfg.model, ctx.tokenizer, ctx.cfg.data)


def selected_model(ctx: Context, name: str, model: SLTModel) -> tuple[SLTModel, dict]:
    """The model the run is evaluated with, and the record of why: the best dev BLEU-4 checkpoint of
    the last stage (`DevSelector`), or its last one (eval.select=last, or no dev measurement)."""
    ckpt_dir = ctx.run_dir / name / "checkpoints"
    last = eng.latest_tag(ckpt_dir)
    sel = (eng.checkpoint_meta(ckpt_dir, last) or {}).get("selection") or {}
    best = sel.get("best") if ctx.cfg.eval.select == "dev_bleu4" else None
    record = {"stage": name, "tag": last, "rule": "last checkpoint of the last stage"}
    if best:
        record = {"stage": name, "tag": best["tag"], "step": best["step"], "dev_bleu4": best["dev_bleu4"],
                  "rule": f"best dev BLEU-4 (ties: chrF, ROUGE-L, then the earliest) of the last stage, decoded "
                          f"every {ctx.cfg.eval.dev_every_epochs} epoch(s) and at its end (eval.select=dev_bleu4)",
                  "history": sel.get("history", [])}
        if best["tag"] != last:
            model = build_model(ctx)
            model.load_state_dict(eng.load_module_state(ckpt_dir, best["tag"]), strict=True)
            model.to(ctx.dist["device"])
    ctx.reporter.info(f"evaluating {name}/{record['tag']}: {record['rule']}")
    return model, record


def run(cfg: Config, ds_config: str, resume: bool = False) -> dict | None:
    ctx = prepare(cfg, ds_config)
    t0 = time.time()
    model = None
    retrieval = {}
    enabled = enabled_stages(cfg)
    for i, name in enumerate(enabled):
        model = build_model(ctx)
        if i > 0 and eng.latest_tag(ctx.run_dir / name / "checkpoints") is None:
            transfer_weights(model, ctx.run_dir / enabled[i - 1] / "checkpoints", ctx.reporter)
        seed_everything(cfg.train.seed + 17 * (i + 1) + 7919 * ctx.rank)   # per-rank dropout/augmentation draws
        model = train_stage(ctx, name, model, resume)
        if getattr(cfg, name).contrastive_weight > 0:      # the contrastive stage's own measure
            emb = embed_split(model, ctx.shards_dir, cfg.eval.retrieval_split, ctx.tokenizer, ctx.dist["device"],
                              cfg.eval.batch_size, max_frames=cfg.data.max_frames)
            retrieval[name] = {"split": cfg.eval.retrieval_split,
                               **retrieval_recall(emb["video"], emb["text"], emb["sentence_ids"])}
            ctx.reporter.scalars(retrieval[name], f"retrieval_{cfg.eval.retrieval_split}")
            ctx.reporter.info(f"{name} {cfg.eval.retrieval_split} retrieval: " + " ".join(
                f"{k} {v:.1f}" for k, v in retrieval[name].items() if k != "split"))
    if model is None:
        raise RunError("no stage enabled: set stage1.enabled or stage2.enabled")
    model, selected = selected_model(ctx, enabled[-1], model)
    result = evaluate(ctx, model, cfg.eval.split)
    result["selected_checkpoint"] = selected
    result["tokenizer"] = tokenizer_record(ctx.tokenizer)
    result["retrieval"] = retrieval
    result["wall_s"] = time.time() - t0
    result["world"] = ctx.world
    if ctx.rank == 0:
        tmp = ctx.run_dir / "results.json.tmp"
        tmp.write_text(json.dumps(result, indent=2))
        os.replace(tmp, ctx.run_dir / "results.json")
        ctx.reporter.results(result)
    dist.barrier()
    return result
