"""One training loop for both stages, and the run that chains them: stage 1 -> stage 2 -> evaluation.

A stage is data (a `BatchSource`), an `Engine`, and a `StageConfig` saying which losses count:
stage 1 = symmetric InfoNCE over gathered negatives + joint translation CE, stage 2 = translation
only. The loop itself does not change between stages: `Stage.run` -> `train_epoch` -> `train_step`
(-> `after_step`), with its position in a `StageState`; it reports its boundaries to a `Checkpointer`
(`sclslt.runtime.checkpointer`), which decides the saves.

The run directory it writes: `sclslt.runtime.rundir`.
"""
from __future__ import annotations

import json
import math
import random
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist

from sclslt.atomic import write_text
from sclslt.config import Config, ConfigError, StageConfig, eval_batch, micro_batch, save_config, to_dict
from sclslt.data.loader import Collate, make_loader
from sclslt.data.prefetch import on_device
from sclslt.data.corpus import resolve_shards_dir
from sclslt.data.shards import check_disjoint_splits, manifest_rows, read_manifest
from sclslt.data.text import make_run_tokenizer
from sclslt.eval.evaluation import DevSelector, evaluate, tokenizer_record
from sclslt.eval.provenance import provenance
from sclslt.eval.retrieval import embed_split, retrieval_recall
from sclslt.model import close_text
from sclslt.model.batchnorm import drop_pending, finish_step
from sclslt.model.losses import all_reduce_sum, contrastive_loss, translation_loss_sum
from sclslt.model.heads import get_head
from sclslt.model.slt import SLTModel
from sclslt.selection.batches import BatchSource
from sclslt.train.accumulate import CachedStep
from sclslt.runtime.checkpointer import Checkpointer
from sclslt.runtime.checkpoints import checkpoint_meta, intact_tag, latest_tag, load_module_state, to_universal
from sclslt.runtime.distributed import finish_distributed, init_distributed
from sclslt.runtime.engine import Engine, build_ds_config, resolve_precision
from sclslt.runtime.context import Context, Preempted, RunError, enabled_stages, on_rank0
from sclslt.runtime.signals import PREEMPT, install_signal_handlers
from sclslt.runtime.telemetry import GpuTelemetry, StepTimer
from sclslt.runtime.rundir import RunDir
from sclslt.runtime.ui import Reporter
from sclslt_kernels import kernel_path

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
                           f"({latest_tag(self.ckpt_dir)}); lower the learning rate or check the data")
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
    LoRA's base weights stay frozen in both (`SLTModel.frozen_by_design`). The contrastive parts are
    the similarity head's (`heads.SimilarityHead.parts`)."""
    contrastive_parts = get_head(model.cfg.similarity).parts
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        frozen = (st.contrastive_weight == 0 and top in contrastive_parts) or \
                 (st.freeze_text_encoder and top == "text_encoder") or model.frozen_by_design(name)
        p.requires_grad_(not frozen)


def step_loss(out: dict, batch, st: StageConfig, world: int, similarity: str = "pooled",
              tau: float = 0.07, close=None) -> tuple[torch.Tensor, dict]:
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
        cl = contrastive_loss(out, batch.sentence_ids if st.mask_same_sentence else None, similarity, tau, close)
        loss = loss + st.contrastive_weight * cl
        parts["nce"] = cl.detach()
    return loss, parts


def verdict(loss: torch.Tensor, parts: dict, world: int) -> tuple[dict, bool, bool]:
    """Every rank's word on this step, from one small all-reduce and the step's one device read: the global
    loss and its parts (for the log), whether all are finite (else every rank skips the step), and whether
    some rank was asked to stop (a preemption signal)."""
    flag = torch.tensor([float(PREEMPT.is_set())], device=loss.device)
    summed = all_reduce_sum(torch.cat([torch.stack([loss.detach(), *parts.values()]).float(), flag])).tolist()
    logged = {k: v / world for k, v in zip(["loss", *parts], summed[:-1])}
    return logged, all(math.isfinite(v) for v in logged.values()), summed[-1] > 0


