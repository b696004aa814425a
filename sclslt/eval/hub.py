"""`SignTranslator`: an exported model, loaded by local path or Hugging Face Hub name.

    from sclslt.eval.hub import SignTranslator
    model = SignTranslator.from_pretrained("runs/phoenix/export")      # or "user/sclslt-phoenix2014t"
    print(model.translate("clip.mp4"))                                 # a video or a folder of frames

The folder (written by `sclslt export`, `sclslt.eval.export`) is the Hugging Face layout:
`model.safetensors` (the whole translator: backbone, visual encoder, decoder, text encoder, projections),
`config.json` (the model and frame settings, the transformers architectures of the backbone and of mBART
so that nothing pretrained is downloaded, generation defaults), the tokenizer files and sclslt's vocab
record, `generation_config.json`, `README.md` (the model card) and `sclslt_export.json`, the sha256 of
every other file, written last: a partial or damaged folder is an `ExportError` naming the file.

An input clip (a video file or a folder of frames) is read as the model's training data were (`load_clip`,
with the frame settings of a `FrameSpec`; a bad one is a `TranslateError` naming the file): here for
`SignTranslator.translate`, and for `sclslt translate` and the demo, which sit above this module.

The class is huggingface_hub's `PyTorchModelHubMixin` (`from_pretrained`, `save_pretrained`,
`push_to_hub`); `push_to_hub` is the library's own call (no network here: untested).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from huggingface_hub import PyTorchModelHubMixin
from torch import nn

from sclslt.data.shards import file_sha256

MANIFEST = "sclslt_export.json"
WEIGHTS = "model.safetensors"
FORMAT = 1


class TranslateError(RuntimeError):
    """Translation cannot go on; the message says what is wrong and with which file."""


class ExportError(RuntimeError):
    """An export folder that cannot be used; the message names the folder or file and what is wrong."""


def write_manifest(folder: Path) -> dict:
    """sha256 of every file of the folder (but the manifest), written last."""
    files = {
        p.relative_to(folder).as_posix(): file_sha256(p)
        for p in sorted(folder.rglob("*"))
        if p.is_file() and p.name != MANIFEST
    }
    rec = {"format": FORMAT, "files": files}
    (folder / MANIFEST).write_text(json.dumps(rec, indent=1) + "\n")
    return rec


def verify(folder: Path) -> dict:
    """The folder's manifest, after checking that every file it lists is there with its sha256."""
    folder = Path(folder)
    m = folder / MANIFEST
    if not m.is_file():
        raise ExportError(
            f"{folder}: not a complete sclslt export ({MANIFEST} is missing: the export did not "
            f"finish, or this is not an sclslt model folder); export it again with sclslt export"
        )
    try:
        rec = json.loads(m.read_text())
        files = rec["files"]
    except (json.JSONDecodeError, KeyError, TypeError) as e:
        raise ExportError(f"{m}: unreadable export manifest ({e})") from e
    for name, digest in files.items():
        f = folder / name
        if not f.is_file():
            raise ExportError(f"{f}: missing from the export (a partial copy or download?)")
        if file_sha256(f) != digest:
            raise ExportError(f"{f}: damaged (sha256 differs from {MANIFEST}); copy or download it again")
    return rec


# ---------------------------------------------------------------------------------------------
# inputs: decoded and resized as the model's training data was (the frame settings: `FrameSpec`)


@dataclass
class FrameSpec:
    size: int  # square side for decode_item (0: keep the decoded size)
    shape: tuple  # (H, W) the model was trained on
    shard_max_frames: int  # the shard tool's --max-frames (0: none)
    fps: float  # the shard tool's --fps (0: native frame rate)
    max_frames: int  # data.max_frames (evenly spaced, as in evaluation)
    source: str  # where the numbers come from


def input_item(path):
    """A `decoding.Item` for one input (video file or frame folder), checked; raises TranslateError."""
    from sclslt.data.decoding import IMAGE_EXTS, Item, check_item

    p = Path(path)
    if not p.exists():
        raise TranslateError(f"input {p} does not exist")
    if p.is_dir():
        kind = "frames"
    elif p.suffix.lower() in IMAGE_EXTS:
        raise TranslateError(f"input {p} is a single image: pass the folder that holds the clip's frames")
    else:
        kind = "video"
    # the text is not used (decode_item's check wants one)
    it = Item(key="input", text="-", source=str(p), path=str(p), kind=kind)
    problem = check_item(it)
    if problem:
        raise TranslateError(
            f"input {p}: {problem}" + (" (PNG/JPEG files expected)" if "zero frames" in problem else "")
        )
    return it


def probe_video(path) -> None:
    """Cheap check that PyAV can open a video and finds a video stream (nothing is decoded)."""
    import av

    try:
        with av.open(str(path)) as c:
            if not c.streams.video:
                raise TranslateError(f"input {path}: no video stream")
    except TranslateError:
        raise
    except Exception as e:  # noqa: BLE001
        raise TranslateError(f"input {path}: cannot be decoded as a video ({type(e).__name__}: {e})") from e


def load_clip(path, spec: FrameSpec) -> tuple[np.ndarray, int]:
    """(frames uint8 T x H x W x 3 as the model sees them, frames in the source)."""
    from sclslt.data.decoding import decode_item
    from sclslt.data.loader import subsample_frames

    it = input_item(path)
    status, *rest = decode_item(it, spec.size, spec.shard_max_frames, spec.fps)
    if status != "ok":
        raise TranslateError(f"input {path}: cannot be decoded: {rest[0]}")
    frames, n_src = rest
    if frames.shape[1:3] != tuple(spec.shape):  # shards kept at their original size (--size 0)
        from PIL import Image

        h, w = spec.shape
        frames = np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in frames])
    return subsample_frames(frames, spec.max_frames), int(n_src)


