"""Clip augmentation and crops on the device; temporal subsampling."""
import random

import numpy as np
import torch

from sclslt.model.augment import ClipAugment
from sclslt.config import DataConfig
from sclslt.data.loader import subsample_frames


def clips(b=3, t=4, h=10, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)


def test_off_is_identity_and_eval_is_an_exact_centre_crop():
    x = clips()
    aug = ClipAugment(DataConfig()).train()
    assert aug(x) is x
    crop = ClipAugment(DataConfig(crop=6, augment=True)).eval()          # eval: no augmentation
    out = crop(x)
    assert out.shape == (3, 4, 6, 6, 3)
    assert torch.allclose(out, x[:, :, 2:8, 2:8].float(), atol=1e-4)


def test_training_draws_one_transform_per_clip_deterministically():
    x = clips(b=4, t=3, h=16, w=16)
    aug = ClipAugment(DataConfig(crop=12, augment=True, aug_prob=1.0)).train()
    torch.manual_seed(3)
    a = aug(x)
    torch.manual_seed(3)
    b = aug(x)
    assert torch.equal(a, b) and a.shape == (4, 3, 12, 12, 3)
    torch.manual_seed(4)
    assert not torch.equal(aug(x), a)
    # every frame of a clip gets the same transform: a clip of identical frames stays identical
    same = x[:, :1].repeat(1, 3, 1, 1, 1)
    out = aug(same)
    assert torch.allclose(out[:, 0], out[:, 2])
    # the clips' own uniforms (Batch.draws, seeded per clip in the loader) decide: a clip's transform does
    # not depend on which other clips share its batch
    u = torch.rand(4, 9, generator=torch.Generator().manual_seed(1))
    whole = aug(x, u)
    assert torch.equal(aug(x, u), whole) and not torch.equal(whole, a)
    assert torch.allclose(aug(x[2:], u[2:]), whole[2:]) and torch.allclose(aug(x[:1], u[:1]), whole[:1])
    # a crop as large as the frame, without augmentation, leaves the clip as it is
    assert ClipAugment(DataConfig(crop=16)).train()(x) is x


def test_temporal_subsampling_uniform_for_eval_random_sorted_for_training():
    frames = np.arange(20).reshape(20, 1, 1, 1).repeat(3, -1).astype(np.uint8)
    uni = subsample_frames(frames, 5)[:, 0, 0, 0].tolist()
    assert uni == [0, 5, 10, 14, 19]
    r = subsample_frames(frames, 5, random.Random(0))[:, 0, 0, 0].tolist()
    assert r == sorted(r) and len(set(r)) == 5 and r != uni
    assert subsample_frames(frames, 0) is frames and subsample_frames(frames, 30) is frames
