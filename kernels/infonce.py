"""Masked InfoNCE over gathered columns: the contract and its plain-PyTorch reference.

`infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None)`: q (b, d) local rows, k (n, d)
gathered columns, logit_scale the multiplier (not its log). Row i's positive is column
`pos_offset + i`; a column j with k_ids[j] == q_ids[i] and j != pos_offset + i is a known false
negative and leaves row i's softmax. Returns the mean over rows of -log softmax(scale q k^T)[i, pos],
computed in fp32 whatever the input dtype. Differentiable in q, k and logit_scale.

The reference materialises the b x n logits; it is the spec that the fused Triton kernels are
tested against, and the path used where no kernel applies.
"""
from __future__ import annotations

import torch


def infonce_reference(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, pos_offset: int = 0,
                      q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None) -> torch.Tensor:
    b = q.shape[0]
    if k.shape[0] < pos_offset + b:
        raise ValueError(f"positives at columns {pos_offset}..{pos_offset + b - 1} but k has {k.shape[0]} rows")
    rows = torch.arange(b, device=q.device)
    pos = rows + pos_offset
    acc = torch.promote_types(q.dtype, torch.float32)          # fp32 at least (fp64 stays fp64)
    logits = logit_scale.to(acc) * (q.to(acc) @ k.to(acc).t())
    if q_ids is not None and k_ids is not None:
        same = q_ids[:, None] == k_ids[None, :]
        same[rows, pos] = False
        logits = logits.masked_fill(same, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[rows, pos]).mean()


def infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None):
    return infonce_reference(q, k, logit_scale, pos_offset, q_ids, k_ids)
