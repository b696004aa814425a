"""The configured BatchNorm (sclslt/model/batchnorm.py) against torch's BatchNorm: `global` on the whole global
batch (values, gradients and running statistics, in one process and over real gloo ranks each holding its slice
of the batch, padded to its own length; masked and unmasked), `group N` against torch's BatchNorm applied group
by group, `frozen` against torch's in evaluation mode; what it saves for backward against torch's; running
statistics in fp32 under bf16."""

import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from sclslt.model.batchnorm import configure, drop_pending, finish_step


def GlobalBatchNorm2d(c, mode="global"):
    return configure(nn.Sequential(nn.BatchNorm2d(c)), mode)[0]


def GlobalBatchNorm1d(c, mode="global"):
    return configure(nn.Sequential(nn.BatchNorm1d(c)), mode)[0]


def _pair(cls, ref_cls, c, seed=0):
    g = torch.Generator().manual_seed(seed)
    ours, ref = cls(c), ref_cls(c)
    with torch.no_grad():
        for a, b in ((ours.weight, ref.weight), (ours.bias, ref.bias)):
            a.copy_(torch.rand(c, generator=g) + 0.5)
            b.copy_(a)
    return ours, ref


def _frames(n, c, seed):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, c, 5, 4, generator=g) * 3 + torch.arange(c).view(1, c, 1, 1)  # offset means


