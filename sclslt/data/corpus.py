"""Which shards a config trains on: `data.shards_dir` (a local directory or a remote prefix), or the
synthetic corpus, generated and sharded once per corpus config into a cache directory on first use
(one writer per machine under a file lock; the others wait, then reuse it). Making a corpus is not
streaming it: the loader (`loader`) only reads what this module points it at.
"""
from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
from pathlib import Path

from sclslt.config import DataConfig, SyntheticConfig
from sclslt.data.shards import write_split

SPLITS = ("train", "dev", "test")


def synthetic_shards_dir(cfg: DataConfig) -> Path:
    """Shards of the synthetic corpus; generated once per corpus config (safe under concurrency)."""
    import hashlib
    import json
    from dataclasses import asdict

    ident = json.dumps({"synthetic": asdict(cfg.synthetic), "per_shard": cfg.samples_per_shard,
                        "lowercase": cfg.lowercase, "v": 2}, sort_keys=True)
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
