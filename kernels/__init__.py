"""sclslt_kernels: fused contrastive-loss kernels (installed from `kernels/` under this name).

- `infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None)`: masked InfoNCE of local rows
  against gathered columns without materialising the logits (`infonce.py`).
- `cico_similarity(v, v_mask, t, t_mask, tau=0.07)`: CiCo token-level similarity without
  materialising the b x n x T x L interactions (`cico.py`).
- `kernel_path(device)`: which path the calls take on a device (the trainer records it in results.json).
Each has a plain-PyTorch `*_reference` that is its spec. `SCLSLT_KERNELS=auto|triton|reference`
picks the path (`_dispatch.py`); for the Triton interpreter on CPU set `TRITON_INTERPRET=1` before
importing this package.
"""

import sys as _sys

if __name__ not in ("sclslt_kernels", "kernels"):
    raise ImportError(
        f"{__file__} is the package sclslt_kernels (installed from this folder): import it under that "
        f"name, not as {__name__!r}"
    )
if __name__ == "kernels":
    # Imported as `kernels`: a checkout's root is on sys.path (`python -m pytest`, a
    # tool, `python -c` in the checkout), and this folder shadows whatever `kernels` is installed (Hugging
    # Face's, which transformers >= 5.25 imports). Step aside: the next `kernels` on sys.path takes this
    # module's place; where there is none, an empty namespace-like module does (no file, no version:
    # what Python gives a folder without __init__.py, and what transformers reads as "not installed").
    import importlib as _importlib
    import importlib.machinery  # noqa: F401
    import os as _os
    import types as _types

    _root = _os.path.dirname(_os.path.dirname(_os.path.realpath(__file__)))
    _saved = _sys.path[:]
    _sys.path[:] = [p for p in _saved if _os.path.realpath(p or _os.curdir) != _root]
    del _sys.modules[__name__]
    try:
        if getattr(_sys, "_sclslt_kernels_aside", False):  # found this folder again (another route to it)
            raise ModuleNotFoundError(f"No module named {__name__!r}", name=__name__)
        _sys._sclslt_kernels_aside = True
        try:
            _importlib.import_module(__name__)
        finally:
            _sys._sclslt_kernels_aside = False
    except ModuleNotFoundError as _e:
        if _e.name != __name__:
            raise
        _empty = _types.ModuleType(__name__, "not sclslt's kernels (installed as sclslt_kernels)")
        _empty.__spec__ = _importlib.machinery.ModuleSpec(__name__, None, is_package=True)
        _empty.__path__ = _empty.__spec__.submodule_search_locations = []
        _sys.modules[__name__] = _empty
    finally:
        _sys.path[:] = _saved
else:
    from ._dispatch import describe as kernel_path
    from .cico import cico_similarity, cico_similarity_reference
    from .infonce import infonce, infonce_reference, masked_ce

    __all__ = [
        "infonce",
        "infonce_reference",
        "cico_similarity",
        "cico_similarity_reference",
        "masked_ce",
        "kernel_path",
    ]
