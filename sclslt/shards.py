"""WebDataset shards of pre-decoded clips: the on-disk format every corpus is converted to.

A sample is `<key>.frames.npy` (uint8 T x H x W x 3, written with `allow_pickle=False`) and
`<key>.json` (text, original text, sentence id, signer, frame count, source). Each split has a
manifest `<split>.json` with counts, frame shape, the sha256 of every shard, and a compact sample
index (key, shard, sentence id, frames, text) so that tokenizers and Pair Selection can work from
metadata without opening any tar.

Shards are written to a temporary name and renamed when complete: a crashed writer never leaves a
truncated shard under a final name.
"""
from __future__ import annotations

import hashlib
import io
import json
import os
from pathlib import Path
from typing import Iterable, Iterator

import numpy as np

from .text import normalise_text, sentence_id

FORMAT = "npy-uint8"
MANIFEST_VERSION = 1


class ShardError(RuntimeError):
    """A shard, manifest or sample is unusable; the message names it."""


def encode_frames(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def decode_frames(data: bytes, where: str) -> np.ndarray:
    try:
        arr = np.load(io.BytesIO(data), allow_pickle=False)
    except Exception as e:  # noqa: BLE001 - re-raised with the sample named
        raise ShardError(f"{where}: cannot decode frames.npy ({e})") from e
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise ShardError(f"{where}: frames must be uint8 T x H x W x 3, got {arr.dtype} {arr.shape}")
    return arr


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def write_split(samples: Iterable[dict], out_dir: str | Path, split: str,
                samples_per_shard: int = 64, lowercase: bool = True) -> dict:
    """Write `samples` (dicts with key, frames, text[, signer, source, original_text]) as shards.

    Returns the manifest, also written to `<out_dir>/<split>.json`.
    """
    import webdataset as wds

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    shards, index = [], []
    shape = None
    writer, tmp, count = None, None, 0

    def close():
        nonlocal writer
        if writer is None:
            return
        writer.close()
        name = f"{split}-{len(shards):06d}.tar"
        os.replace(tmp, out / name)
        shards.append({"name": name, "num_samples": count, "sha256": _sha256(out / name)})
        writer = None

    for s in samples:
        key, frames, text = s["key"], s["frames"], s["text"]
        if not text or not text.strip():
            raise ShardError(f"sample {key}: empty text")
        if frames.ndim != 4 or frames.shape[0] == 0 or frames.dtype != np.uint8:
            raise ShardError(f"sample {key}: frames must be non-empty uint8 T x H x W x 3, got "
                             f"{frames.dtype} {frames.shape}")
        if shape is None:
            shape = list(frames.shape[1:])
        elif list(frames.shape[1:]) != shape:
            raise ShardError(f"sample {key}: frame shape {frames.shape[1:]} differs from {shape}")
        if writer is None:
            tmp = out / f".{split}-{len(shards):06d}.tar.tmp"
            writer, count = wds.TarWriter(str(tmp), encoder=False, mtime=0), 0
        norm = normalise_text(text, lowercase)
        meta = {"key": key, "text": norm, "original_text": s.get("original_text", text),
                "sentence_id": sentence_id(text, lowercase), "signer": s.get("signer", ""),
                "num_frames": int(frames.shape[0]), "source": s.get("source", "")}
        writer.write({"__key__": key, "frames.npy": encode_frames(frames),
                      "json": json.dumps(meta, ensure_ascii=False).encode("utf-8")})
        index.append([key, len(shards), meta["sentence_id"], meta["num_frames"], norm])
        count += 1
        if count == samples_per_shard:
            close()
    close()
    if not index:
        raise ShardError(f"split {split}: no samples to write")
    manifest = {"version": MANIFEST_VERSION, "split": split, "format": FORMAT,
                "num_samples": len(index), "frame_shape": shape, "shards": shards,
                "samples": index, "lowercase": lowercase}
    tmpm = out / f".{split}.json.tmp"
    tmpm.write_text(json.dumps(manifest))
    os.replace(tmpm, out / f"{split}.json")
    return manifest


def read_manifest(shards_dir: str | Path, split: str) -> dict:
    path = Path(shards_dir) / f"{split}.json"
    if not path.is_file():
        raise ShardError(f"no manifest {path}: make shards with tools/shard_videos.py (split {split!r})")
    try:
        man = json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise ShardError(f"manifest {path} is not valid JSON: {e}") from e
    for key in ("num_samples", "shards", "samples", "frame_shape"):
        if key not in man:
            raise ShardError(f"manifest {path} lacks '{key}'")
    for sh in man["shards"]:
        if not (Path(shards_dir) / sh["name"]).is_file():
            raise ShardError(f"manifest {path} lists {sh['name']}, which is missing")
    return man


def iter_shard(path: str | Path) -> Iterator[dict]:
    """Decoded samples of one shard: {key, frames (np.uint8), meta (dict)}; errors name shard and key."""
    import webdataset as wds

    path = str(path)
    for raw in wds.tarfile_samples([{"url": path}]):
        key = raw.get("__key__", "?")
        where = f"{path}:{key}"
        if "frames.npy" not in raw or "json" not in raw:
            raise ShardError(f"{where}: sample lacks frames.npy or json (has {sorted(raw)})")
        try:
            meta = json.loads(raw["json"])
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{where}: bad json metadata ({e})") from e
        yield {"key": key, "frames": decode_frames(raw["frames.npy"], where), "meta": meta}


class ShardIndex:
    """Random access to samples by key: byte offsets of each member, from the tar headers.

    Used where the sample order is planned (Pair Selection) rather than streamed: a rank reads
    exactly the clips it was assigned, with one seek each. Indexes are built lazily per shard.
    """

    def __init__(self, shards_dir: str | Path, manifest: dict):
        self.dir = Path(shards_dir)
        names = [sh["name"] for sh in manifest["shards"]]
        self.shard_of = {s[0]: names[s[1]] for s in manifest["samples"]}
        self._members: dict[str, dict] = {}

    def _index(self, name: str) -> dict:
        if name not in self._members:
            import tarfile
            members = {}
            with tarfile.open(self.dir / name) as tf:
                for m in tf.getmembers():
                    key, _, ext = m.name.partition(".")
                    members.setdefault(key, {})[ext] = (m.offset_data, m.size)
            self._members[name] = members
        return self._members[name]

    def read(self, key: str) -> dict:
        if key not in self.shard_of:
            raise ShardError(f"sample {key!r} is not in the manifest of {self.dir}")
        name = self.shard_of[key]
        parts = self._index(name).get(key, {})
        where = f"{self.dir / name}:{key}"
        if "frames.npy" not in parts or "json" not in parts:
            raise ShardError(f"{where}: sample lacks frames.npy or json")
        with open(self.dir / name, "rb") as f:
            f.seek(parts["frames.npy"][0])
            frames = f.read(parts["frames.npy"][1])
            f.seek(parts["json"][0])
            meta = f.read(parts["json"][1])
        try:
            meta = json.loads(meta)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            raise ShardError(f"{where}: bad json metadata ({e})") from e
        return {"key": key, "frames": decode_frames(frames, where), "meta": meta}
