"""`sclslt demo --run RUN | --model DIR`: a Gradio page on 127.0.0.1 to try a trained translator.

Upload a video or a zip of frame images, or pick a clip of the run's test split; the page shows the
translation, the frames the model used, the latency and, from the contrastive head, the five nearest
training sentences with their similarity (and the reference sentence for a test clip). A bad input (not
a video, an empty or unsafe zip, a clip longer than `--max-frames` source frames) is a message on the
page, never a traceback. The translation is `sclslt translate`'s (`translate.Translator`, the same
decoding, frames and beam). Gradio is an optional extra: `pip install -e '.[demo]'`.
"""

from __future__ import annotations

import json
import tempfile
import time
import zipfile
from pathlib import Path

import numpy as np
import torch

from sclslt.eval.hub import TranslateError, input_item, load_clip, probe_video
from sclslt.eval.translate import Translator

SENTENCES = "train_sentences.json"  # an export's training sentences (sclslt export), for the neighbours
ZIP_LIMIT = 2 << 30  # bytes a frames zip may expand to


class DemoError(TranslateError):
    """What the page shows instead of a result."""


def extract_frames_zip(path: Path, into: Path) -> Path:
    """The frame images of a zip, extracted into `into`; a zip with other files only, unsafe names or too
    many bytes is a DemoError."""
    from sclslt.data.decoding import IMAGE_EXTS

    try:
        z = zipfile.ZipFile(path)
    except zipfile.BadZipFile as e:
        raise DemoError(f"{path.name}: not a readable zip ({e})") from e
    with z:
        members = [
            m
            for m in z.infolist()
            if not m.is_dir()
            and Path(m.filename).suffix.lower() in IMAGE_EXTS
            and "__MACOSX" not in Path(m.filename).parts
            and not Path(m.filename).name.startswith("._")
        ]
        if not members:
            raise DemoError(f"{path.name}: the zip holds no frame images (PNG/JPEG expected)")
        if sum(m.file_size for m in members) > ZIP_LIMIT:
            raise DemoError(f"{path.name}: the frames expand to more than {ZIP_LIMIT >> 30} GiB")
        seen = set()
        for m in members:
            name = Path(m.filename)
            if name.is_absolute() or ".." in name.parts:
                raise DemoError(f"{path.name}: unsafe member name {m.filename!r}")
            if name.name in seen:
                raise DemoError(f"{path.name}: two frames named {name.name!r} (put one clip's frames in the zip)")
            seen.add(name.name)
            try:
                data = z.read(m)
            except (
                RuntimeError,
                zipfile.BadZipFile,
                NotImplementedError,
                OSError,
            ) as e:  # encrypted, bad CRC, deflate64
                raise DemoError(f"{path.name}: cannot read {m.filename!r} ({e})") from e
            (into / name.name).write_bytes(data)
    return into


class Demo:
    """The translator plus what the page shows beside a translation: the training sentences embedded by
    the contrastive head (nearest neighbours) and the test split's clips (run mode)."""

    def __init__(self, run=None, model=None, device=None, max_frames: int = 2000):
        self.tr = Translator(run_dir=run, model=model, device=device)
        self.max_frames = max_frames
        self.head = self.tr.model.cfg.similarity
        self.test, self.shards = {}, None
        if run is not None:
            from sclslt.data.corpus import resolve_shards_dir
            from sclslt.data.shards import manifest_rows, read_manifest

            self.shards = resolve_shards_dir(self.tr.cfg.data)
            sentences = sorted({r.text for r in manifest_rows(read_manifest(self.shards, "train"))})
            self.test = {r.key: r.text for r in manifest_rows(read_manifest(self.shards, "test"))}
        else:
            f = Path(self.tr.export_dir) / SENTENCES
            sentences = json.loads(f.read_text()) if f.is_file() else []
        self.sentences = sentences
        self.text_features = self._embed_texts(sentences) if sentences else None

    @torch.no_grad()
    def _embed_texts(self, texts: list[str], batch: int = 256) -> dict:
        from sclslt.model.heads import get_head

        m, head = self.tr.model, get_head(self.head)
        dummy = torch.zeros(1, 1, m.s2s.config.d_model, device=self.tr.device)  # features() wants both sides
        parts = []
        for i in range(0, len(texts), batch):
            enc = self.tr.tokenizer(
                texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt"
            ).to(self.tr.device)
            text = m.encode_text(enc["input_ids"], enc["attention_mask"])
            f = head.features(
                m, dummy, torch.ones(1, 1, dtype=torch.bool, device=self.tr.device), text, enc["attention_mask"]
            )
            parts.append({k: v for k, v in f.items() if k.startswith("text")})
        if len(parts) == 1:
            return parts[0]
        from sclslt.model.losses import pad_cat

        return {k: (pad_cat if parts[0][k].ndim > 2 else torch.cat)([p[k] for p in parts]) for k in parts[0]}

    @torch.no_grad()
    def neighbours(self, frames: np.ndarray, k: int = 5) -> list[list]:
        """The k training sentences nearest the clip by the contrastive head's similarity."""
        if self.text_features is None:
            return []
        from sclslt.model.heads import get_head

        m, head, dev = self.tr.model, get_head(self.head), self.tr.device
        x = torch.from_numpy(np.array(frames))[None].to(dev)  # a copy: the clip may be read-only
        enc, mask = m.encode_video(x, torch.ones(1, frames.shape[0], dtype=torch.bool, device=dev))
        no_text = torch.zeros(1, 1, m.text_encoder.config.d_model, device=dev)  # features() wants both sides
        f = head.features(m, enc, mask, no_text, torch.ones(1, 1, dtype=torch.bool, device=dev))
        video = {k: v for k, v in f.items() if k.startswith("video")}
        scores = head.scores({**video, **self.text_features}, m.cfg.cico_tau)[0]
        top = torch.topk(scores, min(k, len(self.sentences)))
        return [[self.sentences[i], round(float(s), 4)] for s, i in zip(top.values.tolist(), top.indices.tolist())]

    def frames_of_upload(self, path: str | None) -> tuple[np.ndarray, int, str]:
        if not path:
            raise DemoError("no file: upload a video or a zip of frames, or pick a test clip")
        p = Path(path)
        if p.stat().st_size == 0:
            raise DemoError(f"{p.name}: the file is empty")
        if p.suffix.lower() == ".zip":
            with tempfile.TemporaryDirectory() as tmp:
                folder = extract_frames_zip(p, Path(tmp))
                input_item(folder)
                frames, n_src = load_clip(folder, self.tr.spec)
            return frames, n_src, p.name
        probe_video(p)
        return (*load_clip(p, self.tr.spec), p.name)

    def frames_of_test_clip(self, key: str) -> tuple[np.ndarray, int, str]:
        from sclslt.data.loader import subsample_frames
        from sclslt.data.shards import ShardIndex, read_manifest

        if key not in self.test:
            raise DemoError(f"no test clip {key!r}")
        frames = ShardIndex(self.shards, read_manifest(self.shards, "test")).read(key)["frames"]
        return subsample_frames(frames, self.tr.spec.max_frames), len(frames), key

    def translate(self, upload: str | None = None, test_key: str | None = None) -> dict:
        """Everything the page shows for one input; DemoError / TranslateError for a bad one."""
        t0 = time.perf_counter()
        frames, n_src, name = self.frames_of_test_clip(test_key) if test_key else self.frames_of_upload(upload)
        if n_src > self.max_frames:
            raise DemoError(
                f"{name}: {n_src} frames is longer than this demo takes ({self.max_frames}; sclslt demo --max-frames N)"
            )
        if len(frames) == 0:
            raise DemoError(f"{name}: no frames")
        decode_ms = 1000 * (time.perf_counter() - t0)
        text, model_ms = self.tr.translate_frames(frames)
        return {
            "input": name,
            "text": text,
            "frames": frames,
            "source_frames": n_src,
            "decode_ms": decode_ms,
            "model_ms": model_ms,
            "neighbours": self.neighbours(frames),
            "reference": self.test.get(test_key) if test_key else None,
        }


