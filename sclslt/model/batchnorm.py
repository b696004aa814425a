"""BatchNorm whose training statistics are a set the config names (`model.batchnorm`), never the GPU count.

- `global`: the global batch's statistics over valid positions (what GFSLT-VLP trains with: SyncBatchNorm
  over its 4 x 4 clips). Each rank reduces its rows to per-channel (count, mean, centred sum of squares) in
  fp32, one all-gather of those 2C + 1 floats per layer gives the global mean and variance (combined exactly,
  as SyncBatchNorm does), and the backward all-reduces (sum dy, sum dy * xhat) once. Only whole shares: a
  layer's statistics depend on every clip's previous layer, so a rank cannot split its share into
  micro-batches (config validation says so).
- `group N`: statistics of fixed groups of N clips of the global batch (clips gN .. gN+N-1; MosaicML
  Streaming's canonical nodes): the same at any world size and any micro-batch holding whole groups, no
  communication.
- `frozen`: the running statistics (fine-tuning a pretrained ResNet); weight and bias still train.

Memory: the autograd function saves what torch's BatchNorm saves, the input in its own dtype and per-channel
(per-group) mean and 1/std in fp32; fp32 temporaries live inside one layer's forward or backward only.
Padded time steps (`mask`) count in no statistic. Running statistics stay fp32 whatever the compute dtype;
they are updated once per optimizer step (`finish_step`), from the mean over the step's groups (one for
`global`) of their mean and unbiased variance, all-reduced over ranks: the same at any world size or
micro-batch. Evaluation and `frozen` use them. The classes keep `nn.BatchNorm`'s parameters and buffers,
so checkpoints and pretrained weights load unchanged (`configure` swaps the classes in place).
"""

from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from sclslt.config import batchnorm_mode

_all_gather_single = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor  # torch >= 2.13 / older


def _world() -> int:
    return dist.get_world_size() if dist.is_available() and dist.is_initialized() else 1


_ROWS = {"segments": None, "groups": 0}  # backbone rows' clip groups during one forward: `rows_in_groups`


@contextlib.contextmanager
def rows_in_groups(segments: torch.Tensor | None, groups: int = 0):
    """Inside: BatchNorm layers called without `segments` (a backbone's, which knows nothing of clips) give
    row i to group `segments[i]` of `groups`."""
    old = dict(_ROWS)
    _ROWS.update(segments=segments, groups=groups)
    try:
        yield
    finally:
        _ROWS.update(old)


def _segment_sum(v: torch.Tensor, seg: torch.Tensor | None, groups: int) -> torch.Tensor:
    if seg is None:
        return v.sum(0, keepdim=True)
    return v.new_zeros((groups, v.shape[1])).index_add_(0, seg, v)


def _per_row(v: torch.Tensor, seg: torch.Tensor | None, x: torch.Tensor) -> torch.Tensor:
    """(S, C) per-group values as (N, C, 1, ...) rows of x (or (1, C, 1, ...) for one group)."""
    r = v if seg is None else v[seg]
    return r.reshape(*r.shape, *([1] * (x.dim() - 2)))


