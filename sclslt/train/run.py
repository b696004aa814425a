"""The run: stage 1 -> stage 2 -> evaluation, each stage trained by the one loop (`sclslt.train.stage`).

`prepare` does what comes before the first stage (distributed init, the run directory, the tokenizer), `run`
chains the enabled stages (each starts from the previous one's weights), measures the contrastive stages'
retrieval and evaluates the checkpoint `selected_model` picks. The run directory it writes:
`sclslt.runtime.rundir`.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

from sclslt.atomic import write_text
from sclslt.config import Config, eval_batch, save_config, to_dict
from sclslt.data.corpus import resolve_shards_dir
from sclslt.data.shards import check_disjoint_splits, manifest_rows, read_manifest
from sclslt.data.text import make_run_tokenizer
from sclslt.eval.evaluation import DevSelector, evaluate, tokenizer_record
from sclslt.eval.provenance import provenance
from sclslt.eval.retrieval import embed_split, retrieval_recall
from sclslt.model.slt import SLTModel
from sclslt.runtime.checkpoints import checkpoint_meta, latest_tag, load_module_state
from sclslt.runtime.context import Context, enabled_stages, on_rank0
from sclslt.runtime.distributed import finish_distributed, init_distributed
from sclslt.runtime.rundir import RunDir, RunError
from sclslt.runtime.signals import install_signal_handlers
from sclslt.runtime.ui import Reporter
from sclslt.train.schedule import seed_everything
from sclslt.train.stage import Stage
from sclslt_kernels import kernel_path


def train_stage(ctx: Context, name: str, model: SLTModel, resume: bool) -> SLTModel:
    """Train one stage to completion (or resume it); returns the trained module."""
    return Stage(ctx, name, model, resume).run()


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
    reporter.info(
        f"weights from {src_ckpt}: {len(loaded)} loaded, {len(missing)} newly initialised, "
        f"{len(ignored)} ignored, {len(shape_mismatch)} shape mismatches"
    )
    if shape_mismatch or missing or ignored:
        raise RunError(
            f"stage transfer from {src_ckpt} does not match the model: missing {missing[:8]}, "
            f"unexpected {ignored[:8]}, shape mismatch {shape_mismatch[:8]}"
        )
    model.load_state_dict({k: state[k] for k in loaded}, strict=True)


def prepare(cfg: Config, ds_config: str) -> Context:
    """Distributed init, data, run dir, tokenizer: everything before the first stage."""
    d = init_distributed(cfg.train.dist_timeout_s)
    install_signal_handlers()
    reporter = Reporter(enabled=d.rank == 0, log_every=cfg.train.log_every)
    run_dir = Path(cfg.train.run_dir).resolve()

    def make_run_dir():
        shards_dir = resolve_shards_dir(cfg.data)  # synthetic corpus made here on first use
        manifests = {sp: read_manifest(shards_dir, sp) for sp in ("train", "dev", "test")}
        check_disjoint_splits(shards_dir, manifests)  # before anything is written: a refused run leaves nothing
        run_dir.mkdir(parents=True, exist_ok=True)
        save_config(cfg, RunDir(run_dir).config_file)
        tok_dir = RunDir(run_dir).tokenizer_dir
        if not (tok_dir / "tokenizer_config.json").is_file():  # made once per run, published whole
            texts = {sp: [r.text for r in manifest_rows(m)] for sp, m in manifests.items()}
            make_run_tokenizer(cfg.model, texts.pop("train"), tok_dir, heldout=texts)

    on_rank0(make_run_dir, "preparing the run")
    reporter.open_trackers(run_dir, cfg.train.report_to, to_dict(cfg), cfg.train.tracker_project)
    shards_dir = resolve_shards_dir(cfg.data)
    tokenizer = RunDir(run_dir).tokenizer()
    reporter.info(f"world {d.world} x {d.accelerator}, shards {shards_dir}, run {run_dir}")
    return Context(
        cfg=cfg,
        ds_config_path=ds_config,
        dist=d,
        run_dir=run_dir,
        shards_dir=shards_dir,
        tokenizer=tokenizer,
        reporter=reporter,
    )


def build_model(ctx: Context) -> SLTModel:
    """A fresh model, with the same initial weights on every rank and in every run."""
    seed_everything(ctx.cfg.train.seed)  # identical initial weights on every rank and every run
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
        record = {
            "stage": name,
            "tag": best["tag"],
            "step": best["step"],
            "dev_bleu4": best["dev_bleu4"],
            "rule": f"best dev BLEU-4 (ties: chrF, ROUGE-L, then the earliest) of the last stage, decoded "
            f"every {ctx.cfg.eval.dev_every_epochs} epoch(s) and at its end (eval.select=dev_bleu4)",
            "history": sel.get("history", []),
        }
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
    """The whole run: every enabled stage in order (each from the previous one's weights), the contrastive
    stages' retrieval, then the selected checkpoint's evaluation; returns the results (written by rank 0)."""
    ctx = prepare(cfg, ds_config)
    t0 = time.time()
    model = None
    retrieval = {}
    enabled = enabled_stages(cfg)
    for i, name in enumerate(enabled):
        model = build_model(ctx)
        if ctx.run.latest(name) is None:  # a fresh stage
            if i > 0:
                transfer_weights(model, ctx.run.checkpoints(enabled[i - 1]), ctx.reporter)
            elif cfg.model.init_from:
                transfer_weights(model, Path(cfg.model.init_from), ctx.reporter)
        seed_everything(
            cfg.train.seed + 17 * (i + 1) + 7919 * ctx.rank
        )  # per-rank dropout draws (clip draws: per clip)
        model = train_stage(ctx, name, model, resume)
        if getattr(cfg, name).contrastive_weight > 0:  # the contrastive stage's own measure
            retrieval[name] = stage_retrieval(ctx, name, model)
    if model is None:
        raise RunError("no stage enabled: set stage1.enabled or stage2.enabled")
    return finish(ctx, enabled[-1], model, retrieval, t0)


def stage_retrieval(ctx: Context, name: str, model: SLTModel) -> dict:
    """A contrastive stage's video-text retrieval recall on `eval.retrieval_split`, reported."""
    cfg = ctx.cfg
    emb = embed_split(
        model,
        ctx.shards_dir,
        cfg.eval.retrieval_split,
        ctx.tokenizer,
        ctx.dist.device,
        eval_batch(cfg),
        max_frames=cfg.data.max_frames,
        decode=ctx.decode,
    )
    recall = {"split": cfg.eval.retrieval_split, **retrieval_recall(emb["video"], emb["text"], emb["sentence_ids"])}
    ctx.reporter.scalars(recall, f"retrieval_{cfg.eval.retrieval_split}", name)
    ctx.reporter.info(
        f"{name} {cfg.eval.retrieval_split} retrieval: "
        + " ".join(f"{k} {v:.1f}" for k, v in recall.items() if k != "split")
    )
    return recall


def finish(ctx: Context, last: str, model: SLTModel, retrieval: dict, t0: float) -> dict:
    """Evaluate the selected checkpoint of the last stage, write results.json (rank 0), leave the process group."""
    cfg = ctx.cfg
    model, selected = selected_model(ctx, last, model)
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
