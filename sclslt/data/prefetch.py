"""Batches reach the device one step ahead: the copy (and nvJPEG's decode) of batch k+1 overlaps step k.

`on_device(loader, device)` iterates the loader in a thread that moves each batch to the device (`Batch.to`:
an asynchronous copy from the pinned memory the loader made, or `EncodedFrames`' batched decode) on a side
CUDA stream, at most `ahead` batches ahead of the training step; the step's stream waits for that copy only
(an event), and the batch's memory is marked as used by it (`record_stream`), so the caching allocator
cannot hand it out early. Order, content and errors are the loader's: a loader error is raised in the
training thread, with its own type and message, when its batch would have come. On a CPU the thread still
runs (the same code path, tested), without streams.
"""

from __future__ import annotations

import queue
import threading
from dataclasses import fields

import torch

_END = object()


class _Failed:
    def __init__(self, exc: BaseException):
        self.exc = exc


def _tensors(batch):
    for f in fields(batch):
        value = getattr(batch, f.name)
        if isinstance(value, torch.Tensor):
            yield value


def _produce(it, device: torch.device, out: queue.Queue, room: threading.Semaphore, stop: threading.Event) -> None:
    """The thread: for each batch, wait for room (at most `ahead` batches on the device besides the step's),
    move it on the side stream, hand it over with the event that marks its copy done."""
    side = torch.cuda.Stream(device) if device.type == "cuda" else None
    try:
        while True:
            while not room.acquire(timeout=0.1):
                if stop.is_set():
                    return
            if stop.is_set():
                return
            batch = next(it, _END)
            if batch is _END:
                break
            if side is not None:
                with torch.cuda.stream(side):
                    batch = batch.to(device, non_blocking=True)
                    ready = torch.cuda.Event()
                    ready.record(side)
            else:
                batch, ready = batch.to(device), None
            out.put((batch, ready))
        out.put(_END)
    except BaseException as e:  # noqa: BLE001 - handed to the training thread, raised there
        out.put(_Failed(e))


def on_device(loader, device, ahead: int = 1):
    """The loader's batches, each already on `device` when yielded (see the module docstring)."""
    device = torch.device(device)
    out: queue.Queue = queue.Queue()
    room, stop = threading.Semaphore(max(1, ahead)), threading.Event()
    worker = threading.Thread(
        target=_produce, args=(iter(loader), device, out, room, stop), daemon=True, name="sclslt-prefetch"
    )
    worker.start()
    try:
        while True:
            item = out.get()
            if item is _END:
                return
            if isinstance(item, _Failed):
                raise item.exc
            room.release()
            batch, ready = item
            if ready is not None:
                stream = torch.cuda.current_stream(device)
                stream.wait_event(ready)
                for t in _tensors(batch):
                    if t.is_cuda:
                        t.record_stream(stream)
            yield batch
    finally:  # the stage ended before the epoch did, or an error: the thread stops too
        stop.set()
        worker.join()
