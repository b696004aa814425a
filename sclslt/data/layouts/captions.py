"""The ``captions`` corpus layout (`sclslt shard --layout captions`).

Long videos with timed sentences (YouTube-ASL, YouTube-SL-25, BOBSL-style). ``--root``
holds videos (any of ``VIDEO_EXTS``, searched recursively) and, next to each, a caption file
``<video stem>.vtt`` or ``<video stem>.<lang>.vtt`` (WebVTT, as yt-dlp writes YouTube's captions;
``.srt`` too), read with webvtt-py. Every cue is one clip, cut from the video by its times while
sharding: key ``<video stem>_<cue number, 5 digits>``, text = the cue's lines joined by spaces.
Splits: ``<root>/splits.json`` (``{"train": [video stems], "dev": [...], "test": [...]}``) or
``<root>/<split>.txt`` (one stem per line); without either, every video belongs to ``train``.
A cue without text or with end <= start, and a caption file without its video, are bad items.
"""

from __future__ import annotations

import json
from pathlib import Path

from sclslt.data.decoding import VIDEO_EXTS, Item
from sclslt.data.layouts.common import DEFAULT_SPLITS, CorpusError, rel, safe_key
from sclslt.registry import CORPUS_LAYOUTS


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


@CORPUS_LAYOUTS.register("captions")
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
            items.append(
                Item(
                    key=safe_key(stem),
                    text="",
                    source=rel(cap, root),
                    path=str(cap),
                    kind="video",
                    problem=f"unreadable captions {cap.name}: {type(e).__name__}: {e}",
                )
            )
            continue
        for i, cue in enumerate(cues, 1):
            # milliseconds, not webvtt's *_in_seconds (whole seconds)
            start, end = cue.start_time.in_milliseconds() / 1000, cue.end_time.in_milliseconds() / 1000
            text = " ".join(line.strip() for line in cue.text.splitlines() if line.strip())
            problem = "" if end > start >= 0 else f"bad times {cue.start}..{cue.end} (cue {i} of {cap.name})"
            if video is None:
                problem = f"no video {stem}.* (any of {', '.join(VIDEO_EXTS)}) for captions {cap.name}"
            items.append(
                Item(
                    key=safe_key(f"{stem}_{i:05d}"),
                    text=text,
                    source=f"{rel(cap, root)}#{i}",
                    path=str(video or cap),
                    kind="video",
                    start=start,
                    end=end,
                    problem=problem,
                )
            )
    return items
