"""`sclslt export --run RUN --out DIR`: a run's selected checkpoint as a self-contained Hugging Face model folder.

The checkpoint is the one `results.json` names (`selected_checkpoint`: the one the run evaluated on the
test split); its weights are consolidated from any ZeRO stage (`load_run_model`, through DeepSpeed's
universal form). LoRA adapters are merged into the weights they adapt (`--lora merged`, the default: a
plain model, as fast as one without LoRA) or kept as adapters (`--lora adapter`: the peft modules and
the rank stay in the model). The folder is written beside DIR and renamed into place when complete,
with `sclslt_export.json` (every file's sha256) written last (`model.verify`). `train_sentences.json`, the
distinct training sentences, is the demo's nearest-sentence list (`--no-sentences` leaves it out).
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

from sclslt.eval.hub import FORMAT, MANIFEST, ExportError, SignTranslator, verify

FRAME_KEYS = ("max_frames", "lowercase", "crop", "augment", "aug_prob", "aug_rotate", "aug_scale", "aug_translate")


def merge_lora(model) -> int:
    """Merge every peft LoRA layer of `model` into its base weight and put the base layer back in its place
    (a plain nn.Linear); returns how many were merged."""
    from peft.tuners.lora import LoraLayer

    merged = 0
    for name, mod in list(model.named_modules()):
        if isinstance(mod, LoraLayer):
            mod.merge()
            parent = model.get_submodule(name.rsplit(".", 1)[0]) if "." in name else model
            setattr(parent, name.rsplit(".", 1)[-1], mod.get_base_layer())
            merged += 1
    return merged


def export_config(cfg, model, spec, beam: int, max_len: int, lora: str, provenance: dict) -> dict:
    mcfg = dataclasses.asdict(cfg.model)
    if lora == "merged":
        mcfg["lora_rank"] = 0
    mcfg["init_from"] = ""
    return {
        "sclslt_format": FORMAT,
        "model": mcfg,
        "data": {k: getattr(cfg.data, k) for k in FRAME_KEYS},
        "arch": model.architecture(),
        "frames": dataclasses.asdict(spec),
        "lora": lora,
        "generation": {"beam": int(beam), "max_len": int(max_len)},
        "provenance": provenance,
    }


def export_run(
    run_dir,
    out,
    lora: str = "merged",
    license: str = "other",
    name: str = "",
    overwrite: bool = False,
    sentences: bool = True,
) -> Path:
    """Write the export of run `run_dir` to `out`; returns `out`. See the module docstring."""
    from sclslt.eval.card import model_card
    from sclslt.eval.translate import check_run, frame_spec, resolve_checkpoint
    from sclslt.runtime.rundir import RunDir, load_run_model

    if lora not in ("merged", "adapter"):
        raise ExportError(f"--lora {lora}: use merged or adapter")
    run = check_run(run_dir)
    results_file = RunDir(run).results_file
    if not results_file.is_file():
        raise ExportError(
            f"{results_file} is missing: the run has not finished (the export is the checkpoint it "
            f"selected and evaluated)"
        )
    results = json.loads(results_file.read_text())
    out = Path(out)
    if out.resolve() == run.resolve() or out.resolve() in run.resolve().parents:
        raise ExportError(f"--out {out} is the run directory or holds it: choose another folder")
    if out.exists() and not (overwrite and (out / MANIFEST).is_file()):
        raise ExportError(
            f"{out} exists: choose another --out"
            + (
                ", or pass --overwrite to replace an earlier export"
                if (out / MANIFEST).is_file()
                else " (it is not an sclslt export, so --overwrite does not replace it)"
            )
        )
    choice = resolve_checkpoint(run)
    model, tok, cfg = load_run_model(run, choice.ckpt_dir, choice.tag)
    model.eval()
    if cfg.model.lora_rank > 0 and lora == "merged":
        merge_lora(model)
    elif cfg.model.lora_rank <= 0:
        lora = "none"
    provenance = {
        "run": run.name,
        "checkpoint": choice.label,
        "checkpoint_choice": choice.why,
        "world": results.get("world"),
        "kernels": results.get("kernels"),
    }
    config = export_config(cfg, model, frame_spec(cfg), cfg.eval.beam, cfg.eval.max_len, lora, provenance)
    hub = SignTranslator(config)
    missing, unexpected = hub.model.load_state_dict(model.state_dict(), strict=False)
    if missing or unexpected:
        raise ExportError(
            f"the export's model does not take the checkpoint's weights: missing {missing[:5]}, "
            f"unexpected {unexpected[:5]}"
        )
    hub.tokenizer = tok
    record = RunDir(run).tokenizer_dir / "sclslt_vocab.json"
    if record.is_file():  # the vocab record beside the tokenizer files
        hub.extras["sclslt_vocab.json"] = record.read_bytes()
    if sentences:  # the demo's nearest training sentences (sclslt demo --model)
        from sclslt.data.corpus import resolve_shards_dir
        from sclslt.data.shards import manifest_rows, read_manifest

        texts = sorted({r.text for r in manifest_rows(read_manifest(resolve_shards_dir(cfg.data), "train"))})
        hub.extras["train_sentences.json"] = (json.dumps(texts, ensure_ascii=False, indent=0) + "\n").encode()
    hub.extras["README.md"] = model_card(run, cfg, results, config, license, name or run.name).encode()
    tmp = out.with_name(out.name + ".partial")
    shutil.rmtree(tmp, ignore_errors=True)
    hub.save_pretrained(tmp)  # every file, then the manifest
    if out.exists():
        shutil.rmtree(out)
    tmp.rename(out)
    verify(out)
    return out


def export_encoders(run: Path, out: Path, stage: str = "stage2", tag: str | None = None) -> dict:
    """`sclslt export --encoders`: a run's encoders as pretrained models in the layout a real recipe loads
    (`model.backbone`, `model.mbart`, `model.tokenizer`, all `save_pretrained` folders), so that another run can
    start from encoders whose similarities already mean something:

      <out>/backbone    the frame ResNet (transformers ResNetModel)
      <out>/mbart       MBartForConditionalGeneration: encoder = the run's TEXT encoder (text-pretrained, as
                        mBART's encoder is), decoder, embeddings and LM head = the run's; the visual encoder,
                        temporal blocks and contrastive heads are not exported
      <out>/tokenizer   the run's tokenizer (load it with model.trim_vocab false: the run's own vocabulary)

    from checkpoint `tag` (latest if None) of `stage`."""
    import os

    from sclslt.runtime.rundir import RunDir, load_run_model

    model, _, cfg = load_run_model(run, RunDir(run).checkpoints(stage), tag)
    if cfg.model.lora_rank:
        raise ValueError(
            f"{run} trains LoRA adapters (model.lora_rank={cfg.model.lora_rank}): export a run "
            f"without LoRA, whose weights are whole"
        )
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
    info = {
        "run": str(run),
        "stage": stage,
        "tag": tag or RunDir(run).latest(stage),
        "backbone_params": sum(p.numel() for p in model.backbone.parameters()),
        "mbart_params": sum(p.numel() for p in model.s2s.parameters()),
    }
    (tmp / "export.json").write_text(json.dumps(info, indent=1))
    shutil.rmtree(out, ignore_errors=True)
    tmp.rename(out)
    return info


def add_arguments(p) -> None:
    p.add_argument(
        "--run", required=True, metavar="RUN_DIR", help="a finished run (its results.json names the checkpoint)"
    )
    p.add_argument("--out", required=True, metavar="DIR", help="the model folder to write")
    p.add_argument(
        "--encoders",
        action="store_true",
        help="instead: the run's encoders as pretrained backbone/, mbart/ and tokenizer/ folders for "
        "model.backbone, model.mbart and model.tokenizer of another run (export_encoders)",
    )
    p.add_argument("--stage", default="stage2", help="--encoders: whose checkpoint (default stage2)")
    p.add_argument("--tag", default=None, help="--encoders: the checkpoint tag (default: the stage's latest)")
    p.add_argument(
        "--lora",
        choices=("merged", "adapter"),
        default="merged",
        help="LoRA runs: merge the adapters into the weights (default) or keep them as adapters",
    )
    p.add_argument("--license", default="other", help="the card's license field (default: other; set your data's)")
    p.add_argument("--name", default="", help="the model's name in the card (default: the run directory's name)")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument(
        "--no-sentences",
        dest="sentences",
        action="store_false",
        help="leave out train_sentences.json (the distinct training sentences the demo shows as the nearest to a clip)",
    )


def run_command(args) -> int:
    import sys

    from sclslt.eval.hub import TranslateError

    if args.encoders:
        try:
            info = export_encoders(Path(args.run), Path(args.out), args.stage, args.tag)
        except (ValueError, FileNotFoundError, RuntimeError) as e:
            print(f"sclslt export: error: {e}", file=sys.stderr)
            return 1
        print(
            f"wrote {args.out}/{{backbone,mbart,tokenizer}} from {info['run']} {info['stage']}/{info['tag']}: "
            f"--model.backbone {args.out}/backbone --model.mbart {args.out}/mbart --model.tokenizer "
            f"{args.out}/tokenizer --model.trim_vocab false"
        )
        return 0
    try:
        out = export_run(args.run, args.out, args.lora, args.license, args.name, args.overwrite, args.sentences)
    except (ExportError, TranslateError, FileNotFoundError, RuntimeError) as e:
        print(f"sclslt export: error: {e}", file=sys.stderr)
        return 1
    cfg = json.loads((out / "config.json").read_text())
    print(
        f"exported {cfg['provenance']['checkpoint']} of {args.run} to {out} (LoRA: {cfg['lora']}); load it with "
        f"SignTranslator.from_pretrained({str(out)!r}) or sclslt translate --model {out}"
    )
    return 0
