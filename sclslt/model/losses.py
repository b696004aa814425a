"""Losses: symmetric masked InfoNCE over negatives gathered from all ranks, and label-smoothed CE.

Contrastive (CLIP-style): each rank scores its b local rows against all n = b x world gathered
columns (memory b x n, never n x n); the gather keeps the gradient (its backward reduce-scatters),
so the gradient equals that of one process holding the whole global batch. A column whose
sentence id equals the row's (other than the row's own positive) is a known false negative and
is removed from the row's softmax; with `stage1.mask_close_text` so is a column whose sentence is
close to the row's (`close_text`; or it becomes a weighted positive). What is gathered and how rows
score columns is the similarity head's (`heads`: pooled embeddings through the fused
`sclslt_kernels.infonce`, no b x n matrix, except under close-text masks, which materialise it; CiCo's
token-level similarity through `sclslt_kernels.cico_similarity`, no b x n x T x L tensor).

Normalisation makes results independent of the number of ranks: DeepSpeed averages gradients
over ranks, so every per-rank loss is scaled such that the mean over ranks equals the loss of the
global batch (rows are equal per rank; token counts are all-reduced).
"""

from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn.functional as F

from sclslt.model.heads import get_head


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
        return grad[ctx.rank * ctx.b : (ctx.rank + 1) * ctx.b]


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


_HOST_GROUP = {}


def _host_group():
    """A CPU (gloo) group over every rank, for host integers (the default group where it is gloo already)."""
    if dist.get_backend() == "gloo":
        return None
    if "group" not in _HOST_GROUP:  # collective: every rank makes it at its first call
        _HOST_GROUP["group"] = dist.new_group(backend="gloo")
    return _HOST_GROUP["group"]


def host_max(values: list[int]) -> list[int]:
    """Each value's maximum over ranks: host integers reduced on the CPU in one collective, no device read."""
    rank, world = world_info()
    if world == 1 or not values:
        return list(values)
    t = torch.tensor(values, dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MAX, group=_host_group())
    return t.tolist()


def pad_tokens(x: torch.Tensor, length: int) -> torch.Tensor:
    """Pad dim 1 (tokens) with zeros (False for masks) up to `length`."""
    if x.shape[1] == length:
        return x
    pad = x.new_zeros((x.shape[0], length - x.shape[1], *x.shape[2:]))
    return torch.cat([x, pad], dim=1)


def pad_cat(parts: list[torch.Tensor]) -> torch.Tensor:
    """Concatenate token tensors of different lengths (what the gather yields, in one process)."""
    length = max(p.shape[1] for p in parts)
    return torch.cat([pad_tokens(p, length) for p in parts], dim=0)


def gather_columns(out: dict, ids: torch.Tensor | None, similarity: str) -> dict:
    """The columns every rank scores its rows against: all ranks' outputs of the head's `columns`, with
    gradient. Token tensors (a token-level head: CiCo) are padded to the longest micro-batch of any rank
    first, so the gathered result equals `pad_cat` of all ranks' outputs."""
    head = get_head(similarity)
    padded = [k for k in head.columns if head.token_level and out[k].ndim >= 2]
    lengths = dict(zip(padded, host_max([out[k].shape[1] for k in padded])))  # one collective, on the host
    cols = {}
    for key in head.columns:
        x = pad_tokens(out[key], lengths[key]) if key in lengths else out[key]
        cols[key] = gather_with_grad(x) if x.is_floating_point() else gather_nograd(x)
    cols["ids"] = gather_nograd(ids) if ids is not None else None
    return cols


def contrastive_from_columns(
    out: dict, ids: torch.Tensor | None, cols: dict, offset: int, similarity: str, tau: float = 0.07, close=None
) -> torch.Tensor:
    """(video->text + text->video) / 2 for the local rows against the gathered columns (the head's loss;
    with `close` (`close_text.CloseSentences`), its close-text columns masked or weighted too)."""
    head = get_head(similarity)
    if close is not None:
        return head.close_loss(out, ids, cols, offset, tau, close)
    return head.loss(out, ids, cols, offset, tau)


def contrastive_loss(out: dict, ids: torch.Tensor | None, similarity: str = "pooled", tau: float = 0.07, close=None):
    """Distributed symmetric InfoNCE: local rows against columns gathered from all ranks."""
    rank, _ = world_info()
    cols = gather_columns(out, ids, similarity)
    return contrastive_from_columns(out, ids, cols, rank * get_head(similarity).rows(out), similarity, tau, close)


def translation_loss_sum(logits: torch.Tensor, labels: torch.Tensor, label_smoothing: float) -> torch.Tensor:
    """Sum over non-padding target tokens of label-smoothed cross entropy (fp32)."""
    return F.cross_entropy(
        logits.float().flatten(0, 1),
        labels.flatten(),
        ignore_index=-100,
        label_smoothing=label_smoothing,
        reduction="sum",
    )
