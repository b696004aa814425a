"""Shards read over HTTP from a real server on the loopback address (started and stopped here): streamed
and planned (byte ranges at the manifest's offsets) reads equal the local ones, a connection dropped
mid-shard is retried with nothing lost or duplicated, and a server that keeps failing is a clear error."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from sclslt.data.loader import GlobalStream, ShardStream
from sclslt.data.shards import ShardError, ShardIndex, iter_shard, read_manifest, write_split
from sclslt.data.storage import StorageError, Store
from tests.shard_server import Server


def _samples(n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = int(rng.integers(3, 9))
        yield {
            "key": f"clip{i:04d}",
            "frames": rng.integers(0, 255, (t, 16, 16, 3), dtype=np.uint8),
            "text": f"sentence {i % 7} number {i}",
            "signer": f"s{i % 3}",
        }


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    d = tmp_path_factory.mktemp("remote")
    for split, n in (("train", 40), ("dev", 13)):
        write_split(_samples(n, seed=len(split)), d, split, samples_per_shard=6)
    return d


def _by_key(samples):
    return {s["key"]: s for s in samples}


def test_manifest_offsets_give_the_streamed_samples(shards, tmp_path):
    man = read_manifest(shards, "train")
    assert all(len(row) == 8 and len(row[5]) == 4 and len(row[6]) == 8 and row[7] == "" for row in man["samples"])
    streamed = _by_key(s for sh in man["shards"] for s in iter_shard(shards / sh["name"]))
    index = ShardIndex(shards, man)
    for key, want in streamed.items():
        got = index.read(key)
        assert np.array_equal(got["frames"], want["frames"]) and got["meta"] == want["meta"]
    # a manifest from before offsets existed: indexed from the tar headers
    old = {**man, "samples": [row[:5] for row in man["samples"]]}
    assert np.array_equal(ShardIndex(shards, old).read("clip0007")["frames"], streamed["clip0007"]["frames"])
    # offsets that point at another sample (a stale manifest) are an error naming it
    bad = {**man, "samples": [list(r) for r in man["samples"]]}
    bad["samples"][0][5] = bad["samples"][1][5]
    with pytest.raises(ShardError, match="clip0000.*stale manifest"):
        ShardIndex(shards, bad).read("clip0000")


def test_streamed_reads_over_http_equal_local_despite_a_dropped_connection(shards):
    local = ShardStream(shards, "dev", 4)
    want = [s for b in local for s in b]
    with Server(shards) as srv:
        names = [sh["name"] for sh in read_manifest(shards, "dev")["shards"]]
        srv.drop = {names[1]: 700}  # inside the first sample's frames of shard 1
        remote = ShardStream(srv.url, "dev", 4)
        remote.store.block_size = 1024  # several ranges per shard
        got = [s for b in remote for s in b]
        assert srv.dropped and srv.dropped[0][0] == names[1]
    assert [s["key"] for s in got] == [s["key"] for s in want]  # nothing lost or duplicated
    for a, b in zip(got, want):
        assert np.array_equal(a["frames"], b["frames"]) and a["meta"] == b["meta"]
    assert remote.bad.errors == []


def test_planned_reads_over_http_use_byte_ranges_and_retry(shards):
    man = read_manifest(shards, "train")
    keys = [row[0] for row in man["samples"]]
    plan = [keys[i : i + 5] for i in (3, 17, 30)]
    want = [[s["frames"] for s in b] for b in GlobalStream(shards, "train", plan)]
    with Server(shards) as srv:
        first = read_manifest(shards, "train")["samples"][17]
        srv.drop = {man["shards"][first[1]]["name"]: first[5][0] + 10}  # cut inside a planned clip
        got = [[s["frames"] for s in b] for b in GlobalStream(srv.url, "train", plan)]
        assert srv.dropped
        tar_gets = [g for g in srv.gets if g[0].endswith(".tar")]
    assert all(np.array_equal(a, b) for ga, gb in zip(got, want) for a, b in zip(ga, gb))
    # one range a clip (frames and json together) and the one retried: no shard read whole, no header parsed
    assert all(rng for _, rng in tar_gets) and len(tar_gets) == 15 + len(srv.dropped)


def test_a_server_that_keeps_failing_is_a_clear_error(shards):
    with Server(shards) as srv:
        store = Store(srv.url, retries=2, backoff_s=0.01)
        srv.always_drop = True
        with pytest.raises(StorageError, match=r"train-000000\.tar bytes 0\.\.100: failed after 3 attempts"):
            store.read_range("train-000000.tar", 0, 100)
        srv.always_drop = False
        with pytest.raises(ShardError, match="no manifest .*/test.json"):
            read_manifest(srv.url, "test")


def _member_offset(shards: Path, shard: str, key: str, member: str = "frames.npy") -> int:
    import tarfile

    with tarfile.open(shards / shard) as tf:
        return next(m.offset_data for m in tf.getmembers() if m.name == f"{key}.{member}")


def test_a_damaged_byte_range_is_named_counted_and_never_trained_on(shards):
    """Planned reads check each sample against the manifest's checksum: a server serving one flipped
    byte of one clip gives a bad sample naming the shard URL and the clip, replaced in its batch."""
    man = read_manifest(shards, "train")
    keys = [r[0] for r in man["samples"]][:24]
    batches = [keys[i : i + 6] for i in range(0, 24, 6)]
    victim, shard = keys[8], man["shards"][man["samples"][8][1]]["name"]
    local = [[s["key"] for s in b] for b in GlobalStream(shards, "train", batches)]
    with Server(shards) as srv:
        srv.flip = {shard: [_member_offset(shards, shard, victim) + 200]}  # inside the frames' data
        stream = GlobalStream(srv.url, "train", batches, max_bad_fraction=0.1)
        got = [b for b in stream]
        assert len(stream.bad.errors) == 1, stream.bad.errors  # a failure explains itself
        err = stream.bad.errors[0]
        assert f"{srv.url}/{shard}:{victim}" in err and "checksum mismatch" in err
        assert victim not in {s["key"] for b in got for s in b}
        want = [[k if k != victim else b[0] for k in b] for b in local]  # the batch's first good clip
        assert [[s["key"] for s in b] for b in got] == want
        strict = GlobalStream(srv.url, "train", batches, max_bad_fraction=0.0)
        with pytest.raises(ShardError, match="checksum mismatch"):
            list(strict)


def test_read_threads_starting_at_once_share_one_remote_filesystem(shards, monkeypatch):
    """The loader's read threads ask the store for its filesystem at the same moment (the first batch): one is
    made, not one per thread whose sessions are dropped while others still read through them (a race suspected
    of this file's one unexplained failure). Mutation caught (checked): the lock in `Store.fs` removed (8 made)."""
    import threading
    import time

    import fsspec.core

    made, url_to_fs = [], fsspec.core.url_to_fs

    def slow_url_to_fs(*a, **k):  # widen the window the threads race through
        made.append(1)
        time.sleep(0.05)
        return url_to_fs(*a, **k)

    monkeypatch.setattr(fsspec.core, "url_to_fs", slow_url_to_fs)
    with Server(shards) as srv:
        store, out = Store(srv.url), []
        threads = [
            threading.Thread(target=lambda: out.append(store.read_range("train-000000.tar", 0, 512))) for _ in range(8)
        ]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert len(made) == 1 and len(out) == 8 and len(set(out)) == 1


def test_a_damaged_streamed_shard_is_caught_by_sample_and_by_shard(shards, capsys):
    """Streamed shards: a flipped byte inside a sample skips that sample (named); one in a tar header
    (no sample's bytes) is caught at the shard's end by its sha256; manifests without per-sample
    checksums still load, with one warning."""
    man = read_manifest(shards, "dev")
    want = [s["key"] for b in ShardStream(shards, "dev", 4) for s in b]
    shard = man["shards"][1]["name"]
    victim = next(r[0] for r in man["samples"] if r[1] == 1)
    with Server(shards) as srv:
        srv.flip = {shard: [_member_offset(shards, shard, victim) + 300]}  # in the pixels, past the npy header
        stream = ShardStream(srv.url, "dev", 4, max_bad_fraction=0.2)
        assert [s["key"] for b in stream for s in b] == [k for k in want if k != victim]
        assert len(stream.bad.errors) == 1 and f"{shard}:{victim}" in stream.bad.errors[0]
        # the zero padding after a member's data (the tar's own checksums cover headers, not this):
        # no sample byte changes, the file does
        import tarfile

        with tarfile.open(shards / shard) as tf:
            m = next(m for m in tf.getmembers() if m.size % 512)
        srv.flip = {shard: [m.offset_data + m.size]}
        stream = ShardStream(srv.url, "dev", 4, max_bad_fraction=0.2)
        assert [s["key"] for b in stream for s in b] == want
        assert len(stream.bad.errors) == 1 and "sha256" in stream.bad.errors[0] and shard in stream.bad.errors[0]
    old = {**man, "samples": [row[:6] for row in man["samples"]]}
    (shards / "old").mkdir(exist_ok=True)
    import json
    import shutil

    for sh in man["shards"]:
        shutil.copy(shards / sh["name"], shards / "old" / sh["name"])
    (shards / "old" / "dev.json").write_text(json.dumps(old))
    capsys.readouterr()
    assert [s["key"] for b in ShardStream(shards / "old", "dev", 4) for s in b] == want
    assert ShardIndex(shards / "old", old).read(victim)["key"] == victim
    assert capsys.readouterr().err.count("no per-sample checksums") == 1
