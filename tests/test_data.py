"""Shards round trip, manifests, and the per-rank stream guarantees (equal batches, determinism, resume)."""
import hashlib
import io
from collections import Counter

import numpy as np
import pytest
import torch

from sclslt.data.loader import Collate, ShardStream, make_loader
from sclslt.data.shards import ShardError, iter_shard, read_manifest, write_split
from sclslt.data.text import normalise_text, sentence_id, train_tokenizer


def _samples(n, seed=0, texts=None):
    rng = np.random.default_rng(seed)
    for i in range(n):
        t = int(rng.integers(2, 9))
        yield {"key": f"s{i:04d}", "frames": rng.integers(0, 256, (t, 6, 5, 3), dtype=np.uint8),
               "text": (texts or ["Guten  Abend", "hallo welt", "Es regnet"])[i % 3], "signer": f"sig{i % 2}"}


def test_round_trip_and_manifest(tmp_path):
    src = list(_samples(23))
    man = write_split(iter(src), tmp_path, "train", samples_per_shard=10)
    assert [s["num_samples"] for s in man["shards"]] == [10, 10, 3]
    assert read_manifest(tmp_path, "train")["num_samples"] == 23
    got = [s for sh in man["shards"] for s in iter_shard(tmp_path / sh["name"])]
    assert [g["key"] for g in got] == [s["key"] for s in src]
    for g, s in zip(got, src):
        np.testing.assert_array_equal(g["frames"], s["frames"])
        assert g["meta"]["original_text"] == s["text"]
        assert g["meta"]["text"] == normalise_text(s["text"])
        assert g["meta"]["sentence_id"] == sentence_id(s["text"]) and g["meta"]["num_frames"] == len(s["frames"])
    for sh in man["shards"]:
        assert hashlib.sha256((tmp_path / sh["name"]).read_bytes()).hexdigest() == sh["sha256"]
    # the same input gives byte-identical shards (deterministic output)
    man2 = write_split(iter(src), tmp_path / "again", "train", samples_per_shard=10)
    assert [s["sha256"] for s in man2["shards"]] == [s["sha256"] for s in man["shards"]]
    # no pickle anywhere: the members are exactly <key>.frames.npy (loadable with allow_pickle=False) and json
    import tarfile
    with tarfile.open(tmp_path / man["shards"][0]["name"]) as tf:
        names = tf.getnames()
        assert sorted({n.split(".", 1)[1] for n in names}) == ["frames.npy", "json"]
        np.load(io.BytesIO(tf.extractfile(names[0]).read()), allow_pickle=False)


def test_sentence_ids_identify_normalised_text():
    assert sentence_id("Guten  Abend ") == sentence_id("guten abend")
    assert sentence_id("guten abend") != sentence_id("guten morgen")
    assert 0 <= sentence_id("x") < 2 ** 63


def test_bad_samples_are_named(tmp_path):
    bad = [{"key": "clip7", "frames": np.zeros((0, 4, 4, 3), np.uint8), "text": "a"}]
    with pytest.raises(ShardError, match="clip7"):
        write_split(iter(bad), tmp_path, "train")
    bad = [{"key": "clip8", "frames": np.zeros((2, 4, 4, 3), np.uint8), "text": "  "}]
    with pytest.raises(ShardError, match="clip8.*empty text"):
        write_split(iter(bad), tmp_path, "train")
    with pytest.raises(ShardError, match="no manifest"):
        read_manifest(tmp_path / "nowhere", "train")


def _keys(stream, epoch, skip=0):
    stream.set_epoch(epoch, skip)
    return [[s["key"] for s in b] for b in stream]


