"""Fuzzed inputs: generated malformed inputs at every reader a user's files reach. Each must
end in that reader's own error type with a message naming the file (or, for a corpus item, the item
marked bad with its problem), within bounded time and memory: no traceback from inside a library, no
hang, no allocation a header asks for.

Readers: experiment YAML and dotted overrides (ConfigError), shard manifests and tar members: truncated,
wrong names, npy headers with huge or negative dimensions, zstd frames claiming 10^12 bytes, non-UTF-8
json (ShardError), caption files, CSV/JSONL manifests, label pickles and frame images of the corpus
readers (CorpusError, or a bad item).
"""

from __future__ import annotations

import functools
import io
import json
import resource
import signal
import struct
import tarfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from sclslt.config import ConfigError, load_config, parse_overrides
from sclslt.data.layouts import read_items
from sclslt.data.layouts.common import CorpusError
from sclslt.data.shards import ShardError, decode_frames, iter_shard, read_manifest

FUZZ = settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
LIMIT_S = 20  # one input, one reader: milliseconds normally; a loop that never ends fails here


def bounded(test):
    """Each generated input's run is bounded in time (hypothesis's deadline only judges runs that finish: a
    reader stuck in a loop would hang the suite instead). Mutation caught (checked): a manifest reader that
    loops forever on a shard list it cannot parse fails test_manifests with this TimeoutError."""

    @functools.wraps(test)
    def run(*args, **kwargs):
        def expire(*_):
            raise TimeoutError(f"one input took over {LIMIT_S} s: a reader hangs on it")

        old = signal.signal(signal.SIGALRM, expire)
        signal.setitimer(signal.ITIMER_REAL, LIMIT_S)
        try:
            return test(*args, **kwargs)
        finally:
            signal.setitimer(signal.ITIMER_REAL, 0)
            signal.signal(signal.SIGALRM, old)

    return run


junk = st.binary(max_size=400)
text = st.text(max_size=300)


@pytest.fixture(autouse=True)
def bounded_memory():
    """An input that makes a reader allocate what a header claims fails here instead of swapping."""
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    resource.setrlimit(resource.RLIMIT_AS, (min(hard, 16 << 30) if hard > 0 else 16 << 30, hard))
    yield
    resource.setrlimit(resource.RLIMIT_AS, (soft, hard))


def _names(e: BaseException, path) -> bool:
    return str(path) in str(e)


# -- configuration ------------------------------------------------------------------------------


@FUZZ
@given(body=st.one_of(text, junk.map(lambda b: b.decode("latin-1"))))
@example(body="model: {d_model: x}")  # a wrong type
@example(body="stage1: [1, 2")  # broken YAML
@example(body="nonsense_key: 1")  # an unknown section
@bounded
def test_experiment_files(tmp_path, body):
    """Any file body loads or ends in a ConfigError that names the file. Mutation caught: a type error raised
    without the file's path (checked: the d_model example)."""
    f = tmp_path / "exp.yaml"
    f.write_text(body, encoding="utf-8", errors="surrogateescape")
    try:
        load_config(f)
    except ConfigError as e:
        assert _names(e, f), e


@FUZZ
@given(
    args=st.lists(
        st.one_of(
            text,
            st.sampled_from(
                ["--train.max_steps", "--model.similarity", "--x.y", "--data", "--stage1.lr", "nan", "[1,", "{a: 1"]
            ),
        ),
        max_size=6,
    )
)
@bounded
def test_dotted_overrides(args):
    try:
        load_config(None, parse_overrides(args))
    except ConfigError:
        pass


# -- shards -------------------------------------------------------------------------------------


@FUZZ
@given(
    body=st.one_of(
        junk,
        st.builds(
            lambda d: json.dumps(d).encode(),
            st.dictionaries(
                st.sampled_from(["num_samples", "shards", "samples", "frame_shape", "format", "split"]),
                st.one_of(st.integers(), st.text(max_size=5), st.lists(st.integers(), max_size=3), st.none()),
                max_size=6,
            ),
        ),
    )
)
@bounded
def test_manifests(tmp_path, body):
    (tmp_path / "train.json").write_bytes(body)
    try:
        man = read_manifest(tmp_path, "train")
    except ShardError as e:
        assert _names(e, tmp_path / "train.json"), e
        return
    from sclslt.data.loader import ShardStream

    try:
        list(ShardStream(tmp_path, "train", 2))
    except ShardError as e:
        assert str(tmp_path) in str(e), e
    assert isinstance(man, dict)


