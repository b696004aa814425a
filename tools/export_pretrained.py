"""Export a trained run's encoders as pretrained models, in the layout a real recipe loads.

A real recipe starts from an ImageNet ResNet-18 (`model.backbone`), mBART (`model.mbart`) and its
tokenizer (`model.tokenizer`), all `save_pretrained` directories. This writes the same three from a
checkpoint of one of our runs, so that a test bed can start where the paper starts: from encoders
whose similarities already mean something (issue 14: the early view of Pair Selection's table).

  <out>/backbone    the frame ResNet (transformers ResNetModel)
  <out>/mbart       MBartForConditionalGeneration: encoder = the run's TEXT encoder (text-pretrained, as
                    mBART's encoder is), decoder, embeddings and LM head = the run's; the visual
                    encoder, temporal blocks and contrastive heads are not exported (a recipe starts them
                    from mBART's encoder and from scratch, as with the real checkpoints)
  <out>/tokenizer   the run's tokenizer (load it with model.trim_vocab false: it is the run's own vocabulary)

  python tools/export_pretrained.py --run runs/pretrain --out runs/pretrain/pretrained
  deepspeed launch/train.py --config X.yaml --model.backbone runs/pretrain/pretrained/backbone \\
      --model.mbart runs/pretrain/pretrained/mbart --model.tokenizer runs/pretrain/pretrained/tokenizer \\
      --model.trim_vocab false
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
from pathlib import Path

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def export(run: Path, out: Path, stage: str = "stage2", tag: str | None = None) -> dict:
    """Write backbone/, mbart/ and tokenizer/ under `out` from checkpoint `tag` (latest if None) of `stage`."""
    from sclslt.runtime.rundir import RunDir, load_run_model
    model, _, cfg = load_run_model(run, RunDir(run).checkpoints(stage), tag)
    if cfg.model.lora_rank:
        raise ValueError(f"{run} trains LoRA adapters (model.lora_rank={cfg.model.lora_rank}): export a run "
                         f"without LoRA, whose weights are whole")
    tmp = out.parent / f".{out.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    model.backbone.save_pretrained(tmp / "backbone")
    text = {k: v for k, v in model.text_encoder.state_dict().items() if not k.startswith("embed_tokens.")}
    missing, unexpected = model.s2s.model.encoder.load_state_dict(text, strict=False)
    if unexpected or any(not k.startswith("embed_tokens.") for k in missing):
        raise RuntimeError(f"text encoder and mBART encoder differ: missing {missing[:5]}, unexpected {unexpected[:5]}")
    model.s2s.save_pretrained(tmp / "mbart")
    shutil.copytree(RunDir(run).tokenizer_dir, tmp / "tokenizer")
    info = {"run": str(run), "stage": stage, "tag": tag or RunDir(run).latest(stage),
            "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
            "mbart_params": sum(p.numel() for p in model.s2s.parameters())}
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path)
    p.add_argument("--out", required=True, type=Path)
    p.add_argument("--stage", default="stage2", help="whose checkpoint (default stage2: both stages trained)")
    p.add_argument("--tag", default=None, help="checkpoint tag (default: the stage's latest)")
    args = p.parse_args(argv)
    info = export(args.run, args.out, args.stage, args.tag)
    print(f"wrote {args.out}/{{backbone,mbart,tokenizer}} from {info['run']} {info['stage']}/{info['tag']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
