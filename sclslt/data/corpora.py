"""Readers for the sign-language corpora's own layouts, and clip decoding (used by sclslt shard).

A reader turns a corpus root and a split into `Item`s (key, text exactly as the corpus has it,
signer, source, and either a list of frame files or a video with optional start/end times); nothing
is decoded there. `check_item` does the cheap checks (files exist, counts agree, text non-empty) and
`decode_item` decodes one clip (frames resized, temporally subsampled) in a worker process.

Layouts and the assumptions made about them (checked against public loaders where possible):

- ``phoenix2014t``: ``--root`` is the ``PHOENIX-2014-T`` release directory. Annotations are looked up
  in ``--annotations`` (default ``<root>/annotations/manual`` then ``<root>``): first the official
  ``PHOENIX-2014-T.<split>.corpus.csv`` ('|'-separated, header ``name|video|start|end|speaker|orth|
  translation``; text = ``translation``, signer = ``speaker``), else GFSLT-VLP's ``labels.<split>``
  (gzip-compressed pickle of a dict keyed ``"<split>/<name>"`` with ``name, gloss, text, length,
  imgs_path``; ``imgs_path`` is relative to ``features/fullFrame-210x260px/``, e.g.
  ``train/<name>/images0001.png``, as in GFSLT-VLP's ``datasets.py``; it has no signer). Frames of the
  CSV are the PNGs in ``features/fullFrame-210x260px/<split>/<name>/`` (the CSV's ``video`` column
  ``<name>/1/*.png`` comes from PHOENIX-2014 and is not used as a path). With the pickle, ``length``
  must equal ``len(imgs_path)`` and every listed file must exist.
- ``csl-daily``: ``--root`` is the CSL-Daily directory with ``sentence_label/csl2020ct_v2.pkl`` (a
  plain pickle: ``{"info": [{"name", "length", "label_gloss", "label_char", "label_word", "signer",
  ...}], ...}``), ``sentence_label/split_1.txt`` ('|'-separated, header ``name|split``) and JPEG frames
  in ``sentence/frames_512x512/<name>/`` (also accepted: ``frames_512x512/<name>/``,
  ``sentence_frames-512x512/frames_512x512/<name>/``). The text is ``"".join(label_char)`` (the
  sentence as characters, no separators: the annotation has no other sentence string); ``length``,
  when present, must equal the number of frame files.
- ``how2sign``: ``--root`` holds ``how2sign_realigned_<split>.csv`` (searched recursively; TAB-separated,
  columns ``VIDEO_ID, VIDEO_NAME, SENTENCE_ID, SENTENCE_NAME, START_REALIGNED, END_REALIGNED,
  SENTENCE``) and mp4s anywhere under it. A sentence clip ``<SENTENCE_NAME>.mp4`` (the release's
  sentence-level videos) is decoded whole; otherwise ``<VIDEO_NAME>.mp4`` is decoded between
  ``START_REALIGNED`` and ``END_REALIGNED`` seconds. The release calls its dev split ``val``:
  ``--split dev`` reads ``how2sign_realigned_val.csv`` and writes split ``dev``. No signer column.
- ``captions`` (YouTube-ASL, YouTube-SL-25, BOBSL-style: long videos with timed sentences): ``--root``
  holds videos (any of ``VIDEO_EXTS``, searched recursively) and, next to each, a caption file
  ``<video stem>.vtt`` or ``<video stem>.<lang>.vtt`` (WebVTT, as yt-dlp writes YouTube's captions;
  ``.srt`` too), read with webvtt-py. Every cue is one clip, cut from the video by its times while
  sharding: key ``<video stem>_<cue number, 5 digits>``, text = the cue's lines joined by spaces.
  Splits: ``<root>/splits.json`` (``{"train": [video stems], "dev": [...], "test": [...]}``) or
  ``<root>/<split>.txt`` (one stem per line); without either, every video belongs to ``train``.
  A cue without text or with end <= start, and a caption file without its video, are bad items.
- ``manifest``: ``--root`` is a ``.csv`` (comma-separated, with header) or ``.jsonl`` file, or a
  directory holding ``manifest.csv``/``manifest.jsonl``. Fields: ``path`` (a video file or a folder
  of frames, relative to the manifest's directory unless absolute), ``text``, optional ``split``
  (rows without one belong to ``train``), ``signer``, ``key``, ``start``/``end`` (seconds, videos
  only). The key defaults to the path without its extension.

Keys are made tar-safe (characters outside ``[A-Za-z0-9_-]`` become ``_``); two items with the
same key are both reported bad. Unpickling happens only for the corpora's own annotation files
(CSL-Daily's ``.pkl``, GFSLT-VLP's ``labels.*``), which are the formats those corpora ship, and only
as data (``load_annotation_pickle``: containers, strings, numbers, numpy arrays; a pickle naming any
other global is refused before it runs); shards never contain pickles. Only the frames selected by ``--max-frames`` are decoded, so an unreadable
frame that is not selected goes unnoticed.
"""
from __future__ import annotations