def gallery(frames: np.ndarray, n: int = 8, size: int = 112) -> list[np.ndarray]:
    """Up to n evenly spaced frames, enlarged (nearest) for the page."""
    from PIL import Image

    idx = np.linspace(0, len(frames) - 1, min(n, len(frames))).round().astype(int)
    return [np.asarray(Image.fromarray(frames[i]).resize((size, size), Image.NEAREST)) for i in idx]


def build_app(demo: Demo):
    import gradio as gr

    def run(upload, test_key):
        try:
            r = demo.translate(upload, None if upload else (test_key or None))  # an upload wins
        except TranslateError as e:
            return "", f"**Error:** {e}", [], []
        info = (
            f"**{r['input']}**: {len(r['frames'])} frames used of {r['source_frames']}; latency "
            f"{r['decode_ms'] + r['model_ms']:.0f} ms (decode {r['decode_ms']:.0f} ms, model {r['model_ms']:.0f} ms)"
        )
        if r["reference"] is not None:
            info += f"  \nReference: *{r['reference']}*"
        return r["text"], info, gallery(r["frames"]), r["neighbours"]

    with gr.Blocks(title="sclslt: sign language translation") as app:
        gr.Markdown(
            f"# Sign language translation\n`{demo.tr.source}`, checkpoint `{demo.tr.choice.label}`, beam {demo.tr.beam}"
        )
        with gr.Row():
            with gr.Column():
                upload = gr.File(label="A video, or a zip of frames", elem_id="upload", type="filepath")
                test_key = gr.Dropdown(
                    choices=[""] + sorted(demo.test),
                    value="",
                    label="or a test clip",
                    elem_id="test_clip",
                    visible=bool(demo.test),
                )
                button = gr.Button("Translate", variant="primary", elem_id="translate")
            with gr.Column():
                text = gr.Textbox(label="Translation", elem_id="translation", interactive=False)
                info = gr.Markdown(elem_id="info")
                frames = gr.Gallery(label="Frames the model used", elem_id="frames", columns=8, height=160)
                near = gr.Dataframe(
                    headers=["nearest training sentence", "similarity"],
                    elem_id="neighbours",
                    label="Nearest training sentences (contrastive head)",
                    interactive=False,
                )
        button.click(run, [upload, test_key], [text, info, frames, near])
    return app


def add_arguments(p) -> None:
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--run", metavar="RUN_DIR", help="a trained run (its selected checkpoint)")
    src.add_argument("--model", metavar="DIR|HUB_NAME", help="an exported model (sclslt export)")
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=7860)
    p.add_argument("--device", default=None, metavar="cpu|cuda")
    p.add_argument("--max-frames", type=int, default=2000, help="longest clip taken, in source frames")


def run_command(args) -> int:
    import os
    import sys

    os.environ.setdefault("GRADIO_ANALYTICS_ENABLED", "False")
    try:
        import gradio  # noqa: F401
    except ImportError:
        print("sclslt demo: error: needs gradio: pip install -e '.[demo]'", file=sys.stderr)
        return 1
    try:
        demo = Demo(args.run, args.model, args.device, args.max_frames)
    except TranslateError as e:
        print(f"sclslt demo: error: {e}", file=sys.stderr)
        return 1
    print(f"sclslt demo: http://{args.host}:{args.port}", flush=True)
    build_app(demo).launch(server_name=args.host, server_port=args.port, share=False, show_error=False)
    return 0
