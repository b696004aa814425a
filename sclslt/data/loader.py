"""Training and evaluation data: shards -> micro-batches.

Training (`GlobalStream`): the epoch is a list of global batches of sample keys, made before the epoch
from the config and the seed alone (`epoch_order` in random mode, the Pair Selection plan otherwise);
each rank trains on its slice of each global batch, read by random access at the manifest's offsets.
What that guarantees, at any world size (any divisor of the global batch) and any number of workers:
- global batch k of epoch e holds the same clips in the same order, and every random draw that touches
  a clip (temporal subsampling, the augmentation uniforms) is seeded by (seed, epoch, clip key);
- an epoch visits every training clip exactly once, but for the `clips % global_batch` that the
  epoch's shuffle puts last (stated, deterministic, different clips each epoch);
- every rank yields the same number of micro-batches (a collective cannot hang on uneven shards);
- resumable anywhere, at another world size too: `skip=k` starts at global batch k, reading nothing
  before it.
Evaluation (`ShardStream`): every sample once, a contiguous slice per rank, streamed shard by shard.
Frames stay uint8 until they reach the device (normalisation happens in the model).
"""

from __future__ import annotations

import hashlib
import os
import random
from dataclasses import dataclass, fields
from typing import Iterator

import numpy as np
import torch

from sclslt.data.codec import JpegClip
from sclslt.data.decoding import even_frames
from sclslt.data.shards import (
    ShardError,
    frame_format,
    iter_shard,
    manifest_rows,
    read_manifest,
    warn_unchecked,
)

# ---------------------------------------------------------------------------------------------
# batches


@dataclass
class Batch:
    frames: torch.Tensor  # uint8 (B, T, H, W, 3), zero-padded in time (before `to`: or EncodedFrames)
    frame_mask: torch.Tensor  # bool (B, T)
    input_ids: torch.Tensor  # long (B, L): text tokens ending in </s>, padded with pad id
    attention_mask: torch.Tensor  # long (B, L)
    labels: torch.Tensor  # long (B, L): input_ids with -100 at padding
    sentence_ids: torch.Tensor  # long (B,)
    keys: list
    texts: list
    draws: torch.Tensor | None = None  # float (B, AUG_DRAWS): each clip's augmentation uniforms (training)
    frame_index: torch.Tensor | None = None  # long (N,): flat indices b * T + t of the valid frames, made on the host
    lengths: list | None = None  # valid frames per clip (host ints): where each clip's frames end

    def _apply(self, method: str, *args, **kwargs) -> "Batch":
        """A copy with `method(*args, **kwargs)` applied to every field that has it (tensors, EncodedFrames)."""
        return Batch(
            **{
                f.name: (
                    getattr(getattr(self, f.name), method)(*args, **kwargs)
                    if hasattr(getattr(self, f.name), method)
                    else getattr(self, f.name)
                )
                for f in fields(self)
            }
        )

    def to(self, device, non_blocking: bool = True) -> "Batch":
        return self._apply("to", device, non_blocking=non_blocking)

    def pin_memory(self) -> "Batch":
        """The DataLoader's pinning thread calls this (`pin_memory=True` on CUDA): page-locked tensors, so
        that `to(device, non_blocking=True)` is an asynchronous copy."""
        return self._apply("pin_memory")

    def __len__(self) -> int:
        return len(self.keys)

    @property
    def valid_frames(self) -> tuple[torch.Tensor, list] | None:
        """(frame_index, lengths): where the valid frames are, known without reading the device."""
        return None if self.frame_index is None else (self.frame_index, self.lengths)

    def split(self, size: int) -> list["Batch"]:
        """Consecutive micro-batches of `size` clips (padding as the whole batch's: masks say what is valid);
        each chunk's frame indices are a slice of the batch's, renumbered, with bounds from the host lengths."""
        chunks, start = [], 0
        steps = self.frame_mask.shape[1]
        for i in range(0, len(self), size):
            c = {
                f.name: (getattr(self, f.name)[i : i + size] if getattr(self, f.name) is not None else None)
                for f in fields(self)
            }
            if self.frame_index is not None:
                stop = start + sum(self.lengths[i : i + size])
                c["frame_index"] = self.frame_index[start:stop] - i * steps
                start = stop
            chunks.append(Batch(**c))
        return chunks


