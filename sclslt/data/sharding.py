"""Convert a sign-language corpus in its own layout into WebDataset shards of pre-decoded clips.

  sclslt shard --layout phoenix2014t --root /data/PHOENIX-2014-T --out shards/phoenix
  sclslt shard --layout csl-daily --root /data/CSL-Daily --out shards/csl --workers 8
  sclslt shard --layout how2sign --root /data/how2sign --out shards/h2s --fps 12.5
  sclslt shard --layout manifest --root my_clips.csv --out shards/mine --split train

Layouts (details and assumptions in sclslt/data/layouts/, one module each): phoenix2014t (official
corpus CSVs or GFSLT-VLP's labels.<split>), csl-daily (csl2020ct_v2.pkl + split_1.txt + frame folders),
how2sign (realigned sentence CSVs + mp4), manifest (CSV/JSONL of path,text[,split,signer]).

Output, per split, in --out (format: sclslt/data/shards.py):
  <split>-NNNNNN.tar      samples <key>.frames.npy (uint8 T x S x S x 3) + <key>.json
  <split>.json            manifest: counts, frame shape, sha256 of every shard, sample index, options
  <split>.bad.jsonl       with --skip-bad: the skipped samples {key, source, reason} (empty if none)
  <split>.progress.jsonl  the shard-by-shard record a rerun uses to skip finished shards

Frames are resized to a square --size x --size (aspect ratio not kept, as GFSLT-VLP's resize to 256
before its 224 crop), videos optionally resampled to --fps (nearest frame), then at most
--max-frames evenly spaced frames are kept. Text is stored exactly as the corpus has it
(`original_text`) next to its normalised form (`text`) and sentence id.

Determinism: samples are written in the reader's order (sorted for pickled annotations) by the
main process; workers only decode; tar members have mtime 0; shard boundaries depend only on the
samples (count and byte bounds), so the same input gives byte-identical shards for any --workers.

Resumption: shards are written to <out>/.<split>.work/ and published (moved next to a new manifest)
only when the whole split succeeded. After each finished shard, a line in the progress file records
its sha256, the range of input items it covers and a hash of those items' annotations; a rerun with
the same options keeps every leading shard whose file still has that sha256 and whose items are
unchanged, and decodes only the rest. (Changed pixels in a file with the same path are not detected.)

Bad input (missing file or folder, zero frames, unreadable frame or video, empty text, mismatched
frame counts, duplicate keys) is reported with the sample's key and path. Without --skip-bad the
run stops with exit status 2 and publishes nothing (annotation-level problems of the whole split are
all listed before any decoding); with it, bad samples are skipped and listed in <split>.bad.jsonl.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import shutil
import sys
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from multiprocessing import get_context
from pathlib import Path

from sclslt.atomic import write_text
from sclslt.data.decoding import check_item, decode_item
from sclslt.data.layouts import read_items
from sclslt.data.layouts.common import DEFAULT_SPLITS, CorpusError
from sclslt.data.shards import ShardError, ShardWriter, file_sha256, make_manifest, write_manifest
from sclslt.registry import CORPUS_LAYOUTS

PROGRESS_VERSION = 1


class BadInput(RuntimeError):
    """Bad samples without --skip-bad; the message names each one (key, path, reason)."""


def _items_hash(items) -> str:
    return hashlib.sha256(
        json.dumps([it.descriptor() for it in items], ensure_ascii=False, sort_keys=True).encode("utf-8")
    ).hexdigest()


def _bad_entry(it, reason: str) -> dict:
    return {"key": it.key, "source": it.source, "reason": reason}


def _describe(split: str, bad: list[dict], limit: int = 20) -> str:
    lines = [f"split {split}: {len(bad)} bad sample(s); nothing published (fix them or pass --skip-bad):"]
    lines += [f"  {b['key']} ({b['source']}): {b['reason']}" for b in bad[:limit]]
    if len(bad) > limit:
        lines.append(f"  ... and {len(bad) - limit} more")
    return "\n".join(lines)


def _load_progress(paths: list[Path], fingerprint: str) -> list[dict]:
    for p in paths:
        if not p.is_file():
            continue
        lines = [ln for ln in p.read_text(encoding="utf-8").splitlines() if ln.strip()]
        try:
            recs = [json.loads(ln) for ln in lines]
        except json.JSONDecodeError:
            recs = []
            for ln in lines:  # a crash may leave a torn last line: keep the good prefix
                try:
                    recs.append(json.loads(ln))
                except json.JSONDecodeError:
                    break
        if recs and recs[0].get("fingerprint") == fingerprint:
            return recs[1:]
    return []


def _verify(records: list[dict], items, dirs: list[Path]) -> list[dict]:
    """The leading records whose shard file is intact and whose items are unchanged."""
    ok, pos = [], 0
    for i, r in enumerate(records):
        if r.get("index") != i or r.get("lo") != pos or r.get("hi", len(items) + 1) > len(items):
            break
        where = next(
            (d / r["name"] for d in dirs if (d / r["name"]).is_file() and file_sha256(d / r["name"]) == r["sha256"]),
            None,
        )
        if where is None or _items_hash(items[r["lo"] : r["hi"]]) != r["items"]:
            break
        ok.append({**r, "path": str(where)})
        pos = r["hi"]
    return ok


def _decoded(items: list, pos: int, workers: int, size: int, max_frames: int, fps: float):
    """(index, decode_item result) for items[pos:], in order; decoded by `workers` spawned processes
    (a bounded window ahead) or in this one."""
    todo = range(pos, len(items))
    if workers <= 1:
        for i in todo:
            yield i, decode_item(items[i], size, max_frames, fps)
        return
    window = 2 * workers + 2
    with ProcessPoolExecutor(max_workers=workers, mp_context=get_context("spawn")) as ex:
        futs: dict[int, object] = {}
        nxt = pos
        for i in todo:
            while nxt < len(items) and nxt < i + window:
                futs[nxt] = ex.submit(decode_item, items[nxt], size, max_frames, fps)
                nxt += 1
            yield i, futs.pop(i).result()


def _sample(it, frames, n_src: int) -> dict:
    """The shard sample of a decoded corpus item."""
    return {
        "key": it.key,
        "frames": frames,
        "text": it.text,
        "original_text": it.text,
        "signer": it.signer,
        "source": it.source,
        "meta": {"source_frames": int(n_src), **({"start": it.start, "end": it.end} if it.end is not None else {})},
    }


def _open_progress(out: Path, split: str, items: list, options: dict, skip_bad: bool, log):
    """The split's verified finished shards from an earlier, interrupted run with the same options (their
    sha256 and items checked), and the progress file reopened for appending:
    (work dir, records, their bad entries, the item to resume at, the open progress file)."""
    fingerprint = hashlib.sha256(json.dumps(options, sort_keys=True).encode()).hexdigest()
    work = out / f".{split}.work"
    published_progress = out / f"{split}.progress.jsonl"
    records = _verify(_load_progress([work / "progress.jsonl", published_progress], fingerprint), items, [work, out])
    prior_bad = [b for r in records for _, b in r["bad"]]
    if prior_bad and not skip_bad:
        raise BadInput(_describe(split, prior_bad))
    pos = records[-1]["hi"] if records else 0
    if records:
        log(f"{split}: {len(records)} finished shard(s) verified by sha256, resuming at item {pos}/{len(items)}")

    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*.tmp"):
        stale.unlink()
    prog_path = work / "progress.jsonl"
    write_text(
        prog_path,
        json.dumps({"fingerprint": fingerprint, "options": options})
        + "\n"
        + "".join(json.dumps({k: v for k, v in r.items() if k != "path"}, ensure_ascii=False) + "\n" for r in records),
    )
    return work, records, prior_bad, pos, open(prog_path, "a", encoding="utf-8")


@dataclass(frozen=True)
class ShardOptions:
    """`sclslt shard`'s options for one split (`shard_split`'s keyword arguments). The fields that shape the
    shards are recorded (`recorded`): in the manifest, and as the fingerprint a rerun resumes under."""

    size: int = 256  # frames resized to size x size (0: original size)
    max_frames: int = 300  # at most this many evenly spaced frames per clip (0: all)
    fps: float = 0.0  # videos resampled to this rate, nearest frame (0: native)
    workers: int = 1  # decoding processes (the output does not depend on it)
    shard_size_mb: float = 512.0  # byte bound of a shard, 10^6 bytes (0: none)
    samples_per_shard: int = 0  # count bound of a shard (0: none)
    skip_bad: bool = False  # skip and list bad samples instead of stopping
    lowercase: bool = True  # lowercase the normalised text and sentence ids
    progress: bool = True  # a progress bar
    frame_format: str = "npy"  # on-disk form of the frames (sclslt/data/codec.py)

    @property
    def max_bytes(self) -> int:
        return int(self.shard_size_mb * 1e6) if self.shard_size_mb and self.shard_size_mb > 0 else 0

    def recorded(self, layout: str) -> dict:
        """The options the manifest records and a rerun must match to resume (this key order is written)."""
        return {
            "layout": layout,
            "size": self.size,
            "max_frames": self.max_frames,
            "fps": self.fps,
            "shard_size_mb": self.shard_size_mb,
            "samples_per_shard": self.samples_per_shard,
            "lowercase": self.lowercase,
            "resize": "square",
            "format": self.frame_format,
            "progress_version": PROGRESS_VERSION,
        }


class SplitSharder:
    """Writes one split's decoded items, in input order, into shards under <out>/.<split>.work/ and publishes
    them (Streaming's `Writer` shape): `write` one decode result, `flush_shard` closes the open shard and
    records it in the progress file, `finish` publishes the shards and the manifest; `abort` drops the
    shard being written. Opening it resumes after the verified shards of an interrupted run (`pos`)."""

    def __init__(self, out: Path, split: str, items: list, layout: str, opts: ShardOptions, log=print):
        self.out, self.split, self.items, self.opts, self.log = out, split, items, opts, log
        self.options = opts.recorded(layout)
        self.work, self.records, prior_bad, self.pos, self.prog = _open_progress(
            out, split, items, self.options, opts.skip_bad, log
        )
        self.writer = ShardWriter(
            self.work,
            split,
            opts.samples_per_shard,
            opts.max_bytes,
            opts.lowercase,
            first_shard=len(self.records),
            frame_shape=self.records[0]["shape"] if self.records else None,
            frame_format=opts.frame_format,
        )
        self.pending_bad: list[tuple[int, dict]] = []  # (item index, entry) of shards not yet recorded
        self.n_bad = len(prior_bad)
        self.lo = self.pos  # first item of the open shard
        self.rows = 0  # the writer's index rows already recorded

    def write(self, i: int, status: str, payload, n_src: int) -> None:
        """Item `i`'s `decode_item` result: encoded into the open shard, or (bad) listed or raised."""
        it = self.items[i]
        if status == "ok":
            try:
                enc = self.writer.encode(_sample(it, payload, n_src))
            except ShardError as e:
                status, payload = "bad", str(e)
        if status != "ok":
            entry = _bad_entry(it, payload)
            if not self.opts.skip_bad:
                raise BadInput(_describe(self.split, [entry]))
            self.pending_bad.append((i, entry))
            self.n_bad += 1
            return
        if self.writer.overflows(enc):
            self.flush_shard(i)
        for rec in self.writer.write(enc):
            self._record(rec, i + 1)

    def flush_shard(self, hi: int) -> None:
        """Close the open shard (if any), covering the items before `hi`, and record it."""
        rec = self.writer.close_shard()
        if rec is not None:
            self._record(rec, hi)

    def _record(self, rec: dict, hi: int) -> None:
        """A closed shard's line in the progress file (fsynced): its sha256, items [lo, hi), their index rows."""
        lo = self.lo
        r = {
            "index": len(self.records),
            "name": rec["name"],
            "num_samples": rec["num_samples"],
            "sha256": rec["sha256"],
            "lo": lo,
            "hi": hi,
            "items": _items_hash(self.items[lo:hi]),
            "shape": self.writer.shape,
            "rows": self.writer.index[self.rows :],
            "bad": [[i, b] for i, b in self.pending_bad if lo <= i < hi],
        }
        self.prog.write(json.dumps(r, ensure_ascii=False) + "\n")
        self.prog.flush()
        os.fsync(self.prog.fileno())
        self.records.append({**r, "path": str(self.work / rec["name"])})
        self.lo, self.rows = hi, len(self.writer.index)

    def abort(self) -> None:
        self.writer.abort()

    def close(self) -> None:
        self.prog.close()

    def finish(self) -> dict:
        """Publish the recorded shards: move them from the work directory into `out`, write the bad list and
        the manifest last; returns the manifest."""
        out, split, records, opts = self.out, self.split, self.records, self.opts
        index = [row for r in records for row in r["rows"]]
        if not index:
            raise ShardError(f"split {split}: no samples to write (all {len(self.items)} bad)")
        bad = [b for r in records for _, b in r["bad"]] + [b for i, b in self.pending_bad if i >= self.lo]
        # publish: the old manifest goes first, so no reader ever sees it next to new shards
        (out / f"{split}.json").unlink(missing_ok=True)
        names = [r["name"] for r in records]
        for r in records:
            if Path(r["path"]).parent == self.work:
                os.replace(self.work / r["name"], out / r["name"])
        for old in out.glob(f"{split}-*.tar"):
            if old.name not in names:
                old.unlink()
        if opts.skip_bad or (out / f"{split}.bad.jsonl").exists():
            write_text(out / f"{split}.bad.jsonl", "".join(json.dumps(b, ensure_ascii=False) + "\n" for b in bad))
        os.replace(self.work / "progress.jsonl", out / f"{split}.progress.jsonl")
        shards = [{"name": r["name"], "num_samples": r["num_samples"], "sha256": r["sha256"]} for r in records]
        manifest = make_manifest(
            split,
            shards,
            index,
            records[0]["shape"],
            opts.lowercase,
            {
                "options": {k: v for k, v in self.options.items() if k != "progress_version"},
                "num_bad": len(bad),
                "tool": "sclslt shard",
            },
            opts.frame_format,
        )
        write_manifest(out, split, manifest)
        shutil.rmtree(self.work, ignore_errors=True)
        self.log(
            f"{split}: {manifest['num_samples']} samples in {len(shards)} shard(s), {len(bad)} bad, "
            f"frames {manifest['frame_shape']} -> {out}"
        )
        return manifest


def _progress_bar(enabled: bool):
    from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("bad {task.fields[bad]}"),
        TimeRemainingColumn(),
        disable=not enabled,
        transient=False,
    )