def _clips(lengths, c, t_max, seed):
    """(B, C, t_max) with zero padding past each clip's length, and its (B, t_max) mask."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(len(lengths), c, t_max, generator=g) * 2 + 1
    mask = torch.arange(t_max)[None] < torch.tensor(lengths)[:, None]
    return x * mask[:, None], mask


def test_one_process_equals_torch_batchnorm_values_gradients_and_running_stats():
    x = _frames(6, 3, 1).requires_grad_()
    ours, ref = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    w = torch.randn(6, 3, 5, 4)
    y, yr = ours(x), ref(x)
    assert torch.allclose(y, yr, atol=1e-5)
    g = torch.autograd.grad((y * w).sum(), [x, ours.weight, ours.bias])
    want = torch.autograd.grad((yr * w).sum(), [x, ref.weight, ref.bias])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g, want))
    finish_step(ours)  # running statistics: once per optimizer step
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
    assert torch.allclose(ours.running_mean, ref.running_mean, atol=1e-6)
    # masked: only valid steps count, whatever the padding
    x1, mask = _clips([7, 3, 5], 4, 9, 2)
    x1.requires_grad_()
    m1, r1 = _pair(GlobalBatchNorm1d, nn.BatchNorm1d, 4)
    valid = x1.permute(0, 2, 1)[mask]
    assert torch.allclose(m1(x1, mask).permute(0, 2, 1)[mask], r1(valid), atol=1e-5)
    finish_step(m1)
    assert torch.allclose(m1.running_var, r1.running_var, atol=1e-6)
    # evaluation uses the running statistics
    m1.eval(), r1.eval()
    assert torch.allclose(m1(x1, mask), r1(x1), atol=1e-6)


def _worker(rank, world, init_file, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = _frames(8, 3, 1)[rank * 8 // world : (rank + 1) * 8 // world].requires_grad_()
    ours, _ = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    w = torch.randn(8, 3, 5, 4, generator=torch.Generator().manual_seed(5))[rank * 8 // world : (rank + 1) * 8 // world]
    y = ours(x)
    gx, gw = torch.autograd.grad((y * w).sum(), [x, ours.weight])
    finish_step(ours)
    lengths = [7, 3, 5, 2, 6, 4][rank * 6 // world : (rank + 1) * 6 // world]
    x1, mask = _clips(lengths, 4, max(lengths), 2 + rank)  # each rank pads to its own longest clip
    x1.requires_grad_()
    m1, _ = _pair(GlobalBatchNorm1d, nn.BatchNorm1d, 4)
    y1 = m1(x1, mask)
    g1 = torch.autograd.grad((y1 * y1.detach().sign() * mask[:, None]).sum(), [x1, m1.weight])  # valid steps
    finish_step(m1)
    out = {
        "y": y.detach(),
        "gx": gx,
        "gw": gw,
        "rv": ours.running_var,
        "x1": x1.detach(),
        "mask": mask,
        "y1": y1.detach(),
        "g1x": g1[0],
        "g1w": g1[1],
        "rv1": m1.running_var,
    }
    every = [None] * world
    dist.all_gather_object(every, out)
    if rank == 0:
        torch.save(every, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_holding_slices_equal_one_batchnorm_over_the_whole_batch(tmp_path, world):
    out = tmp_path / "out.pt"
    mp.spawn(_worker, args=(world, str(tmp_path / "init"), str(out)), nprocs=world)
    parts = torch.load(out, weights_only=False)
    # unmasked: torch's BatchNorm2d on the whole global batch
    x = _frames(8, 3, 1).requires_grad_()
    _, ref = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    w = torch.randn(8, 3, 5, 4, generator=torch.Generator().manual_seed(5))
    y = ref(x)
    gx, gw = torch.autograd.grad((y * w).sum(), [x, ref.weight])
    assert torch.allclose(torch.cat([p["y"] for p in parts]), y, atol=1e-5)
    assert torch.allclose(torch.cat([p["gx"] for p in parts]), gx, atol=1e-5)
    assert torch.allclose(sum(p["gw"] for p in parts), gw, atol=1e-4)  # parameter grads sum over ranks
    assert all(torch.allclose(p["rv"], ref.running_var, atol=1e-5) for p in parts)
    # masked: torch's BatchNorm1d over every rank's valid steps together
    valid = torch.cat([p["x1"].permute(0, 2, 1)[p["mask"]] for p in parts]).requires_grad_()
    _, r1 = _pair(GlobalBatchNorm1d, nn.BatchNorm1d, 4)
    yv = r1(valid)
    gv, gw1 = torch.autograd.grad((yv * yv.detach().sign()).sum(), [valid, r1.weight])
    assert torch.allclose(torch.cat([p["y1"].permute(0, 2, 1)[p["mask"]] for p in parts]), yv, atol=1e-5)
    assert torch.allclose(torch.cat([p["g1x"].permute(0, 2, 1)[p["mask"]] for p in parts]), gv, atol=1e-4)
    assert torch.allclose(sum(p["g1w"] for p in parts), gw1, atol=1e-4)
    assert all(torch.allclose(p["rv1"], r1.running_var, atol=1e-5) for p in parts)
    # the test can fail: per-rank statistics (plain BatchNorm on each slice) are far from the global ones
    local = torch.cat(
        [nn.BatchNorm2d(3)(_frames(8, 3, 1)[r * 8 // world : (r + 1) * 8 // world]) for r in range(world)]
    )
    assert not torch.allclose(local, nn.BatchNorm2d(3)(_frames(8, 3, 1)), atol=1e-2)


@pytest.mark.parametrize("n,chunk", [(2, 4), (3, 6)])
def test_group_n_equals_torch_batchnorm_group_by_group_in_any_micro_batch(n, chunk):
    """'group N' on micro-batches of `chunk` clips (frames of clips in groups, as the backbone sees them, and
    clips with masked steps, as the temporal blocks do) equals torch's BatchNorm run on each group alone:
    values and input gradients; weight gradients summed over groups; the running statistics after one step
    are the mean over all groups of their mean and unbiased variance, whatever the chunking.
    Mutation caught: statistics over the whole micro-batch (groups ignored) or the groups' sums mixed up."""
    clips, c = 12, 3
    g = torch.Generator().manual_seed(7)
    frames_per_clip = torch.randint(1, 4, (clips,), generator=g)
    x = (
        torch.randn(int(frames_per_clip.sum()), c, 3, 2, generator=g) * 2
        + torch.randn(clips, generator=g).repeat_interleave(frames_per_clip).view(-1, 1, 1, 1)
    ).requires_grad_()
    clip_of = torch.arange(clips).repeat_interleave(frames_per_clip)
    w = torch.randn(x.shape, generator=g)
    ours, ref = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, c)
    ours = configure(nn.Sequential(ours), f"group {n}")[0]
    ys = []
    for start in range(0, clips, chunk):  # micro-batches of whole groups
        rows = (clip_of >= start) & (clip_of < start + chunk)
        ys.append(ours(x[rows], segments=((clip_of[rows] - start) // n, chunk // n)))
    y = torch.cat(ys)
    gx, gw = torch.autograd.grad((y * w).sum(), [x, ours.weight])
    finish_step(ours)
    refs = [_pair(GlobalBatchNorm2d, nn.BatchNorm2d, c)[1] for _ in range(clips // n)]
    yr = torch.cat([r(x[(clip_of // n) == k]) for k, r in enumerate(refs)])
    rx, *rw = torch.autograd.grad((yr * w).sum(), [x, *[r.weight for r in refs]])
    assert torch.allclose(y, yr, atol=1e-5) and torch.allclose(gx, rx, atol=1e-5)
    assert torch.allclose(gw, sum(rw), atol=1e-4)
    # each reference took one momentum step from (0, 1): the mean of theirs is ours
    assert torch.allclose(ours.running_mean, torch.stack([r.running_mean for r in refs]).mean(0), atol=1e-6)
    assert torch.allclose(ours.running_var, torch.stack([r.running_var for r in refs]).mean(0), atol=1e-5)
    whole = nn.BatchNorm2d(c)(x.detach())
    assert not torch.allclose(whole, y.detach(), atol=1e-2)  # groups matter on this input
    # masked steps of clips (the temporal blocks): each clip group's valid steps only
    x1, mask = _clips([7, 3, 5, 2, 6, 4], 4, 9, 2)
    m1 = GlobalBatchNorm1d(4, f"group {n}")
    y1 = m1(x1, mask, segments=(torch.arange(6) // n, -(-6 // n)))
    for k in range(-(-6 // n)):
        sel = slice(k * n, (k + 1) * n)
        want = nn.BatchNorm1d(4)(x1[sel].permute(0, 2, 1)[mask[sel]])
        assert torch.allclose(y1[sel].permute(0, 2, 1)[mask[sel]], want, atol=1e-5)


def test_frozen_uses_running_statistics_and_trains_weight_and_bias():
    """'frozen' normalises by the running statistics in training too (torch's BatchNorm in eval mode), leaves
    them untouched, and weight and bias get gradients. Mutation caught: batch statistics in training."""
    x = _frames(6, 3, 3).requires_grad_()
    ours, ref = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    ours = configure(nn.Sequential(ours), "frozen")[0]
    with torch.no_grad():
        for m in (ours, ref):
            m.running_mean.copy_(torch.tensor([0.5, -1.0, 2.0]))
            m.running_var.copy_(torch.tensor([2.0, 0.5, 4.0]))
    ref.eval()
    y, yr = ours(x), ref(x)
    assert torch.allclose(y, yr, atol=1e-6)
    gw = torch.autograd.grad(y.square().sum(), [x, ours.weight, ours.bias])
    rw = torch.autograd.grad(yr.square().sum(), [x, ref.weight, ref.bias])
    assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(gw, rw))
    finish_step(ours)
    assert torch.equal(ours.running_mean, ref.running_mean)


def _saved_bytes(fn) -> int:
    """Bytes autograd keeps for backward while `fn` runs (distinct storages)."""
    seen = {}

    def pack(t):
        seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        fn()
    return sum(seen.values())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_global_saves_no_more_than_torch_batchnorm_and_keeps_fp32_running_statistics(dtype):
    """What the global mode saves for backward is no more than torch's BatchNorm2d saves for the same input (the
    input in its own dtype, per-channel statistics), in fp32 and bf16; under bf16 the running statistics stay
    fp32 and take a 0.1-momentum step that bf16 would round away.
    Mutation caught: saving an fp32 copy of the input (the old GlobalBatchNorm: two of them)."""
    c = 16
    x = torch.randn(8, c, 12, 12).to(dtype).requires_grad_()
    ours = GlobalBatchNorm2d(c).to(dtype)
    ours.running_mean.data, ours.running_var.data = ours.running_mean.float(), ours.running_var.float()
    ref = nn.BatchNorm2d(c).to(dtype) if dtype == torch.float32 else nn.BatchNorm2d(c)
    ours_bytes = _saved_bytes(lambda: ours(x))
    ref_bytes = _saved_bytes(lambda: ref(x if dtype == torch.float32 else x.float()))
    input_bytes = x.numel() * x.element_size()
    assert ours_bytes <= max(ref_bytes, input_bytes + 64 * c), (ours_bytes, ref_bytes)
    assert ours_bytes < input_bytes * 1.5
    finish_step(ours)
    with torch.no_grad():
        ours.running_mean.fill_(1000.0)
    ours(torch.full((4, c, 2, 2), 1004.0, dtype=dtype))  # bf16 holds 1004 (its step there: 4)
    finish_step(ours)
    assert ours.running_mean.dtype == torch.float32
    assert torch.allclose(ours.running_mean, torch.full((c,), 1000.4)), ours.running_mean[:2]


def test_a_skipped_step_leaves_no_statistics_behind():
    """A step skipped for a non-finite loss (NaN activations) drops its pending statistics (`drop_pending`, what
    the loop calls then): the next step's running statistics are finite and equal torch's after that step alone.
    Mutation caught: not dropping them (the NaN reaches the running statistics for good)."""
    ours, ref = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    bad = _frames(4, 3, 8)
    bad[0, 0, 0, 0] = float("nan")
    ours(bad.requires_grad_())
    drop_pending(ours)
    good = _frames(6, 3, 9)
    ours(good.requires_grad_())
    ref(good)
    finish_step(ours)
    assert torch.isfinite(ours.running_mean).all() and torch.isfinite(ours.running_var).all()
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)