import csv
import gzip
import io
import json
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".bmp")
VIDEO_EXTS = (".mp4", ".avi", ".mov", ".mkv", ".webm")


class CorpusError(RuntimeError):
    """The corpus layout itself is unusable (annotation file missing or malformed)."""


class _AnnotationUnpickler(pickle.Unpickler):
    """Unpickles data only: builtins' containers, strings and numbers, and numpy arrays and scalars.
    A pickle that names any other global (a function to call on load, a class to build) is refused
    before anything runs: annotation files travel through mirrors and forks, and a pickle runs code."""

    ALLOWED = {("builtins", n) for n in ("dict", "list", "tuple", "set", "frozenset", "str", "bytes", "bytearray",
                                         "int", "float", "complex", "bool", "slice")} | \
        {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode")} | \
        {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")} | \
        {("numpy", "ndarray"), ("numpy", "dtype")} | \
        {(m, n) for m in ("numpy.core.numeric", "numpy._core.numeric") for n in ("_frombuffer",)}

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


class RefusedPickle(pickle.UnpicklingError):
    """An annotation pickle asked for a global outside the data-only allow-list."""


def load_annotation_pickle(f, path) -> object:
    """`pickle.load` of a corpus's own annotation file (GFSLT-VLP's labels, CSL-Daily's .pkl), data only:
    a pickle that would run code is a `CorpusError` naming the file and the global it asked for."""
    try:
        return _AnnotationUnpickler(f).load()
    except RefusedPickle as e:
        raise CorpusError(f"{path}: refused to unpickle it: it asks for {e.args[0]}, which is not data (an "
                          f"annotation file may hold containers, strings, numbers and numpy arrays only); "
                          f"a pickle runs what it names when loaded, so this file was not read") from None


@dataclass
class Item:
    key: str
    text: str
    source: str                      # path relative to the root (posix), shown in errors and stored
    path: str                        # absolute path: frame folder or video file
    kind: str                        # "frames" | "video"
    signer: str = ""
    frames: list = field(default_factory=list)   # absolute frame files (sorted), kind == "frames"
    listed: bool = False             # frames come from the annotation (not from listing a folder)
    expected_len: int | None = None  # frame count the annotation states
    start: float | None = None       # seconds, videos only
    end: float | None = None
    problem: str = ""                # set by check_item
    checked: bool = False

    def descriptor(self) -> list:
        """What identifies the item's content for resumption (see sclslt/data/sharding.py)."""
        return [self.key, self.text, self.source, self.signer, self.kind, self.start, self.end,
                self.expected_len, [Path(f).name for f in self.frames] if self.listed else len(self.frames),
                self.problem]


_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")
_NUM = re.compile(r"(\d+)")


def safe_key(name: str) -> str:
    return _UNSAFE.sub("_", name.strip()) or "_"


def natural_key(name: str):
    return [int(t) if t.isdigit() else t for t in _NUM.split(name)]


