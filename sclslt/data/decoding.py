"""A clip as files (`Item`), its cheap checks, and its decoding into frames: what `sclslt shard`
(sclslt/data/sharding.py) stores and what `sclslt translate` (sclslt/eval/translate.py) feeds the model
go through this one code path, so a translated clip is decoded exactly as its training clips were.

- `Item`: one clip as a corpus reader (sclslt/data/layouts/) or translation describes it: key, text,
  and either a list of frame files or a video with optional start/end times; nothing decoded.
- `check_item`: the cheap checks (files exist, counts agree, text non-empty), no decoding.
- `decode_item`: frame images with PIL, videos with PyAV (optionally resampled to `fps`, nearest
  frame), resized to a square `size`, at most `max_frames` kept by `even_frames`; it runs in a
  sharding worker process and reports a bad clip instead of raising.
- `even_frames`: the evenly spaced frame selection shard time, translation and the loader's
  evaluation-time subsampling all use.

Only the frames selected by ``--max-frames`` are decoded, so an unreadable frame that is not
selected goes unnoticed.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")

_NUM = re.compile(r"(\d+)")


@dataclass
class Item:
    """One clip as its files and annotation (nothing decoded); `check_item` fills `frames` and `problem`."""

    key: str
    text: str
    source: str  # path relative to the root (posix), shown in errors and stored
    path: str  # absolute path: frame folder or video file
    kind: str  # "frames" | "video"
    signer: str = ""
    frames: list = field(default_factory=list)  # absolute frame files (sorted), kind == "frames"
    listed: bool = False  # frames come from the annotation (not from listing a folder)
    expected_len: int | None = None  # frame count the annotation states
    start: float | None = None  # seconds, videos only
    end: float | None = None
    problem: str = ""  # set by check_item
    checked: bool = False

    def descriptor(self) -> list:
        """What identifies the item's content for resumption (see sclslt/data/sharding.py)."""
        return [
            self.key,
            self.text,
            self.source,
            self.signer,
            self.kind,
            self.start,
            self.end,
            self.expected_len,
            [Path(f).name for f in self.frames] if self.listed else len(self.frames),
            self.problem,
        ]


def natural_key(name: str):
    """Sort key of a file name with its digit runs compared as numbers (images2 before images10)."""
    return [int(t) if t.isdigit() else t for t in _NUM.split(name)]


def list_frames(folder: Path) -> list[str]:
    """The image files of a frame folder, in natural name order."""
    return [
        str(p)
        for p in sorted(
            (p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
            key=lambda p: natural_key(p.name),
        )
    ]


def check_item(it: Item) -> str:
    """Cheap checks without decoding; sets and returns `it.problem` ('' when fine)."""
    if it.problem or it.checked:
        return it.problem
    it.checked = True
    p = Path(it.path)
    if not it.text or not it.text.strip():
        it.problem = "empty text"
    elif it.kind == "video":
        if not p.is_file():
            it.problem = f"missing file {p}"
    elif it.listed:
        missing = [f for f in it.frames if not Path(f).is_file()]
        if it.expected_len is not None and int(it.expected_len) != len(it.frames):
            it.problem = f"mismatched counts: length {it.expected_len} but {len(it.frames)} imgs_path entries"
        elif missing:
            it.problem = f"missing file {missing[0]} ({len(missing)} of {len(it.frames)} frames missing)"
        elif not it.frames:
            it.problem = "zero frames"
    else:
        if not p.is_dir():
            it.problem = f"missing frame folder {p}"
        else:
            it.frames = list_frames(p)
            if not it.frames:
                it.problem = f"zero frames in {p}"
            elif it.expected_len is not None and int(it.expected_len) != len(it.frames):
                it.problem = f"mismatched counts: annotation length {it.expected_len} but {len(it.frames)} files"
    return it.problem


def even_frames(n: int, max_frames: int) -> np.ndarray:
    """Indices of at most `max_frames` of `n` frames, evenly spaced (shard time, `sclslt translate`, and
    the loader's evaluation-time subsampling all use this one)."""
    if max_frames <= 0 or n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def resize(img, size: int) -> np.ndarray:
    """A PIL image as uint8 RGB H x W x 3, resized to `size` x `size` (bilinear; 0 keeps its size)."""
    from PIL import Image

    img = img.convert("RGB")
    if size > 0 and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


class BadClip(Exception):
    """A clip that cannot be decoded (unreadable frame or video, zero frames); the message says why."""


def _decode_frames(it: Item, size: int, max_frames: int) -> tuple[np.ndarray, int]:
    from PIL import Image

    idx = even_frames(len(it.frames), max_frames)
    out = []
    for i in idx:
        f = it.frames[i]
        try:
            with Image.open(f) as im:
                im.load()
                out.append(resize(im, size))
        except Exception as e:  # noqa: BLE001
            raise BadClip(f"unreadable frame {f}: {type(e).__name__}: {e}") from e
    if size <= 0 and len({a.shape for a in out}) > 1:
        raise BadClip("frames of different sizes (use --size)")
    return np.stack(out), len(it.frames)


def _decode_video(it: Item, size: int, max_frames: int, fps: float) -> tuple[np.ndarray, int]:
    import av

    try:
        with av.open(it.path) as c:
            if not c.streams.video:
                raise BadClip(f"no video stream in {it.path}")
            st = c.streams.video[0]
            tb = float(st.time_base) if st.time_base else None
            if it.start and tb:
                c.seek(int(it.start / tb), stream=st, backward=True)
            frames, times = [], []
            for fr in c.decode(st):
                t = float(fr.pts * st.time_base) if (fr.pts is not None and tb) else (fr.time or 0.0)
                if it.start is not None and t < it.start - 1e-6:
                    continue
                if it.end is not None and t >= it.end - 1e-6:
                    break
                frames.append(fr.to_image())
                times.append(t)
    except BadClip:
        raise
    except Exception as e:  # noqa: BLE001
        raise BadClip(f"unreadable video {it.path}: {type(e).__name__}: {e}") from e
    if not frames:
        raise BadClip(f"zero frames in {it.path}" + (f" between {it.start}s and {it.end}s" if it.end else ""))
    n_src = len(frames)
    idx = np.arange(n_src)
    if fps and fps > 0:
        t0 = it.start if it.start is not None else times[0]
        step = float(np.median(np.diff(times))) if len(times) > 1 else 1.0 / fps
        t1 = it.end if it.end is not None else times[-1] + step  # the last frame lasts one step
        targets = t0 + np.arange(max(1, int(np.floor((t1 - t0) * fps + 1e-9)))) / fps
        tarr = np.asarray(times)
        idx = np.abs(tarr[None, :] - targets[:, None]).argmin(1)
    idx = idx[even_frames(len(idx), max_frames)]
    return np.stack([resize(frames[i], size) for i in idx]), n_src


def decode_item(it: Item, size: int, max_frames: int, fps: float = 0.0):
    """('ok', frames uint8 T x H x W x 3, source frame count) or ('bad', reason, 0): always a 3-tuple; never
    raises for bad input."""
    try:
        if it.problem or check_item(it):
            return ("bad", it.problem, 0)
        if it.kind == "video":
            frames, n = _decode_video(it, size, max_frames, fps)
        else:
            frames, n = _decode_frames(it, size, max_frames)
        return ("ok", np.ascontiguousarray(frames, dtype=np.uint8), n)
    except BadClip as e:
        return ("bad", str(e), 0)
    except Exception as e:  # noqa: BLE001 - a worker must report, not die
        return ("bad", f"{type(e).__name__}: {e}", 0)