def test_uneven_shards_give_equal_batches_per_rank(tiny_shards):
    man = read_manifest(tiny_shards, "train")
    sizes = [s["num_samples"] for s in man["shards"]]
    assert len(set(sizes)) > 1, "the fixture must have uneven shards"
    for world in (1, 2, 3):
        streams = [ShardStream(tiny_shards, "train", 4, rank=r, world=world, seed=1, shuffle_buffer=8)
                   for r in range(world)]
        counts = [len(_keys(s, 0)) for s in streams]
        assert len(set(counts)) == 1 and counts[0] == man["num_samples"] // (4 * world)
        keys = [k for s in streams for b in _keys(s, 0) for k in b]
        # each rank reads its own shards: no sample is read by two ranks in one epoch
        by_rank = [set(k for b in _keys(s, 0) for k in b) for s in streams]
        for i in range(world):
            for j in range(i + 1, world):
                assert not by_rank[i] & by_rank[j]
        assert len(keys) == counts[0] * 4 * world


def test_order_is_deterministic_per_seed_epoch_and_resumable(tiny_shards):
    mk = lambda seed: ShardStream(tiny_shards, "train", 4, rank=1, world=2, seed=seed, shuffle_buffer=8)
    a, b = _keys(mk(3), 0), _keys(mk(3), 0)
    assert a == b
    assert _keys(mk(3), 1) != a and _keys(mk(4), 0) != a
    assert _keys(mk(3), 0, skip=5) == a[5:]


def test_worker_processes_reproduce(tiny_shards, tmp_path):
    tok = train_tokenizer([s[4] for s in read_manifest(tiny_shards, "train")["samples"]], tmp_path / "tok")
    stream = ShardStream(tiny_shards, "train", 4, rank=0, world=1, seed=0, shuffle_buffer=8)

    def run():
        stream.set_epoch(2)
        return [b.keys for b in make_loader(stream, Collate(tok), num_workers=2)]
    first = run()
    assert first == run() and len(first) == len(stream)
    assert len({k for b in first for k in b}) > len(first)   # not one repeated batch


def test_collate_pads_and_masks(tiny_shards, tmp_path):
    tok = train_tokenizer([s[4] for s in read_manifest(tiny_shards, "train")["samples"]], tmp_path / "tok")
    samples = next(iter(ShardStream(tiny_shards, "dev", 5, train=False)))
    batch = Collate(tok)(samples)
    lens = [s["frames"].shape[0] for s in samples]
    assert batch.frames.shape[:2] == (5, max(lens)) and batch.frames.dtype == torch.uint8
    assert batch.frame_mask.sum(1).tolist() == lens
    for i, s in enumerate(samples):
        assert not batch.frames[i, lens[i]:].any()
        assert tok.decode(batch.input_ids[i], skip_special_tokens=True) == s["meta"]["text"]
        n_tok = int(batch.attention_mask[i].sum())
        assert batch.input_ids[i, n_tok - 1] == tok.eos_token_id
        assert (batch.labels[i, n_tok:] == -100).all() and (batch.labels[i, :n_tok] >= 0).all()
    assert batch.sentence_ids.tolist() == [s["meta"]["sentence_id"] for s in samples]


def test_eval_stream_covers_split_once_across_ranks(tiny_shards):
    man = read_manifest(tiny_shards, "test")
    keys = []
    for r in range(3):
        for b in ShardStream(tiny_shards, "test", 4, rank=r, world=3, train=False):
            keys += [s["key"] for s in b]
    assert keys == [s[0] for s in man["samples"]]


def test_synthetic_corpus_has_duplicates_in_the_shards(tiny_shards):
    ids = Counter(s[2] for s in read_manifest(tiny_shards, "train")["samples"])
    assert max(ids.values()) > 1


