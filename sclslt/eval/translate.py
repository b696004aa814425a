"""`sclslt translate`: a trained run's model on new sign videos or frame folders.

An input is a video file (decoded with PyAV) or a folder of frame images (PNG/JPEG, in natural name
order as in PHOENIX-2014T). It goes through the same path as the run's training data:

1. decoding and resizing as the shards were made (`sclslt.data.decoding.decode_item`, the code of
   sclslt shard): frames resized to the run's frame size (square `size` recorded in the
   shards manifest's options, or the synthetic corpus's `frame_size`), and, for videos, the shard
   tool's `--fps` resampling and `--max-frames` subsampling when the manifest records them;
2. evenly spaced subsampling to `data.max_frames`, as evaluation does (`sclslt.data.subsample_frames`);
3. the model of `sclslt.runtime.rundir.load_run_model` in eval mode (so `data.crop` is a centre crop), decoded
   with the run's `eval.beam` and `eval.max_len` unless `--beam` / `--max-len` say otherwise.

The checkpoint is, by default, the one the run selected and evaluated (`"selected_checkpoint"` in
`<run>/results.json`: {"stage", "tag"} or a stage-2 tag), else stage 2's `latest` (stage 1's when the
run has no stage 2). `--checkpoint stage1|stage2|<dir>` and `--tag` pick another.

Every problem is a `TranslateError` (`sclslt.eval.hub`, which reads the inputs) whose message names the file: a run
directory without config,
tokenizer or checkpoints, a missing input, a folder without frames, a video that cannot be decoded.
"""

from __future__ import annotations

import contextlib
import json
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from sclslt.eval.hub import ExportError, FrameSpec, SignTranslator, TranslateError, input_item, load_clip, probe_video
from sclslt.runtime.checkpoints import MODEL_FILES, latest_tag
from sclslt.runtime.context import STAGES
from sclslt.runtime.rundir import RunDir, RunError, checkpoint_tags, load_run_model

# ---------------------------------------------------------------------------------------------
# the run: config, tokenizer, checkpoint


@dataclass
class CheckpointChoice:
    ckpt_dir: Path
    tag: str
    label: str  # e.g. "stage2/step00000072"
    why: str  # how it was chosen


def check_run(run_dir) -> Path:
    run = Path(run_dir)
    if not run.is_dir():
        raise TranslateError(f"run directory {run} does not exist")
    if not RunDir(run).config_file.is_file():
        raise TranslateError(
            f"{run} is not a run directory: it has no config.yaml (a training run writes "
            f"<run>/config.yaml, tokenizer/ and stage1|stage2/checkpoints/)"
        )
    tok = RunDir(run).tokenizer_dir
    if not (tok.is_dir() and any((tok / f).is_file() for f in ("tokenizer_config.json", "tokenizer.json"))):
        raise TranslateError(f"run {run} has no tokenizer: {tok} is missing or holds no tokenizer files")
    return run


def _selected(run: Path) -> tuple[str, str] | None:
    try:
        return RunDir(run).selected()
    except RunError as e:
        raise TranslateError(str(e)) from e


def _checked(ckpt_dir: Path, tag: str | None, label_stage: str, why: str) -> CheckpointChoice:
    tag = tag or latest_tag(ckpt_dir)
    if tag is None:
        raise TranslateError(
            f"no checkpoint in {ckpt_dir} (no 'latest' file); available: {checkpoint_tags(ckpt_dir) or 'none'}"
        )
    if not any((ckpt_dir / tag / f).is_file() for f in MODEL_FILES):
        raise TranslateError(
            f"checkpoint {ckpt_dir / tag} does not exist or has no model states "
            f"(available in {ckpt_dir}: {checkpoint_tags(ckpt_dir) or 'none'})"
        )
    return CheckpointChoice(ckpt_dir, tag, f"{label_stage}/{tag}" if label_stage else str(ckpt_dir / tag), why)