def _rel(path: Path, root: Path) -> str:
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def list_frames(folder: Path) -> list[str]:
    return [str(p) for p in sorted((p for p in folder.iterdir() if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                                   key=lambda p: natural_key(p.name))]


# ---------------------------------------------------------------------------------------------
# layouts

def _find_first(cands: list[Path]) -> Path | None:
    return next((c for c in cands if c.is_file()), None)


def read_phoenix2014t(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    dirs = [annotations] if annotations else [root / "annotations" / "manual", root]
    csv_path = _find_first([d / f"PHOENIX-2014-T.{split}.corpus.csv" for d in dirs])
    pkl_path = _find_first([d / f"labels.{split}" for d in dirs])
    frames_root = root / "features" / "fullFrame-210x260px"
    items = []
    if csv_path is not None:
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="|", quoting=csv.QUOTE_NONE))
        if rows and not {"name", "translation"} <= set(rows[0]):
            raise CorpusError(f"{csv_path}: expected columns name|video|start|end|speaker|orth|translation, "
                              f"got {list(rows[0])}")
        for r in rows:
            folder = frames_root / split / r["name"]
            items.append(Item(key=safe_key(r["name"]), text=r.get("translation") or "",
                              source=_rel(folder, root), path=str(folder), kind="frames",
                              signer=r.get("speaker") or ""))
        return items
    if pkl_path is not None:
        try:
            with gzip.open(pkl_path, "rb") as f:
                data = load_annotation_pickle(f, pkl_path)     # GFSLT-VLP's own annotation format
        except CorpusError:
            raise
        except Exception as e:  # noqa: BLE001
            raise CorpusError(f"{pkl_path}: cannot read GFSLT-VLP labels (gzip pickle): {e}") from e
        if not isinstance(data, dict):
            raise CorpusError(f"{pkl_path}: expected a dict keyed '<split>/<name>', got {type(data).__name__}")
        for k in sorted(data):
            v = data[k]
            name = v.get("name") or str(k).split("/", 1)[-1]
            imgs = list(v.get("imgs_path") or [])
            folder = frames_root / split / name
            items.append(Item(key=safe_key(name), text=v.get("text") or "", source=_rel(folder, root),
                              path=str(folder), kind="frames", frames=[str(frames_root / p) for p in imgs],
                              listed=True, expected_len=v.get("length")))
        return items
    raise CorpusError(f"phoenix2014t: no annotation for split {split!r}: looked for "
                      f"PHOENIX-2014-T.{split}.corpus.csv and labels.{split} in {', '.join(map(str, dirs))}")


def read_csl_daily(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    ann = annotations or root / "sentence_label"
    pkl_path, split_path = ann / "csl2020ct_v2.pkl", ann / "split_1.txt"
    for p in (pkl_path, split_path):
        if not p.is_file():
            raise CorpusError(f"csl-daily: missing {p}")
    with open(split_path, encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="|"))
    if rows and not {"name", "split"} <= set(rows[0]):
        raise CorpusError(f"{split_path}: expected header name|split, got {list(rows[0])}")
    names = [r["name"].strip() for r in rows if (r.get("split") or "").strip() == split]
    try:
        with open(pkl_path, "rb") as f:
            data = load_annotation_pickle(f, pkl_path)     # CSL-Daily's own annotation format
        info = {d["name"]: d for d in data["info"]}
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"{pkl_path}: cannot read CSL-Daily annotation (pickle with 'info'): {e}") from e
    frame_dirs = [root / "sentence" / "frames_512x512", root / "frames_512x512",
                  root / "sentence_frames-512x512" / "frames_512x512"]
    base = next((d for d in frame_dirs if d.is_dir()), frame_dirs[0])
    items = []
    for name in names:
        folder = base / name
        d = info.get(name)
        if d is None:
            items.append(Item(key=safe_key(name), text="", source=_rel(folder, root), path=str(folder),
                              kind="frames", problem=f"not in {pkl_path.name}"))
            continue
        chars = d.get("label_char")
        text = "".join(map(str, chars)) if isinstance(chars, (list, tuple, np.ndarray)) else str(chars or "")
        items.append(Item(key=safe_key(name), text=text, source=_rel(folder, root), path=str(folder),
                          kind="frames", signer=str(d.get("signer", "")), expected_len=d.get("length")))
    return items


