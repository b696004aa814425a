"""Streaming training/eval data: shards -> per-rank micro-batches.

Guarantees the distributed loop relies on:
- every rank yields exactly the same number of micro-batches per epoch (uneven shards cannot hang
  a collective): `batches_per_epoch = num_samples // global_batch`; a rank whose shards run out
  early cycles over its own shards again, a rank with more stops early;
- the order is a pure function of (seed, epoch, rank, world, num_workers): the shard order is
  shuffled per (seed, epoch), shards are split by rank then by worker, samples pass through a
  shuffle buffer seeded by (seed, epoch, rank, worker); workers' batches are interleaved in a
  fixed round-robin, which is what torch's DataLoader does;
- resumable: `set_epoch(epoch, skip=k)` skips the first k micro-batches. Their samples are still read
  and decoded (the seeded shuffle buffer must see the same sequence), but not subsampled, collated or
  moved to the device; a resume costs reading up to one epoch of shards, not training on it.
Frames stay uint8 until they reach the device (normalisation happens in the model).
"""
from __future__ import annotations

import fcntl
import os
import random
import shutil
import tempfile
from dataclasses import dataclass, fields
from pathlib import Path
from typing import Iterator

import numpy as np
import torch

from sclslt.config import DataConfig, SyntheticConfig
from sclslt.data.codec import JpegClip
from sclslt.data.corpora import select as even_frames
from sclslt.data.shards import (
    ShardError, frame_format, iter_shard, manifest_rows, read_manifest, write_split,
)

SPLITS = ("train", "dev", "test")


# ---------------------------------------------------------------------------------------------
# the synthetic corpus, made and sharded into a cache directory on first use

def synthetic_shards_dir(cfg: DataConfig) -> Path:
    """Shards of the synthetic corpus; generated once per corpus config (safe under concurrency)."""
    import hashlib
    import json
    from dataclasses import asdict

    ident = json.dumps({"synthetic": asdict(cfg.synthetic), "per_shard": cfg.samples_per_shard,
                        "lowercase": cfg.lowercase, "v": 1}, sort_keys=True)
    tag = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir or os.environ.get("SCLSLT_CACHE", Path.home() / ".cache" / "sclslt"))
    final = root / f"synthetic-{tag}"
    if all((final / f"{s}.json").is_file() for s in SPLITS):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".synthetic-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)        # one writer per machine; others wait, then reuse
        if not all((final / f"{s}.json").is_file() for s in SPLITS):
            make_synthetic_shards(cfg.synthetic, final, cfg.samples_per_shard, cfg.lowercase)
    return final


def make_synthetic_shards(syn: SyntheticConfig, out_dir: Path, samples_per_shard: int,
                          lowercase: bool = True) -> None:
    from sclslt.data.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(syn)
    out_dir = Path(out_dir)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    try:
        for split in SPLITS:
            samples = ({**s, "source": f"synthetic:{split}:{i}"}
                       for i, s in zip(corpus.indices(split), corpus.samples(split)))
            write_split(samples, tmp, split, samples_per_shard, lowercase)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


def resolve_shards_dir(cfg: DataConfig) -> Path | str:
    """The shard location: a local directory (Path) or a remote prefix (URL string, `storage.Store`)."""
    from sclslt.data.storage import is_url
    if cfg.corpus == "synthetic":
        return synthetic_shards_dir(cfg)
    return cfg.shards_dir.rstrip("/") if is_url(cfg.shards_dir) else Path(cfg.shards_dir)


# ---------------------------------------------------------------------------------------------
# batches

@dataclass
class Batch:
    frames: torch.Tensor          # uint8 (B, T, H, W, 3), zero-padded in time (before `to`: or EncodedFrames)
    frame_mask: torch.Tensor      # bool (B, T)
    input_ids: torch.Tensor       # long (B, L): text tokens ending in </s>, padded with pad id
    attention_mask: torch.Tensor  # long (B, L)
    labels: torch.Tensor          # long (B, L): input_ids with -100 at padding
    sentence_ids: torch.Tensor    # long (B,)
    keys: list
    texts: list

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return Batch(**{f.name: (getattr(self, f.name).to(device, non_blocking=non_blocking)
                                 if hasattr(getattr(self, f.name), "to") else getattr(self, f.name))
                        for f in fields(self)})

    def __len__(self) -> int:
        return len(self.keys)


