"""Where every input of a run came from, for results.json and the model card: the shard manifests (sha256 of each
split's manifest, which holds every shard's sha256), the pretrained sources (a local folder's weight and config
files hashed, a Hub name with the revision in the local cache), the weights a first stage started from
(`model.init_from`) and the Pair Selection reference table (its sha256 and the run and checkpoints it was
exported from). A reader can tell from it, for instance, whether features came from a gloss-supervised model."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".json", ".model", ".txt")


def sha256_bytes(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


def folder_hash(folder: Path) -> dict:
    """sha256 over a folder's weight/config/vocabulary files (names and contents, sorted), and their count."""
    from sclslt.data.shards import file_sha256

    files = sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix in WEIGHT_SUFFIXES)
    h = hashlib.sha256()
    for p in files:
        h.update(f"{p.relative_to(folder).as_posix()}\0{file_sha256(p)}\n".encode())
    return {"sha256": h.hexdigest(), "files": len(files)}


def source_record(name: str) -> dict:
    """A pretrained source: a local path (hashed) or a Hub name (with the cached revision, when there is one)."""
    path = Path(name).expanduser()
    if path.is_dir():
        return {"source": str(path.resolve()), **folder_hash(path)}
    if path.is_file():
        from sclslt.data.shards import file_sha256

        return {"source": str(path.resolve()), "sha256": file_sha256(path)}
    record = {"source": name, "hub": True}
    try:
        from huggingface_hub import snapshot_download

        record["revision"] = Path(snapshot_download(name, local_files_only=True)).name
    except Exception:  # noqa: BLE001 - not in the local cache: the name is what there is
        record["revision"] = None
    return record


def table_record(table: str) -> dict:
    """The reference table: its sha256 (a sharded table's index.json) and what it was exported from."""
    from sclslt.data.shards import file_sha256

    path = Path(table)
    index = path / "index.json"
    record = {"path": str(path.resolve()), "sha256": file_sha256(index if path.is_dir() else path)}
    try:
        if path.is_dir():
            meta = json.loads(index.read_text())
        else:
            from safetensors import safe_open

            with safe_open(str(path), framework="pt") as f:
                meta = json.loads((f.metadata() or {}).get("meta", "{}"))
    except (OSError, ValueError):
        meta = {}
    return {**record, **{k: meta[k] for k in ("run", "stage", "early", "late", "score", "split") if k in meta}}


def provenance(cfg, shards_dir) -> dict:
    from sclslt.data.storage import Store

    store = Store(shards_dir)
    out = {
        "shards": {
            "dir": str(shards_dir),
            "manifest_sha256": {
                sp: sha256_bytes(store.read_text(f"{sp}.json").encode("utf-8")) for sp in ("train", "dev", "test")
            },
        },
        "pretrained": {
            k: source_record(getattr(cfg.model, k)) for k in ("backbone", "mbart", "tokenizer") if getattr(cfg.model, k)
        },
    }
    if cfg.model.init_from:
        out["init_from"] = source_record(cfg.model.init_from)
    if cfg.selection.mode == "ps" and cfg.selection.table:
        out["selection_table"] = table_record(cfg.selection.table)
    return out