def forward(model_call, batch, st: StageConfig) -> dict:
    return model_call(batch.frames, batch.frame_mask, batch.input_ids, batch.attention_mask, batch.labels,
                      contrastive=st.contrastive_weight > 0, translation=st.translation_weight > 0,
                      draws=batch.draws, valid_frames=batch.valid_frames)


@dataclass
class StageState:
    """Where a stage is: optimizer steps taken, epoch, micro-batches consumed in the epoch (travels in
    every checkpoint's client state, which a resume continues from)."""
    step: int = 0
    epoch: int = 0
    pos: int = 0

    def state_dict(self) -> dict:
        return {"step": self.step, "epoch": self.epoch, "batch_in_epoch": self.pos}

    def load_state_dict(self, d: dict) -> None:
        self.step, self.epoch, self.pos = d["step"], d["epoch"], d["batch_in_epoch"]


def _step_of(line: str) -> float:
    try:
        return json.loads(line)["step"]
    except (json.JSONDecodeError, KeyError, TypeError):
        return math.inf                 # a line cut short by a crash: dropped with the rest after the step


class BatchLog:
    """The audit trail `<run_dir>/<stage>/batches.jsonl`: one JSON line per optimizer step,
    {"step", "epoch", "keys"} with the sample keys of the whole global batch in global order (rank 0
    writes it). A resume first drops the lines after the step it continues from (written after the last
    checkpoint by a job that then died), so the file has one line per step, none twice: two runs that
    should be the same compare with `diff`."""

    def __init__(self, path: Path, enabled: bool, step: int):
        self.path, self.enabled = path, enabled
        if enabled and path.is_file():
            write_text(path, "".join(ln + "\n" for ln in path.read_text().splitlines() if _step_of(ln) <= step))

    def write(self, step: int, epoch: int, keys: list[str]) -> None:
        if self.enabled:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            with open(self.path, "a") as f:
                f.write(json.dumps({"step": step, "epoch": epoch, "keys": list(keys)}) + "\n")


