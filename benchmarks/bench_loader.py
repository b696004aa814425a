"""Loader throughput per on-disk form of a clip: clips/s, MB/s and bytes per clip, per CPU core.

The same synthetic clips (`--clips` clips of `--frames` frames at `--size` px) are stored as
  npy      WebDataset tar, raw uint8 (`sclslt.data.codec`)
  npy.zst  the same, zstd-compressed (lossless)
  jpg      per-frame JPEG in one member, decoded with Pillow on the CPU (the loader's CPU decoder)
  jpg-nvimgcodec   the same shards decoded by nvImageCodec's CPU backend (libjpeg-turbo, one thread,
           all of a clip's frames in one call; the same pixels as Pillow)
  jpg-feed the same shards as the loader reads them when the device decodes (data.decode=device):
           read, framing checked, packed into the batch's buffer; no decode on the CPU
  png-dir  a folder of PNG files per clip, read one by one (the GFSLT-VLP way)
  mp4      an H.264 file per clip, decoded with PyAV
and read back with 1, 2 and all cores (one process per core, each reading its share of the clips),
timing read + decode to a uint8 array (no augmentation, no model). Files are read warm from the page
cache, so this measures the CPU cost of decoding, the loader's bottleneck; MB/s is what storage
must deliver per core at that rate. The last column says how many cores one accelerator needs at
`--gpu-clips-per-s` (a stage-1 step rate; the issue estimates a few hundred clips/s per H100).

  python benchmarks/bench_loader.py                    # 224 px, 64-frame clips
  python benchmarks/bench_loader.py --quick            # tiny: checks the script

--stream measures the training stream instead, one process (one core), one epoch of --clips clips in
shards of --per-shard, micro-batches of 8, per shard source: the local directory, and the same
directory over HTTP on the loopback address (tests/shard_server.py) with --latency-ms added to every
response, as a remote object store adds a round trip:
  sequential   every shard read front to back (the loader's per-rank streaming before batches were
               world-size invariant, which could not give the same global batches at every world size;
               evaluation reads so)
  global-tN    the training stream now (`GlobalStream`): epoch_order's global batches, each clip one
               byte range at the manifest's offsets, N reads in flight (data.read_threads)
Rows give clips/s (wall) and clips per CPU second of the process, bytes read per clip and the bytes a
loader process holds in flight (`cache_mb`: the remote reader's block buffer for sequential reads,
read_threads clips for the global stream; the page cache not counted). jpg shards are read as with
data.decode=device (framing checked, no CPU decode), so the read path is what is measured.

  python benchmarks/bench_loader.py --stream --clips 256 --frames 64 --size 224 --latency-ms 0 5 20
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from multiprocessing import get_context
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchio import run_tag, write_rows  # noqa: E402

from sclslt.data.codec import FORMATS, decode, encode, member_name  # noqa: E402


def make_clips(n: int, frames: int, size: int) -> list[np.ndarray]:
    from sclslt.config import SyntheticConfig
    from sclslt.data.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(SyntheticConfig(frame_size=size, n_train=n, min_frames_per_sign=3, max_frames_per_sign=5))
    out = []
    for i in range(n):
        f = corpus.sample("train", i)["frames"]
        reps = -(-frames // len(f))
        out.append(np.concatenate([f] * reps)[:frames])
    return out


def write_all(clips: list[np.ndarray], root: Path) -> dict[str, list[Path]]:
    import av
    import webdataset as wds
    from PIL import Image

    paths: dict[str, list[Path]] = {}
    for fmt in FORMATS:
        paths[fmt] = []
        for i, c in enumerate(clips):
            p = root / fmt / f"clip{i:05d}.tar"
            p.parent.mkdir(parents=True, exist_ok=True)
            with wds.TarWriter(str(p), encoder=False, mtime=0) as w:
                w.write({"__key__": f"clip{i:05d}", member_name(fmt): encode(c, fmt), "json": b"{}"})
            paths[fmt].append(p)
    paths["png-dir"] = []
    for i, c in enumerate(clips):
        d = root / "png-dir" / f"clip{i:05d}"
        d.mkdir(parents=True, exist_ok=True)
        for t, f in enumerate(c):
            Image.fromarray(f).save(d / f"images{t:04d}.png")
        paths["png-dir"].append(d)
    paths["mp4"] = []
    for i, c in enumerate(clips):
        p = root / "mp4" / f"clip{i:05d}.mp4"
        p.parent.mkdir(parents=True, exist_ok=True)
        with av.open(str(p), "w") as out:
            st = out.add_stream("libx264", rate=25)
            st.height, st.width = c.shape[1] - c.shape[1] % 2, c.shape[2] - c.shape[2] % 2
            st.pix_fmt = "yuv420p"
            for f in c:
                frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(f[: st.height, : st.width]), format="rgb24")
                for packet in st.encode(frame):
                    out.mux(packet)
            for packet in st.encode():
                out.mux(packet)
        paths["mp4"].append(p)
    return paths


def read_one(kind: str, path: str) -> int:
    """Read and decode one clip; returns the bytes read from disk."""
    p = Path(path)
    if kind in FORMATS:
        import tarfile

        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(member_name(kind)):
                    decode(tf.extractfile(m).read(), kind)
        return p.stat().st_size
    if kind == "png-dir":
        from PIL import Image

        files = sorted(p.glob("*.png"))
        np.stack([np.asarray(Image.open(f).convert("RGB")) for f in files])
        return sum(f.stat().st_size for f in files)
    if kind == "mp4":
        import av

        with av.open(str(p)) as c:
            np.stack([fr.to_ndarray(format="rgb24") for fr in c.decode(video=0)])
        return p.stat().st_size
    if kind in ("jpg-feed", "jpg-nvimgcodec"):
        import tarfile

        from sclslt.data.codec import JpegClip
        from sclslt.data.devdecode import EncodedFrames, decoder

        with tarfile.open(p) as tf:
            for m in tf.getmembers():
                if m.name.endswith(member_name("jpg")):
                    clip = JpegClip.parse(tf.extractfile(m).read())
                    if kind == "jpg-feed":
                        EncodedFrames.from_clips([clip], [m.name])
                    else:
                        parts = [np.frombuffer(q, dtype=np.uint8) for q in clip.parts]
                        np.stack([np.asarray(im) for im in decoder("cpu", threads=1).decode(parts)])
        return p.stat().st_size
    raise ValueError(kind)


def _worker(args):
    kind, paths, repeat = args
    import torch

    torch.set_num_threads(1)
    total = 0
    for _ in range(repeat):
        for p in paths:
            total += read_one(kind, p)
    return total


def measure(kind: str, paths: list[Path], cores: int, repeat: int) -> dict:
    shares = [[str(p) for p in paths[i::cores]] for i in range(cores)]
    with get_context("spawn").Pool(cores) as pool:
        pool.map(_worker, [(kind, s[:1], 1) for s in shares])  # warm-up: imports, page cache
        t0 = time.perf_counter()
        nbytes = sum(pool.map(_worker, [(kind, s, repeat) for s in shares]))
        dt = time.perf_counter() - t0
    n = len(paths) * repeat
    return {"clips_s": n / dt, "clips_s_per_core": n / dt / cores, "mb_s": nbytes / dt / 2**20}


def stream_epoch(make, n_clips: int) -> dict:
    import torch

    torch.set_num_threads(1)
    stream = make()
    list(zip(range(1), stream))  # warm-up: connections, first shard
    t0, c0 = time.perf_counter(), time.process_time()
    got = sum(len(b) for b in make())
    wall, cpu = time.perf_counter() - t0, time.process_time() - c0
    assert got >= n_clips - n_clips % 8 > 0, (got, n_clips)
    return {"clips_s": got / wall, "clips_per_cpu_s": got / max(cpu, 1e-9)}


def stream_rows(args, root: Path) -> list[dict]:
    from sclslt.data.loader import GlobalStream, ShardStream, epoch_order
    from sclslt.data.shards import manifest_rows, read_manifest, write_split
    from sclslt.data.storage import Store
    from tests.shard_server import Server

    clips = make_clips(args.clips, args.frames, args.size)
    rows = []
    for fmt in args.stream_formats:
        d = root / f"stream-{fmt}"
        write_split(
            (
                {"key": f"c{i:05d}", "frames": c, "text": f"sentence {i % 7}", "signer": "s0"}
                for i, c in enumerate(clips)
            ),
            d,
            "train",
            samples_per_shard=args.per_shard,
            frame_format=fmt,
        )
        man = read_manifest(d, "train")
        keys = [r.key for r in manifest_rows(man)]
        tar_bytes = sum((d / sh["name"]).stat().st_size for sh in man["shards"])
        clip_bytes = sum(r.offsets[1] + r.offsets[3] for r in manifest_rows(man)) / len(keys)
        decode = "device" if fmt == "jpg" else "cpu"
        batches = epoch_order(keys, 0, 0, 8)
        rows.append(integrity_row(d, man, fmt, args))
        unchecked = {**man, "samples": [r[:6] for r in man["samples"]]}  # a manifest without checksums
        for latency in [None, *args.latency_ms]:
            server = Server(d, latency or 0.0) if latency is not None else None
            src = d if server is None else None
            with server or _null():
                src = src or server.url
                kinds = {
                    "sequential": (
                        lambda: ShardStream(src, "train", 8, decode=decode),
                        tar_bytes / len(keys),
                        Store(src).block_size if server else 0,
                    )
                }
                for t in args.read_threads:
                    if t == args.read_threads[0]:  # side by side, just before: the same reads unchecked
                        kinds[f"global-t{t}-unchecked"] = (
                            lambda t=t: GlobalStream(
                                src, "train", batches, read_threads=t, decode=decode, manifest=unchecked
                            ),
                            clip_bytes + 512,
                            t * clip_bytes,
                        )
                    kinds[f"global-t{t}"] = (
                        lambda t=t: GlobalStream(src, "train", batches, read_threads=t, decode=decode),
                        clip_bytes + 512,
                        t * clip_bytes,
                    )
                for kind, (make, per_clip, cache) in kinds.items():
                    r = {
                        "mode": "stream",
                        "format": fmt,
                        "source": "local" if server is None else f"http+{latency:g}ms",
                        "loader": kind,
                        "clips": len(keys),
                        "frames": args.frames,
                        "size": args.size,
                        "per_shard": args.per_shard,
                        "read_bytes_per_clip": per_clip,
                        "cache_mb": cache / 2**20,
                        **stream_epoch(make, len(keys)),
                    }
                    rows.append(r)
                    print(
                        " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()),
                        flush=True,
                    )
    return rows


def integrity_row(d: Path, man: dict, fmt: str, args) -> dict:
    """What checking costs against decoding, per clip, one core: the per-sample checksum of a planned
    read (CRC-32 over frames + json), blake2b and sha256 for comparison (a streamed shard's check),
    beside decoding the frames."""
    import hashlib

    from sclslt.data.shards import decode_frames, manifest_rows, sample_digest

    data = (d / man["shards"][0]["name"]).read_bytes()
    rows = [r for r in manifest_rows(man) if r.shard == 0]
    pairs = [
        (data[r.offsets[0] : r.offsets[0] + r.offsets[1]], data[r.offsets[2] : r.offsets[2] + r.offsets[3]])
        for r in rows
    ]

    def per_clip(fn) -> float:
        t0 = time.perf_counter()
        for _ in range(3):
            for f, j in pairs:
                fn(f, j)
        return (time.perf_counter() - t0) / (3 * len(pairs)) * 1e3

    digest = per_clip(sample_digest)
    blake = per_clip(lambda f, j: hashlib.blake2b(f, digest_size=16).update(j))
    sha = per_clip(lambda f, j: hashlib.sha256(f).update(j))
    dec = per_clip(lambda f, j: decode_frames(f, "bench", fmt))
    r = {
        "mode": "integrity",
        "format": fmt,
        "frames": args.frames,
        "size": args.size,
        "clip_bytes": sum(len(f) + len(j) for f, j in pairs) / len(pairs),
        "checksum_ms": digest,
        "blake2b_ms": blake,
        "sha256_ms": sha,
        "decode_ms": dec,
        "checksum_over_decode": digest / dec,
    }
    print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True)
    return r


class _null:
    def __enter__(self):
        return None

    def __exit__(self, *exc):
        return False


def print_stream(rows: list[dict], args) -> None:
    from rich.console import Console
    from rich.table import Table

    tables = {
        "stream": (
            f"training stream: {args.clips} clips x {args.frames} frames x {args.size}px, "
            f"{args.per_shard} a shard, 1 process",
            ("format", "source", "loader", "clips_s", "clips_per_cpu_s", "read_bytes_per_clip", "cache_mb"),
        ),
        "integrity": (
            "integrity: checking against decoding, per clip, 1 core",
            ("format", "clip_bytes", "checksum_ms", "blake2b_ms", "sha256_ms", "decode_ms", "checksum_over_decode"),
        ),
    }
    for mode, (title, cols) in tables.items():
        t = Table(title=title)
        for c in cols:
            t.add_column(c)
        for r in rows:
            if r["mode"] == mode:
                t.add_row(*[f"{r[c]:.4g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
        Console(width=160).print(t)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--clips", type=int, default=16)
    p.add_argument("--frames", type=int, default=64)
    p.add_argument("--size", type=int, default=224)
    p.add_argument("--repeat", type=int, default=2)
    p.add_argument("--cores", type=int, nargs="+", default=None, help="default: 1, 2 and all")
    p.add_argument("--gpu-clips-per-s", type=float, default=300.0)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--stream", action="store_true", help="measure the training stream (see above)")
    p.add_argument("--stream-formats", nargs="+", default=["npy", "jpg"])
    p.add_argument("--per-shard", type=int, default=32, help="--stream: clips a shard")
    p.add_argument("--latency-ms", type=float, nargs="+", default=[0.0, 5.0, 20.0], help="--stream: HTTP sources")
    p.add_argument("--read-threads", type=int, nargs="+", default=[1, 8], help="--stream: data.read_threads")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.clips, args.frames, args.size, args.repeat = 4, 8, 32, 1
        args.latency_ms, args.per_shard = [5.0], 4
        args.clips = 24 if args.stream else args.clips
    if args.stream:
        root = Path(tempfile.mkdtemp(prefix="bench_stream."))
        try:
            rows = stream_rows(args, root)
        finally:
            shutil.rmtree(root, ignore_errors=True)
        base = write_rows(rows, args.out, "loader-stream", run_tag())
        print_stream(rows, args)
        print(f"wrote {base}.csv and {base}.json")
        return 0
    cores = args.cores or sorted({1, min(2, os.cpu_count() or 1), os.cpu_count() or 1})
    root = Path(tempfile.mkdtemp(prefix="bench_loader."))
    try:
        clips = make_clips(args.clips, args.frames, args.size)
        paths = write_all(clips, root)
        paths["jpg-nvimgcodec"] = paths["jpg-feed"] = paths["jpg"]
        raw = clips[0].nbytes
        rows = []
        for kind, ps in paths.items():
            size = sum(
                q.stat().st_size if q.is_file() else sum(f.stat().st_size for f in q.iterdir()) for q in ps
            ) / len(ps)
            for c in cores:
                r = {
                    "format": kind,
                    "cores": c,
                    "clips": args.clips,
                    "frames": args.frames,
                    "size": args.size,
                    "bytes_per_clip": size,
                    "raw_bytes_per_clip": raw,
                    **measure(kind, ps, c, args.repeat),
                }
                r["cores_for_gpu"] = args.gpu_clips_per_s / r["clips_s_per_core"]
                r["storage_gb_s_for_gpu"] = args.gpu_clips_per_s * size / 1e9
                rows.append(r)
                print(
                    " ".join(f"{k}={v:.2f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items()), flush=True
                )
        png = {r["cores"]: r["clips_s_per_core"] for r in rows if r["format"] == "png-dir"}
        for r in rows:
            r["x_png_per_core"] = r["clips_s_per_core"] / png[r["cores"]]
        base = write_rows(rows, args.out, "loader", run_tag(gpu_clips_per_s=args.gpu_clips_per_s))
        from rich.console import Console
        from rich.table import Table

        t = Table(title=f"loader: {args.clips} clips x {args.frames} frames x {args.size}px (warm page cache)")
        cols = (
            "format",
            "cores",
            "clips_s_per_core",
            "x_png_per_core",
            "mb_s",
            "bytes_per_clip",
            "cores_for_gpu",
            "storage_gb_s_for_gpu",
        )
        for c in cols:
            t.add_column(c)
        for r in rows:
            t.add_row(*[f"{r[c]:.3g}" if isinstance(r[c], float) else str(r[c]) for c in cols])
        Console(width=160).print(t)
        print(f"wrote {base}.csv and {base}.json")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
