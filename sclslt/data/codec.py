"""On-disk forms of a pre-decoded clip (a shard-time option recorded in the manifest).

- `npy`     raw uint8 T x H x W x 3 (`np.save`, allow_pickle=False): no decode cost, largest.
- `npy.zst` the same bytes compressed with zstd (lossless): smaller, one fast decompress.
- `jpg`     per-frame JPEG (lossy, quality 90) concatenated in one member with a length index:
            smallest; decoded on the CPU with Pillow here (on a GPU, nvJPEG could take it).
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


def decode(data: bytes, fmt: str = "npy") -> np.ndarray:
    if fmt == "npy":
        arr = _npy_view(data)
    elif fmt == "npy.zst":
        import zstandard
        arr = _npy_view(zstandard.ZstdDecompressor().decompress(data))
    elif fmt == "jpg":
        from PIL import Image
        (n,) = struct.unpack_from("<I", data)
        sizes = struct.unpack_from(f"<{n}I", data, 4)
        pos, frames = 4 + 4 * n, []
        for size in sizes:
            frames.append(np.asarray(Image.open(io.BytesIO(data[pos:pos + size])).convert("RGB")))
            pos += size
        arr = np.stack(frames)
    else:
        raise CodecError(f"unknown frame format {fmt!r}: use one of {FORMATS}")
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise CodecError(f"decoded frames are {arr.dtype} {arr.shape}, not uint8 T x H x W x 3")
    return arr


def member_name(fmt: str) -> str:
    """The tar member suffix of a sample's frames in this form."""
    return {"npy": "frames.npy", "npy.zst": "frames.npy.zst", "jpg": "frames.jpgs"}[fmt]
