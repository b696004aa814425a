"""What every corpus layout reader shares: the layout error, the default splits, tar-safe keys and
paths relative to the corpus root.
"""

from __future__ import annotations

import re
from pathlib import Path

DEFAULT_SPLITS = ("train", "dev", "test")

_UNSAFE = re.compile(r"[^A-Za-z0-9_-]")


class CorpusError(RuntimeError):
    """The corpus layout itself is unusable (annotation file missing or malformed)."""


def safe_key(name: str) -> str:
    """A tar-safe sample key: characters outside ``[A-Za-z0-9_-]`` become ``_``."""
    return _UNSAFE.sub("_", name.strip()) or "_"


def rel(path: Path, root: Path) -> str:
    """`path` relative to `root` (posix), or absolute when outside it: an item's `source`."""
    try:
        return path.resolve().relative_to(root.resolve()).as_posix()
    except ValueError:
        return path.resolve().as_posix()


def find_first(cands: list[Path]) -> Path | None:
    """The first of `cands` that is a file."""
    return next((c for c in cands if c.is_file()), None)
