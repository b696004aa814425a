"""The one training loop, for both stages: a `Stage` trains one stage of a run to its end (or resumes it).

A stage is data (a `BatchSource`), an `Engine`, and a `StageConfig` saying which losses count
(`sclslt.model.objective`). The loop itself does not change between stages: `Stage.run` -> `train_epoch` ->
`train_step` (-> `after_step`), with its position in a `StageState`; it reports its boundaries to a
`Checkpointer` (`sclslt.runtime.checkpointer`), which decides the saves. Where a stage resumes from:
`sclslt.train.resume`; the run that chains the stages: `sclslt.train.run`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from sclslt.config import ConfigError, micro_batch, to_dict
from sclslt.data.loader import Collate, make_loader
from sclslt.data.prefetch import on_device
from sclslt.eval.evaluation import DevSelector
from sclslt.model.batchnorm import drop_pending, finish_step
from sclslt.model.objective import forward, set_trainable, step_loss
from sclslt.model.slt import SLTModel
from sclslt.runtime.checkpointer import Checkpointer
from sclslt.runtime.context import Context, Preempted
from sclslt.runtime.engine import Engine, build_ds_config, resolve_precision
from sclslt.runtime.rundir import RunError
from sclslt.runtime.telemetry import GpuTelemetry, StepTimer
from sclslt.selection.batches import BatchSource
from sclslt.train.accumulate import CachedStep
from sclslt.train.audit import BatchLog
from sclslt.train.close_pairs import stage_close_pairs
from sclslt.train.resume import resume_tag, resume_world
from sclslt.train.schedule import lr_lambda, seed_everything
from sclslt.train.verdict import NonFiniteGuard, verdict


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


class Stage:
    """One stage of training: its data, engine, state and checkpointer; `run` trains it to the end."""

    def __init__(self, ctx: Context, name: str, model: SLTModel, resume: bool):
        self.ctx, self.name, self.st = ctx, name, getattr(ctx.cfg, name)
        self.ckpt_dir = ctx.run.checkpoints(name)
        self.source = self._open_source()
        schedule_steps = self._count_steps()
        self.close = stage_close_pairs(ctx, name, model)  # from the stage's starting text encoder
        set_trainable(model, self.st)
        ds_config = self._ds_config()
        tag = resume_tag(self.ckpt_dir, resume, ctx.rank, ctx.world)  # the newest intact checkpoint, if any
        saved_world = resume_world(self.ckpt_dir, tag, ctx.rank) if tag is not None else ctx.world
        self.engine = self._wire_engine(model, ds_config, schedule_steps, saved_world)
        self.state = StageState()
        self.selector = DevSelector(ctx, name)
        self.checkpointer = self._wire_checkpointer()
        if tag is not None:
            self._resume(tag, saved_world)
        self.audit = BatchLog(ctx.run.batches(name), ctx.rank == 0, self.state.step)

    def _open_source(self) -> BatchSource:
        """The stage's batches, and where its frames are decoded (reported)."""
        ctx, name = self.ctx, self.name
        source = BatchSource(ctx, name)
        fmt = source.fmt
        where = f"on {ctx.dist.device} (nvImageCodec)" if fmt == "jpg" and ctx.decode == "device" else "in the loader"
        ctx.reporter.info(f"{name}: {fmt} frames decoded {where}")
        return source

    def _count_steps(self) -> int:
        """Sets `per_epoch` and `total` (the steps this job trains to); returns the LR schedule's length."""
        self.per_epoch = self.source.per_epoch
        schedule_steps = self.st.epochs * self.per_epoch  # the LR schedule's length: max_steps only truncates it,
        self.total = schedule_steps  # so a run extended with --resume follows the same curve
        if self.ctx.cfg.train.max_steps > 0:
            self.total = min(self.total, self.ctx.cfg.train.max_steps)
        return schedule_steps

    def _ds_config(self) -> dict:
        """DeepSpeed's config for this stage (sets `micro`, the micro-batch size of a rank's share)."""
        ctx, cfg, st = self.ctx, self.ctx.cfg, self.st
        precision = resolve_precision(cfg.train.precision, ctx.dist.device)
        try:
            self.micro = micro_batch(cfg, self.name, ctx.world)
        except ConfigError as e:
            raise RunError(str(e)) from e
        return build_ds_config(
            ctx.ds_config_path, st.global_batch, ctx.world, cfg.train.grad_clip, precision, self.micro
        )

    def _wire_engine(self, model: SLTModel, ds_config: dict, schedule_steps: int, saved_world: int) -> Engine:
        """The engine over the model, optimizer and LR schedule; it loads a checkpoint written at another world
        size from its universal form."""
        st = self.st
        return Engine(
            model,
            ds_config,
            st.lr,
            st.weight_decay,
            lr_lambda(schedule_steps, st.warmup_steps, st.min_lr_ratio),
            eps=st.adam_eps,
            load_universal=saved_world != self.ctx.world,
        )

    def _wire_checkpointer(self) -> Checkpointer:
        """The stage's checkpointer: what every checkpoint records, and the best one kept from deletion."""
        ctx, name, cfg = self.ctx, self.name, self.ctx.cfg
        ck = cfg.checkpoint
        return Checkpointer(
            self.engine,
            self.ckpt_dir,
            ck.every_steps,
            ck.every_epochs,
            ck.keep,
            record=lambda: {
                "stage": name,
                **self.state.state_dict(),
                "world": ctx.world,
                "selection": self.selector.state(),
            },
            protect=lambda: {self.selector.best["tag"]} if self.selector.best else set(),
            config=to_dict(cfg),
        )

    def _resume(self, tag: str, saved_world: int) -> None:
        ctx = self.ctx
        client = self.engine.load(self.ckpt_dir, tag)["sclslt"]
        self.state.load_state_dict(client)
        self.selector.restore(client.get("selection"))
        s = self.state
        ctx.reporter.info(
            f"{self.name}: resumed at step {s.step} (epoch {s.epoch}, batch {s.pos}) from "
            f"{self.ckpt_dir}/{tag}"
            + (f", written by {saved_world} ranks, now {ctx.world}" if saved_world != ctx.world else "")
        )
        if saved_world != ctx.world:  # RNG streams are per rank: new ones, a function of the position
            seed_everything(ctx.cfg.train.seed * 7919 + s.step * 104729 + ctx.rank * 15485863)

    def eval_model(self) -> SLTModel:
        """engine.module, or under ZeRO-3 a plain copy (see Engine.eval_module); RNG untouched."""
        ctx, device = self.ctx, self.engine.device
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            return self.engine.eval_module(lambda: SLTModel(ctx.cfg.model, ctx.tokenizer, ctx.cfg.data))

    def measure_dev(self) -> None:
        if self.selector.measure(self.eval_model(), self.state.step, self.state.epoch):
            self.checkpointer.at("best", self.state.step)  # published now, kept while it is the best
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
        self.gpus = GpuTelemetry(ctx.dist.device)  # the same kind of device on every rank: all or none gather
        self.timer = StepTimer(self.engine.device, ctx.cfg.train.timing_every)
        self.engine.train()
        ctx.reporter.start_stage(self.name, self.total, s.step, self.st.global_batch, ctx.run.metrics(self.name))
        while s.step < self.total and s.epoch < self.st.epochs:
            self.train_epoch()
            if s.pos >= self.per_epoch:
                s.epoch, s.pos = s.epoch + 1, 0
                self.checkpointer.at("epoch", s.step, s.epoch)
                if (
                    self.selector.active
                    and s.epoch % max(ctx.cfg.eval.dev_every_epochs, 1) == 0
                    and s.step < self.total
                ):
                    self.measure_dev()
                    stop = self.selector.stopped(patience)
                    if stop:
                        ctx.reporter.info(
                            f"{self.name}: stopping early at step {s.step} (eval.patience={patience}): {stop['reason']}"
                        )
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
        self.engine.park_eval_copy()  # ZeRO-3: the evaluation copy leaves the device while training runs
        device = self.engine.device
        loader = make_loader(
            self.source.stream(self.batches, s.epoch, s.pos),
            self.collate,
            self.ctx.cfg.data.num_workers,
            self.ctx.cfg.data.prefetch_factor,
            pin_memory=torch.device(device).type == "cuda",
        )
        self.timer.begin(s.step + 1)
        for batch in on_device(loader, device):  # batch k+1's copy overlaps step k
            preempted = self.train_step(batch)
            if preempted and s.step < self.total:  # at the stage's last step: finish it normally first
                self.checkpointer.at("stop", s.step)
                raise Preempted(
                    f"{self.name}: stopped by a signal at step {s.step}; checkpoint saved in "
                    f"{self.ckpt_dir}: continue with --resume"
                )
            if s.step >= self.total:
                return
            self.timer.begin(s.step + 1)

    def train_step(self, batch) -> bool:
        """Forward, loss, and (when every rank's loss is finite) backward and optimizer step, in one pass or,
        when the share is split into micro-batches, by gradient caching (`accumulate`); returns whether some
        rank was asked to stop (a preemption signal)."""
        ctx, s, st, timer, engine = self.ctx, self.state, self.st, self.timer, self.engine
        timer.mark("data")
        batch = batch.to(engine.device)  # a no-op: `on_device` moved it while the last step ran
        timer.mark("h2d")
        chunks = batch.split(self.micro) if self.micro < len(batch) else [batch]
        if len(chunks) > 1:
            step = CachedStep(
                lambda c: forward(engine, c, st),
                st,
                ctx.world,
                ctx.cfg.model.similarity,
                ctx.cfg.model.cico_tau,
                self.close,
            )
            loss, parts = step.losses(chunks, engine.device)
            timer.mark("forward")
        else:
            out = forward(engine, batch, st)
            timer.mark("forward")
            loss, parts = step_loss(
                out, batch, st, ctx.world, ctx.cfg.model.similarity, ctx.cfg.model.cico_tau, self.close
            )
        # one small collective per step: the loss parts for the log, and every rank's verdicts (finite
        # loss, preemption signal), so all ranks skip or stop together
        logged, finite, preempted = verdict(loss, parts, ctx.world)
        timer.mark("loss")  # includes the step's one small all-reduce and its one device read
        keys = self.batches[s.pos]
        s.pos += 1
        if self.guard.check(finite, s.step, self.name):
            if len(chunks) > 1:
                step.backward(chunks, engine)  # each chunk's second forward and backward, and DeepSpeed's
                timer.mark("backward")  # step at the last: "optimizer" is then BatchNorm's update
            else:
                engine.backward(loss)
                timer.mark("backward")
                engine.step()
            finish_step(engine.module)  # BatchNorm running statistics, once per step
            timer.mark("optimizer")
            s.step += 1
            self.audit.write(s.step, s.epoch, keys)
            self.after_step(logged)
        else:
            drop_pending(engine.module)  # the skipped step's BatchNorm statistics (maybe NaN)
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
