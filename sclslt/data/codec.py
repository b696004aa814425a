"""On-disk forms of a pre-decoded clip (a shard-time option recorded in the manifest).

- `npy`     raw uint8 T x H x W x 3 (`np.save`, allow_pickle=False): no decode cost, largest.
- `npy.zst` the same bytes compressed with zstd (lossless): smaller, one fast decompress.
- `jpg`     per-frame JPEG (lossy, quality 90) concatenated in one member with a length index:
            smallest; decoded on the CPU with Pillow (`decode`), or carried undecoded as a `JpegClip`
            to the training device and decoded there in batches (`sclslt.data.devdecode`, nvJPEG).
Every form decodes to the same array type, without unpickling anything. `benchmarks/bench_loader.py`
measures clips/s, MB/s and bytes per clip of each against a PNG-folder loader and mp4 decoding.
"""

from __future__ import annotations

import io
import struct

import numpy as np

FORMATS = ("npy", "npy.zst", "jpg")


class CodecError(ValueError):
    pass


MAX_CLIP_BYTES = 4 << 30  # a decoded clip larger than this is a broken header, not a clip (3000 x 512^2 x 3 = 2.4 GB)


def _npy(frames: np.ndarray) -> bytes:
    buf = io.BytesIO()
    np.save(buf, np.ascontiguousarray(frames), allow_pickle=False)
    return buf.getvalue()


def encode(frames: np.ndarray, fmt: str = "npy", level: int = 3, quality: int = 90) -> bytes:
    if frames.dtype != np.uint8 or frames.ndim != 4 or frames.shape[-1] != 3:
        raise CodecError(f"frames must be uint8 T x H x W x 3, got {frames.dtype} {frames.shape}")
    if fmt == "npy":
        return _npy(frames)
    if fmt == "npy.zst":
        import zstandard

        return zstandard.ZstdCompressor(level=level).compress(_npy(frames))
    if fmt == "jpg":
        from PIL import Image

        parts = []
        for f in frames:
            buf = io.BytesIO()
            Image.fromarray(f).save(buf, format="JPEG", quality=quality)
            parts.append(buf.getvalue())
        header = struct.pack(f"<I{len(parts)}I", len(parts), *[len(p) for p in parts])
        return header + b"".join(parts)
    raise CodecError(f"unknown frame format {fmt!r}: use one of {FORMATS}")


def _npy_view(data: bytes) -> np.ndarray:
    """An .npy payload as an array over the same bytes (no copy; read-only), header checked by numpy."""
    buf = io.BytesIO(data)
    major, _ = np.lib.format.read_magic(buf)
    read_header = np.lib.format.read_array_header_1_0 if major == 1 else np.lib.format.read_array_header_2_0
    shape, fortran, dtype = read_header(buf)
    if dtype.hasobject or fortran:
        raise CodecError(f"npy payload is {'object' if dtype.hasobject else 'Fortran-ordered'}: refused")
    return np.frombuffer(data, dtype=dtype, count=int(np.prod(shape)), offset=buf.tell()).reshape(shape)


class JpegClip:
    """A `jpg` clip's frames, still compressed: one JPEG bytestring per frame, checked for framing
    (index sizes, start/end markers) but not decoded. Indexing selects frames (temporal subsampling
    happens before any decode); `sclslt.data.devdecode` decodes a batch of them on the device."""

    __slots__ = ("parts",)

    def __init__(self, parts: list):
        self.parts = parts

    @classmethod
    def parse(cls, data: bytes) -> "JpegClip":
        view = memoryview(data)
        if len(view) < 4:
            raise CodecError(f"jpg payload of {len(view)} bytes has no frame index")
        (n,) = struct.unpack_from("<I", view)
        head = 4 + 4 * n
        if n == 0 or head > len(view):
            raise CodecError(f"jpg frame index says {n} frames, payload is {len(view)} bytes")
        sizes = struct.unpack_from(f"<{n}I", view, 4)
        if head + sum(sizes) != len(view):
            raise CodecError(f"jpg frame sizes sum to {sum(sizes)} bytes, payload holds {len(view) - head}")
        parts, pos = [], head
        for i, size in enumerate(sizes):
            part = view[pos : pos + size]
            if size < 4 or bytes(part[:2]) != b"\xff\xd8" or bytes(part[-2:]) != b"\xff\xd9":
                raise CodecError(f"jpg frame {i} of {n} is not a whole JPEG (no start/end marker)")
            parts.append(part)
            pos += size
        return cls(parts)

    def __len__(self) -> int:
        return len(self.parts)

    def __getitem__(self, idx) -> "JpegClip":
        return JpegClip([self.parts[int(i)] for i in np.asarray(idx).reshape(-1)])

    def decode(self) -> np.ndarray:
        """The frames decoded on the CPU (Pillow): uint8 T x H x W x 3."""
        from PIL import Image

        return np.stack([np.asarray(Image.open(io.BytesIO(p)).convert("RGB")) for p in self.parts])


def decode(data: bytes, fmt: str = "npy") -> np.ndarray:
    if fmt == "npy":
        arr = _npy_view(data)
    elif fmt == "npy.zst":
        import zstandard

        claimed = zstandard.frame_content_size(data)  # -1: not in the frame header
        if claimed > MAX_CLIP_BYTES:
            raise CodecError(f"zstd frame claims {claimed} bytes, more than a clip may hold ({MAX_CLIP_BYTES})")
        arr = _npy_view(zstandard.ZstdDecompressor().decompress(data, max_output_size=MAX_CLIP_BYTES))
    elif fmt == "jpg":
        arr = JpegClip.parse(data).decode()
    else:
        raise CodecError(f"unknown frame format {fmt!r}: use one of {FORMATS}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3 or arr.shape[0] == 0:
        raise CodecError(f"decoded frames are {arr.dtype} {arr.shape}, not uint8 T x H x W x 3 with T > 0")
    return arr


def member_name(fmt: str) -> str:
    """The tar member suffix of a sample's frames in this form."""
    return {"npy": "frames.npy", "npy.zst": "frames.npy.zst", "jpg": "frames.jpgs"}[fmt]