class Stage:
    """One stage of training: its data, engine, state and checkpointer; `run` trains it to the end."""

    def __init__(self, ctx: Context, name: str, model: SLTModel, resume: bool):
        cfg, st = ctx.cfg, getattr(ctx.cfg, name)
        self.ctx, self.name, self.st = ctx, name, st
        self.ckpt_dir = ctx.run.checkpoints(name)
        self.source = BatchSource(ctx, name)
        fmt = self.source.fmt
        where = f"on {ctx.dist.device} (nvImageCodec)" if fmt == "jpg" and ctx.decode == "device" else "in the loader"
        ctx.reporter.info(f"{name}: {fmt} frames decoded {where}")
        self.per_epoch = self.source.per_epoch
        schedule_steps = st.epochs * self.per_epoch  # the LR schedule's length: max_steps only truncates it,
        self.total = schedule_steps                  # so a run extended with --resume follows the same curve
        if cfg.train.max_steps > 0:
            self.total = min(self.total, cfg.train.max_steps)
        self.close = stage_close_pairs(ctx, name, model)   # from the stage's starting text encoder
        set_trainable(model, st)
        precision = resolve_precision(cfg.train.precision, ctx.dist.device)
        try:
            self.micro = micro_batch(cfg, name, ctx.world)
        except ConfigError as e:
            raise RunError(str(e)) from e
        ds_config = build_ds_config(ctx.ds_config_path, st.global_batch, ctx.world, cfg.train.grad_clip, precision,
                                    self.micro)
        tag = latest_tag(self.ckpt_dir)
        if tag is not None and not resume:
            raise RunError(f"{self.ckpt_dir} already holds checkpoints: pass --resume to continue this run, "
                           f"or choose another --train.run_dir")
        if tag is not None:                 # the newest checkpoint whose files match their checksums
            try:
                tag = intact_tag(self.ckpt_dir, ctx.rank, ctx.world)
            except RuntimeError as e:
                raise RunError(str(e)) from e
        saved_world = resume_world(self.ckpt_dir, tag, ctx.rank) if tag is not None else ctx.world
        self.engine = Engine(model, ds_config, st.lr, st.weight_decay,
                                 lr_lambda(schedule_steps, st.warmup_steps, st.min_lr_ratio), eps=st.adam_eps,
                                 load_universal=saved_world != ctx.world)
        self.state = StageState()
        self.selector = DevSelector(ctx, name)
        ck = cfg.checkpoint
        self.checkpointer = Checkpointer(
            self.engine, self.ckpt_dir, ck.every_steps, ck.every_epochs, ck.keep,
            record=lambda: {"stage": name, **self.state.state_dict(), "world": ctx.world,
                            "selection": self.selector.state()},
            protect=lambda: {self.selector.best["tag"]} if self.selector.best else set(), config=to_dict(cfg))
        if tag is not None:
            self._resume(tag, saved_world)
        self.audit = BatchLog(ctx.run.batches(name), ctx.rank == 0, self.state.step)

    def _resume(self, tag: str, saved_world: int) -> None:
        ctx = self.ctx
        client = self.engine.load(self.ckpt_dir, tag)["sclslt"]
        self.state.load_state_dict(client)
        self.selector.restore(client.get("selection"))
        s = self.state
        ctx.reporter.info(f"{self.name}: resumed at step {s.step} (epoch {s.epoch}, batch {s.pos}) from "
                          f"{self.ckpt_dir}/{tag}"
                          + (f", written by {saved_world} ranks, now {ctx.world}" if saved_world != ctx.world else ""))
        if saved_world != ctx.world:       # RNG streams are per rank: new ones, a function of the position
            seed_everything(ctx.cfg.train.seed * 7919 + s.step * 104729 + ctx.rank * 15485863)

    def eval_model(self) -> SLTModel:
        """engine.module, or under ZeRO-3 a plain copy (see Engine.eval_module); RNG untouched."""
        ctx, device = self.ctx, self.engine.device
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            return self.engine.eval_module(lambda: SLTModel(ctx.cfg.model, ctx.tokenizer, ctx.cfg.data))

    def measure_dev(self) -> None:
        if self.selector.measure(self.eval_model(), self.state.step, self.state.epoch):
            self.checkpointer.at("best", self.state.step)     # published now, kept while it is the best
        self.engine.park_eval_copy()
        self.engine.train()

    def run(self) -> SLTModel:
        """Train to the stage's last step (or return at once if a resumed stage is complete)."""
        ctx, s = self.ctx, self.state
        patience = ctx.cfg.eval.patience
        if s.step >= self.total or self.selector.stopped(patience):
            return self.eval_model()
        self.checkpointer.at("start", s.step)
        self.collate = Collate(ctx.tokenizer)
        self.guard = NonFiniteGuard(ctx.cfg.train.max_nonfinite, self.ckpt_dir)
        self.gpus = GpuTelemetry(ctx.dist.device)     # the same kind of device on every rank: all or none gather
        self.timer = StepTimer(self.engine.device, ctx.cfg.train.timing_every)
        self.engine.train()
        ctx.reporter.start_stage(self.name, self.total, s.step, self.st.global_batch,
                                 ctx.run.metrics(self.name))
        while s.step < self.total and s.epoch < self.st.epochs:
            self.train_epoch()
            if s.pos >= self.per_epoch:
                s.epoch, s.pos = s.epoch + 1, 0
                self.checkpointer.at("epoch", s.step, s.epoch)
                if self.selector.active and s.epoch % max(ctx.cfg.eval.dev_every_epochs, 1) == 0 \
                        and s.step < self.total:
                    self.measure_dev()
                    stop = self.selector.stopped(patience)
                    if stop:
                        ctx.reporter.info(f"{self.name}: stopping early at step {s.step} (eval.patience={patience}): "
                                          f"{stop['reason']}")
                        break
        if self.selector.active and not self.selector.measured(s.step):
            self.measure_dev()
        self.checkpointer.at("end", s.step)
        ctx.reporter.end_stage(self.name, s.step)
        return self.eval_model()

    def train_epoch(self) -> None:
        """The rest of the current epoch, or up to the stage's last step."""
        s = self.state
        self.batches = self.source.epoch_batches(s.epoch, self.eval_model)
        self.engine.park_eval_copy()            # ZeRO-3: the evaluation copy leaves the device while training runs
        device = self.engine.device
        loader = make_loader(self.source.stream(self.batches, s.epoch, s.pos), self.collate,
                             self.ctx.cfg.data.num_workers, self.ctx.cfg.data.prefetch_factor,
                             pin_memory=torch.device(device).type == "cuda")
        self.timer.begin(s.step + 1)
        for batch in on_device(loader, device):              # batch k+1's copy overlaps step k
            preempted = self.train_step(batch)
            if preempted and s.step < self.total:      # at the stage's last step: finish it normally first
                self.checkpointer.at("stop", s.step)
                raise Preempted(f"{self.name}: stopped by a signal at step {s.step}; checkpoint saved in "
                                f"{self.ckpt_dir}: continue with --resume")
            if s.step >= self.total:
                return
            self.timer.begin(s.step + 1)

    def train_step(self, batch) -> bool:
        """Forward, loss, and (when every rank's loss is finite) backward and optimizer step, in one pass or,
        when the share is split into micro-batches, by gradient caching (`accumulate`); returns whether some
        rank was asked to stop (a preemption signal)."""
        ctx, s, st, timer, engine = self.ctx, self.state, self.st, self.timer, self.engine
        timer.mark("data")
        batch = batch.to(engine.device)           # a no-op: `on_device` moved it while the last step ran
        timer.mark("h2d")
        chunks = batch.split(self.micro) if self.micro < len(batch) else [batch]
        if len(chunks) > 1:
            step = CachedStep(lambda c: forward(engine, c, st), st, ctx.world, ctx.cfg.model.similarity,
                              ctx.cfg.model.cico_tau, self.close)
            loss, parts = step.losses(chunks, engine.device)
            timer.mark("forward")
        else:
            out = forward(engine, batch, st)
            timer.mark("forward")
            loss, parts = step_loss(out, batch, st, ctx.world, ctx.cfg.model.similarity, ctx.cfg.model.cico_tau,
                                    self.close)
        # one small collective per step: the loss parts for the log, and every rank's verdicts (finite
        # loss, preemption signal), so all ranks skip or stop together
        logged, finite, preempted = verdict(loss, parts, ctx.world)
        timer.mark("loss")              # includes the step's one small all-reduce and its one device read
        keys = self.batches[s.pos]
        s.pos += 1
        if self.guard.check(finite, s.step, self.name):
            if len(chunks) > 1:
                step.backward(chunks, engine)         # each chunk's second forward and backward, and DeepSpeed's
                timer.mark("backward")                # step at the last: "optimizer" is then BatchNorm's update
            else:
                engine.backward(loss)
                timer.mark("backward")
                engine.step()
            finish_step(engine.module)                # BatchNorm running statistics, once per step
            timer.mark("optimizer")
            s.step += 1
            self.audit.write(s.step, s.epoch, keys)
            self.after_step(logged)
        else:
            drop_pending(engine.module)               # the skipped step's BatchNorm statistics (maybe NaN)
        return preempted

    def after_step(self, logged: dict) -> None:
        """Log, sample timings and telemetry, and save on the step period."""
        ctx, s, cfg = self.ctx, self.state, self.ctx.cfg
        ctx.reporter.step(s.step, logged, self.engine.lr(), s.epoch)
        timed = self.timer.end()
        if timed is not None:
            ctx.reporter.timing(s.step, timed)
        self.checkpointer.at("step", s.step, s.epoch, self.total)
        # every rank joins the gather on GPUs (a rank whose NVML failed sends {}), none on CPUs
        if self.engine.device.type == "cuda" and cfg.train.telemetry_every and s.step % cfg.train.telemetry_every == 0:
            per_rank = [None] * ctx.world
            dist.all_gather_object(per_rank, self.gpus.sample())
            ctx.reporter.telemetry(s.step, per_rank)


