"""What a resumed run must recompute exactly from its position: the learning-rate schedule and the seeds.

Both are pure functions of their arguments (the step, the seed), so a run continued with --resume, at any
world size, follows the same curve and draws the same initial weights.
"""

from __future__ import annotations

import math
import random

import numpy as np
import torch


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed % 2**32)
    torch.manual_seed(seed)


def lr_lambda(total_steps: int, warmup: int, min_ratio: float):
    """Linear warm-up then cosine decay to `min_ratio`; a pure function of the step (resume-safe)."""

    def f(step: int) -> float:
        if warmup > 0 and step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / max(1, total_steps - warmup))
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

    return f
