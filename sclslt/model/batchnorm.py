"""BatchNorm whose training statistics are those of the global batch, over valid positions only.

Why: with per-rank statistics (what DDP and DeepSpeed give a plain `nn.BatchNorm`), a step normalises
each rank's micro-batch by its own mean and variance, so the same global batch gives another loss and
other gradients at 1, 2 or 8 GPUs. Here each rank's per-channel count, mean and variance are gathered
(with autograd, so the backward is the global batch's too) and combined exactly into the global batch's
mean and variance: a step is the same math at any world size, up to the order of floating-point sums. Padded time steps
(`mask`) count in no statistic, so how a micro-batch was padded (its longest clip) does not matter either.

Cost: one all-gather of 2C + 1 floats per layer in the forward and one collective in the backward
(ResNet-18 has 20 layers); at world 1, torch's fused BatchNorm runs as it is (the statistics are
the same). Evaluation uses the running statistics, no collective. The classes keep `nn.BatchNorm`'s
parameters and buffers, so checkpoints and pretrained weights load unchanged (`globalise` swaps the
class of an existing module in place, e.g. the BatchNorm2d layers of a pretrained ResNet).
torch's `SyncBatchNorm` does the first half on CUDA only, and knows no mask.
"""
from __future__ import annotations

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F


FUSED_AT_WORLD_1 = True    # world 1: torch's fused kernel (same statistics; tests may take the combined path)


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


class _GlobalStats:
    """The shared forward of `GlobalBatchNorm1d` / `GlobalBatchNorm2d` (channel dimension 1)."""

    def forward(self, x: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
        if not self.training:
            return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)
        if mask is None and FUSED_AT_WORLD_1 and _world() == 1:
            return super().forward(x)          # the global batch is this one: torch's fused kernel
        if mask is None:
            return self._unmasked(x)
        return self._masked(x, mask)

    def _unmasked(self, x: torch.Tensor) -> torch.Tensor:
        """Every position counts: this rank's fused (variance, mean), combined over the ranks."""
        var, mean = torch.var_mean(x.float(), [0, *range(2, x.dim())], unbiased=False)
        return self._combined(x, torch.full((1,), x.numel() / x.shape[1], device=x.device), mean, var)

    def _masked(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Only the valid positions `mask` (N, *) of x's non-channel dims count."""
        xf, dims = x.float(), [0, *range(2, x.dim())]
        view = [1, -1] + [1] * (x.dim() - 2)
        m = mask.unsqueeze(1).to(xf.dtype)
        n = m.sum().reshape(1)
        mean = (xf * m).sum(dims) / n.clamp_min(1.0)
        centred = (xf - mean.view(view)) * m
        return self._combined(x, n, mean, (centred * centred).sum(dims) / n.clamp_min(1.0))

    def _combined(self, x: torch.Tensor, n: torch.Tensor, mean: torch.Tensor, var: torch.Tensor) -> torch.Tensor:
        """The global batch's statistics from every rank's (count, mean, biased variance), gathered with
        autograd and combined exactly (Chan et al.'s parallel variance, no E[x^2] - E[x]^2 cancellation)."""
        from sclslt.model.losses import gather_with_grad
        c = x.shape[1]
        parts = gather_with_grad(torch.cat([n, mean, var])[None])           # (world, 1 + 2C)
        counts, means, vars_ = parts[:, :1], parts[:, 1:1 + c], parts[:, 1 + c:]
        total = counts.sum()
        g_mean = (counts * means).sum(0) / total.clamp_min(1.0)
        g_var = (counts * (vars_ + (means - g_mean) ** 2)).sum(0) / total.clamp_min(1.0)
        return self._normalise(x, g_mean, g_var, total)

    def _normalise(self, x: torch.Tensor, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> torch.Tensor:
        """(x - mean) / sqrt(var + eps) * weight + bias as one per-channel scale and shift."""
        view = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(var + self.eps)
        if self.affine:
            scale = scale * self.weight.float()
        shift = -mean * scale + (self.bias.float() if self.affine else 0.0)
        if self.track_running_stats:
            self._update_running(mean.detach(), var.detach(), n.detach())
        return torch.addcmul(shift.view(view), x.float(), scale.view(view)).to(x.dtype)

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
