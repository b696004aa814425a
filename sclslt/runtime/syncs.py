"""Device-to-host reads counted: the host synchronisations a piece of code would make on a GPU.

A CUDA kernel launch returns at once; a read of a device value on the host (`.item()`, `bool(t)`, `.tolist()`,
boolean-mask indexing, whose output size is data-dependent, `nonzero`) waits for every queued kernel, so the
GPU idles while the host catches up. A training step should make one (its verdict: finite loss, preemption).

`HostReads` counts them on any device, the CPU included, where nothing actually waits: aten operators whose
result needs a device value on the host (seen through a `TorchDispatchMode`), and the tensor methods that
copy values out to Python (`tolist`, `item`, `__bool__`, ...), which do not dispatch on a CPU tensor.
Each read is recorded with the line of our code that made it. On a GPU, `torch.cuda.set_sync_debug_mode`
confirms it (benchmarks/gpu_check.py's `syncs` part).
"""

from __future__ import annotations

import traceback

import torch
from torch.utils._python_dispatch import TorchDispatchMode

aten = torch.ops.aten

# aten operators that read device values on the host (their output shape depends on the data, or they return
# a Python scalar)
READ_OPS = {
    aten._local_scalar_dense.default,
    aten.nonzero.default,
    aten.masked_select.default,
    aten.unique_consecutive.default,
    aten._unique2.default,
    aten.bincount.default,
}
# tensor methods that copy values to Python (on a CPU tensor they do not reach the dispatcher). Not `numpy`
# (a CUDA tensor has none: `.cpu()` first) nor `.cpu()`, which a CPU run cannot tell from a no-op: on a GPU,
# `torch.cuda.set_sync_debug_mode` sees those
READ_METHODS = ("tolist", "item", "__bool__", "__int__", "__float__", "__index__")


def _bool_index(func, args) -> bool:
    """Boolean-mask indexing (`x[mask]`, `x[mask] = v`): nonzero inside, a host read."""
    if func not in (aten.index.Tensor, aten.index_put.default, aten.index_put_.default, aten._index_put_impl_.default):
        return False
    indices = args[1] if len(args) > 1 else ()
    return any(t is not None and t.dtype == torch.bool for t in indices)


def _where() -> str:
    """The innermost frame of this project (or the test calling it) that made the read."""
    for frame in reversed(traceback.extract_stack()[:-3]):
        path = frame.filename.replace("\\", "/")
        if ("/sclslt/" in path or "/tests/" in path or "/kernels/" in path) and not path.endswith("runtime/syncs.py"):
            return f"{path.rsplit('/', 2)[-2]}/{path.rsplit('/', 1)[-1]}:{frame.lineno} {frame.line}"
    return "?"


class HostReads(TorchDispatchMode):
    """`with HostReads() as reads: ...` then `reads.count` and `reads.where` (one entry per read: what, where)."""

    def __init__(self):
        super().__init__()
        self.where: list[str] = []
        self._depth = 0
        self._saved = {}

    @property
    def count(self) -> int:
        return len(self.where)

    def _record(self, what: str) -> None:
        if self._depth == 0:  # a method's own aten read is the same read, counted once
            self.where.append(f"{what} at {_where()}")

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func in READ_OPS or _bool_index(func, args):
            self._record(str(func))
        return func(*args, **(kwargs or {}))

    def _wrap(self, name):
        original = getattr(torch.Tensor, name)

        def read(t, *a, **k):
            self._record(f"Tensor.{name}")
            self._depth += 1
            try:
                return original(t, *a, **k)
            finally:
                self._depth -= 1

        return original, read

    def __enter__(self):
        for name in READ_METHODS:
            self._saved[name], wrapper = self._wrap(name)
            setattr(torch.Tensor, name, wrapper)
        return super().__enter__()

    def __exit__(self, *exc):
        for name, original in self._saved.items():
            setattr(torch.Tensor, name, original)
        self._saved.clear()
        return super().__exit__(*exc)
