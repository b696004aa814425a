"""`sclslt evaluate`: score a run's checkpoint on any split without training.

  sclslt evaluate --run runs/scl                                   # the run's selected checkpoint, test split
  sclslt evaluate --run runs/scl --split dev --checkpoint stage1 --tag epoch0005 --beam 8
  deepspeed --num_gpus 8 --module sclslt.cli evaluate --run runs/scl   # every rank decodes its slice

The checkpoint is chosen as `sclslt translate` chooses it (the one results.json selected, else stage 2's
latest; `--checkpoint stage1|stage2|DIR` and `--tag` pick another); its weights are consolidated from any ZeRO
stage. The split is decoded with the run's own evaluation settings (beam, max_len, batch) unless overridden, and
scored as training's evaluation scores it (sacrebleu BLEU-1..4 with the signature, chrF, ROUGE-L, the trivial
baseline). The report (metrics, checkpoint, every hypothesis) goes to --out, by default
<run>/eval/<split>.<stage>.<tag>.json; the run's own results.json and hypotheses are never touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--run",
        required=True,
        type=Path,
        metavar="RUN_DIR",
        help="a run directory (training need not have finished: any checkpoint it has)",
    )
    p.add_argument("--split", default=None, help="the split to decode (default: the run's eval.split)")
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="stage2|stage1|DIR",
        help="which checkpoints (default: the one the run selected, else stage 2's latest)",
    )
    p.add_argument("--tag", default=None, help="a checkpoint tag in it (e.g. step00000072, epoch0005)")
    p.add_argument("--beam", type=int, default=None, help="beam width (default: the run's eval.beam)")
    p.add_argument("--max-len", type=int, default=None, help="longest hypothesis in tokens (default: eval.max_len)")
    p.add_argument("--out", type=Path, default=None, help="the report's path (default: <run>/eval/...json)")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_command(args) -> int:
    from sclslt.eval.hub import TranslateError
    from sclslt.eval.translate import check_run, resolve_checkpoint
    from sclslt.runtime.distributed import finish_distributed, init_distributed

    try:
        run = check_run(args.run)
        choice = resolve_checkpoint(run, args.checkpoint, args.tag)
    except TranslateError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    d = init_distributed()
    try:
        result = evaluate_checkpoint(run, choice, d, args)
    finally:
        finish_distributed()
    if d.rank == 0:
        m, t = result["model"], result["trivial_baseline"]
        print(f"{result['split']} split, {result['checkpoint']} ({result['checkpoint_choice']}), beam {result['beam']}")
        for name, r in (("model", m), ("trivial: most frequent train sentence", t)):
            print(
                f"  {name:<40} "
                + " ".join(f"BLEU-{k} {r[f'bleu{k}']:.2f}" for k in range(1, 5))
                + f" ROUGE-L {r['rouge_l']:.2f} chrF {r['chrf']:.2f}"
            )
        print(f"  {m['bleu_signature']}\nwrote {result['report']}")
    return 0


def evaluate_checkpoint(run: Path, choice, d, args) -> dict:
    """Decode and score on every rank; rank 0 writes the report. Returns the result with its report's path."""
    import dataclasses

    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.eval.evaluation import evaluate
    from sclslt.runtime.context import Context
    from sclslt.runtime.rundir import load_run_model
    from sclslt.runtime.ui import Reporter

    model, tok, cfg = load_run_model(run, choice.ckpt_dir, choice.tag)
    model.to(d.device).eval()
    ev = dataclasses.replace(cfg.eval, **{k: v for k, v in (("beam", args.beam), ("max_len", args.max_len)) if v})
    cfg = dataclasses.replace(cfg, eval=ev)
    split = args.split or cfg.eval.split
    label = choice.label.replace("/", ".") if "/" in choice.label else f"{choice.ckpt_dir.name}.{choice.tag}"
    out = args.out or run / "eval" / f"{split}.{label}.json"
    ctx = Context(
        cfg=cfg,
        ds_config_path="",
        dist=d,
        run_dir=run,
        shards_dir=resolve_shards_dir(cfg.data),
        tokenizer=tok,
        reporter=Reporter(enabled=d.rank == 0),
    )
    if d.rank == 0:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    about = {"run": str(run), "checkpoint": choice.label, "checkpoint_choice": choice.why}
    result = evaluate(ctx, model, split, write=False, report=out, about=about)
    return {**result, **about, "report": str(out)}
