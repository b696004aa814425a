"""`jpg` shards decoded on the device (sclslt.data.devdecode): the compressed path yields the same
batches as decoding in the loader, through the real nvImageCodec (its CPU backend here, nvJPEG on a
GPU when there is one)."""

import io

import numpy as np
import pytest
import torch

from sclslt.data.codec import CodecError, JpegClip, decode, encode
from sclslt.data.devdecode import DecodeError, EncodedFrames, resolve
from sclslt.data.loader import Collate, GlobalStream, ShardStream, make_loader
from sclslt.data.shards import read_manifest, write_split
from sclslt.data.text import train_tokenizer


def _clip(rng, t, h=24, w=32):
    """Natural-ish frames (smooth gradients plus noise), so JPEG has real work to do."""
    yy, xx = np.mgrid[0:h, 0:w]
    base = np.stack([(xx * 7 + yy * 3) % 256, (yy * 9) % 256, (xx * 5 + 40) % 256], -1)
    frames = base[None] + rng.integers(-30, 30, (t, h, w, 3))
    return np.clip(frames, 0, 255).astype(np.uint8)


def _shards(tmp_path, n=13, seed=0):
    rng = np.random.default_rng(seed)
    texts = ["wind from the north", "rain in the south", "snow on the hills tomorrow", "sunny and warm"]
    samples = [
        {"key": f"c{i:03d}", "frames": _clip(rng, int(rng.integers(3, 9))), "text": texts[i % 4], "signer": "s0"}
        for i in range(n)
    ]
    write_split(iter(samples), tmp_path, "train", samples_per_shard=4, frame_format="jpg")
    tok = train_tokenizer(texts, tmp_path / "tok")
    return tmp_path, tok


def test_jpeg_clip_parses_selects_and_decodes_like_the_codec():
    x = _clip(np.random.default_rng(1), 6)
    data = encode(x, "jpg")
    clip = JpegClip.parse(data)
    assert len(clip) == 6
    assert np.array_equal(clip.decode(), decode(data, "jpg"))
    assert np.array_equal(clip[np.array([1, 4])].decode(), decode(data, "jpg")[[1, 4]])
    with pytest.raises(CodecError, match="sum to"):
        JpegClip.parse(data[:-10])
    with pytest.raises(CodecError, match="frame index says"):
        JpegClip.parse(b"\x09\x00\x00\x00" + data[4:20])
    broken = bytearray(data)
    broken[4 + 4 * 6] = 0  # frame 0 loses its start-of-image marker
    with pytest.raises(CodecError, match="frame 0 of 6 is not a whole JPEG"):
        JpegClip.parse(bytes(broken))


def test_encoded_frames_decode_bit_for_bit_like_pillow_with_padding():
    rng = np.random.default_rng(2)
    clips = [_clip(rng, t) for t in (5, 2, 7)]
    packed = EncodedFrames.from_clips([JpegClip.parse(encode(c, "jpg")) for c in clips], ["a", "b", "c"])
    got = packed.to("cpu")
    assert got.dtype == torch.uint8 and tuple(got.shape) == (3, 7, 24, 32, 3)
    for i, c in enumerate(clips):
        want = decode(encode(c, "jpg"), "jpg")  # Pillow
        assert torch.equal(got[i, : len(c)], torch.from_numpy(want))
        assert not got[i, len(c) :].any()


def test_device_decode_gives_the_same_batches_as_loader_decode(tmp_path):
    shards, tok = _shards(tmp_path)
    keys = [r[0] for r in read_manifest(shards, "train")["samples"]]
    train = [keys[i : i + 4] for i in range(0, 12, 4)][::-1]
    for make in (
        lambda **kw: ShardStream(shards, "train", 3, max_frames=4, **kw),
        lambda **kw: GlobalStream(shards, "train", train, world=2, rank=1, seed=3, max_frames=4, **kw),
    ):
        cpu = [b for b in make_loader(make(), Collate(tok), num_workers=2)]
        dev = [b.to("cpu") for b in make_loader(make(decode="device"), Collate(tok), num_workers=2)]
        assert len(cpu) == len(dev) > 1
        for a, b in zip(cpu, dev):
            assert a.keys == b.keys
            assert torch.equal(a.frame_mask, b.frame_mask) and torch.equal(a.frames, b.frames)


def test_a_frame_that_does_not_decode_is_named(tmp_path):
    from PIL import Image

    rng = np.random.default_rng(4)
    good = JpegClip.parse(encode(_clip(rng, 2), "jpg"))
    buf = io.BytesIO()
    Image.fromarray(_clip(rng, 1)[0]).save(buf, format="JPEG")
    data = buf.getvalue()
    garbled = JpegClip([data[:2] + b"\x00" * 64 + data[66:]])  # markers intact, header destroyed
    with pytest.raises(DecodeError, match="sample bad: a frame could not be decoded"):
        EncodedFrames.from_clips([good, garbled], ["good", "bad"]).to("cpu")
    other = JpegClip.parse(encode(_clip(rng, 2, h=16), "jpg"))
    with pytest.raises(DecodeError, match=r"sample odd: frame shape \(16, 32, 3\)"):
        EncodedFrames.from_clips([good, other], ["good", "odd"]).to("cpu")


def test_resolve_says_where_frames_are_decoded(monkeypatch):
    import sys

    assert resolve("cpu", "cuda") == "cpu"
    assert resolve("auto", "cpu") == "cpu"  # the loader decodes when training on the CPU
    assert resolve("device", "cpu") == "device"
    with pytest.raises(ValueError, match="data.decode='gpu'"):
        resolve("gpu", "cpu")
    monkeypatch.setitem(sys.modules, "nvidia.nvimgcodec", None)  # as on a machine without it
    with pytest.raises(DecodeError, match="needs nvImageCodec"):
        resolve("device", "cpu")
    assert resolve("auto", "cuda") == "cpu"


@pytest.mark.skipif(
    not torch.cuda.is_available(),
    reason="nvJPEG decode needs a CUDA device; the CPU backend of the same path is tested above",
)
def test_gpu_decode_is_within_jpeg_rounding_of_pillow():
    rng = np.random.default_rng(5)
    clips = [_clip(rng, t, 64, 96) for t in (6, 3)]
    packed = EncodedFrames.from_clips([JpegClip.parse(encode(c, "jpg")) for c in clips], ["a", "b"])
    got = packed.to("cuda").cpu()
    for i, c in enumerate(clips):
        diff = (got[i, : len(c)].int() - torch.from_numpy(decode(encode(c, "jpg"), "jpg")).int()).abs()
        assert diff.max() <= 8 and diff.float().mean() < 1.0, (diff.max(), diff.float().mean())