def frame_layout(mask: torch.Tensor) -> tuple[torch.Tensor, list]:
    """(flat indices b * T + t of the valid frames, valid frames per clip) of a (B, T) frame mask: made by the
    collate on the host (`Batch.frame_index`, `Batch.lengths`), so the model picks the frames without reading the
    device; on a device mask (evaluation, the demo) it costs one read."""
    return mask.flatten().nonzero().squeeze(1), mask.sum(1).tolist()


def frame_fields(mask: torch.Tensor) -> dict:
    """`frame_layout` as the Batch fields `frame_index` and `lengths`."""
    return dict(zip(("frame_index", "lengths"), frame_layout(mask)))


class Collate:
    """Pad clips in time (with a frame mask) and tokenize texts; runs in the loader workers."""

    def __init__(self, tokenizer, max_text_len: int = 128):
        self.tokenizer = tokenizer
        self.max_text_len = max_text_len

    def __call__(self, samples: list[dict]) -> Batch:
        if not samples:
            raise ValueError("empty batch")
        texts = [s["meta"]["text"] for s in samples]
        enc = self.tokenizer(texts, padding=True, truncation=True, max_length=self.max_text_len, return_tensors="pt")
        labels = enc["input_ids"].masked_fill(enc["attention_mask"] == 0, -100)
        frames, mask = self.frames(samples)
        return Batch(
            frames=frames,
            frame_mask=mask,
            input_ids=enc["input_ids"],
            attention_mask=enc["attention_mask"],
            labels=labels,
            sentence_ids=torch.tensor([int(s["meta"]["sentence_id"]) for s in samples], dtype=torch.long),
            keys=[s["key"] for s in samples],
            texts=texts,
            draws=torch.from_numpy(np.stack([s["draws"] for s in samples])) if "draws" in samples[0] else None,
            **frame_fields(mask),
        )

    @staticmethod
    def frames(samples: list[dict]):
        """(frames, frame mask): decoded clips padded into one uint8 tensor, or compressed clips
        (`JpegClip`, decoded on the device) packed into `devdecode.EncodedFrames`."""
        t_max = max(len(s["frames"]) for s in samples)
        mask = torch.zeros((len(samples), t_max), dtype=torch.bool)
        for i, s in enumerate(samples):
            mask[i, : len(s["frames"])] = True
        if isinstance(samples[0]["frames"], JpegClip):
            from sclslt.data.devdecode import EncodedFrames

            return EncodedFrames.from_clips([s["frames"] for s in samples], [s["key"] for s in samples]), mask
        h, w, c = samples[0]["frames"].shape[1:]
        frames = np.zeros((len(samples), t_max, h, w, c), dtype=np.uint8)
        for i, s in enumerate(samples):
            if s["frames"].shape[1:] != (h, w, c):
                raise ShardError(
                    f"sample {s['key']}: frame shape {s['frames'].shape[1:]} != {(h, w, c)} of the rest of the batch"
                )
            frames[i, : len(s["frames"])] = s["frames"]
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
            raise ShardError(
                f"{len(self.errors)} unreadable samples out of {self.expected} read "
                f"(more than data.max_bad_fraction={self.max_fraction}); first: " + "; ".join(self.errors[:5])
            )


def clip_rng(seed: int, epoch: int, key: str, purpose: int) -> random.Random:
    """The generator of one clip's random draws in an epoch: a function of (seed, epoch, clip key,
    purpose), never of the rank, the world size or the loader worker that happens to read the clip."""
    h = hashlib.blake2b(f"{seed}/{epoch}/{purpose}/{key}".encode("utf-8"), digest_size=8).digest()
    return random.Random(int.from_bytes(h, "little"))


AUG_DRAWS = 9  # uniforms per clip that `ClipAugment` turns into its affine transform


def clip_draws(seed: int, epoch: int, key: str) -> np.ndarray:
    """The clip's augmentation uniforms in [0, 1) for this epoch (float32, `AUG_DRAWS`)."""
    rng = clip_rng(seed, epoch, key, 4)
    return np.array([rng.random() for _ in range(AUG_DRAWS)], dtype=np.float32)