CARRIED = ("sclslt_vocab.json", "train_sentences.json", "README.md")  # files a model carries through save/load


class SignTranslator(
    nn.Module, PyTorchModelHubMixin, library_name="sclslt", tags=["sign-language-translation", "gloss-free", "sclslt"]
):
    """An exported translator (`config`: the export's config.json). `from_pretrained` sets `tokenizer`, the
    `folder` it read and the files it carries (`extras`: the vocab record, the training sentences, the card),
    which `save_pretrained` / `push_to_hub` write again with a fresh manifest: what is saved loads back."""

    def __init__(self, config: dict):
        super().__init__()
        from sclslt.config import from_dict
        from sclslt.model.slt import SLTModel

        self.config = config
        cfg = from_dict({"model": config["model"], "data": config["data"]})
        self.model = SLTModel(cfg.model, None, cfg.data, arch=config["arch"]).eval()
        self.tokenizer, self.folder, self.extras = None, None, {}

    @classmethod
    def from_pretrained(
        cls,
        pretrained_model_name_or_path,
        *,
        force_download: bool = False,
        token=None,
        cache_dir=None,
        local_files_only: bool = False,
        revision=None,
        **model_kwargs,
    ):
        """A local export folder or a Hub repository (downloaded first); its manifest is checked before any
        file is read, so a partial or damaged folder is an `ExportError` naming the file."""
        folder = Path(pretrained_model_name_or_path)
        if not folder.is_dir():
            from huggingface_hub import snapshot_download

            folder = Path(
                snapshot_download(
                    str(pretrained_model_name_or_path),
                    revision=revision,
                    cache_dir=cache_dir,
                    token=token,
                    force_download=force_download,
                    local_files_only=local_files_only,
                )
            )
        verify(folder)
        try:
            config = json.loads((folder / "config.json").read_text())
        except json.JSONDecodeError as e:
            raise ExportError(f"{folder / 'config.json'}: not JSON ({e})") from e
        if config.get("sclslt_format") != FORMAT:
            raise ExportError(
                f"{folder / 'config.json'}: export format {config.get('sclslt_format')!r}, this "
                f"sclslt reads format {FORMAT}"
            )
        return super().from_pretrained(str(folder), local_files_only=True, **model_kwargs)

    @classmethod
    def _from_pretrained(
        cls,
        *,
        model_id: str,
        revision,
        cache_dir,
        force_download,
        local_files_only,
        token,
        map_location: str = "cpu",
        strict: bool = True,
        **model_kwargs,
    ):
        from safetensors.torch import load_model

        from sclslt.data.text import load_tokenizer

        folder = Path(model_id)  # from_pretrained resolved and verified it
        model = cls(model_kwargs.pop("config", None) or json.loads((folder / "config.json").read_text()))
        missing, unexpected = load_model(model, str(folder / WEIGHTS), strict=False, device=map_location)
        if missing or unexpected:
            raise ExportError(
                f"{folder / WEIGHTS}: does not match config.json's model (missing {sorted(missing)[:5]}, "
                f"unexpected {sorted(unexpected)[:5]})"
            )
        model.tokenizer = load_tokenizer(folder)
        model.folder = folder
        model.extras = {n: (folder / n).read_bytes() for n in CARRIED if (folder / n).is_file()}
        return model.eval()

    def _save_pretrained(self, save_directory: Path) -> None:
        """Weights, config, tokenizer, generation defaults and the carried files, then the manifest (last)."""
        from safetensors.torch import save_model

        save_directory = Path(save_directory)
        save_model(self, str(save_directory / WEIGHTS))
        (save_directory / "config.json").write_text(json.dumps(self.config, indent=1, sort_keys=True) + "\n")
        if self.tokenizer is not None:
            self.tokenizer.save_pretrained(str(save_directory))
        g = self.model.s2s.generation_config
        g.num_beams, g.max_new_tokens = (
            int(self.config["generation"]["beam"]),
            int(self.config["generation"]["max_len"]),
        )
        g.save_pretrained(str(save_directory))
        for name, data in self.extras.items():
            (save_directory / name).write_bytes(data)
        for f in save_directory.iterdir():  # readable by whoever the folder is shared with
            if f.is_file():
                f.chmod(0o644)
        write_manifest(save_directory)

    # -- translating ------------------------------------------------------------------------
    def frame_spec(self):
        f = self.config["frames"]
        return FrameSpec(
            int(f["size"]),
            tuple(f["shape"]),
            int(f["shard_max_frames"]),
            float(f["fps"]),
            int(f["max_frames"]),
            "the export's config.json",
        )

    @torch.no_grad()
    def translate_frames(self, frames: np.ndarray, beam: int | None = None, max_len: int | None = None) -> str:
        """The translation of one clip of uint8 frames (T x H x W x 3) as the model's training frames were."""
        g = self.config["generation"]
        dev = next(self.parameters()).device
        x = torch.from_numpy(np.ascontiguousarray(frames))[None].to(dev)
        mask = torch.ones(1, frames.shape[0], dtype=torch.bool, device=dev)
        out = self.model.generate(x, mask, beam=int(beam or g["beam"]), max_len=int(max_len or g["max_len"]))
        return self.tokenizer.batch_decode(out, skip_special_tokens=True)[0].strip()

    def translate(self, path, beam: int | None = None, max_len: int | None = None) -> str:
        """The translation of a video file or a folder of frames (decoded as the training data were)."""
        frames, _ = load_clip(path, self.frame_spec())
        return self.translate_frames(frames, beam, max_len)