def stage_close_pairs(ctx: Context, name: str, model: SLTModel) -> close_text.CloseSentences | None:
    """The stage's close pairs (None when `mask_close_text` is 0): computed on rank 0 from the stage's
    starting text encoder and written into the run's selection directory, or read back from there
    (every rank; a resumed run), so all ranks use the same pairs."""
    st = getattr(ctx.cfg, name)
    if st.mask_close_text <= 0 or st.contrastive_weight == 0:
        return None
    path = Path(ctx.run.selection(name)) / close_text.CLOSE_FILE
    want = {"kind": st.mask_close_text_kind, "threshold": st.mask_close_text}
    if not path.is_file() and ctx.rank == 0:
        rows = manifest_rows(read_manifest(ctx.shards_dir, "train"))
        close = close_text.build(st.mask_close_text_kind, st.mask_close_text, rows, model, ctx.tokenizer,
                                 ctx.dist.device)
        path.parent.mkdir(parents=True, exist_ok=True)
        close.save(path, want)
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
    have = close_text.CloseSentences.made_by(path)
    if have != want:
        raise RunError(f"{path} holds close pairs made with {have or 'unknown settings'}, but {name} asks for {want}: "
                       f"resume with the run's own settings, or delete the file to find the pairs again")
    close = close_text.CloseSentences.load(path, st.soft_close_text)
    ctx.reporter.info(f"{name}: {len(close.codes) // 2} close sentence pairs ({st.mask_close_text_kind} >= "
                      f"{st.mask_close_text}) of {len(close.sids)} sentences, "
                      + (f"soft positives (w={st.soft_close_text})" if st.soft_close_text else "masked"))
    return close