def shard_split(layout: str, root, out, split: str, *, annotations=None, log=print, **options) -> dict:
    """Convert one split; returns its manifest. `options` are `ShardOptions`' fields.
    Raises BadInput / CorpusError / ShardError."""
    opts = ShardOptions(**options)
    items = read_items(layout, root, split, annotations)
    if not items:
        raise CorpusError(f"{layout}: split {split} has no items under {root}")
    for it in items:
        check_item(it)
    pre_bad = [_bad_entry(it, it.problem) for it in items if it.problem]  # decoding reports them again
    if pre_bad and not opts.skip_bad:
        raise BadInput(_describe(split, pre_bad))

    sharder = SplitSharder(Path(out), split, items, layout, opts, log)
    bar = _progress_bar(opts.progress)
    try:
        with bar:
            task = bar.add_task(f"{layout} {split}", total=len(items), completed=sharder.pos, bad=sharder.n_bad)
            for i, result in _decoded(items, sharder.pos, opts.workers, opts.size, opts.max_frames, opts.fps):
                sharder.write(i, *result)
                bar.update(task, advance=1, bad=sharder.n_bad)
            sharder.flush_shard(len(items))
    except BaseException:
        sharder.abort()
        raise
    finally:
        sharder.close()
    return sharder.finish()


