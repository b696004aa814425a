"""WebDataset shards of pre-decoded clips: the on-disk format every corpus is converted to.

A sample is `<key>.frames.npy` (uint8 T x H x W x 3, written with `allow_pickle=False`) and
`<key>.json` (text, original text, sentence id, signer, frame count, source). Each split has a
manifest `<split>.json` with counts, frame shape, the sha256 of every shard, and a compact sample
index (key, shard, sentence id, frames, text, byte offsets, a per-sample checksum, source) so that
tokenizers, Pair Selection and the split check (`check_disjoint_splits`) work from metadata without opening
any tar.

Every byte read is checked: a planned read (`ShardIndex`) against the sample's checksum, a streamed
shard (`iter_shard`) sample by sample and, at its end, against the shard's sha256. A mismatch is a
`ShardError` naming the shard's URL and the sample, which the loaders count as a bad sample
(`data.max_bad_fraction`) and never yield. Manifests written before the per-sample checksum load with
one warning (their planned reads are unchecked; streamed shards still meet the shard sha256).

Shards are written to a temporary name and renamed when complete: a crashed writer never leaves a
truncated shard under a final name. `ShardWriter` bounds shards by sample count and/or bytes (the
exact tar size, computed before writing, so boundaries depend only on the samples); `write_split`
wraps it. Manifests may carry extra keys (sclslt shard adds its options and bad count).
"""

from __future__ import annotations

import hashlib
import json
import os
import zlib
from pathlib import Path
from typing import Iterable, Iterator, NamedTuple

import numpy as np

from sclslt.atomic import write_text
from sclslt.data.text import normalise_text, sentence_id

FORMAT = "npy-uint8"
MANIFEST_VERSION = 1


class ShardError(RuntimeError):
    """A shard, manifest or sample is unusable; the message names it."""


def encode_frames(frames: np.ndarray) -> bytes:
    """The default (npy) encoding of a clip's frames."""
    from sclslt.data.codec import encode

    return encode(frames, "npy")


def frame_format(manifest: dict) -> str:
    """The codec of a split's frames (`sclslt.data.codec`); manifests before formats existed say npy-uint8."""
    fmt = manifest.get("format", FORMAT)
    return "npy" if fmt == FORMAT else fmt


def decode_frames(data: bytes, where: str, fmt: str = "npy", defer: bool = False):
    """A sample's frames as uint8 T x H x W x 3; with `defer`, a `jpg` clip stays compressed
    (`codec.JpegClip`, framing checked) for decoding on the device (`sclslt.data.devdecode`)."""
    from sclslt.data.codec import JpegClip, decode

    try:
        return JpegClip.parse(data) if defer and fmt == "jpg" else decode(data, fmt)
    except Exception as e:  # noqa: BLE001 - re-raised with the sample named
        raise ShardError(f"{where}: cannot decode frames ({fmt}): {e}") from e


def sample_digest(frames: bytes, meta: bytes) -> str:
    """The per-sample checksum the shard writer records in the manifest: CRC-32 of the frames member,
    then the json member (what a planned read gets in one byte range), as 8 hex digits. A CRC catches
    the accidents it is for (flipped bits, truncated or stale copies) at about one pass over memory:
    raw npy frames decode without a copy, so a cryptographic hash would cost several times their
    decode (benchmarks/bench_loader.py --stream, the integrity table); the shard's sha256 stays the
    check of a whole shard."""
    return f"{zlib.crc32(meta, zlib.crc32(frames)):08x}"


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


_TAR_BLOCK = 512
_TAR_RECORD = 20 * _TAR_BLOCK


