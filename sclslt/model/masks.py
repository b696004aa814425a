"""Attention masks made without reading the device, in the form the attention implementation takes.

A 2-D padding mask handed to transformers is inspected on the host before every attention stack (whether it
is all ones, so the mask may be skipped: `padding_mask.all()`), and a boolean-mask index (`frames[mask]`) has a
data-dependent size: each is a device-to-host read, which idles a GPU until the host catches up. The training
step passes the valid-frame indices the collate made on the host (`Batch.valid_frames`, `loader.frame_layout`)
and 4-D masks, which transformers uses as they are.
"""

from __future__ import annotations

import torch


def _implementation(module) -> str:
    return getattr(module.config, "_attn_implementation", None) or "eager"


def key_mask(module, mask: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """A (B, K) key padding mask (1 = attend) as the (B, 1, 1, K) mask `module`'s attention takes: boolean for
    SDPA, additive for eager attention. Other implementations (flash attention) take the 2-D mask."""
    impl = _implementation(module)
    if impl == "sdpa":
        return mask.bool()[:, None, None, :]
    if impl == "eager":
        return (1.0 - mask[:, None, None, :].to(dtype)) * torch.finfo(dtype).min
    return mask.long()


def causal_mask(module, length: int, dtype: torch.dtype, device) -> torch.Tensor | None:
    """The decoder's (1, 1, L, L) causal self-attention mask in the form `module`'s attention takes (None where
    that implementation builds its own from no mask: flash attention)."""
    keep = torch.ones(length, length, dtype=torch.bool, device=device).tril()[None, None]
    impl = _implementation(module)
    if impl == "sdpa":
        return keep
    if impl == "eager":
        return (~keep).to(dtype) * torch.finfo(dtype).min
    return None