def resolve_checkpoint(run_dir, checkpoint: str | None = None, tag: str | None = None) -> CheckpointChoice:
    """Which checkpoint to load: see the module docstring."""
    run = Path(run_dir)
    selected = _selected(run)
    if checkpoint in (None, "", *STAGES):
        stages = [checkpoint] if checkpoint else ["stage2", "stage1"]
        for st in stages:
            ckpt_dir = RunDir(run).checkpoints(st)
            if not checkpoint_tags(ckpt_dir) and not (checkpoint or tag):
                continue  # default: a run without stage 2 falls back to stage 1
            if tag:
                return _checked(ckpt_dir, tag, st, "--tag")
            if selected and selected[0] == st:
                return _checked(ckpt_dir, selected[1], st, "selected by the run, results.json")
            return _checked(ckpt_dir, None, st, "latest")
        raise TranslateError(
            f"run {run} has no checkpoints (looked in {RunDir(run).checkpoints('stage2')} and "
            f"{RunDir(run).checkpoints('stage1')})"
        )
    path = Path(checkpoint)
    if not path.is_absolute() and not path.exists() and (run / path).exists():
        path = run / path
    if not path.is_dir():
        raise TranslateError(
            f"--checkpoint {checkpoint}: use stage1, stage2, or a checkpoint directory (no directory {path})"
        )
    if any((path / f).is_file() for f in MODEL_FILES) and not tag:  # one tag's directory
        return _checked(path.parent, path.name, "", "--checkpoint")
    return _checked(path, tag, "", "--checkpoint" + (" --tag" if tag else ""))


# ---------------------------------------------------------------------------------------------
# inputs: decoded and resized as the run's training data was (`FrameSpec`, `load_clip`: `sclslt.eval.hub`)


def frame_spec(cfg, size_override: int = 0) -> FrameSpec:
    """How the run's training frames were made: the synthetic corpus's frame size, or the shards
    manifest (`frame_shape` and the shard tool's recorded `options`) of `data.shards_dir`."""
    max_frames = int(cfg.data.max_frames)
    if size_override > 0:
        return FrameSpec(size_override, (size_override, size_override), 0, 0.0, max_frames, "--size")
    if cfg.data.corpus == "synthetic":
        fs = int(cfg.data.synthetic.frame_size)
        return FrameSpec(fs, (fs, fs), 0, 0.0, max_frames, "data.synthetic.frame_size")
    from sclslt.data.storage import Store

    shards = Store(cfg.data.shards_dir)
    for split in ("train", "dev", "test"):
        f = shards.url(f"{split}.json")
        if shards.exists(f"{split}.json"):
            break
    else:
        raise TranslateError(
            f"cannot find the frame size the run was trained on: no shards manifest "
            f"(train.json) in data.shards_dir={shards}; pass --size N"
        )
    try:
        man = json.loads(shards.read_text(f"{split}.json"))
        h, w = int(man["frame_shape"][0]), int(man["frame_shape"][1])
    except (json.JSONDecodeError, KeyError, TypeError, IndexError, ValueError) as e:
        raise TranslateError(f"{f}: not a shards manifest with a frame_shape ({e}); pass --size N") from e
    opts = man.get("options") or {}
    size = int(opts.get("size", h if h == w else 0) or 0)
    if size and (size, size) != (h, w):
        size = h if h == w else 0
    return FrameSpec(
        size, (h, w), int(opts.get("max_frames", 0) or 0), float(opts.get("fps", 0.0) or 0.0), max_frames, str(f)
    )


# ---------------------------------------------------------------------------------------------
# the model


def resolve_device(name: str | None):
    import torch

    if not name:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except RuntimeError as e:
        raise TranslateError(f"--device {name}: {e}") from e
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise TranslateError(f"--device {name}: CUDA is not available on this machine (use --device cpu)")
    if dev.type not in ("cpu", "cuda"):
        raise TranslateError(f"--device {name}: use cpu or cuda")
    return dev


