"""sclslt: distributed trainer for gloss-free sign language translation with Selective Contrastive Learning.

Imported from a checkout (a git worktree of an older commit too, beside an installed copy), `sclslt_kernels`
is that checkout's `kernels/` folder, as `sclslt` is its `sclslt/` folder: the two always come from one
commit, and a bare checkout (`PYTHONPATH=. python3 benchmarks/gpu_check.py` on a machine where nothing is
installed) finds both. An installed copy (a wheel) has no `kernels/` beside it and is left as it is. The
folder itself is never importable as `kernels` (see its `__init__.py`).
"""

from __future__ import annotations

import importlib.abc
import importlib.util
import sys
from pathlib import Path

__version__ = "0.1.0"


class _CheckoutKernels(importlib.abc.MetaPathFinder):
    """Finds `sclslt_kernels` (the package; its modules follow its `__path__`) in one checkout's `kernels/`."""

    def __init__(self, folder: Path):
        self.folder = folder

    def find_spec(self, name, path=None, target=None):
        if name != "sclslt_kernels":
            return None
        return importlib.util.spec_from_file_location(
            name, self.folder / "__init__.py", submodule_search_locations=[str(self.folder)]
        )


def _bind_checkout_kernels() -> None:
    root = Path(__file__).resolve().parent.parent
    folder = root / "kernels"
    if not ((root / "setup.py").is_file() and (folder / "_dispatch.py").is_file()):
        return  # installed: site-packages/sclslt_kernels is ours
    if any(isinstance(f, _CheckoutKernels) for f in sys.meta_path):
        return
    sys.meta_path.insert(0, _CheckoutKernels(folder))


_bind_checkout_kernels()


def __getattr__(name: str):
    """`from sclslt import SignTranslator`: the class a trained model is loaded with (imported on first use,
    so `import sclslt` stays light)."""
    if name == "SignTranslator":
        from sclslt.eval.hub import SignTranslator

        return SignTranslator
    raise AttributeError(f"module 'sclslt' has no attribute {name!r}")


__all__ = ["SignTranslator", "__version__"]