def train_stage(ctx: Context, name: str, model: SLTModel, resume: bool) -> SLTModel:
    """Train one stage to completion (or resume it); returns the trained module."""
    return Stage(ctx, name, model, resume).run()


def resume_world(ckpt_dir: Path, tag: str, rank: int) -> int:
    """The world size checkpoint `tag` was written at; if it differs from this job's, rank 0 converts
    it to the universal format (the data position is in global batches, so it carries over as is)."""
    meta = checkpoint_meta(ckpt_dir, tag)
    if meta is None:
        raise RunError(f"{ckpt_dir}/{tag} has no sclslt.json: not a complete checkpoint of this trainer")
    world = dist.get_world_size()
    if meta["world"] != world:
        def convert():
            print(f"sclslt: {ckpt_dir}/{tag} was written by {meta['world']} ranks, this job has {world}: "
                  f"converting it to a universal checkpoint", flush=True)
            to_universal(ckpt_dir, tag)
        on_rank0(convert, f"converting {ckpt_dir}/{tag}")
    return int(meta["world"])


def transfer_weights(model: SLTModel, src_ckpt: Path, reporter: Reporter) -> None:
    """Initialise from a previous stage (or model.init_from): report loaded / new / ignored keys; fail on
    surprises."""
    if not Path(src_ckpt).is_dir() or latest_tag(src_ckpt) is None:
        raise RunError(f"no checkpoint to start from in {src_ckpt} (model.init_from or the previous stage)")
    state = load_module_state(src_ckpt)
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


def prepare(cfg: Config, ds_config: str) -> Context:
    """Distributed init, data, run dir, tokenizer: everything before the first stage."""
    d = init_distributed(cfg.train.dist_timeout_s)
    install_signal_handlers()
    reporter = Reporter(enabled=d.rank == 0, log_every=cfg.train.log_every)
    run_dir = Path(cfg.train.run_dir).resolve()
    def make_run_dir():
        shards_dir = resolve_shards_dir(cfg.data)       # synthetic corpus made here on first use
        manifests = {sp: read_manifest(shards_dir, sp) for sp in ("train", "dev", "test")}
        check_disjoint_splits(shards_dir, manifests)    # before anything is written: a refused run leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(run_dir).config_file)
        tok_dir = RunDir(run_dir).tokenizer_dir
        if not (tok_dir / "tokenizer_config.json").is_file():      # made once per run, published whole
            texts = {sp: [r.text for r in manifest_rows(m)] for sp, m in manifests.items()}
            make_run_tokenizer(cfg.model, texts.pop("train"), tok_dir, heldout=texts)
    on_rank0(make_run_dir, "preparing the run")
    reporter.open_trackers(run_dir, cfg.train.report_to, to_dict(cfg), cfg.train.tracker_project)
    shards_dir = resolve_shards_dir(cfg.data)
    tokenizer = RunDir(run_dir).tokenizer()
    reporter.info(f"world {d.world} x {d.accelerator}, shards {shards_dir}, run {run_dir}")
    return Context(cfg=cfg, ds_config_path=ds_config, dist=d, run_dir=run_dir,
                   shards_dir=shards_dir, tokenizer=tokenizer, reporter=reporter)