def _tar_member_bytes(size: int) -> int:
    """Bytes one member takes in a ustar archive: a header block plus the data padded to blocks."""
    return _TAR_BLOCK + -(-size // _TAR_BLOCK) * _TAR_BLOCK


def tar_bytes(member_sizes: list[int]) -> int:
    """Size of a tar holding members of these sizes (end-of-archive blocks, padded to a record)."""
    n = sum(_tar_member_bytes(m) for m in member_sizes) + 2 * _TAR_BLOCK
    return -(-n // _TAR_RECORD) * _TAR_RECORD


class ManifestRow(NamedTuple):
    """One sample of a split's manifest (stored in the JSON as a list in this order)."""

    key: str
    shard: int  # index into the manifest's "shards"
    sentence_id: int  # the false-negative identity (`text.sentence_id` of the normalised text)
    num_frames: int
    text: str  # normalised text
    offsets: list | None = None  # [frames offset, frames size, json offset, json size] in the shard (bytes)
    digest: str | None = None  # `sample_digest` of the two members (manifests before it: absent)
    source: str | None = None  # where the clip came from ("video.mp4", "video.mp4#3": a segment; before: absent)


def manifest_rows(manifest: dict) -> list[ManifestRow]:
    return [ManifestRow(*row) for row in manifest["samples"]]


SPLITS = ("train", "dev", "test")


def source_video(source: str | None) -> str:
    """The video (or frame folder) a clip was cut from: its source without the segment ("#3", "#t=1,2")."""
    return (source or "").split("#", 1)[0]


def check_disjoint_splits(shards_dir, manifests: dict | None = None, limit: int = 5) -> None:
    """Raise ShardError when two splits share a clip (the same key) or a source video (the clips' sources
    without their segment): a dev split that is the test split, or test clips trained on, make every number
    the run reports wrong. The same sentence in two splits is normal and allowed. Manifests written before
    rows carried their source are checked by key only."""
    rows = {sp: manifest_rows(manifests[sp] if manifests else read_manifest(shards_dir, sp)) for sp in SPLITS}
    problems = []
    for i, a in enumerate(SPLITS):
        for b in SPLITS[i + 1 :]:
            keys = sorted({r.key for r in rows[a]} & {r.key for r in rows[b]})
            videos = sorted(
                ({source_video(r.source) for r in rows[a]} & {source_video(r.source) for r in rows[b]}) - {""}
            )
            for what, shared in (("clips", keys), ("source videos", videos)):
                if shared:
                    problems.append(
                        f"{a} and {b} share {len(shared)} {what}: {', '.join(shared[:limit])}"
                        + (" ..." if len(shared) > limit else "")
                    )
    if problems:
        raise ShardError(
            f"{shards_dir}: the splits overlap ({'; '.join(problems)}). Every reported number would "
            f"measure clips the model was selected or trained on: shard the corpus again with disjoint "
            f"splits (sentences may repeat across splits; clips and source videos may not)"
        )


class ShardWriter:
    """Writes samples into `<split>-NNNNNN.tar` shards under `out_dir`, in order, deterministically.

    A shard is closed when it holds `samples_per_shard` samples (0: no count bound) or when the next
    sample would push it past `max_shard_bytes` (0: no byte bound; a single larger sample gets a
    shard of its own). Boundaries depend only on the sequence of samples, so a rerun reproduces them.
    `first_shard` numbers the first shard written (used to resume after verified shards).
    """

    def __init__(
        self,
        out_dir: str | Path,
        split: str,
        samples_per_shard: int = 64,
        max_shard_bytes: int = 0,
        lowercase: bool = True,
        first_shard: int = 0,
        frame_shape: list | None = None,
        frame_format: str = "npy",
    ):
        from sclslt.data.codec import FORMATS, member_name

        if frame_format not in FORMATS:
            raise ShardError(f"frame format {frame_format!r}: use one of {FORMATS}")
        self.frame_format, self.member = frame_format, member_name(frame_format)
        self.out = Path(out_dir)
        self.out.mkdir(parents=True, exist_ok=True)
        self.split, self.samples_per_shard = split, int(samples_per_shard or 0)
        self.max_shard_bytes, self.lowercase = int(max_shard_bytes or 0), lowercase
        self.next_shard, self.shape = first_shard, (list(frame_shape) if frame_shape else None)
        self.shards: list[dict] = []  # closed by this writer
        self.index: list[list] = []  # manifest rows of the samples written by this writer
        self._writer, self._tmp, self._count, self._members, self._rows = None, None, 0, [], []

    @property
    def open_count(self) -> int:
        return self._count

    def encode(self, s: dict) -> dict:
        """Validate and encode one sample (no I/O); raises ShardError naming the sample."""
        key, frames, text = s["key"], s["frames"], s["text"]
        if not key or any(c in key for c in "./\\") or key.strip() != key:
            raise ShardError(f"sample {key!r}: keys must be non-empty without '.', '/', '\\' or edge spaces")
        if not text or not text.strip():
            raise ShardError(f"sample {key}: empty text")
        if (
            not isinstance(frames, np.ndarray)
            or frames.ndim != 4
            or frames.shape[0] == 0
            or frames.shape[-1] != 3
            or frames.dtype != np.uint8
        ):
            raise ShardError(
                f"sample {key}: frames must be non-empty uint8 T x H x W x 3, got "
                f"{getattr(frames, 'dtype', type(frames))} {getattr(frames, 'shape', '')}"
            )
        if self.shape is not None and list(frames.shape[1:]) != self.shape:
            raise ShardError(f"sample {key}: frame shape {list(frames.shape[1:])} differs from {self.shape}")
        norm = normalise_text(text, self.lowercase)
        meta = {
            "key": key,
            "text": norm,
            "original_text": s.get("original_text", text),
            "sentence_id": sentence_id(text, self.lowercase),
            "signer": s.get("signer", ""),
            "num_frames": int(frames.shape[0]),
            "source": s.get("source", ""),
        }
        for k, v in (s.get("meta") or {}).items():  # extra fields never override the standard ones
            meta.setdefault(k, v)
        from sclslt.data.codec import encode

        data = encode(frames, self.frame_format)
        js = json.dumps(meta, ensure_ascii=False, sort_keys=True).encode("utf-8")
        return {
            "key": key,
            "frames": data,
            "json": js,
            "meta": meta,
            "shape": list(frames.shape[1:]),
            "digest": sample_digest(data, js),
            "row": [key, None, meta["sentence_id"], meta["num_frames"], norm],
            "sizes": [len(data), len(js)],
        }

    def overflows(self, enc: dict) -> bool:
        """Whether writing `enc` now would first close the open shard (byte bound)."""
        return bool(
            self.max_shard_bytes and self._count and tar_bytes(self._members + enc["sizes"]) > self.max_shard_bytes
        )

    def write(self, enc: dict) -> list[dict]:
        """Write an encoded sample; returns the shards this call closed (before and/or after it)."""
        closed = []
        if self.overflows(enc):
            closed.append(self.close_shard())
        if self.shape is None:
            self.shape = enc["shape"]
        elif enc["shape"] != self.shape:
            raise ShardError(f"sample {enc['key']}: frame shape {enc['shape']} differs from {self.shape}")
        if self._writer is None:
            import webdataset as wds

            self._tmp = self.out / f".{self.split}-{self.next_shard:06d}.tar.tmp"
            self._writer = wds.TarWriter(str(self._tmp), encoder=False, mtime=0)
            self._count, self._members = 0, []
        self._writer.write({"__key__": enc["key"], self.member: enc["frames"], "json": enc["json"]})
        self._members += enc["sizes"]
        self._count += 1
        self.index.append([enc["row"][0], self.next_shard] + enc["row"][2:])
        self._rows.append((self.index[-1], enc["digest"], enc["meta"]["source"]))
        if self.samples_per_shard and self._count >= self.samples_per_shard:
            closed.append(self.close_shard())
        return closed

    def add(self, s: dict) -> list[dict]:
        return self.write(self.encode(s))

    def close_shard(self) -> dict | None:
        if self._writer is None:
            return None
        self._writer.close()
        self._writer = None
        offsets = member_offsets(self._tmp)
        for row, digest, source in self._rows:  # where each sample's members lie, their checksum
            o = offsets[row[0]]
            row += [[*o[self.member], *o["json"]], digest, source]
        self._rows = []
        name = f"{self.split}-{self.next_shard:06d}.tar"
        os.replace(self._tmp, self.out / name)
        rec = {"name": name, "num_samples": self._count, "sha256": file_sha256(self.out / name)}
        self.shards.append(rec)
        self.next_shard += 1
        self._count, self._members = 0, []
        return rec

    def abort(self) -> None:
        """Drop the shard being written (its temp file), keeping the closed ones."""
        if self._writer is not None:
            try:
                self._writer.close()
            finally:
                self._writer, self._rows = None, []
                Path(self._tmp).unlink(missing_ok=True)


def make_manifest(
    split: str,
    shards: list[dict],
    index: list[list],
    frame_shape,
    lowercase: bool,
    extra: dict | None = None,
    frame_format: str = "npy",
) -> dict:
    """The manifest dict (the keys read by `read_manifest` plus any `extra` ones)."""
    man = {
        "version": MANIFEST_VERSION,
        "split": split,
        "format": FORMAT if frame_format == "npy" else frame_format,
        "num_samples": len(index),
        "frame_shape": frame_shape,
        "shards": shards,
        "samples": index,
        "lowercase": lowercase,
    }
    for k, v in (extra or {}).items():
        man.setdefault(k, v)
    return man


def write_manifest(out_dir: str | Path, split: str, manifest: dict) -> Path:
    return write_text(Path(out_dir) / f"{split}.json", json.dumps(manifest, ensure_ascii=False))


def write_split(
    samples: Iterable[dict],
    out_dir: str | Path,
    split: str,
    samples_per_shard: int = 64,
    lowercase: bool = True,
    *,
    max_shard_bytes: int = 0,
    extra: dict | None = None,
    frame_format: str = "npy",
    encoded: bool = False,
) -> dict:
    """Write `samples` (dicts with key, frames, text[, signer, source, original_text, meta]; or, with `encoded`,
    what `ShardWriter.encode` made of them, e.g. in worker processes) as shards.

    Shards hold at most `samples_per_shard` samples (0: unbounded) and, when `max_shard_bytes` is set,
    at most that many bytes (a single larger sample is alone in its shard). `extra` adds keys to the
    manifest (e.g. the conversion options). Returns the manifest, also written to `<out_dir>/<split>.json`.
    """
    w = ShardWriter(out_dir, split, samples_per_shard, max_shard_bytes, lowercase, frame_format=frame_format)
    try:
        for s in samples:
            w.write(s) if encoded else w.add(s)
        w.close_shard()
    except BaseException:
        w.abort()
        raise
    if not w.index:
        raise ShardError(f"split {split}: no samples to write")
    manifest = make_manifest(split, w.shards, w.index, w.shape, lowercase, extra, frame_format)
    write_manifest(out_dir, split, manifest)
    return manifest


def check_manifest(man, where: str) -> None:
    """The manifest's structure, before anything indexes into it: a ShardError naming the first problem."""

    def bad(what: str):
        raise ShardError(f"manifest {where}: {what}")

    if not isinstance(man, dict):
        bad(f"top level is {type(man).__name__}, not an object")
    for key in ("num_samples", "shards", "samples", "frame_shape"):
        if key not in man:
            bad(f"lacks '{key}'")
    if not isinstance(man["num_samples"], int) or isinstance(man["num_samples"], bool) or man["num_samples"] < 0:
        bad(f"num_samples is {man['num_samples']!r}, not a count")
    if not isinstance(man["shards"], list) or not all(
        isinstance(sh, dict)
        and isinstance(sh.get("name"), str)
        and "/" not in sh["name"]
        and isinstance(sh.get("num_samples"), int)
        for sh in man["shards"]
    ):
        bad("'shards' must be a list of {name, num_samples, sha256} records")
    if not isinstance(man["frame_shape"], list) or not all(isinstance(d, int) and d > 0 for d in man["frame_shape"]):
        bad(f"frame_shape is {man['frame_shape']!r}, not positive sizes")
    rows, n = man["samples"], len(man["shards"])
    if not isinstance(rows, list):
        bad("'samples' must be a list of rows")
    for i, r in enumerate(rows):
        if not (
            isinstance(r, list)
            and 5 <= len(r) <= len(ManifestRow._fields)
            and isinstance(r[0], str)
            and isinstance(r[1], int)
            and 0 <= r[1] < n
            and isinstance(r[3], int)
            and isinstance(r[4], str)
        ):
            bad(f"sample row {i} is {str(r)[:120]}, not [key, shard index, sentence id, frames, text, ...]")
    if sum(sh["num_samples"] for sh in man["shards"]) != len(rows) or man["num_samples"] != len(rows):
        bad(
            f"counts disagree: num_samples {man['num_samples']}, {len(rows)} rows, "
            f"{sum(sh['num_samples'] for sh in man['shards'])} in the shards"
        )


def read_manifest(shards_dir, split: str) -> dict:
    """A split's manifest from a local directory or a remote prefix (`storage.Store`)."""
    from sclslt.data.storage import Store

    store = Store(shards_dir)
    where = store.url(f"{split}.json")
    if not store.exists(f"{split}.json"):
        raise ShardError(f"no manifest {where}: make shards with sclslt shard (split {split!r})")
    try:
        man = json.loads(store.read_text(f"{split}.json"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ShardError(f"manifest {where} is not valid JSON: {e}") from e
    check_manifest(man, where)
    if not store.remote:  # remote shards are named by the first read that fails (one request fewer each)
        for sh in man["shards"]:
            if not store.exists(sh["name"]):
                raise ShardError(f"manifest {where} lists {sh['name']}, which is missing")
    return man


def member_offsets(path=None, fileobj=None) -> dict[str, dict[str, tuple[int, int]]]:
    """{key: {member suffix: (data offset, size)}} of a tar, from its headers: a local `path`, or a
    `fileobj` read front to back (a remote shard)."""
    import tarfile

    members: dict[str, dict] = {}
    with tarfile.open(path) if fileobj is None else tarfile.open(fileobj=fileobj, mode="r|") as tf:
        for m in tf:
            key, _, ext = m.name.partition(".")
            members.setdefault(key, {})[ext] = (m.offset_data, m.size)
    return members


def iter_shard(
    path,
    fmt: str = "npy",
    on_error=None,
    store=None,
    defer: bool = False,
    sha256: str | None = None,
    digests: dict | None = None,
) -> Iterator[dict]:
    """Decoded samples of one shard: {key, frames (np.uint8), meta (dict)}; errors name shard and key.
    `defer`: `jpg` frames stay compressed for the device (`decode_frames`). With `digests` (key ->
    `sample_digest`, from the manifest) every sample is checked before it is yielded; with `sha256`
    the whole shard is checked at its end (a mismatch is an error of the shard).

    `path`: a local tar, or with `store` (`storage.Store`) a shard name in it (local or remote).
    With `on_error(where, exc)` a bad sample is reported and skipped, and a corrupt tar ends the
    shard after reporting it; without it, the first error is raised.
    """
    import tarfile

    from webdataset.tariterators import group_by_keys, tar_file_expander

    from sclslt.data.codec import member_name
    from sclslt.data.storage import Store

    if store is None:
        store, path = Store(Path(path).parent), Path(path).name
    name, member = str(path), member_name(fmt)
    path, stream, damaged = store.url(name), None, 0
    try:
        stream = _HashingReader(store.open_stream(name))
        for raw in group_by_keys(tar_file_expander([{"url": path, "stream": stream}])):
            key = raw.get("__key__", "?")
            where = f"{path}:{key}"
            try:
                if member not in raw or "json" not in raw:
                    raise ShardError(f"{where}: sample lacks {member} or json (has {sorted(raw)})")
                if digests is not None:
                    check_digest(digests.get(key), raw[member], raw["json"], where)
                try:
                    meta = json.loads(raw["json"])
                except (UnicodeDecodeError, json.JSONDecodeError) as e:
                    raise ShardError(f"{where}: bad json metadata ({e})") from e
                yield {"key": key, "frames": decode_frames(raw[member], where, fmt, defer), "meta": meta}
            except ShardError as e:
                if on_error is None:
                    raise
                on_error(where, e)
                damaged += 1
        # the shard's own sha256 reports damage its samples' checksums did not see (tar headers, padding,
        # a manifest without per-sample checksums), not the same damaged sample twice
        if sha256 is not None and (got := stream.finish()) != sha256 and not damaged:
            e = ShardError(
                f"{path}: sha256 {got[:16]}... differs from the manifest's {sha256[:16]}... "
                f"(damaged, truncated or stale copy of the shard)"
            )
            if on_error is None:
                raise e
            on_error(path, e)
    except (tarfile.TarError, OSError, ValueError) as e:  # a truncated/corrupt tar stops this shard
        if on_error is None:
            raise ShardError(f"{path}: corrupt shard ({type(e).__name__}: {e})") from e
        on_error(path, e)
    finally:
        if stream is not None:
            stream.close()


_WARNED: set = set()


def warn_unchecked(store, manifest: dict) -> None:
    """Once per split and location: this manifest predates per-sample checksums."""
    import sys

    what = f"{store}/{manifest.get('split', '?')}.json"
    if what not in _WARNED:
        _WARNED.add(what)
        print(
            f"sclslt: warning: {what} has no per-sample checksums (written before they existed): planned "
            f"reads of it are not verified; rerun sclslt shard to add them",
            file=sys.stderr,
            flush=True,
        )


def check_digest(want: str | None, frames: bytes, meta: bytes, where: str) -> None:
    if want is not None and sample_digest(frames, meta) != want:
        raise ShardError(
            f"{where}: checksum mismatch: the bytes read are not the ones the shard writer "
            f"recorded in the manifest (damaged or stale copy of the shard)"
        )


class _HashingReader:
    """A binary stream that hashes (sha256) every byte read through it."""

    def __init__(self, stream):
        self.stream, self.sha = stream, hashlib.sha256()

    def read(self, n: int = -1) -> bytes:
        b = self.stream.read(n)
        self.sha.update(b)
        return b

    def finish(self) -> str:
        while self.read(1 << 20):  # the tar's end blocks: the sha256 covers the whole file
            pass
        return self.sha.hexdigest()

    def close(self) -> None:
        self.stream.close()


class ShardIndex:
    """Random access to samples by key (planned order: Pair Selection), local or remote.

    A rank reads exactly the clips it was assigned: one byte range each (frames and json, neighbours
    in the tar), at the offsets the shard writer recorded in the manifest. Manifests written before offsets existed are
    indexed from the tar headers, lazily per shard (a whole read of each remote shard).
    """

    def __init__(self, shards_dir, manifest: dict, defer: bool = False):
        from sclslt.data.codec import member_name
        from sclslt.data.storage import Store

        self.store = Store(shards_dir)
        names = [sh["name"] for sh in manifest["shards"]]
        rows = manifest_rows(manifest)
        self.shard_of = {r.key: names[r.shard] for r in rows}
        self.offsets = {r.key: r.offsets for r in rows if r.offsets}
        self.digests = {r.key: r.digest for r in rows if r.digest}
        if rows and not self.digests:
            warn_unchecked(self.store, manifest)
        self.fmt, self.defer = frame_format(manifest), defer
        self.member = member_name(self.fmt)
        self._members: dict[str, dict] = {}

    def _from_headers(self, name: str, key: str) -> list | None:
        if name not in self._members:
            if self.store.remote:
                with self.store.open_stream(name) as stream:
                    self._members[name] = member_offsets(fileobj=stream)
            else:
                self._members[name] = member_offsets(self.store.url(name))
        parts = self._members[name].get(key, {})
        if self.member not in parts or "json" not in parts:
            return None
        return [*parts[self.member], *parts["json"]]

    def _read_pair(self, name: str, off: list) -> tuple[bytes, bytes]:
        """The frames and json members: one byte range when they are neighbours in the tar (as the shard
        writer puts them: one request a clip to a remote store), else two."""
        lo, hi = min(off[0], off[2]), max(off[0] + off[1], off[2] + off[3])
        if hi - lo > off[1] + off[3] + 4096:
            return self.store.read_range(name, off[0], off[1]), self.store.read_range(name, off[2], off[3])
        span = self.store.read_range(name, lo, hi - lo)
        return span[off[0] - lo : off[0] - lo + off[1]], span[off[2] - lo : off[2] - lo + off[3]]

    def where(self, key: str) -> str:
        """The sample's location for messages: shard URL and key."""
        return f"{self.store.url(self.shard_of[key])}:{key}" if key in self.shard_of else f"{self.store}:{key}"

    def read(self, key: str) -> dict:
        if key not in self.shard_of:
            raise ShardError(f"sample {key!r} is not in the manifest of {self.store}")
        name = self.shard_of[key]
        where = f"{self.store.url(name)}:{key}"
        off = self.offsets.get(key) or self._from_headers(name, key)
        if off is None:
            raise ShardError(f"{where}: sample lacks {self.member} or json")
        frames, raw = self._read_pair(name, off)
        try:
            meta = json.loads(raw)
        except (UnicodeDecodeError, json.JSONDecodeError) as e:
            meta = e
        if isinstance(meta, dict) and meta.get("key", key) != key:
            raise ShardError(f"{where}: the manifest's offsets point at sample {meta.get('key')!r}: stale manifest")
        check_digest(self.digests.get(key), frames, raw, where)  # before anything is decoded
        if not isinstance(meta, dict):
            raise ShardError(f"{where}: bad json metadata ({meta})")
        return {"key": key, "frames": decode_frames(frames, where, self.fmt, self.defer), "meta": meta}
