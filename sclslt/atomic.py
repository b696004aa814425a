"""Atomic file writes: a reader sees the old file or the whole new one, never a part, even after a crash.

`atomic_path(path)` yields a temporary path beside `path` (same directory, so the rename stays on one
file system); when the block ends without an error the temporary file is fsync'd and renamed over
`path`, then the directory entry is fsync'd; on an error it is removed. `write_text` is the common case.
Every file the trainer and its tools publish goes through here (directories are published by renaming
a complete `.partial` directory, see runtime/checkpoints.py).
"""

from __future__ import annotations

import os
from contextlib import contextmanager
from pathlib import Path


def _fsync(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


@contextmanager
def atomic_path(path: str | os.PathLike):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path: str | os.PathLike, text: str) -> Path:
    with atomic_path(path) as tmp:
        tmp.write_text(text, encoding="utf-8")
    return Path(path)