class Translator:
    """A trained model on one device, ready to translate clips one at a time: a run's checkpoint
    (`run_dir`, `checkpoint`, `tag`) or an exported model folder / Hub name (`model`, `sclslt export`)."""

    def __init__(
        self,
        run_dir=None,
        checkpoint: str | None = None,
        tag: str | None = None,
        device: str | None = None,
        beam: int | None = None,
        max_len: int | None = None,
        size: int = 0,
        model: str | None = None,
    ):
        import torch

        from sclslt.runtime.distributed import setup_accelerator

        if (run_dir is None) == (model is None):
            raise TranslateError("give a run (--run RUN_DIR) or an exported model (--model DIR or Hub name), not both")
        self.device = resolve_device(device)
        setup_accelerator()  # before deepspeed is imported (checkpoint loading)
        t0 = time.perf_counter()
        # library chatter (DeepSpeed logs to stdout, also from loggers made at import) goes to stderr:
        # stdout holds the translations only (`--json`: JSON lines)
        with contextlib.redirect_stdout(sys.stderr):
            loaded, (beam0, len0) = (
                self._load_run(run_dir, checkpoint, tag, size) if model is None else self._load_export(model, size)
            )
        self.source, model_, self.tokenizer, self.spec = loaded
        self.beam = int(beam if beam else beam0)
        self.max_len = int(max_len if max_len else len0)
        if self.beam < 1 or self.max_len < 1:
            raise TranslateError("--beam and --max-len must be >= 1")
        self.model = model_.to(self.device).eval()
        self._sync()
        self.load_s = time.perf_counter() - t0
        self.params = sum(p.numel() for p in self.model.parameters())
        self._torch = torch
        # one short decode first, so that the per-input latencies exclude one-time set-up (lazy
        # initialisation in generate, CUDA kernels and allocator); reported as warmup_ms
        h, w = self.spec.shape
        _, self.warmup_ms = self.translate_frames(np.zeros((8, h, w, 3), dtype=np.uint8), max_len=2)

    def _load_run(self, run_dir, checkpoint, tag, size):
        from sclslt.config import ConfigError

        self.run = check_run(run_dir)
        try:
            cfg = RunDir(self.run).config()
        except ConfigError as e:
            raise TranslateError(f"{self.run / 'config.yaml'}: {e}") from e
        self.choice = resolve_checkpoint(self.run, checkpoint, tag)
        spec = frame_spec(cfg, size)
        try:
            model, tok, self.cfg = load_run_model(self.run, self.choice.ckpt_dir, self.choice.tag)
        except (FileNotFoundError, RuntimeError, OSError) as e:
            raise TranslateError(f"cannot load {self.choice.ckpt_dir / self.choice.tag}: {e}") from e
        return (str(self.run), model, tok, spec), (cfg.eval.beam, cfg.eval.max_len)

    def _load_export(self, name, size):
        try:
            hub = SignTranslator.from_pretrained(name)
        except (ExportError, FileNotFoundError, OSError, ValueError) as e:
            raise TranslateError(f"cannot load the exported model {name}: {e}") from e
        self.export_dir = hub.folder  # the local folder (a Hub name: its downloaded snapshot)
        spec = hub.frame_spec()
        if size > 0:
            spec = FrameSpec(size, (size, size), spec.shard_max_frames, spec.fps, spec.max_frames, "--size")
        prov = hub.config.get("provenance", {})
        self.choice = CheckpointChoice(
            Path(str(name)),
            prov.get("checkpoint", ""),
            f"export of {prov.get('run', '?')}/{prov.get('checkpoint', '?')}",
            "the exported model",
        )
        g = hub.config["generation"]
        return (str(name), hub.model, hub.tokenizer, spec), (g["beam"], g["max_len"])

    def _sync(self) -> None:
        import torch

        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def translate_frames(self, frames: np.ndarray, max_len: int | None = None) -> tuple[str, float]:
        """(text, model milliseconds) for one clip of uint8 frames (T x H x W x 3)."""
        torch = self._torch
        t0 = time.perf_counter()
        with torch.no_grad():
            x = torch.from_numpy(np.require(frames, requirements=["C", "W"]))[None].to(self.device)
            mask = torch.ones(1, frames.shape[0], dtype=torch.bool, device=self.device)
            out = self.model.generate(x, mask, beam=self.beam, max_len=max_len or self.max_len)
            text = self.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()
        self._sync()
        return text, 1000.0 * (time.perf_counter() - t0)

    def translate(self, path) -> dict:
        t0 = time.perf_counter()
        frames, n_src = load_clip(path, self.spec)
        decode_ms = 1000.0 * (time.perf_counter() - t0)
        text, model_ms = self.translate_frames(frames)
        return {
            "input": str(path),
            "text": text,
            "frames": int(frames.shape[0]),
            "source_frames": n_src,
            "decode_ms": round(decode_ms, 3),
            "model_ms": round(model_ms, 3),
            "latency_ms": round(decode_ms + model_ms, 3),
        }

    def info(self) -> dict:
        return {
            "run": self.source,
            "checkpoint": self.choice.label,
            "checkpoint_choice": self.choice.why,
            "params": int(self.params),
            "load_s": round(self.load_s, 4),
            "warmup_ms": round(self.warmup_ms, 3),
            "device": str(self.device),
            "beam": self.beam,
            "max_len": self.max_len,
            "frame_shape": list(self.spec.shape),
            "max_frames": self.spec.max_frames,
        }


