"""Evaluation inside a run: decode a split across ranks, score it against the trivial baseline and
write its report; and checkpoint selection by dev BLEU-4 (`DevSelector`)."""

from __future__ import annotations

import json

import torch.distributed as dist

from sclslt.config import eval_batch
from sclslt.data.loader import Collate, ShardStream, make_loader
from sclslt.data.shards import manifest_rows, read_manifest
from sclslt.data.vocab import record_of
from sclslt.eval.metrics import (
    compute_metrics,
    decode_loader,
    most_frequent_sentence,
    write_report,
)
from sclslt.model.slt import SLTModel
from sclslt.runtime.checkpointer import step_tag
from sclslt.runtime.context import Context, enabled_stages


def evaluate(ctx: Context, model: SLTModel, split: str, write: bool = True, report=None, about=None) -> dict:
    """Decode `split` on every rank (contiguous slices), gather, and score against the references and the trivial
    baseline; rank 0 writes the run's report.<split>.json and hypotheses (`write`), or the report to `report`
    with `about` (what was evaluated) in it."""
    cfg = ctx.cfg
    stream = ShardStream(
        ctx.shards_dir,
        split,
        eval_batch(cfg),
        rank=ctx.rank,
        world=ctx.world,
        max_frames=cfg.data.max_frames,
        decode=ctx.decode,
    )
    loader = make_loader(stream, Collate(ctx.tokenizer), cfg.data.num_workers, cfg.data.prefetch_factor)
    rows = decode_loader(model, loader, ctx.tokenizer, ctx.dist.device, cfg.eval.beam, cfg.eval.max_len)
    gathered = [None] * ctx.world
    dist.all_gather_object(gathered, rows)
    rows = [r for part in gathered for r in part]  # rank order = split order (contiguous slices)
    refs = [r["ref"] for r in rows]
    train_texts = [r.text for r in manifest_rows(read_manifest(ctx.shards_dir, "train"))]
    trivial = most_frequent_sentence(train_texts)
    result = {
        "split": split,
        "model": compute_metrics([r["hyp"] for r in rows], refs, cfg.eval.bleu_tokenize),
        "trivial_baseline": {
            "sentence": trivial,
            **compute_metrics([trivial] * len(refs), refs, cfg.eval.bleu_tokenize),
        },
        "beam": cfg.eval.beam,
    }
    if ctx.rank == 0 and report is not None:
        write_report(report, {**result, **(about or {}), "tokenizer": tokenizer_record(ctx.tokenizer)}, rows)
    elif ctx.rank == 0 and write:
        write_report(
            ctx.run_dir / f"report.{split}.json", {**result, "tokenizer": tokenizer_record(ctx.tokenizer)}, rows
        )
        with open(ctx.run.hypotheses(split), "w") as f:
            for r in rows:
                f.write(json.dumps(r, ensure_ascii=False) + "\n")
    return result


def tokenizer_record(tokenizer) -> dict:
    """What the run's texts were tokenized with: kind, source, size, whether it was trimmed, the hash
    of the kept ids (trimmed) and of the saved vocabulary, the language code, <unk> counts."""
    v = record_of(tokenizer)
    if v is None:
        return {"dir": str(getattr(tokenizer, "name_or_path", ""))}
    return {
        k: v[k]
        for k in ("kind", "source", "size", "trimmed", "sha256", "vocab_sha256", "lang", "heldout_unk")
        if k in v
    }


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
        self.active = (
            cfg.eval.select == "dev_bleu4"
            and bool(enabled)
            and enabled[-1] == name
            and getattr(cfg, name).translation_weight > 0
        )
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

    def since_best(self) -> int:
        """Dev decodings after the best one (0 when the latest is the best, or before any)."""
        if not self.best:
            return 0
        return len(self.history) - 1 - max(i for i, h in enumerate(self.history) if h["step"] == self.best["step"])

    def stopped(self, patience: int) -> dict | None:
        """Where and why the stage stopped early (eval.patience), or None: computed from the history a
        checkpoint carries, so a resumed run stops where the interrupted one would have."""
        if not (self.active and patience > 0 and self.since_best() >= patience):
            return None
        return {
            "patience": patience,
            "at_step": self.history[-1]["step"],
            "reason": f"no better dev score in the {patience} decoding(s) after step {self.best['step']}'s "
            f"(dev BLEU-4 {self.best['dev_bleu4']:.2f})",
        }

    def measured(self, step: int) -> bool:
        return bool(self.history) and self.history[-1]["step"] == step

    def measure(self, model, step: int, epoch: int) -> bool:
        """Decode dev; True if this step is the new best."""
        res = evaluate(self.ctx, model, "dev", write=False)["model"]
        row = {
            "step": step,
            "epoch": epoch,
            "tag": step_tag(step),
            "dev_bleu4": res["bleu4"],
            "dev_chrf": res.get("chrf"),
            "dev_rouge_l": res["rouge_l"],
        }
        self.history.append(row)
        better = self.best is None or self.key(row) > self.key(self.best)
        if better:
            self.best = row
        self.ctx.reporter.info(
            f"{self.name} step {step}: dev BLEU-4 {row['dev_bleu4']:.2f}"
            + (" (best so far)" if better else f" (best {self.best['dev_bleu4']:.2f} at step {self.best['step']})")
        )
        self.ctx.reporter.scalars({"bleu4": row["dev_bleu4"], "rouge_l": row["dev_rouge_l"]}, "dev")
        return better
