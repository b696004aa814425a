"""sclslt_kernels: the fused contrastive-loss kernels (installed from `kernels/` under this name).

`infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None)` is the public contract used by
the trainer's loss (see `infonce.py`).
"""
from .infonce import infonce, infonce_reference

__all__ = ["infonce", "infonce_reference"]