def read_how2sign(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    fsplit = "val" if split == "dev" else split
    fname = f"how2sign_realigned_{fsplit}.csv"
    cands = sorted((annotations or root).rglob(fname))
    if not cands:
        raise CorpusError(f"how2sign: no {fname} under {annotations or root}")
    videos: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() == ".mp4":
            videos.setdefault(p.stem, p)
    items = []
    with open(cands[0], encoding="utf-8", newline="") as f:
        rows = list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))
    need = {"VIDEO_NAME", "SENTENCE_NAME", "START_REALIGNED", "END_REALIGNED", "SENTENCE"}
    if rows and not need <= set(rows[0]):
        raise CorpusError(f"{cands[0]}: expected tab-separated columns {sorted(need)}, got {list(rows[0])}")
    for r in rows:
        sname, vname = r["SENTENCE_NAME"].strip(), r["VIDEO_NAME"].strip()
        clip, full = videos.get(sname), videos.get(vname)
        problem, start, end = "", None, None
        if clip is not None:
            path = clip
        else:
            path = full if full is not None else root / f"{vname}.mp4"
            try:
                start, end = float(r["START_REALIGNED"]), float(r["END_REALIGNED"])
                if not end > start >= 0:
                    problem = f"bad times start={start} end={end}"
            except (TypeError, ValueError):
                problem = f"bad times {r['START_REALIGNED']!r}..{r['END_REALIGNED']!r}"
            if full is None:
                problem = problem or f"missing file: neither {sname}.mp4 nor {vname}.mp4 under {root}"
        items.append(Item(key=safe_key(sname), text=r.get("SENTENCE") or "", source=_rel(Path(path), root),
                          path=str(path), kind="video", start=start, end=end, problem=problem))
    return items


