"""The ``phoenix2014t`` corpus layout (`sclslt shard --layout phoenix2014t`).

``--root`` is the ``PHOENIX-2014-T`` release directory. Annotations are looked up
in ``--annotations`` (default ``<root>/annotations/manual`` then ``<root>``): first the official
``PHOENIX-2014-T.<split>.corpus.csv`` ('|'-separated, header ``name|video|start|end|speaker|orth|
translation``; text = ``translation``, signer = ``speaker``), else GFSLT-VLP's ``labels.<split>``
(gzip-compressed pickle of a dict keyed ``"<split>/<name>"`` with ``name, gloss, text, length,
imgs_path``; ``imgs_path`` is relative to ``features/fullFrame-210x260px/``, e.g.
``train/<name>/images0001.png``, as in GFSLT-VLP's ``datasets.py``; it has no signer). Frames of the
CSV are the PNGs in ``features/fullFrame-210x260px/<split>/<name>/`` (the CSV's ``video`` column
``<name>/1/*.png`` comes from PHOENIX-2014 and is not used as a path). With the pickle, ``length``
must equal ``len(imgs_path)`` and every listed file must exist.
"""

from __future__ import annotations

import csv
import gzip
from pathlib import Path

from sclslt.data.decoding import Item
from sclslt.data.layouts.common import CorpusError, find_first, rel, safe_key
from sclslt.data.layouts.pickles import load_annotation_pickle
from sclslt.registry import CORPUS_LAYOUTS


@CORPUS_LAYOUTS.register("phoenix2014t")
def read_phoenix2014t(root: Path, split: str, annotations: Path | None = None) -> list[Item]:
    dirs = [annotations] if annotations else [root / "annotations" / "manual", root]
    csv_path = find_first([d / f"PHOENIX-2014-T.{split}.corpus.csv" for d in dirs])
    pkl_path = find_first([d / f"labels.{split}" for d in dirs])
    frames_root = root / "features" / "fullFrame-210x260px"
    items = []
    if csv_path is not None:
        with open(csv_path, encoding="utf-8", newline="") as f:
            rows = list(csv.DictReader(f, delimiter="|", quoting=csv.QUOTE_NONE))
        if rows and not {"name", "translation"} <= set(rows[0]):
            raise CorpusError(
                f"{csv_path}: expected columns name|video|start|end|speaker|orth|translation, got {list(rows[0])}"
            )
        for r in rows:
            folder = frames_root / split / r["name"]
            items.append(
                Item(
                    key=safe_key(r["name"]),
                    text=r.get("translation") or "",
                    source=rel(folder, root),
                    path=str(folder),
                    kind="frames",
                    signer=r.get("speaker") or "",
                )
            )
        return items
    if pkl_path is not None:
        try:
            with gzip.open(pkl_path, "rb") as f:
                data = load_annotation_pickle(f, pkl_path)  # GFSLT-VLP's own annotation format
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
            items.append(
                Item(
                    key=safe_key(name),
                    text=v.get("text") or "",
                    source=rel(folder, root),
                    path=str(folder),
                    kind="frames",
                    frames=[str(frames_root / p) for p in imgs],
                    listed=True,
                    expected_len=v.get("length"),
                )
            )
        return items
    raise CorpusError(
        f"phoenix2014t: no annotation for split {split!r}: looked for "
        f"PHOENIX-2014-T.{split}.corpus.csv and labels.{split} in {', '.join(map(str, dirs))}"
    )