class Collate:
    """Pad clips in time (with a frame mask) and tokenize texts; runs in the loader workers."""

    def __init__(self, tokenizer, max_text_len: int = 128):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, samples: list[dict]) -> Batch:
        if not samples:
            raise ValueError("empty batch")
        texts = [s["meta"]["text"] for s in samples]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_len,
                             return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        frames, mask = self.frames(samples)
        return Batch(frames=frames, frame_mask=mask,
                     input_ids=enc["input_ids"], attention_mask=enc["attention_mask"], labels=labels,
                     sentence_ids=torch.tensor([int(s["meta"]["sentence_id"]) for s in samples],
                                               dtype=torch.long),
                     keys=[s["key"] for s in samples], texts=texts)

    @staticmethod
    def frames(samples: list[dict]):
        """(frames, frame mask): decoded clips padded into one uint8 tensor, or compressed clips
        (`JpegClip`, decoded on the device) packed into `devdecode.EncodedFrames`."""
        t_max = max(len(s["frames"]) for s in samples)
        mask = torch.zeros((len(samples), t_max), dtype=torch.bool)
        for i, s in enumerate(samples):
            mask[i, :len(s["frames"])] = True
        if isinstance(samples[0]["frames"], JpegClip):
            from sclslt.data.devdecode import EncodedFrames
            return EncodedFrames.from_clips([s["frames"] for s in samples], [s["key"] for s in samples]), mask
        h, w, c = samples[0]["frames"].shape[1:]
        frames = np.zeros((len(samples), t_max, h, w, c), dtype=np.uint8)
        for i, s in enumerate(samples):
            if s["frames"].shape[1:] != (h, w, c):
                raise ShardError(f"sample {s['key']}: frame shape {s['frames'].shape[1:]} != {(h, w, c)} "
                                 f"of the rest of the batch")
            frames[i, :len(s["frames"])] = s["frames"]
        return torch.from_numpy(frames), mask


def subsample_frames(frames, max_frames: int, rng: random.Random | None = None):
    """At most `max_frames` frames (an array, or a `JpegClip` before decoding): uniformly spaced, or
    (training, `rng` given) a random sorted subset."""
    if max_frames <= 0 or len(frames) <= max_frames:
        return frames
    if rng is not None:
        return frames[np.array(sorted(rng.sample(range(len(frames)), max_frames)), dtype=np.int64)]
    return frames[even_frames(len(frames), max_frames)]


def rng_seed(*parts: int) -> int:
    return int(np.random.SeedSequence([int(p) & 0xFFFFFFFF for p in parts]).generate_state(1)[0])


class BadSamples:
    """Counts unreadable samples (corrupt tar member, decode failure): each is reported with its shard
    and key and skipped; once more than `max_fraction` of the samples read so far are bad, training
    stops with an error that lists them (a few bad clips in a large corpus should not stop a run;
    a broken copy of the data should)."""

    def __init__(self, max_fraction: float):
        self.max_fraction, self.expected, self.errors = max_fraction, 0, []

    def expect(self, n: int) -> None:
        self.expected += n

    def __call__(self, where: str, exc: Exception) -> None:
        import sys
        self.errors.append(f"{where}: {exc}")
        print(f"sclslt: skipping unreadable sample {where}: {exc}", file=sys.stderr, flush=True)
        if len(self.errors) > self.max_fraction * max(self.expected, 1):
            raise ShardError(f"{len(self.errors)} unreadable samples out of {self.expected} read "
                             f"(more than data.max_bad_fraction={self.max_fraction}); first: "
                             + "; ".join(self.errors[:5]))


