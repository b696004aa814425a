"""Readers of the sign-language corpora's own layouts, one module each, registered by name in
`sclslt.registry.CORPUS_LAYOUTS` (`sclslt shard --layout NAME`; a new layout is one module here that
registers its reader, imported below).

A reader, ``read(root, split, annotations)``, turns a corpus root and a split into `Item`s
(sclslt/data/decoding.py: key, text exactly as the corpus has it, signer, source, and either a list of
frame files or a video with optional start/end times); nothing is decoded there. `read_items` runs
the named reader and checks its items (`check_item`); decoding is sclslt/data/decoding.py's.

- `phoenix`    ``phoenix2014t``: the official corpus CSVs or GFSLT-VLP's ``labels.<split>``, PNG folders
- `csl_daily`  ``csl-daily``: ``csl2020ct_v2.pkl``, ``split_1.txt`` and JPEG frame folders
- `how2sign`   ``how2sign``: the realigned sentence CSVs and mp4s, start/end times honoured
- `captions`   ``captions``: long videos with WebVTT/SRT captions beside them, one clip per cue
- `manifest`   ``manifest``: a CSV/JSONL of path,text[,split,signer,key,start,end] for anything else
- `common`     the layout error, default splits, tar-safe keys; `pickles` the data-only annotation unpickler

Each module's docstring states the files it reads and the assumptions made about them (checked
against public loaders where possible). Keys are made tar-safe (characters outside ``[A-Za-z0-9_-]``
become ``_``); two items with the same key are both reported bad. Unpickling happens only for the
corpora's own annotation files (CSL-Daily's ``.pkl``, GFSLT-VLP's ``labels.*``), and only as data
(`pickles.load_annotation_pickle`); shards never contain pickles.
"""

from __future__ import annotations

from pathlib import Path

from sclslt.data.decoding import Item, check_item
from sclslt.data.layouts import captions, csl_daily, how2sign, manifest, phoenix  # noqa: F401 - each registers one
from sclslt.data.layouts.common import CorpusError
from sclslt.registry import CORPUS_LAYOUTS


def read_items(layout: str, root, split: str, annotations=None) -> list[Item]:
    """The split's items, checked (`check_item`; items sharing a key are all marked bad)."""
    if layout not in CORPUS_LAYOUTS.names():
        raise CorpusError(f"unknown layout {layout!r}; one of {sorted(CORPUS_LAYOUTS.names())}")
    root = Path(root)
    if not root.exists():
        raise CorpusError(f"--root {root} does not exist")
    items = CORPUS_LAYOUTS.get(layout)(root, split, Path(annotations) if annotations else None)
    for it in items:
        check_item(it)
    seen: dict[str, int] = {}
    for it in items:
        seen[it.key] = seen.get(it.key, 0) + 1
    for it in items:
        if seen[it.key] > 1 and not it.problem:
            it.problem = f"duplicate key {it.key!r} ({seen[it.key]} items)"
    return items
