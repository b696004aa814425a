"""Clip augmentation and crops on the device; temporal subsampling."""

import random

import numpy as np
import pytest
import torch

from sclslt.config import DataConfig
from sclslt.data.loader import subsample_frames
from sclslt.model.augment import ClipAugment


def clips(b=3, t=4, h=10, w=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, 256, (b, t, h, w, 3), generator=g, dtype=torch.uint8)


def test_off_is_identity_and_eval_is_an_exact_centre_crop():
    x = clips()
    aug = ClipAugment(DataConfig()).train()
    assert aug(x) is x
    crop = ClipAugment(DataConfig(crop=6, augment=True)).eval()  # eval: no augmentation
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


def dot_clip(size=65, at=(47.0, 32.0), sigma=2.0):
    """One clip (1, 2, size, size, 3) of a Gaussian dot centred at pixel (x, y) = `at`."""
    yy, xx = np.mgrid[0:size, 0:size].astype(np.float64)
    dot = 255 * np.exp(-((xx - at[0]) ** 2 + (yy - at[1]) ** 2) / (2 * sigma**2))
    frame = np.repeat(np.round(dot)[..., None], 3, -1).astype(np.uint8)
    return torch.from_numpy(np.stack([frame, frame]))[None]


def centroid(out: torch.Tensor) -> np.ndarray:
    """(x, y) intensity centroid of the first frame's first channel."""
    img = out[0, 0, :, :, 0].double().numpy()
    yy, xx = np.mgrid[0 : img.shape[0], 0 : img.shape[1]]
    return np.array([(img * xx).sum(), (img * yy).sum()]) / img.sum()


def test_each_transform_moves_a_dot_as_its_setting_says():
    """Rotation turns a dot about the frame's centre by the drawn angle in degrees (+-aug_rotate at the extreme
    draws), zoom moves it away from the centre by the drawn factor (aug_scale's ends), translation moves it by
    aug_translate of the frame, the random crop takes the window its draw puts at the frame's edge, and a
    transform whose coin says off leaves the dot where it was. The expected positions are plane geometry
    written out here, measured as the dot's intensity centroid. Mutations caught (checked): degrees read as
    radians (`math.radians` removed), zoom or shift never applied, the translation in half-frames."""
    size, c = 65, 32.0  # the frame's centre pixel
    cfg = DataConfig(augment=True, aug_prob=0.5, aug_rotate=30.0, aug_scale=[0.8, 1.25], aug_translate=0.1)
    aug = ClipAugment(cfg).train()
    x = dot_clip(size)
    base = [0.5, 0.5, 0.9, 0.9, 0.9, 0.5, 0.5, 0.5, 0.5]  # every coin off (u >= aug_prob)

    def moved(**draws):
        u = list(base)
        for i, v in draws.items():
            u[int(i[1:])] = v
        return centroid(aug(x, torch.tensor([u])))

    assert np.allclose(moved(), [47, 32], atol=0.05)
    for u5, sign in ((1.0, 1), (0.0, -1)):  # the extreme draws: +-30 degrees
        p = moved(u2=0.1, u5=u5) - c
        assert np.hypot(*p) == pytest.approx(15, abs=0.3)
        turned = np.degrees(np.arctan2(p[1], p[0]))
        assert abs(abs(turned) - 30) < 1.0 and np.sign(turned) != 0
        if u5 == 1.0:
            first = np.sign(turned)
        else:
            assert np.sign(turned) == -first  # the two ends turn opposite ways
    for u6, zoom in ((0.0, 0.8), (1.0, 1.25)):
        p = moved(u3=0.1, u6=u6) - c
        assert p == pytest.approx([15 * zoom, 0], abs=0.3)
    for u7, u8 in ((1.0, 0.5), (0.5, 0.0)):  # the extreme draws: 0.1 of the frame along x, then y
        p = moved(u4=0.1, u7=u7, u8=u8) - np.array([47, 32])
        assert np.hypot(*p) == pytest.approx(0.1 * size, abs=0.3) and (p[0] == pytest.approx(0, abs=0.05)) == (
            u7 == 0.5
        )
    # the random crop: draws 1 and 0 put the window at the right and top edges, pixel for pixel
    crop = ClipAugment(DataConfig(crop=6, augment=False)).train()
    y = clips(b=1, t=2, h=10, w=10)
    assert torch.allclose(crop(y, torch.tensor([[1.0, 0.0] + [0.5] * 7])), y[:, :, 0:6, 4:10].float(), atol=1e-4)
