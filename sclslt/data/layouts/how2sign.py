"""The ``how2sign`` corpus layout (`sclslt shard --layout how2sign`).

``--root`` holds ``how2sign_realigned_<split>.csv`` (searched recursively; TAB-separated,
columns ``VIDEO_ID, VIDEO_NAME, SENTENCE_ID, SENTENCE_NAME, START_REALIGNED, END_REALIGNED,
SENTENCE``) and mp4s anywhere under it. A sentence clip ``<SENTENCE_NAME>.mp4`` (the release's
sentence-level videos) is decoded whole; otherwise ``<VIDEO_NAME>.mp4`` is decoded between
``START_REALIGNED`` and ``END_REALIGNED`` seconds. The release calls its dev split ``val``:
``--split dev`` reads ``how2sign_realigned_val.csv`` and writes split ``dev``. No signer column.
"""

from __future__ import annotations

import csv
from pathlib import Path

from sclslt.data.decoding import Item
from sclslt.data.layouts.common import CorpusError, rel, safe_key
from sclslt.registry import CORPUS_LAYOUTS


@CORPUS_LAYOUTS.register("how2sign")
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
        items.append(
            Item(
                key=safe_key(sname),
                text=r.get("SENTENCE") or "",
                source=rel(Path(path), root),
                path=str(path),
                kind="video",
                start=start,
                end=end,
                problem=problem,
            )
        )
    return items
