"""Where shards live: a local directory or a remote prefix (HTTP(S), S3, GCS, ... through fsspec).

`data.shards_dir` may be a path or a URL. Everything that reads shards goes through a `Store`:
- `read_text(name)`: a manifest;
- `open_stream(name)`: a shard read front to back (streamed training and evaluation); remote reads
  come in `block_size` byte ranges, and a failed range (dropped connection, timeout, 5xx) is
  fetched again from the same offset, up to `retries` times with exponential backoff: the bytes
  delivered are exactly the file's, none lost or repeated;
- `read_range(name, offset, size)`: one member of one sample (planned random access, Pair
  Selection), from the byte offsets that the shard writer records in the manifest.
Remote access needs fsspec with the protocol's implementation installed: aiohttp for http(s)
(a dependency), s3fs / gcsfs for object stores (install them on clusters that use them). The server
must answer byte-range requests (every object store and ordinary web servers do).
"""

from __future__ import annotations

import io
import os
import threading
import time
from pathlib import Path

RETRIES = 5
BACKOFF_S = 0.2


def is_url(location) -> bool:
    return isinstance(location, str) and "://" in location and not location.startswith("file://")


_FS_LOCK = threading.Lock()


def _new_lock_in_child() -> None:
    global _FS_LOCK
    _FS_LOCK = threading.Lock()  # a fork while a read thread held it must not leave the child locked


os.register_at_fork(after_in_child=_new_lock_in_child)


class StorageError(OSError):
    """A shard or manifest could not be read after the retries; the message names it."""


class Store:
    """A shard directory, local or remote (see the module docstring)."""

    def __init__(self, root, retries: int = RETRIES, backoff_s: float = BACKOFF_S, block_size: int = 4 << 20):
        self.root = str(root).rstrip("/") if is_url(root) else Path(root)
        self.remote = is_url(root)
        self.retries, self.backoff_s, self.block_size = retries, backoff_s, block_size
        self._fs, self._fs_pid = None, None

    def __str__(self) -> str:
        return str(self.root)

    def url(self, name: str) -> str:
        return f"{self.root}/{name}" if self.remote else str(self.root / name)

    @property
    def fs(self):
        """The fsspec filesystem, made anew in each process (a forked loader worker must not share the
        parent's event loop and connections)."""
        fs = self._fs
        if fs is not None and self._fs_pid == os.getpid():
            return fs
        with _FS_LOCK:  # the loader's read threads ask at once: one filesystem (one session), not one each
            if self._fs is None or self._fs_pid != os.getpid():
                import fsspec

                self._fs = fsspec.core.url_to_fs(self.root, skip_instance_cache=True)[0]
                self._fs_pid = os.getpid()
            return self._fs

    def _retry(self, what: str, fn):
        for attempt in range(self.retries + 1):
            try:
                return fn()
            except FileNotFoundError:
                raise
            except Exception as e:  # noqa: BLE001 - transport errors of any fsspec backend
                if attempt == self.retries:
                    raise StorageError(
                        f"{what}: failed after {self.retries + 1} attempts: {type(e).__name__}: {e}"
                    ) from e
                time.sleep(self.backoff_s * 2**attempt)

    def exists(self, name: str) -> bool:
        if not self.remote:
            return (self.root / name).is_file()
        return bool(self._retry(f"stat {self.url(name)}", lambda: self.fs.exists(self.url(name))))

    def read_text(self, name: str) -> str:
        if not self.remote:
            return (self.root / name).read_text()
        return self._retry(f"read {self.url(name)}", lambda: self.fs.cat_file(self.url(name))).decode("utf-8")

    def read_range(self, name: str, offset: int, size: int) -> bytes:
        if not self.remote:
            with open(self.root / name, "rb") as f:
                f.seek(offset)
                return f.read(size)
        url = self.url(name)
        return self._retry(
            f"read {url} bytes {offset}..{offset + size}",
            lambda: _exact(self.fs.cat_file(url, start=offset, end=offset + size), size),
        )

    def open_stream(self, name: str):
        if not self.remote:
            return open(self.root / name, "rb")
        return io.BufferedReader(_ResumingReader(self, self.url(name)), buffer_size=self.block_size)


class _ResumingReader(io.RawIOBase):
    """A remote file read sequentially in byte ranges; a failed range is read again from its offset."""

    def __init__(self, store: Store, url: str):
        self.store, self.url, self.pos = store, url, 0
        self.size = store._retry(f"stat {url}", lambda: store.fs.size(url))
        if self.size is None:
            raise StorageError(f"{url}: the server does not report a size (byte ranges are needed)")

    def readable(self) -> bool:
        return True

    def readinto(self, b) -> int:
        n = min(len(b), self.store.block_size, self.size - self.pos)
        if n <= 0:
            return 0
        start = self.pos
        data = self.store._retry(
            f"read {self.url} bytes {start}..{start + n}",
            lambda: _exact(self.store.fs.cat_file(self.url, start=start, end=start + n), n),
        )
        b[:n] = data
        self.pos += n
        return n


def _exact(data: bytes, n: int) -> bytes:
    if len(data) != n:
        raise StorageError(f"short read: {len(data)} of {n} bytes")
    return data