def npy_header(shape, descr="|u1") -> bytes:
    head = repr({"descr": descr, "fortran_order": False, "shape": tuple(shape)}).encode()
    head += b" " * (-(len(head) + 11) % 64) + b"\n"
    return b"\x93NUMPY\x01\x00" + struct.pack("<H", len(head)) + head


dims = st.integers(min_value=-3, max_value=10**12)


@FUZZ
@given(
    shape=st.lists(dims, min_size=0, max_size=5),
    tail=junk,
    fmt=st.sampled_from(["npy", "npy.zst", "jpg"]),
    descr=st.sampled_from(["|u1", "<f8", "|O", "<i4"]),
)
@example(shape=[1, 1, 1, 3], tail=bytes(24), fmt="npy", descr="<f8")  # well-formed npy, the wrong dtype
@example(shape=[2, 3], tail=bytes(6), fmt="npy", descr="|u1")  # well-formed npy, the wrong shape
@example(shape=[0, 4, 4, 3], tail=b"", fmt="npy", descr="|u1")  # no frames
@bounded
def test_frame_payloads(shape, tail, fmt, descr):
    """Whatever the payload, decoding ends in the reader's error naming the member, or in frames as the contract
    says (uint8, T x H x W x 3, T > 0). Mutation caught: the dtype/shape check dropped from codec.decode (the
    float64 example decodes; checked)."""
    data = npy_header(shape, descr) + tail
    if fmt == "npy.zst":
        import zstandard

        # a frame that claims 10^12 bytes of content, then garbage
        data = zstandard.ZstdCompressor(write_content_size=True).compress(data)[:12] + tail
        data = data[:4] + b"\xa4" + struct.pack("<Q", 10**12) + data[13:]
    elif fmt == "jpg":
        data = struct.pack("<I", max(0, len(shape))) + b"".join(struct.pack("<I", d % 2**32) for d in shape) + tail
    if fmt == "npy.zst":
        import zstandard

        from sclslt.data.codec import MAX_CLIP_BYTES

        huge = zstandard.ZstdCompressor(write_content_size=True).compress(b"\0" * 64)
        assert zstandard.frame_content_size(huge) == 64
        with pytest.raises(ShardError, match="claims"):  # refused from the header, nothing allocated
            decode_frames(_claim(huge, MAX_CLIP_BYTES + 1), "clip.tar:k", fmt)
    try:
        frames = decode_frames(data, "clip.tar:k", fmt)
    except ShardError as e:
        assert "clip.tar:k" in str(e), e
    else:
        assert frames.dtype == np.uint8 and frames.ndim == 4 and frames.shape[-1] == 3 and len(frames) > 0, (
            frames.dtype,
            frames.shape,
        )


def _claim(frame: bytes, size: int) -> bytes:
    """A zstd frame whose header claims `size` bytes of content (an 8-byte Frame_Content_Size)."""
    desc = frame[4]
    fcs_len = {0: 1 if desc & 0x20 else 0, 1: 2, 2: 4, 3: 8}[desc >> 6]
    window = 0 if desc & 0x20 else 1
    did = {0: 0, 1: 1, 2: 2, 3: 4}[desc & 3]
    head, rest = frame[: 5 + window + did], frame[5 + window + did + fcs_len :]
    return head[:4] + bytes([(desc & 0x3F) | 0xC0]) + head[5:] + struct.pack("<Q", size) + rest


def _tar(members: list[tuple[str, bytes]], truncate: int | None) -> bytes:
    buf = io.BytesIO()
    with tarfile.open(fileobj=buf, mode="w") as tf:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tf.addfile(info, io.BytesIO(data))
    b = buf.getvalue()
    return b[:truncate] if truncate is not None else b


