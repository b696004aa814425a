"""Which shards a config trains on: `data.shards_dir` (a local directory or a remote prefix), or the
synthetic corpus, generated and sharded once per corpus config into a cache directory on first use
(one writer per machine under a file lock; the others wait, then reuse it). Making a corpus is not
streaming it: the loader (`loader`) only reads what this module points it at.

A corpus is a pure function of its config, so `workers` processes can render and encode it (clip ranges in
order): the shards are byte-identical to one process's. The trainer makes it in one process; a tool that
needs a corpus in seconds (benchmarks/gpu_smoke.py) passes `workers`.
"""

from __future__ import annotations

import fcntl
import itertools
import os
import shutil
import tempfile
from pathlib import Path

from sclslt.config import DataConfig, SyntheticConfig
from sclslt.data.shards import ShardWriter, write_split

SPLITS = ("train", "dev", "test")
CHUNK = 16  # clips a worker renders and encodes per task (parallel generation)


def synthetic_shards_dir(cfg: DataConfig, workers: int = 1) -> Path:
    """Shards of the synthetic corpus; generated once per corpus config (safe under concurrency), by
    `workers` processes (the same bytes as one)."""
    import hashlib
    import json
    from dataclasses import asdict

    ident = json.dumps(
        {"synthetic": asdict(cfg.synthetic), "per_shard": cfg.samples_per_shard, "lowercase": cfg.lowercase, "v": 2},
        sort_keys=True,
    )
    tag = hashlib.sha256(ident.encode()).hexdigest()[:16]
    root = Path(cfg.cache_dir or os.environ.get("SCLSLT_CACHE", Path.home() / ".cache" / "sclslt"))
    final = root / f"synthetic-{tag}"
    if all((final / f"{s}.json").is_file() for s in SPLITS):
        return final
    root.mkdir(parents=True, exist_ok=True)
    with open(root / f".synthetic-{tag}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # one writer per machine; others wait, then reuse
        if not all((final / f"{s}.json").is_file() for s in SPLITS):
            make_synthetic_shards(cfg.synthetic, final, cfg.samples_per_shard, cfg.lowercase, workers=workers)
    return final


def make_synthetic_shards(
    syn: SyntheticConfig,
    out_dir: Path,
    samples_per_shard: int,
    lowercase: bool = True,
    *,
    workers: int = 1,
    frame_format: str = "npy",
) -> None:
    """The corpus of `syn` as shards of `frame_format` frames in `out_dir` (replaced whole, atomically);
    `workers` > 1 processes render and encode the clips, in order: the same bytes."""
    from sclslt.data.synthetic import SyntheticCorpus

    out_dir = Path(out_dir)
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=out_dir.name + ".", dir=out_dir.parent))
    pool = _pool(syn, tmp, lowercase, frame_format, workers) if workers > 1 else None
    try:
        corpus = SyntheticCorpus(syn)
        for split in SPLITS:
            if pool is not None:
                _write_split_parallel(pool, corpus, split, tmp, samples_per_shard, lowercase, frame_format)
                continue
            samples = (
                {**s, "source": f"synthetic:{split}:{i}"} for i, s in zip(corpus.indices(split), corpus.samples(split))
            )
            write_split(samples, tmp, split, samples_per_shard, lowercase, frame_format=frame_format)
        if out_dir.exists():
            shutil.rmtree(out_dir)
        os.replace(tmp, out_dir)
    finally:
        if pool is not None:
            pool.terminate()
            pool.join()
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)


_WORKER: dict = {}


def _pool(syn: SyntheticConfig, tmp: Path, lowercase: bool, frame_format: str, workers: int):
    """Worker processes that render and encode clips (forkserver: no fork of a process with threads)."""
    import multiprocessing

    ctx = multiprocessing.get_context("forkserver")
    return ctx.Pool(workers, initializer=_init_worker, initargs=(syn, str(tmp), lowercase, frame_format))


def _init_worker(syn: SyntheticConfig, tmp: str, lowercase: bool, frame_format: str) -> None:
    from sclslt.data.synthetic import SyntheticCorpus

    _WORKER["corpus"] = SyntheticCorpus(syn)
    # only its `encode` is used (no I/O): the validation and encoding `write_split` applies to each sample
    _WORKER["encoder"] = ShardWriter(tmp, "encode", lowercase=lowercase, frame_format=frame_format)


def _encode_clips(job: tuple) -> list[dict]:
    split, start, stop = job
    corpus, encoder = _WORKER["corpus"], _WORKER["encoder"]
    return [encoder.encode({**corpus.sample(split, i), "source": f"synthetic:{split}:{i}"}) for i in range(start, stop)]


def _write_split_parallel(
    pool, corpus, split: str, out: Path, samples_per_shard: int, lowercase: bool, frame_format: str
) -> dict:
    """`write_split` of the split's clips, rendered and encoded by `pool` (in order), written here."""
    idx = corpus.indices(split)
    jobs = [(split, i, min(i + CHUNK, idx.stop)) for i in range(idx.start, idx.stop, CHUNK)]
    encoded = itertools.chain.from_iterable(pool.imap(_encode_clips, jobs))
    return write_split(encoded, out, split, samples_per_shard, lowercase, frame_format=frame_format, encoded=True)


def resolve_shards_dir(cfg: DataConfig) -> Path | str:
    """The shard location: a local directory (Path) or a remote prefix (URL string, `storage.Store`)."""
    from sclslt.data.storage import is_url

    if cfg.corpus == "synthetic":
        return synthetic_shards_dir(cfg)
    return cfg.shards_dir.rstrip("/") if is_url(cfg.shards_dir) else Path(cfg.shards_dir)
