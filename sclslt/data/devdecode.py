"""Decoding `jpg` shards on the training device: a batch's JPEG frames cross to the device compressed
and are decoded there in one batched call (nvJPEG through NVIDIA's nvImageCodec), so the loader's
CPU workers only read bytes.

Data flow with `data.decode` resolved to "device" (see `resolve`): the loader yields `codec.JpegClip`s
(framing checked, temporal subsampling already applied, nothing decoded); `Collate` packs a batch's
frames into an `EncodedFrames` (one uint8 buffer, offsets, and each frame's slot in the padded
B x T batch); `Batch.to(device)` calls `EncodedFrames.to`, which decodes all frames at once and
scatters them into the zero-padded uint8 (B, T, H, W, 3) tensor the CPU path would have produced.

Fidelity: on a CPU device nvImageCodec's libjpeg-turbo backend returns exactly Pillow's pixels (the
tests compare bit for bit); nvJPEG on a GPU differs from libjpeg-turbo by rounding in the inverse
DCT and colour conversion, within a few levels (`benchmarks/gpu_check.py` measures it).
Why nvImageCodec and not `torchvision.io.decode_jpeg`: it does not pin a torch version (a cluster's
torch stays as it is), it uses the hardware JPEG engines of A100/H100/H200 when present, and its CPU
backend lets the same path run and be tested on machines without a GPU.
"""

from __future__ import annotations

import numpy as np
import torch

from sclslt.data.codec import JpegClip

MODES = ("auto", "cpu", "device")
_DECODERS: dict = {}
_LOADER_NOTES: list = []  # what nvImageCodec printed while loading its codec libraries


class DecodeError(RuntimeError):
    """Frames could not be decoded on the device; the message names the samples."""


def _nvimgcodec():
    import importlib
    import sys

    if sys.modules.get("nvidia.nvimgcodec") is not None:
        return sys.modules["nvidia.nvimgcodec"]
    try:
        module, said = _capturing_stderr(lambda: importlib.import_module("nvidia.nvimgcodec"))
        _LOADER_NOTES.append(said)
        return module
    except ImportError as e:
        raise DecodeError(
            f"data.decode=device needs nvImageCodec: pip install 'nvidia-nvimgcodec-cu12[nvjpeg]' ({e})"
        ) from e


def resolve(mode: str, device) -> str:
    """ "device" or "cpu": where a run's `jpg` frames are decoded. "auto" decodes on a CUDA device when
    nvImageCodec is installed and in the loader workers otherwise; "device" insists (an error says
    what is missing); shards of other formats have nothing to decode and ignore the choice."""
    if mode not in MODES:
        raise ValueError(f"data.decode={mode!r}: use one of {MODES}")
    if mode == "cpu":
        return "cpu"
    if mode == "device":
        _nvimgcodec()
        return "device"
    if torch.device(device).type != "cuda":
        return "cpu"
    try:
        _nvimgcodec()
    except DecodeError:
        return "cpu"
    return "device"


def _capturing_stderr(make):
    """(make(), what it wrote to the process's stderr): nvImageCodec's extension loader prints a note
    for every codec library it cannot find (JPEG 2000, TIFF, which this trainer does not use; and
    nvJPEG, which `decoder` turns into an error on a GPU)."""
    import os
    import sys
    import tempfile

    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as tmp:
        os.dup2(tmp.fileno(), 2)
        try:
            made = make()
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            tmp.seek(0)
            said = tmp.read().decode(errors="replace")
    return made, said


def rank_cores() -> int:
    """The CPU cores this rank may use: its affinity (a task Slurm or MPI bound to its cores), or, where it
    sees every core of the node, its share among the node's ranks (LOCAL_WORLD_SIZE / LOCAL_SIZE)."""
    import os

    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if cores >= (os.cpu_count() or 1):
        ranks = int(os.environ.get("LOCAL_WORLD_SIZE") or os.environ.get("LOCAL_SIZE") or 1)
        cores //= max(1, ranks)
    return max(1, cores)


