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
from ._dispatch import describe as kernel_path
from .cico import cico_similarity, cico_similarity_reference
from .infonce import infonce, infonce_reference, masked_ce

__all__ = ["infonce", "infonce_reference", "cico_similarity", "cico_similarity_reference", "masked_ce", "kernel_path"]