@torch.no_grad()
def batch_stats(
    x: torch.Tensor, mask: torch.Tensor | None, seg: torch.Tensor | None, groups: int, across_ranks: bool
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per group and channel: mean, biased variance and count of valid positions (fp32, (S, C), (S, C), (S, 1)),
    two-pass (mean, then centred squares: no E[x^2] - E[x]^2 cancellation). With `across_ranks`, over every
    rank's rows: each rank's (count, mean, centred sum of squares) gathered in one collective and combined
    exactly (Chan et al.)."""
    dims = tuple(range(2, x.dim()))
    m = mask.unsqueeze(1).to(x.dtype) if mask is not None else None
    if m is not None:
        count = mask.reshape(mask.shape[0], -1).sum(1, dtype=torch.float32)[:, None]
    else:
        count = x.new_full((x.shape[0], 1), float(x[0, 0].numel()), dtype=torch.float32)
    xm = x * m if m is not None else x
    n = _segment_sum(count, seg, groups)
    mean = _segment_sum(xm.sum(dims, dtype=torch.float32) if dims else xm.float(), seg, groups) / n.clamp_min(1.0)
    centred = x.float() - _per_row(mean, seg, x)  # one fp32 temporary, freed here
    if m is not None:
        centred = centred * m
    m2 = _segment_sum(centred.square().sum(dims) if dims else centred.square(), seg, groups)
    del centred
    if across_ranks:
        c = mean.shape[1]
        flat = torch.empty(_world() * (1 + 2 * c), device=x.device, dtype=torch.float32)
        _all_gather_single(flat, torch.cat([n, mean, m2], 1).reshape(-1))
        parts = flat.view(-1, 1 + 2 * c)
        counts, means, m2s = parts[:, :1], parts[:, 1 : 1 + c], parts[:, 1 + c :]
        n = counts.sum(0, keepdim=True)
        mean = (counts * means).sum(0, keepdim=True) / n.clamp_min(1.0)
        m2 = (m2s + counts * (means - mean) ** 2).sum(0, keepdim=True)
    n = n.clamp_min(1.0)
    return mean, m2 / n, n


class _BatchStatsNorm(torch.autograd.Function):
    """y = (x - mean_g) / sqrt(var_g + eps) * w + b, mean_g and var_g the statistics of row x's group g
    (`batch_stats`); the backward goes through the statistics too (all ranks' rows for `global`)."""

    @staticmethod
    def forward(ctx, x, weight, bias, mask, seg, mean, var, n, eps: float, across_ranks: bool):
        invstd = torch.rsqrt(var + eps)
        w = weight.float() if weight is not None else torch.ones_like(mean[0])
        b = bias.float() if bias is not None else torch.zeros_like(mean[0])
        scale = invstd * w
        ctx.save_for_backward(x, weight, mask, seg, mean, invstd, n)
        ctx.groups, ctx.across_ranks, ctx.has_bias = mean.shape[0], across_ranks, bias is not None
        return torch.addcmul(_per_row(b - mean * scale, seg, x), x, _per_row(scale, seg, x)).to(x.dtype)

    @staticmethod
    def backward(ctx, dy):
        x, weight, mask, seg, mean, invstd, n = ctx.saved_tensors
        dims = tuple(range(2, x.dim()))
        xhat = (x.float() - _per_row(mean, seg, x)) * _per_row(invstd, seg, x)
        dyf = dy.float()
        row_dy = dyf.sum(dims) if dims else dyf
        row_dyx = (dyf * xhat).sum(dims) if dims else dyf * xhat
        g1, g2 = _segment_sum(row_dy, seg, ctx.groups), _segment_sum(row_dyx, seg, ctx.groups)
        d_weight = g2.sum(0).to(weight.dtype) if weight is not None else None  # this rank's share: DeepSpeed
        d_bias = g1.sum(0).to(weight.dtype) if ctx.has_bias else None  # averages over ranks
        if ctx.across_ranks:
            packed = torch.cat([g1, g2], 1)
            dist.all_reduce(packed)
            g1, g2 = packed.chunk(2, 1)
        w = weight.float() if weight is not None else torch.ones_like(mean[0])
        centre = _per_row(g1 / n, seg, x) + xhat * _per_row(g2 / n, seg, x)
        if mask is not None:
            centre = centre * mask.unsqueeze(1)
        dx = ((dyf - centre) * _per_row(invstd * w, seg, x)).to(x.dtype)
        return dx, d_weight, d_bias, None, None, None, None, None, None, None


class _ConfiguredNorm:
    """The shared forward of `BatchNorm1d` / `BatchNorm2d` (channel dimension 1), in the mode `configure` set."""

    mode, group = "global", 0

    def forward(
        self, x: torch.Tensor, mask: torch.Tensor | None = None, segments: tuple[torch.Tensor, int] | None = None
    ) -> torch.Tensor:
        """`mask` (N, *): valid positions; `segments` (group of each row, number of groups): the row groups
        of `group N` (else those of `rows_in_groups`)."""
        if not self.training or self.mode == "frozen":
            return self._running(x)
        seg, groups = None, 1
        if self.mode == "group":
            seg, groups = segments if segments is not None else (_ROWS["segments"], _ROWS["groups"])
            if seg is None:
                raise RuntimeError(
                    "model.batchnorm='group N' needs each row's clip group "
                    "(sclslt.model.batchnorm.rows_in_groups, or segments=)"
                )
        across = self.mode == "global" and _world() > 1
        mean, var, n = batch_stats(x, mask, seg, groups, across)
        if self.track_running_stats and torch.is_grad_enabled():  # an activation checkpoint's recompute
            self._add_pending(mean, var, n)  # adds the same groups again: same mean
        return _BatchStatsNorm.apply(
            x,
            self.weight if self.affine else None,
            self.bias if self.affine else None,
            mask,
            seg,
            mean,
            var,
            n,
            self.eps,
            across,
        )

    def _running(self, x: torch.Tensor) -> torch.Tensor:
        view = [1, -1] + [1] * (x.dim() - 2)
        scale = torch.rsqrt(self.running_var.float() + self.eps)
        shift = -self.running_mean.float() * scale
        if self.affine:
            scale = scale * self.weight.float()
            shift = shift * self.weight.float() + self.bias.float()
        return torch.addcmul(shift.view(view), x, scale.view(view)).to(x.dtype)

    def _add_pending(self, mean: torch.Tensor, var: torch.Tensor, n: torch.Tensor) -> None:
        """Add this forward's group statistics (mean, unbiased variance, number of groups) to the step's."""
        unbiased = var * n / (n - 1).clamp_min(1.0)
        add = torch.cat([mean.sum(0), unbiased.sum(0), mean.new_tensor([mean.shape[0]])])
        self._pending = add if getattr(self, "_pending", None) is None else self._pending + add


def drop_pending(module: nn.Module) -> None:
    """Forget the statistics of a step that is not taken (a non-finite loss: they may be NaN)."""
    for m in module.modules():
        if isinstance(m, _ConfiguredNorm):
            m._pending = None


def finish_step(module: nn.Module) -> None:
    """Update every configured BatchNorm's running statistics once from the step's pending group statistics,
    summed over ranks (one all-reduce for all layers). Call on every rank after each optimizer step."""
    layers = [
        m for m in module.modules() if isinstance(m, _ConfiguredNorm) and getattr(m, "_pending", None) is not None
    ]
    if not layers:
        return
    flat = torch.cat([m._pending for m in layers])
    if _world() > 1:
        dist.all_reduce(flat)
    at = 0
    with torch.no_grad():
        for m in layers:
            c = m.num_features
            s = flat[at : at + 2 * c + 1]
            at += 2 * c + 1
            k = s[-1].clamp_min(1.0)
            m.num_batches_tracked.add_(1)
            f = 1.0 / float(m.num_batches_tracked) if m.momentum is None else m.momentum
            m.running_mean.mul_(1 - f).add_((s[:c] / k).to(m.running_mean.dtype), alpha=f)
            m.running_var.mul_(1 - f).add_((s[c : 2 * c] / k).to(m.running_var.dtype), alpha=f)
            m._pending = None


class BatchNorm1d(_ConfiguredNorm, nn.BatchNorm1d):
    """(N, C, T) with an optional (N, T) mask of valid steps and (N,) clip groups."""


class BatchNorm2d(_ConfiguredNorm, nn.BatchNorm2d):
    """(N, C, H, W): every position counts; a backbone's rows take their groups from `rows_in_groups`."""


def configure(module: nn.Module, spec: str) -> nn.Module:
    """Turn every BatchNorm1d/2d inside `module` into the configured class, in the mode `spec`, in place;
    running statistics (and the affine parameters' storage) become fp32 buffers if they were not."""
    mode, group = batchnorm_mode(spec)
    for m in module.modules():
        if type(m) in (nn.BatchNorm2d, BatchNorm2d):
            m.__class__ = BatchNorm2d
        elif type(m) in (nn.BatchNorm1d, BatchNorm1d):
            m.__class__ = BatchNorm1d
        else:
            continue
        m.mode, m.group = mode, group
        for name in ("running_mean", "running_var"):
            buf = getattr(m, name)
            if buf is not None and buf.dtype != torch.float32:
                setattr(m, name, buf.float())
    return module
