"""Clip augmentation on the device (GFSLT-VLP's recipe): random crop, rotation, zoom and translation,
one affine transform per clip applied to all its frames, in training only; a centre crop otherwise.

Runs where the frames already are (the GPU in a real run), as one `grid_sample` over the batch, so
the loader's CPU cores only read and decode. Randomness: training batches carry each clip's own
uniforms (`Batch.draws`, seeded by (seed, epoch, clip key) in the loader), so a clip gets the same
transform at any world size, worker count or resume; called without them (a direct call), the
uniforms come from torch's global generator.
"""

from __future__ import annotations

import math

import torch
import torch.nn as nn
import torch.nn.functional as F

from sclslt.config import DataConfig


class ClipAugment(nn.Module):
    def __init__(self, cfg: DataConfig):
        super().__init__()
        self.cfg = cfg

    def forward(self, frames: torch.Tensor, draws: torch.Tensor | None = None) -> torch.Tensor:
        """(B, T, H, W, 3) uint8/float -> (B, T, c, c, 3) float in [0, 255] (c = crop, or H x W unchanged).
        `draws`: (B, 9) uniforms in [0, 1) per clip (crop offset x/y, three on/off, angle, zoom, shift x/y)."""
        cfg = self.cfg
        b, t, h, w, _ = frames.shape
        if not (self.training and cfg.augment) and (cfg.crop <= 0 or (cfg.crop == h and cfg.crop == w)):
            return frames
        oh, ow = (cfg.crop, cfg.crop) if cfg.crop > 0 else (h, w)
        if oh > h or ow > w:
            raise ValueError(f"data.crop={cfg.crop} is larger than the frames ({h} x {w})")
        dev = frames.device
        sx, sy = ow / w, oh / h  # the crop window, in normalised coordinates
        angle = torch.zeros(b, device=dev)
        zoom = torch.ones(b, device=dev)
        shift = torch.zeros(b, 2, device=dev)
        if self.training:
            u = torch.rand(b, 9, device=dev) if draws is None else draws.to(dev, torch.float32)
            offset = (u[:, 0:2] * 2 - 1) * torch.tensor([1 - sx, 1 - sy], device=dev)
            if cfg.augment:
                on = (u[:, 2:5] < cfg.aug_prob).float()
                angle = on[:, 0] * (u[:, 5] * 2 - 1) * math.radians(cfg.aug_rotate)
                lo, hi = cfg.aug_scale
                zoom = 1 + on[:, 1] * (lo + u[:, 6] * (hi - lo) - 1)
                shift = on[:, 2:3] * (u[:, 7:9] * 2 - 1) * 2 * cfg.aug_translate
        else:
            offset = torch.zeros(b, 2, device=dev)  # centre crop
        cos, sin = torch.cos(angle) / zoom, torch.sin(angle) / zoom
        theta = torch.stack(
            [
                torch.stack([cos * sx, -sin * sy, offset[:, 0] + shift[:, 0]], 1),
                torch.stack([sin * sx, cos * sy, offset[:, 1] + shift[:, 1]], 1),
            ],
            1,
        )
        x = frames.reshape(b * t, h, w, 3).permute(0, 3, 1, 2).float()
        grid = F.affine_grid(theta.repeat_interleave(t, 0), (b * t, 3, oh, ow), align_corners=False)
        out = F.grid_sample(x, grid, mode="bilinear", padding_mode="zeros", align_corners=False)
        return out.permute(0, 2, 3, 1).reshape(b, t, oh, ow, 3)