def build_model(ctx: Context) -> SLTModel:
    seed_everything(ctx.cfg.train.seed)     # identical initial weights on every rank and every run
    model = SLTModel(ctx.cfg.model, ctx.tokenizer, ctx.cfg.data)
    if ctx.cfg.train.activation_checkpointing:
        model.checkpoint_activations()
    return model


def selected_model(ctx: Context, name: str, model: SLTModel) -> tuple[SLTModel, dict]:
    """The model the run is evaluated with, and the record of why: the best dev BLEU-4 checkpoint of
    the last stage (`DevSelector`), or its last one (eval.select=last, or no dev measurement)."""
    ckpt_dir = ctx.run.checkpoints(name)
    last = latest_tag(ckpt_dir)
    sel = (checkpoint_meta(ckpt_dir, last) or {}).get("selection") or {}
    best = sel.get("best") if ctx.cfg.eval.select == "dev_bleu4" else None
    record = {"stage": name, "tag": last, "rule": "last checkpoint of the last stage"}
    if best:
        record = {"stage": name, "tag": best["tag"], "step": best["step"], "dev_bleu4": best["dev_bleu4"],
                  "rule": f"best dev BLEU-4 (ties: chrF, ROUGE-L, then the earliest) of the last stage, decoded "
                          f"every {ctx.cfg.eval.dev_every_epochs} epoch(s) and at its end (eval.select=dev_bleu4)",
                  "history": sel.get("history", [])}
        selector = DevSelector(ctx, name)
        selector.restore(sel)
        stop = selector.stopped(ctx.cfg.eval.patience)
        if stop:
            record["stopped_early"] = stop
        if best["tag"] != last:
            model = build_model(ctx)
            model.load_state_dict(load_module_state(ckpt_dir, best["tag"]), strict=True)
            model.to(ctx.dist.device)
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
        if ctx.run.latest(name) is None:     # a fresh stage
            if i > 0:
                transfer_weights(model, ctx.run.checkpoints(enabled[i - 1]), ctx.reporter)
            elif cfg.model.init_from:
                transfer_weights(model, Path(cfg.model.init_from), ctx.reporter)
        seed_everything(cfg.train.seed + 17 * (i + 1) + 7919 * ctx.rank)   # per-rank dropout draws (clip draws: per clip)
        model = train_stage(ctx, name, model, resume)
        if getattr(cfg, name).contrastive_weight > 0:      # the contrastive stage's own measure
            emb = embed_split(model, ctx.shards_dir, cfg.eval.retrieval_split, ctx.tokenizer, ctx.dist.device,
                              eval_batch(cfg), max_frames=cfg.data.max_frames, decode=ctx.decode)
            retrieval[name] = {"split": cfg.eval.retrieval_split,
                               **retrieval_recall(emb["video"], emb["text"], emb["sentence_ids"])}
            ctx.reporter.scalars(retrieval[name], f"retrieval_{cfg.eval.retrieval_split}", name)
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
    result["kernels"] = kernel_path(ctx.dist.device)
    if ctx.rank == 0:
        result["provenance"] = provenance(cfg, ctx.shards_dir)
        write_text(ctx.run.results_file, json.dumps(result, indent=2))
        ctx.reporter.results(result)
    finish_distributed()
    return result