def read_manifest_file(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    path = annotations or root
    if path.is_dir():
        path = _find_first([path / "manifest.csv", path / "manifest.jsonl"])
        if path is None:
            raise CorpusError(f"manifest: no manifest.csv or manifest.jsonl in {root}")
    if not path.is_file():
        raise CorpusError(f"manifest: {path} does not exist")
    base = path.parent
    try:
        body = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise CorpusError(f"{path}: not UTF-8 text ({e})") from None
    if path.suffix.lower() == ".jsonl":
        rows = []
        for i, line in enumerate(body.splitlines(), 1):
            if line.strip():
                try:
                    rows.append(json.loads(line))
                except json.JSONDecodeError as e:
                    raise CorpusError(f"{path}:{i}: not JSON ({e})") from e
    else:
        try:
            rows = list(csv.DictReader(io.StringIO(body, newline="")))
        except csv.Error as e:
            raise CorpusError(f"{path}: not CSV ({e})") from None
    items = []
    for i, r in enumerate(rows, 1):
        if not isinstance(r, dict) or "path" not in r or "text" not in r:
            raise CorpusError(f"{path}: row {i} lacks 'path' or 'text' (has "
                              f"{sorted(map(str, r)) if isinstance(r, dict) else type(r).__name__})")
        if str(r.get("split") or "train").strip() != split:
            continue
        raw = str(r["path"] if r["path"] is not None else "").strip()
        p = Path(raw)
        p = p if p.is_absolute() else base / p
        kind = "video" if p.suffix.lower() in VIDEO_EXTS else "frames"
        key = r.get("key") or (Path(raw).with_suffix("").as_posix() if Path(raw).name else f"row{i}")
        start = r.get("start")
        end = r.get("end")
        problem = "" if Path(raw).name else f"row {i}: empty path"
        try:
            start = float(start) if start not in (None, "") else None
            end = float(end) if end not in (None, "") else None
        except (TypeError, ValueError):
            problem, start, end = f"bad times {r.get('start')!r}..{r.get('end')!r}", None, None
        items.append(Item(key=safe_key(str(key)), text=str(r["text"] or ""), source=_rel(p, base),
                          path=str(p), kind=kind, signer=str(r.get("signer") or ""), start=start, end=end,
                          problem=problem))
    return items


def _caption_split(root: Path, split: str) -> set[str] | None:
    """The video stems of `split` (None: no split files, everything is train)."""
    if (root / "splits.json").is_file():
        try:
            splits = json.loads((root / "splits.json").read_text(encoding="utf-8"))
        except json.JSONDecodeError as e:
            raise CorpusError(f"{root / 'splits.json'}: not JSON ({e})") from e
        return set(splits.get(split, []))
    if (root / f"{split}.txt").is_file():
        return {ln.strip() for ln in (root / f"{split}.txt").read_text(encoding="utf-8").splitlines() if ln.strip()}
    if any((root / f"{sp}.txt").is_file() for sp in DEFAULT_SPLITS):
        return set()
    return None


def read_captions(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    import webvtt
    members = _caption_split(root, split)
    if members is None and split != "train":
        return []
    videos: dict[str, Path] = {}
    for p in sorted(root.rglob("*")):
        if p.suffix.lower() in VIDEO_EXTS and p.is_file():
            videos.setdefault(p.stem, p)
    items = []
    for cap in sorted(p for p in (annotations or root).rglob("*") if p.suffix.lower() in (".vtt", ".srt")):
        stem = cap.name.split(".")[0]
        if members is not None and stem not in members:
            continue
        video = videos.get(stem)
        try:
            cues = webvtt.from_srt(str(cap)) if cap.suffix.lower() == ".srt" else webvtt.read(str(cap))
        except Exception as e:  # noqa: BLE001 - webvtt's parse errors name no file: this does
            items.append(Item(key=safe_key(stem), text="", source=_rel(cap, root), path=str(cap), kind="video",
                              problem=f"unreadable captions {cap.name}: {type(e).__name__}: {e}"))
            continue
        for i, cue in enumerate(cues, 1):
            # milliseconds, not webvtt's *_in_seconds (whole seconds)
            start, end = cue.start_time.in_milliseconds() / 1000, cue.end_time.in_milliseconds() / 1000
            text = " ".join(line.strip() for line in cue.text.splitlines() if line.strip())
            problem = "" if end > start >= 0 else f"bad times {cue.start}..{cue.end} (cue {i} of {cap.name})"
            if video is None:
                problem = f"no video {stem}.* (any of {', '.join(VIDEO_EXTS)}) for captions {cap.name}"
            items.append(Item(key=safe_key(f"{stem}_{i:05d}"), text=text, source=f"{_rel(cap, root)}#{i}",
                              path=str(video or cap), kind="video", start=start, end=end, problem=problem))
    return items


LAYOUTS = {"phoenix2014t": read_phoenix2014t, "csl-daily": read_csl_daily, "how2sign": read_how2sign,
           "captions": read_captions, "manifest": read_manifest_file}
DEFAULT_SPLITS = ("train", "dev", "test")


def read_items(layout: str, root, split: str, annotations=None) -> list[Item]:
    """The split's items, checked (`check_item`; items sharing a key are all marked bad)."""
    if layout not in LAYOUTS:
        raise CorpusError(f"unknown layout {layout!r}; one of {sorted(LAYOUTS)}")
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"--root {root} does not exist")
    items = LAYOUTS[layout](root, split, Path(annotations) if annotations else None)
    for it in items:
        check_item(it)
    seen: dict[str, int] = {}
    for it in items:
        seen[it.key] = seen.get(it.key, 0) + 1
    for it in items:
        if seen[it.key] > 1 and not it.problem:
            it.problem = f"duplicate key {it.key!r} ({seen[it.key]} items)"
    return items


# ---------------------------------------------------------------------------------------------
# checks and decoding

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


def select(n: int, max_frames: int) -> np.ndarray:
    """Indices of at most `max_frames` of `n` frames, evenly spaced (shard time, `sclslt translate`, and
    the loader's evaluation-time subsampling all use this one)."""
    if max_frames <= 0 or n <= max_frames:
        return np.arange(n)
    return np.linspace(0, n - 1, max_frames).round().astype(np.int64)


def _resize(img, size: int) -> np.ndarray:
    from PIL import Image
    img = img.convert("RGB")
    if size > 0 and img.size != (size, size):
        img = img.resize((size, size), Image.BILINEAR)
    return np.asarray(img, dtype=np.uint8)


class BadClip(Exception):
    pass


def _decode_frames(it: Item, size: int, max_frames: int) -> tuple[np.ndarray, int]:
    from PIL import Image
    idx = select(len(it.frames), max_frames)
    out = []
    for i in idx:
        f = it.frames[i]
        try:
            with Image.open(f) as im:
                im.load()
                out.append(_resize(im, size))
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
        t1 = it.end if it.end is not None else times[-1] + step     # the last frame lasts one step
        targets = t0 + np.arange(max(1, int(np.floor((t1 - t0) * fps + 1e-9)))) / fps
        tarr = np.asarray(times)
        idx = np.abs(tarr[None, :] - targets[:, None]).argmin(1)
    idx = idx[select(len(idx), max_frames)]
    return np.stack([_resize(frames[i], size) for i in idx]), n_src


def decode_item(it: Item, size: int, max_frames: int, fps: float = 0.0):
    """('ok', frames uint8 T x H x W x 3, source frame count) or ('bad', reason); never raises for bad input."""
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