def rank_shards(manifest: dict, seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """The shards a rank reads in an epoch: the shard list shuffled per (seed, epoch), split by rank."""
    names = [sh["name"] for sh in manifest["shards"]]
    random.Random(rng_seed(seed, epoch, 0)).shuffle(names)
    return names[rank::world] or names[rank % len(names)::len(names)]


def rank_pool_keys(manifest: dict, seed: int, epoch: int, rank: int, world: int) -> list[str]:
    """The sample keys in a rank's shards this epoch (its Pair Selection candidate pool)."""
    mine = set(rank_shards(manifest, seed, epoch, rank, world))
    names = [sh["name"] for sh in manifest["shards"]]
    return [r.key for r in manifest_rows(manifest) if names[r.shard] in mine]


class ShardStream(torch.utils.data.IterableDataset):
    """One rank's micro-batches of one split (see the module docstring for the guarantees).
    `decode`: "cpu" decodes frames in the loader; "device" leaves `jpg` frames compressed for the
    training device (`sclslt.data.devdecode.resolve` says which a run uses)."""

    def __init__(self, shards_dir, split: str, micro_batch: int, *, rank: int = 0, world: int = 1,
                 train: bool = True, seed: int = 0, shuffle_buffer: int = 256, max_frames: int = 0,
                 max_bad_fraction: float = 0.01, decode: str = "cpu"):
        from sclslt.data.storage import Store
        self.store = Store(shards_dir)
        self.manifest = read_manifest(shards_dir, split)
        self.fmt = frame_format(self.manifest)
        self.defer = decode == "device"       # `jpg` frames cross compressed, decoded on the device
        self.bad = BadSamples(max_bad_fraction)
        self.split, self.micro_batch, self.rank, self.world = split, micro_batch, rank, world
        self.train, self.seed, self.shuffle_buffer, self.max_frames = train, seed, shuffle_buffer, max_frames
        self.epoch, self.skip = 0, 0
        n = self.manifest["num_samples"]
        if train:
            if n < micro_batch * world:
                raise ShardError(f"split {split} has {n} samples, fewer than one global batch "
                                 f"({micro_batch} x {world} ranks): lower stageN.global_batch")
            self.batches_per_epoch = n // (micro_batch * world)
        else:
            # evaluation: every sample exactly once, contiguous slice per rank, last batch may be short
            lo, hi = n * rank // world, n * (rank + 1) // world
            self.batches_per_epoch = -(-(hi - lo) // micro_batch)

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        self.epoch, self.skip = epoch, skip

    def __len__(self) -> int:
        return self.batches_per_epoch

    # -- the sample streams ------------------------------------------------------------------
    def _shard_size(self, name: str) -> int:
        return next(sh["num_samples"] for sh in self.manifest["shards"] if sh["name"] == name)

    def _samples(self, shard_names: list[str], worker: int) -> Iterator[dict]:
        """Training: this worker's shards, cycled, through a seeded shuffle buffer."""
        if not shard_names:
            raise ShardError(f"rank {self.rank} worker {worker} got no shard of {self.split}: use fewer "
                             f"workers or more shards (split has {len(self.manifest['shards'])})")
        rng = random.Random(rng_seed(self.seed, self.epoch, self.rank, worker, 1))
        buf: list[dict] = []
        cycle = 0
        while True:
            order = list(shard_names)
            if cycle:
                random.Random(rng_seed(self.seed, self.epoch, self.rank, worker, 2, cycle)).shuffle(order)
            for name in order:
                self.bad.expect(self._shard_size(name))
                for s in iter_shard(name, self.fmt, self.bad, self.store, self.defer):
                    buf.append(s)
                    if len(buf) >= self.shuffle_buffer:
                        yield buf.pop(rng.randrange(len(buf)))
            cycle += 1
            if cycle > 1 and not buf:
                raise ShardError(f"shards {shard_names} yielded no samples")
            while len(buf) > self.shuffle_buffer // 2:    # drain part; keep mixing across passes
                yield buf.pop(rng.randrange(len(buf)))

    def _eval_samples(self) -> Iterator[dict]:
        n = self.manifest["num_samples"]
        lo, hi = n * self.rank // self.world, n * (self.rank + 1) // self.world
        i = 0
        for sh in self.manifest["shards"]:
            if i + sh["num_samples"] <= lo:
                i += sh["num_samples"]
                continue
            self.bad.expect(sh["num_samples"])
            for s in iter_shard(sh["name"], self.fmt, self.bad, self.store, self.defer):
                if lo <= i < hi:
                    yield s
                i += 1
                if i >= hi:
                    return

    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        # this worker produces global batch indices b with b % n_workers == worker (round-robin)
        mine = range(worker, self.batches_per_epoch, n_workers)
        if not self.train:
            batch: list[dict] = []
            b = 0
            for s in self._eval_samples():
                batch.append(s)
                if len(batch) == self.micro_batch:
                    if b in mine and b >= self.skip:
                        yield self._finish(batch, b)
                    batch, b = [], b + 1
            if batch and b in mine and b >= self.skip:
                yield self._finish(batch, b)
            return
        rank_names = rank_shards(self.manifest, self.seed, self.epoch, self.rank, self.world)
        worker_names = rank_names[worker::n_workers]
        stream = self._samples(worker_names, worker)
        for b in mine:
            batch = [next(stream) for _ in range(self.micro_batch)]
            if b >= self.skip:
                yield self._finish(batch, b)

    def _finish(self, batch: list[dict], b: int) -> list[dict]:
        # temporal subsampling: random in training, drawn per (seed, epoch, rank, batch): worker-independent
        rng = random.Random(rng_seed(self.seed, self.epoch, self.rank, b, 3)) if self.train else None
        for s in batch:
            s["frames"] = subsample_frames(s["frames"], self.max_frames, rng)
        return batch


def make_loader(stream: ShardStream, collate: Collate, num_workers: int = 0, prefetch_factor: int = 2):
    kw = dict(num_workers=num_workers, collate_fn=collate, batch_size=None)
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    return torch.utils.data.DataLoader(stream, **kw)


class PlannedStream(torch.utils.data.IterableDataset):
    """A rank's planned micro-batches (lists of sample keys), read by random access from its shards.

    The plan is made before the epoch (Pair Selection); workers take batches round-robin, so the
    order does not depend on the number of workers; `skip` resumes mid-epoch. `decode` as `ShardStream`.
    """

    def __init__(self, shards_dir, split: str, batches: list[list[str]], skip: int = 0, max_frames: int = 0,
                 seed: int = 0, decode: str = "cpu"):
        from sclslt.data.shards import ShardIndex
        self.index = ShardIndex(shards_dir, read_manifest(shards_dir, split), defer=decode == "device")
        self.batches, self.skip, self.max_frames, self.seed = batches, skip, max_frames, seed

    def __len__(self) -> int:
        return len(self.batches)

    def __iter__(self):
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        for b in range(worker, len(self.batches), n_workers):
            if b < self.skip:
                continue
            batch = [self.index.read(k) for k in self.batches[b]]
            rng = random.Random(rng_seed(self.seed, b, 3))
            for s in batch:
                s["frames"] = subsample_frames(s["frames"], self.max_frames, rng)
            yield batch
