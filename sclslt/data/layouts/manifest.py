"""The ``manifest`` corpus layout (`sclslt shard --layout manifest`).

``--root`` is a ``.csv`` (comma-separated, with header) or ``.jsonl`` file, or a
directory holding ``manifest.csv``/``manifest.jsonl``. Fields: ``path`` (a video file or a folder
of frames, relative to the manifest's directory unless absolute), ``text``, optional ``split``
(rows without one belong to ``train``), ``signer``, ``key``, ``start``/``end`` (seconds, videos
only). The key defaults to the path without its extension.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path

from sclslt.data.decoding import VIDEO_EXTS, Item
from sclslt.data.layouts.common import CorpusError, find_first, rel, safe_key
from sclslt.registry import CORPUS_LAYOUTS


@CORPUS_LAYOUTS.register("manifest")
def read_manifest_file(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    path = annotations or root
    if path.is_dir():
        path = find_first([path / "manifest.csv", path / "manifest.jsonl"])
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
            raise CorpusError(
                f"{path}: row {i} lacks 'path' or 'text' (has "
                f"{sorted(map(str, r)) if isinstance(r, dict) else type(r).__name__})"
            )
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
        items.append(
            Item(
                key=safe_key(str(key)),
                text=str(r["text"] or ""),
                source=rel(p, base),
                path=str(p),
                kind=kind,
                signer=str(r.get("signer") or ""),
                start=start,
                end=end,
                problem=problem,
            )
        )
    return items
