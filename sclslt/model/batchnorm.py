"""BatchNorm whose training statistics are those of the global batch, over valid positions only.

Why: with per-rank statistics (what DDP and DeepSpeed give a plain `nn.BatchNorm`), a step normalises
each rank's micro-batch by its own mean and variance, so the same global batch gives another loss and
other gradients at 1, 2 or 8 GPUs. Here the per-channel sums are all-reduced over the ranks (with
autograd, so the backward is the global batch's too) and the mean and variance are the global batch's:
a step is the same math at any world size, up to the order of floating-point sums. Padded time steps
(`mask`) count in no statistic, so how a micro-batch was padded (its longest clip) does not matter either.

Cost: two all-reduces of 2C + 1 floats per layer in the forward, two in the backward (ResNet-18: 20
layers). Evaluation uses the running statistics, no collective. The classes keep `nn.BatchNorm`'s
parameters and buffers, so checkpoints and pretrained weights load unchanged (`globalise` swaps the
class of an existing module in place, e.g. the BatchNorm2d layers of a pretrained ResNet).
torch's `SyncBatchNorm` does the first half on CUDA only, and knows no mask.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


def _sum_over_ranks(t: torch.Tensor) -> torch.Tensor:
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        from torch.distributed.nn.functional import all_reduce
        return all_reduce(t)                   # differentiable: the backward all-reduces the gradient
    return t


class _GlobalStats:
    """The shared forward of `GlobalBatchNorm1d` / `GlobalBatchNorm2d` (channel dimension 1)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        xf = x.float()
        dims = [0, *range(2, x.dim())]
        view = [1, -1] + [1] * (x.dim() - 2)
        if mask is None:
            m = None
            count = torch.tensor([x.numel() / x.shape[1]], device=x.device)
        else:                                   # (N, *) valid positions of x's non-channel dims
            m = mask.unsqueeze(1).to(xf.dtype)
            count = m.sum().reshape(1)
        s1 = (xf if m is None else xf * m).sum(dims)
        packed = _sum_over_ranks(torch.cat([s1, count]))
        n = packed[-1].clamp_min(1.0)
        mean = packed[:-1] / n
        centred = xf - mean.view(view)
        sq = centred * centred if m is None else centred * centred * m
        var = _sum_over_ranks(sq.sum(dims)) / n          # biased, as BatchNorm normalises
        y = centred * torch.rsqrt(var + self.eps).view(view)
        if self.affine:
            y = y * self.weight.float().view(view) + self.bias.float().view(view)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        return y.to(x.dtype)

    @torch.no_grad()
    def _update_running(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        self.num_batches_tracked.add_(1)
        f = 1.0 / float(self.num_batches_tracked) if self.momentum is None else self.momentum
        unbiased = var * n / (n - 1).clamp_min(1.0)
        self.running_mean.mul_(1 - f).add_(mean.to(self.running_mean.dtype), alpha=f)
        self.running_var.mul_(1 - f).add_(unbiased.to(self.running_var.dtype), alpha=f)


class GlobalBatchNorm1d(_GlobalStats, nn.BatchNorm1d):
    """(N, C, T) with an optional (N, T) mask of valid steps."""


class GlobalBatchNorm2d(_GlobalStats, nn.BatchNorm2d):
    """(N, C, H, W): every position counts."""


def globalise(module: nn.Module) -> nn.Module:
    """Turn every plain BatchNorm1d/2d inside `module` into its global-statistics class, in place."""
    for m in module.modules():
        if type(m) is nn.BatchNorm2d:
            m.__class__ = GlobalBatchNorm2d
        elif type(m) is nn.BatchNorm1d:
            m.__class__ = GlobalBatchNorm1d
    return module