@FUZZ
@given(
    members=st.lists(
        st.tuples(
            st.sampled_from(
                ["s0.frames.npy", "s0.json", "s1.json", "s1.frames.npy", "x", "s0.frames.npy.extra", "../s2.json"]
            ),
            st.one_of(junk, st.just(b'\xff\xfe{"key": "s0"}')),
        ),
        max_size=4,
    ),
    truncate=st.one_of(st.none(), st.integers(min_value=0, max_value=3000)),
)
@bounded
def test_tar_members(tmp_path, members, truncate):
    shard = tmp_path / "train-000000.tar"
    shard.write_bytes(_tar(members, truncate))
    errors = []
    got = list(iter_shard(shard, on_error=lambda where, e: errors.append((where, e))))
    assert all(str(shard) in where for where, _ in errors)
    assert all(s["frames"].dtype == np.uint8 for s in got)


# -- corpus readers -----------------------------------------------------------------------------


def _bad_or_error(layout: str, root: Path, named: Path, split: str = "train"):
    try:
        items = read_items(layout, root, split)
    except CorpusError as e:
        assert _names(e, named) or str(root) in str(e), e
        return
    from sclslt.data.decoding import check_item

    for it in items:
        check_item(it)  # a problem is recorded on the item, never raised from a library


@FUZZ
@given(body=st.one_of(text, junk.map(lambda b: b.decode("latin-1"))), srt=st.booleans())
@bounded
def test_caption_files(tmp_path, body, srt):
    (tmp_path / "talk.mp4").write_bytes(b"\x00" * 64)
    cap = tmp_path / ("talk.srt" if srt else "talk.vtt")
    cap.write_text(("" if srt else "WEBVTT\n\n") + body, encoding="utf-8", errors="surrogateescape")
    _bad_or_error("captions", tmp_path, cap)


@FUZZ
@given(
    rows=st.lists(
        st.dictionaries(
            st.sampled_from(["path", "text", "split", "start", "end", "key", "zz"]),
            st.one_of(text, st.integers(), st.floats(allow_nan=True), st.none()),
            max_size=6,
        ),
        max_size=5,
    ),
    jsonl=st.booleans(),
    raw=st.one_of(st.none(), junk),
)
@bounded
def test_csv_and_jsonl_manifests(tmp_path, rows, jsonl, raw):
    f = tmp_path / ("manifest.jsonl" if jsonl else "manifest.csv")
    if raw is not None:
        f.write_bytes(raw)
    elif jsonl:
        f.write_text("\n".join(json.dumps(r) for r in rows))
    else:
        keys = sorted({k for r in rows for k in r}) or ["path", "text"]
        f.write_text(",".join(keys) + "\n" + "\n".join(",".join(str(r.get(k, "")) for k in keys) for r in rows))
    _bad_or_error("manifest", f, f)


@FUZZ
@given(body=junk, gz=st.booleans())
@bounded
def test_label_pickles(tmp_path, body, gz):
    import gzip

    if gz:  # GFSLT-VLP's gzip pickle
        f = tmp_path / "labels.train"
        f.write_bytes(gzip.compress(body))
        _bad_or_error("phoenix2014t", tmp_path, f)
    else:  # CSL-Daily's pickle
        lab = tmp_path / "sentence_label"
        lab.mkdir(exist_ok=True)
        f = lab / "csl2020ct_v2.pkl"
        f.write_bytes(body)
        (lab / "split_1.txt").write_text("name|split\nS0|train\n")
        _bad_or_error("csl-daily", tmp_path, f)


@FUZZ
@given(
    images=st.lists(
        st.one_of(junk, st.just(b"\x89PNG\r\n\x1a\n" + b"\x00" * 30), st.just(b"\xff\xd8\xff\xe0" + b"\x00" * 40)),
        min_size=1,
        max_size=3,
    )
)
@bounded
def test_frame_images(tmp_path, images):
    from sclslt.data.decoding import decode_item

    d = tmp_path / "clip"
    d.mkdir(exist_ok=True)
    for i, b in enumerate(images):
        (d / f"{i:04d}.png").write_bytes(b)
    f = tmp_path / "manifest.csv"
    f.write_text("path,text\nclip,hello there\n")
    try:
        items = read_items("manifest", f, "train")
    except CorpusError as e:
        assert _names(e, f), e
        return
    for it in items:
        try:
            decode_item(it, 16, 8)
        except CorpusError as e:
            assert str(d) in str(e) or it.key in str(e), e