def build_parser(prog: str = "sclslt shard") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog=prog,
        description=__doc__.split("\n\n")[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
    )
    add_arguments(p)
    return p


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`sclslt shard`'s options (the subcommand's parser and `build_parser`)."""
    p.add_argument(
        "--layout",
        required=True,
        choices=sorted(CORPUS_LAYOUTS.names()),
        help="the corpus layout under --root (see sclslt/data/layouts/ for the exact files read)",
    )
    p.add_argument(
        "--root",
        required=True,
        help="the corpus directory (for 'manifest': the CSV/JSONL file or a directory with "
        "manifest.csv / manifest.jsonl)",
    )
    p.add_argument("--out", required=True, help="output directory for shards, manifests and reports")
    p.add_argument(
        "--split",
        action="append",
        default=None,
        help="split(s) to convert, repeatable or comma-separated (default: train, dev, test; "
        "How2Sign's 'val' is written as 'dev')",
    )
    p.add_argument(
        "--annotations", default=None, help="where the annotation files are, if not in the layout's standard place"
    )
    p.add_argument(
        "--size",
        type=int,
        default=256,
        help="frames are resized to SIZE x SIZE pixels, square (default 256); 0 keeps the "
        "original size (all clips must then share it)",
    )
    p.add_argument(
        "--format",
        choices=["npy", "npy.zst", "jpg"],
        default="npy",
        help="on-disk form of the frames (recorded in the manifest): npy raw uint8 (default, no "
        "decode cost), npy.zst lossless zstd, jpg per-frame JPEG q90 (smallest, lossy); "
        "see benchmarks/bench_loader.py",
    )
    p.add_argument(
        "--max-frames",
        type=int,
        default=300,
        help="keep at most N evenly spaced frames per clip (default 300; 0 keeps all)",
    )
    p.add_argument(
        "--fps",
        type=float,
        default=0.0,
        help="resample videos to F frames/second, nearest frame (default 0: native rate; "
        "frame folders are never resampled)",
    )
    p.add_argument(
        "--workers",
        type=int,
        default=1,
        help="decoding processes (default 1: decode in this process); output does not depend on it",
    )
    p.add_argument(
        "--shard-size",
        type=float,
        default=512.0,
        metavar="MB",
        help="close a shard before it would exceed MB megabytes (10^6 bytes; default 512; 0: no "
        "byte bound); a single larger clip gets a shard of its own",
    )
    p.add_argument(
        "--samples-per-shard",
        type=int,
        default=0,
        help="also close a shard after N samples (default 0: no count bound)",
    )
    p.add_argument(
        "--skip-bad",
        action="store_true",
        help="skip bad samples and list them in <out>/<split>.bad.jsonl instead of stopping",
    )
    p.add_argument(
        "--keep-case",
        action="store_true",
        help="do not lowercase the normalised text (and sentence ids); must match data.lowercase",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")


def main(argv=None) -> int:
    return run_command(build_parser().parse_args(argv))


def run_command(args) -> int:
    splits = [s.strip() for a in (args.split or list(DEFAULT_SPLITS)) for s in a.split(",") if s.strip()]
    if args.workers < 1:
        print("--workers must be >= 1", file=sys.stderr)
        return 2
    try:
        for split in splits:
            shard_split(
                args.layout,
                args.root,
                args.out,
                split,
                size=args.size,
                max_frames=args.max_frames,
                fps=args.fps,
                workers=args.workers,
                shard_size_mb=args.shard_size,
                samples_per_shard=args.samples_per_shard,
                skip_bad=args.skip_bad,
                lowercase=not args.keep_case,
                annotations=args.annotations,
                progress=not args.no_progress,
                frame_format=args.format,
            )
    except (BadInput, CorpusError, ShardError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
