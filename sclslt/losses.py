"""Losses: symmetric masked InfoNCE over negatives gathered from all ranks, and label-smoothed CE.

Contrastive (CLIP-style): each rank scores its b local rows against all n = b x world gathered
columns (memory b x n, never n x n); the gather keeps the gradient (its backward reduce-scatters),
so the gradient equals that of one process holding the whole global batch. A column whose
sentence id equals the row's (other than the row's own positive) is a known false negative and
is removed from the row's softmax. `sclslt_kernels.infonce` is that contract.

Normalisation makes results independent of the number of ranks: DeepSpeed averages gradients
over ranks, so every per-rank loss is scaled such that the mean over ranks equals the loss of the
global batch (rows are equal per rank; token counts are all-reduced).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F
from sclslt_kernels import infonce


def world_info() -> tuple[int, int]:
    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


# torch >= 2.13 names these *_single; older releases (GPU clusters keep their own torch) *_tensor
_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
_reduce_scatter_single = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


class _GatherWithGrad(torch.autograd.Function):
    """all_gather along dim 0 whose backward sums every rank's gradient for our rows.

    Backward is a reduce-scatter (NCCL) or, where the backend has none (gloo), an all-reduce of the
    gathered gradient followed by taking our slice: the same sum, b x d x world more bytes.
    (torch.distributed.nn.functional.all_gather does this too but is deprecated.)
    """

    @staticmethod
    def forward(ctx, x: torch.Tensor) -> torch.Tensor:
        ctx.rank, ctx.world, ctx.b = dist.get_rank(), dist.get_world_size(), x.shape[0]
        out = x.new_empty((ctx.world * ctx.b, *x.shape[1:]))
        _all_gather_single(out, x.contiguous())
        return out

    @staticmethod
    def backward(ctx, grad: torch.Tensor) -> torch.Tensor:
        grad = grad.contiguous()
        if dist.get_backend() == "nccl":
            mine = grad.new_empty((ctx.b, *grad.shape[1:]))
            _reduce_scatter_single(mine, grad)
            return mine
        grad = grad.clone()
        dist.all_reduce(grad)
        return grad[ctx.rank * ctx.b:(ctx.rank + 1) * ctx.b]


def gather_with_grad(x: torch.Tensor) -> torch.Tensor:
    """Concatenate `x` from all ranks along dim 0 (equal sizes); gradients flow back to each rank's rows."""
    rank, world = world_info()
    if world == 1:
        return x
    return _GatherWithGrad.apply(x)


def gather_nograd(x: torch.Tensor) -> torch.Tensor:
    rank, world = world_info()
    if world == 1:
        return x
    out = [torch.empty_like(x) for _ in range(world)]
    dist.all_gather(out, x.contiguous())
    return torch.cat(out, dim=0)


def all_reduce_sum(x: torch.Tensor) -> torch.Tensor:
    rank, world = world_info()
    if world > 1:
        x = x.clone()
        dist.all_reduce(x)
    return x


def symmetric_infonce(v: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor, ids: torch.Tensor | None,
                      V: torch.Tensor, T: torch.Tensor, all_ids: torch.Tensor | None, offset: int) -> torch.Tensor:
    """(video->text + text->video) / 2 for local rows (v, t) against gathered columns (V, T)."""
    return 0.5 * (infonce(v, T, logit_scale, offset, ids, all_ids) + infonce(t, V, logit_scale, offset, ids, all_ids))


def contrastive_loss(v: torch.Tensor, t: torch.Tensor, logit_scale: torch.Tensor,
                     ids: torch.Tensor | None = None) -> torch.Tensor:
    """Distributed symmetric InfoNCE: gathers columns from all ranks (with gradient)."""
    rank, _ = world_info()
    V, T = gather_with_grad(v), gather_with_grad(t)
    all_ids = gather_nograd(ids) if ids is not None else None
    return symmetric_infonce(v, t, logit_scale, ids, V, T, all_ids, rank * v.shape[0])


def translation_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum over non-padding target tokens of label-smoothed cross entropy (fp32)."""
    return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100,
                           label_smoothing=label_smoothing, reduction="sum")