def epoch_order(keys: list[str], seed: int, epoch: int, global_batch: int) -> list[list[str]]:
    """The epoch's global batches in random mode: the split's keys (manifest order) shuffled per (seed,
    epoch) and cut into global batches. Every clip is in exactly one batch; the last
    `len(keys) % global_batch` keys of the shuffle sit this epoch out (others the next epoch)."""
    order = list(keys)
    random.Random(rng_seed(seed, epoch, 5)).shuffle(order)
    return [order[b * global_batch : (b + 1) * global_batch] for b in range(len(order) // global_batch)]


class ShardStream(torch.utils.data.IterableDataset):
    """Evaluation micro-batches of one split: every sample once, in manifest order, a contiguous slice
    per rank (the last batch may be short), streamed shard by shard. `decode`: "cpu" decodes frames in
    the loader; "device" leaves `jpg` frames compressed for the training device (`devdecode.resolve`)."""

    def __init__(
        self,
        shards_dir,
        split: str,
        micro_batch: int,
        *,
        rank: int = 0,
        world: int = 1,
        max_frames: int = 0,
        max_bad_fraction: float = 0.01,
        decode: str = "cpu",
    ):
        from sclslt.data.storage import Store

        self.store = Store(shards_dir)
        self.manifest = read_manifest(shards_dir, split)
        self.fmt = frame_format(self.manifest)
        self.defer = decode == "device"  # `jpg` frames cross compressed, decoded on the device
        self.bad = BadSamples(max_bad_fraction)
        self.digests = {r.key: r.digest for r in manifest_rows(self.manifest) if r.digest} or None
        if self.digests is None and self.manifest["samples"]:
            warn_unchecked(self.store, self.manifest)
        self.split, self.micro_batch, self.rank, self.world = split, micro_batch, rank, world
        self.max_frames = max_frames
        n = self.manifest["num_samples"]
        self.lo, self.hi = n * rank // world, n * (rank + 1) // world
        self.batches_per_epoch = -(-(self.hi - self.lo) // micro_batch)

    def __len__(self) -> int:
        return self.batches_per_epoch

    def _samples(self) -> Iterator[dict]:
        i = 0
        for sh in self.manifest["shards"]:
            if i + sh["num_samples"] <= self.lo:
                i += sh["num_samples"]
                continue
            self.bad.expect(sh["num_samples"])
            for s in iter_shard(sh["name"], self.fmt, self.bad, self.store, self.defer, sh.get("sha256"), self.digests):
                if self.lo <= i < self.hi:
                    yield s
                i += 1
                if i >= self.hi:
                    return

    def __iter__(self) -> Iterator[list[dict]]:
        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        batch: list[dict] = []
        b = 0
        for s in self._samples():
            s["frames"] = subsample_frames(s["frames"], self.max_frames)
            batch.append(s)
            if len(batch) == self.micro_batch:
                if b % n_workers == worker:
                    yield batch
                batch, b = [], b + 1
        if batch and b % n_workers == worker:
            yield batch


class GlobalStream(torch.utils.data.IterableDataset):
    """A rank's slice of each of an epoch's global batches (training), read by random access.

    `batches` are the epoch's global batches (sample keys, in global order: `epoch_order` or a Pair
    Selection plan); rank r of `world` trains on members [r m, (r + 1) m) of each, m = batch / world.
    Each clip is read as two byte ranges at the manifest's offsets (`ShardIndex`), `read_threads` at
    a time (remote stores: latency hidden by concurrency), and its random draws (temporal subsampling,
    augmentation uniforms) are seeded by (seed, epoch, clip key): the concatenation of the ranks'
    micro-batches of global batch k is the same at any world size and any number of loader workers.
    Workers take batches round-robin; `skip` resumes mid-epoch (nothing before it is read).
    An unreadable clip is reported and counted (`BadSamples`); its place in the micro-batch is taken by
    a copy of the micro-batch's first readable clip (same sentence: masked as a known false negative),
    so every rank still trains on m clips.
    """

    def __init__(
        self,
        shards_dir,
        split: str,
        batches: list[list[str]],
        *,
        rank: int = 0,
        world: int = 1,
        seed: int = 0,
        epoch: int = 0,
        skip: int = 0,
        max_frames: int = 0,
        decode: str = "cpu",
        read_threads: int = 8,
        max_bad_fraction: float = 0.01,
        manifest: dict | None = None,
    ):
        from sclslt.data.shards import ShardIndex

        size = {len(b) for b in batches}
        if len(size) > 1 or (size and next(iter(size)) % world):
            raise ShardError(f"global batches of sizes {sorted(size)} cannot be split over {world} ranks")
        manifest = manifest if manifest is not None else read_manifest(shards_dir, split)  # a caller's, read once
        self.index = ShardIndex(shards_dir, manifest, defer=decode == "device")
        self.batches, self.rank, self.world, self.skip = batches, rank, world, skip
        self.seed, self.epoch, self.max_frames, self.read_threads = seed, epoch, max_frames, max(1, read_threads)
        self.bad = BadSamples(max_bad_fraction)
        self._pool, self._pool_pid = None, None

    def __len__(self) -> int:
        return len(self.batches)

    def micro(self, b: int) -> list[str]:
        m = len(self.batches[b]) // self.world
        return self.batches[b][self.rank * m : (self.rank + 1) * m]

    def _read(self, key: str):
        try:
            return self.index.read(key)
        except Exception as e:  # noqa: BLE001 - reported and counted by BadSamples
            return e

    def _complete(self, keys: list[str], got: list) -> list[dict]:
        """The micro-batch from its reads: an unreadable clip reported, counted, and replaced."""
        good = next((s for s in got if not isinstance(s, Exception)), None)
        out = []
        for key, s in zip(keys, got):
            if isinstance(s, Exception):
                where = self.index.where(key)
                self.bad(where if where not in str(s) else "clip", s)
                if good is None:
                    raise ShardError(f"no readable clip in micro-batch {keys}: first error {s}") from s
                s = {**good, "meta": dict(good["meta"])}
            out.append(s)
        return out

    def __iter__(self) -> Iterator[list[dict]]:
        from collections import deque
        from concurrent.futures import ThreadPoolExecutor

        info = torch.utils.data.get_worker_info()
        worker, n_workers = (info.id, info.num_workers) if info else (0, 1)
        mine = [b for b in range(worker, len(self.batches), n_workers) if b >= self.skip]
        self.bad.expect(sum(len(self.micro(b)) for b in mine))  # the bad fraction is of this worker's clips
        if self._pool is None or self._pool_pid != os.getpid():  # a forked worker makes its own
            self._pool, self._pool_pid = ThreadPoolExecutor(self.read_threads), os.getpid()
        # reads run ahead of the batch being yielded, so that about read_threads clips are in flight
        ahead = -(-self.read_threads // max(1, len(self.micro(mine[0])))) if mine else 0
        pending: deque = deque()
        for b in mine:
            pending.append((b, [self._pool.submit(self._read, k) for k in self.micro(b)]))
            if len(pending) > ahead:
                yield self._ready(*pending.popleft())
        while pending:
            yield self._ready(*pending.popleft())

    def _ready(self, b: int, futures: list) -> list[dict]:
        batch = self._complete(self.micro(b), [f.result() for f in futures])
        for s in batch:
            self._draw(s)
        return batch

    def _draw(self, s: dict) -> None:
        """The clip's random draws: temporal subsampling and augmentation uniforms, per (seed, epoch, key)."""
        s["frames"] = subsample_frames(s["frames"], self.max_frames, clip_rng(self.seed, self.epoch, s["key"], 3))
        s["draws"] = clip_draws(self.seed, self.epoch, s["key"])


def make_loader(
    stream: ShardStream, collate: Collate, num_workers: int = 0, prefetch_factor: int = 2, pin_memory: bool = False
):
    """`pin_memory` (training on a GPU): batches in page-locked memory, so the copy to the device is asynchronous.
    The loader draws its workers' base seed from a generator of its own, not torch's global one: making a loader
    must not move the stream dropout draws from (a run resumed mid-epoch makes one where the uninterrupted run
    did not), and every draw of the data is seeded by (seed, epoch, clip) anyway."""
    kw = dict(
        num_workers=num_workers,
        collate_fn=collate,
        batch_size=None,
        pin_memory=pin_memory,
        generator=torch.Generator().manual_seed(0),
    )
    if num_workers > 0:
        kw.update(prefetch_factor=prefetch_factor, persistent_workers=False)
    return torch.utils.data.DataLoader(stream, **kw)