def decoder(device: torch.device, threads: int | None = None):
    """One nvImageCodec decoder per device, thread count and process: nvJPEG (hardware engine where the
    GPU has one) on CUDA, libjpeg-turbo on the CPU; `threads` CPU threads (None: `rank_cores()`, not every
    core of the node on each of its ranks)."""
    device = torch.device(device)
    threads = rank_cores() if threads is None else threads
    key = (device.type, device.index, threads)
    if key not in _DECODERS:
        nv = _nvimgcodec()
        if device.type == "cuda":
            index = device.index if device.index is not None else torch.cuda.current_device()
            made, said = _capturing_stderr(
                lambda: nv.Decoder(device_id=index, max_num_cpu_threads=threads, options=":fancy_upsampling=1")
            )
            said = "".join(_LOADER_NOTES) + said
            if "nvjpeg library" in said.lower():  # it would silently decode on the CPU instead
                raise DecodeError(
                    f"nvImageCodec cannot load nvJPEG on {device}: pip install nvidia-nvjpeg-cu12 "
                    f"(or set data.decode=cpu). It said: {said.strip()[:400]}"
                )
        else:
            made, _ = _capturing_stderr(
                lambda: nv.Decoder(
                    device_id=nv.NVIMGCODEC_DEVICE_CPU_ONLY,
                    backends=[nv.Backend(nv.CPU_ONLY)],
                    max_num_cpu_threads=threads,
                    options=":fancy_upsampling=1",
                )
            )
        _DECODERS[key] = made
    return _DECODERS[key]


class EncodedFrames:
    """A batch's frames, compressed: `data` holds every JPEG back to back (frame i is
    data[offsets[i]:offsets[i + 1]]), `slots[i]` is frame i's flat index in the padded B x T batch."""

    def __init__(self, data: torch.Tensor, offsets: torch.Tensor, slots: torch.Tensor, batch_time: tuple, keys: list):
        self.data, self.offsets, self.slots, self.batch_time, self.keys = data, offsets, slots, batch_time, keys

    @classmethod
    def from_clips(cls, clips: list[JpegClip], keys: list) -> "EncodedFrames":
        t_max = max(len(c) for c in clips)
        sizes = [len(p) for c in clips for p in c.parts]
        data = np.empty(sum(sizes), dtype=np.uint8)
        pos = 0
        for c in clips:
            for p in c.parts:
                data[pos : pos + len(p)] = np.frombuffer(p, dtype=np.uint8)
                pos += len(p)
        offsets = np.concatenate([[0], np.cumsum(sizes)]).astype(np.int64)
        slots = np.concatenate([b * t_max + np.arange(len(c)) for b, c in enumerate(clips)]).astype(np.int64)
        return cls(
            torch.from_numpy(data), torch.from_numpy(offsets), torch.from_numpy(slots), (len(clips), t_max), list(keys)
        )

    def _key_of(self, frame: int) -> str:
        return self.keys[int(self.slots[frame]) // self.batch_time[1]]

    def decode(self, device) -> torch.Tensor:
        """uint8 (B, T, H, W, 3) on `device`, zero where a clip is shorter than T."""
        device = torch.device(device)
        buf, off = self.data.numpy(), self.offsets.tolist()
        streams = [buf[off[i] : off[i + 1]] for i in range(len(off) - 1)]
        stream = {"cuda_stream": torch.cuda.current_stream(device).cuda_stream} if device.type == "cuda" else {}
        try:  # on a GPU: on torch's current stream, so the frames are ready for what follows on it
            images = decoder(device).decode(streams, **stream)
        except Exception as e:  # noqa: BLE001 - re-raised naming the batch's samples
            raise DecodeError(f"decoding the frames of samples {self.keys} on {device} failed: {e}") from e
        frames = []
        for i, img in enumerate(images):
            if img is None:
                raise DecodeError(f"sample {self._key_of(i)}: a frame could not be decoded on {device}")
            t = torch.from_dlpack(img) if device.type == "cuda" else torch.from_numpy(np.asarray(img))
            if t.dim() != 3 or t.shape[-1] != 3 or (frames and t.shape != frames[0].shape):
                raise DecodeError(
                    f"sample {self._key_of(i)}: frame shape {tuple(t.shape)} != "
                    f"{tuple(frames[0].shape) if frames else 'H x W x 3'} of the rest of the batch"
                )
            frames.append(t)
        h, w, c = frames[0].shape
        b, t_max = self.batch_time
        out = torch.zeros(b * t_max, h, w, c, dtype=torch.uint8, device=device)
        out[self.slots.to(device)] = torch.stack(frames).to(device)
        return out.view(b, t_max, h, w, c)

    def to(self, device, non_blocking: bool = True) -> torch.Tensor:
        return self.decode(device)