# ---------------------------------------------------------------------------------------------
# the command


def add_arguments(p) -> None:
    p.add_argument(
        "inputs",
        nargs="+",
        metavar="INPUT",
        help="a video file (mp4, mkv, avi, ...; decoded with PyAV) or a folder of frame images "
        "(PNG/JPEG, in natural name order)",
    )
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument(
        "--run",
        metavar="RUN_DIR",
        help="the training run directory (config.yaml, tokenizer/, stage1|stage2/checkpoints/)",
    )
    src.add_argument(
        "--model",
        metavar="DIR|HUB_NAME",
        help="an exported model (sclslt export): a local folder or a Hugging Face Hub name",
    )
    p.add_argument(
        "--checkpoint",
        default=None,
        metavar="stage2|stage1|PATH",
        help="stage2 (the checkpoint the run selected and evaluated, recorded in results.json, "
        "else its latest), stage1 (its latest), or a checkpoint directory (a tag's folder, or a "
        "checkpoints folder with a 'latest' file). Default: what the run selected, else stage 2's "
        "latest, else stage 1's",
    )
    p.add_argument("--tag", default=None, help="a checkpoint tag inside the chosen stage (e.g. step00000072)")
    p.add_argument("--beam", type=int, default=None, metavar="N", help="beam size (default: the run's eval.beam)")
    p.add_argument(
        "--max-len", type=int, default=None, metavar="N", help="new tokens at most (default: the run's eval.max_len)"
    )
    p.add_argument(
        "--device", default=None, metavar="cpu|cuda", help="cpu or cuda (cuda:N); default cuda when available"
    )
    p.add_argument(
        "--size",
        type=int,
        default=0,
        metavar="N",
        help="frame size override (default: the run's training frame size, from its shards manifest "
        "or synthetic corpus config); needed only when the manifest is not available",
    )
    p.add_argument(
        "--json",
        action="store_true",
        help="print one JSON object per input (input, text, frames, latency_ms, ..., params, load_s) "
        "instead of a table",
    )


def run_command(args) -> int:
    from rich.console import Console

    err = Console(stderr=True, highlight=False, soft_wrap=True)
    out = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    try:
        for x in args.inputs:  # every input is checked before the model is loaded
            it = input_item(x)
            if it.kind == "video":
                probe_video(x)
        tr = Translator(
            args.run, args.checkpoint, args.tag, args.device, args.beam, args.max_len, args.size, args.model
        )
    except TranslateError as e:
        err.print(f"[bold red]error:[/] {escape_text(str(e))}")
        return 1
    info = tr.info()
    rows, failure = [], None
    for x in args.inputs:
        try:
            row = tr.translate(x)
        except TranslateError as e:
            failure = e
            break
        rows.append(row)
        if args.json:
            print(json.dumps({**row, **info}, ensure_ascii=False), flush=True)
    if not args.json:
        from rich.markup import escape
        from rich.table import Table

        out.print(
            f"[bold cyan]sclslt[/] {escape(info['run'])}: checkpoint {escape(info['checkpoint'])} "
            f"({info['checkpoint_choice']}), {info['params']:,} parameters, loaded in "
            f"{info['load_s']:.2f} s on {info['device']} (warm-up decode {info['warmup_ms']:.0f} ms), "
            f"beam {info['beam']}, frames {info['frame_shape'][0]}x{info['frame_shape'][1]}"
        )
        t = Table(title="translations")
        for c, kw in (
            ("input", {}),
            ("frames", {"justify": "right"}),
            ("decode ms", {"justify": "right"}),
            ("model ms", {"justify": "right"}),
            ("text", {}),
        ):
            t.add_column(c, **kw)
        for r in rows:
            t.add_row(
                escape(r["input"]), str(r["frames"]), f"{r['decode_ms']:.1f}", f"{r['model_ms']:.1f}", escape(r["text"])
            )
        if rows:
            out.print(t)
    if failure is not None:
        err.print(f"[bold red]error:[/] {escape_text(str(failure))}")
        return 1
    return 0


def escape_text(s: str) -> str:
    """`s` printed as is by rich (brackets in paths or lists are not markup)."""
    from rich.markup import escape

    return escape(s)
