"""The ``csl-daily`` corpus layout (`sclslt shard --layout csl-daily`).

``--root`` is the CSL-Daily directory with ``sentence_label/csl2020ct_v2.pkl`` (a
plain pickle: ``{"info": [{"name", "length", "label_gloss", "label_char", "label_word", "signer",
...}], ...}``), ``sentence_label/split_1.txt`` ('|'-separated, header ``name|split``) and JPEG frames
in ``sentence/frames_512x512/<name>/`` (also accepted: ``frames_512x512/<name>/``,
``sentence_frames-512x512/frames_512x512/<name>/``). The text is ``"".join(label_char)`` (the
sentence as characters, no separators: the annotation has no other sentence string); ``length``,
when present, must equal the number of frame files.
"""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from sclslt.data.decoding import Item
from sclslt.data.layouts.common import CorpusError, rel, safe_key
from sclslt.data.layouts.pickles import load_annotation_pickle
from sclslt.registry import CORPUS_LAYOUTS


@CORPUS_LAYOUTS.register("csl-daily")
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
            data = load_annotation_pickle(f, pkl_path)  # CSL-Daily's own annotation format
        info = {d["name"]: d for d in data["info"]}
    except CorpusError:
        raise
    except Exception as e:  # noqa: BLE001
        raise CorpusError(f"{pkl_path}: cannot read CSL-Daily annotation (pickle with 'info'): {e}") from e
    frame_dirs = [
        root / "sentence" / "frames_512x512",
        root / "frames_512x512",
        root / "sentence_frames-512x512" / "frames_512x512",
    ]
    base = next((d for d in frame_dirs if d.is_dir()), frame_dirs[0])
    items = []
    for name in names:
        folder = base / name
        d = info.get(name)
        if d is None:
            items.append(
                Item(
                    key=safe_key(name),
                    text="",
                    source=rel(folder, root),
                    path=str(folder),
                    kind="frames",
                    problem=f"not in {pkl_path.name}",
                )
            )
            continue
        chars = d.get("label_char")
        text = "".join(map(str, chars)) if isinstance(chars, (list, tuple, np.ndarray)) else str(chars or "")
        items.append(
            Item(
                key=safe_key(name),
                text=text,
                source=rel(folder, root),
                path=str(folder),
                kind="frames",
                signer=str(d.get("signer", "")),
                expected_len=d.get("length"),
            )
        )
    return items
