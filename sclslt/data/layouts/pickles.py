"""Data-only unpickling of the corpora's own annotation pickles (CSL-Daily's ``.pkl``, GFSLT-VLP's
``labels.*``): the formats those corpora ship. A restricted unpickler allows containers, strings,
numbers and numpy arrays; a pickle naming any other global is refused before it runs. Shards never
contain pickles.
"""

from __future__ import annotations

import pickle

from sclslt.data.layouts.common import CorpusError


class _AnnotationUnpickler(pickle.Unpickler):
    """Unpickles data only: builtins' containers, strings and numbers, and numpy arrays and scalars.
    A pickle that names any other global (a function to call on load, a class to build) is refused
    before anything runs: annotation files travel through mirrors and forks, and a pickle runs code."""

    ALLOWED = (
        {
            ("builtins", n)
            for n in (
                "dict",
                "list",
                "tuple",
                "set",
                "frozenset",
                "str",
                "bytes",
                "bytearray",
                "int",
                "float",
                "complex",
                "bool",
                "slice",
            )
        }
        | {("collections", "OrderedDict"), ("collections", "defaultdict"), ("_codecs", "encode")}
        | {(m, n) for m in ("numpy.core.multiarray", "numpy._core.multiarray") for n in ("_reconstruct", "scalar")}
        | {("numpy", "ndarray"), ("numpy", "dtype")}
        | {(m, n) for m in ("numpy.core.numeric", "numpy._core.numeric") for n in ("_frombuffer",)}
    )

    def find_class(self, module: str, name: str):
        if (module, name) not in self.ALLOWED:
            raise RefusedPickle(f"{module}.{name}")
        return super().find_class(module, name)


class RefusedPickle(pickle.UnpicklingError):
    """An annotation pickle asked for a global outside the data-only allow-list."""


def load_annotation_pickle(f, path) -> object:
    """`pickle.load` of a corpus's own annotation file (GFSLT-VLP's labels, CSL-Daily's .pkl), data only:
    a pickle that would run code is a `CorpusError` naming the file and the global it asked for."""
    try:
        return _AnnotationUnpickler(f).load()
    except RefusedPickle as e:
        raise CorpusError(
            f"{path}: refused to unpickle it: it asks for {e.args[0]}, which is not data (an "
            f"annotation file may hold containers, strings, numbers and numpy arrays only); "
            f"a pickle runs what it names when loaded, so this file was not read"
        ) from None