def test_planned_stream_serves_the_plan_whatever_the_workers_and_resumes(tiny_shards, tmp_path):
    from sclslt.data.loader import PlannedStream
    tok = train_tokenizer([s[4] for s in read_manifest(tiny_shards, "train")["samples"]], tmp_path / "tok")
    keys = [s[0] for s in read_manifest(tiny_shards, "train")["samples"]]
    plan = [keys[i:i + 3] for i in range(40, 1, -7)][:6]        # an arbitrary order across shards
    for workers in (0, 2):
        got = [b.keys for b in make_loader(PlannedStream(tiny_shards, "train", plan), Collate(tok), workers)]
        assert got == plan
    assert [b.keys for b in make_loader(PlannedStream(tiny_shards, "train", plan, skip=4), Collate(tok))] == plan[4:]
    # random access returns the same clip as streaming the shard
    first = next(iter(ShardStream(tiny_shards, "train", 1, train=False)))[0]
    again = next(iter(PlannedStream(tiny_shards, "train", [[first["key"]]])))[0]
    assert np.array_equal(first["frames"], again["frames"]) and first["meta"] == again["meta"]


@pytest.mark.parametrize("fmt", ["npy.zst", "jpg"])
def test_other_frame_formats_round_trip_through_stream_and_index(tmp_path, fmt):
    from sclslt.data.loader import PlannedStream
    src = list(_samples(7, seed=2))
    for s in src:                                   # smooth frames: JPEG keeps them close
        s["frames"] = np.repeat(np.linspace(0, 250, 5 * 6, dtype=np.uint8).reshape(1, 5, 6, 1), 3, -1).repeat(
            len(s["frames"]), 0)
    man = write_split(iter(src), tmp_path, "train", samples_per_shard=3, frame_format=fmt)
    assert read_manifest(tmp_path, "train")["format"] == fmt
    got = {s["key"]: s["frames"] for b in ShardStream(tmp_path, "train", 2, train=False) for s in b}
    again = next(iter(PlannedStream(tmp_path, "train", [[src[4]["key"]]])))[0]["frames"]
    for s in src:
        tol = 0 if fmt == "npy.zst" else 8
        assert got[s["key"]].shape == s["frames"].shape
        assert np.abs(got[s["key"]].astype(int) - s["frames"]).max() <= tol
    assert np.array_equal(again, got[src[4]["key"]])
    assert man["num_samples"] == 7


def test_unreadable_samples_are_skipped_below_the_fraction_and_stop_above(tmp_path):
    import tarfile
    write_split(iter(list(_samples(20, seed=3))), tmp_path, "train", samples_per_shard=10)
    shard = tmp_path / "train-000000.tar"                # corrupt one member's frames in place
    with tarfile.open(shard) as tf:
        m = next(x for x in tf.getmembers() if x.name.endswith(".frames.npy"))
    data = bytearray(shard.read_bytes())
    data[m.offset_data:m.offset_data + 8] = b"garbage!"
    shard.write_bytes(bytes(data))
    ok = ShardStream(tmp_path, "train", 4, seed=0, shuffle_buffer=4, max_bad_fraction=0.1)
    keys = [s["key"] for b in ok for s in b]
    assert len(keys) == 20 // 4 * 4 and m.name.split(".")[0] not in keys
    assert len(ok.bad.errors) >= 1 and "train-000000.tar" in ok.bad.errors[0]
    strict = ShardStream(tmp_path, "train", 4, seed=0, shuffle_buffer=4, max_bad_fraction=0.0)
    with pytest.raises(ShardError, match="unreadable samples.*max_bad_fraction"):
        list(strict)


def test_codecs_round_trip_and_refuse_pickled_payloads():
    from sclslt.data.codec import CodecError, decode, encode
    x = np.random.default_rng(0).integers(0, 256, (3, 5, 4, 3), dtype=np.uint8)
    for fmt in ("npy", "npy.zst"):
        assert np.array_equal(decode(encode(x, fmt), fmt), x)
    assert decode(encode(x, "jpg"), "jpg").shape == x.shape
    buf = io.BytesIO()
    np.save(buf, np.array([{"a": 1}], dtype=object), allow_pickle=True)
    with pytest.raises(CodecError, match="object"):
        decode(buf.getvalue(), "npy")
    with pytest.raises(CodecError, match="unknown frame format"):
        encode(x, "gif")
