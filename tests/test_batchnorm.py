"""Global-batch BatchNorm (sclslt/model/batchnorm.py) against torch's BatchNorm on the whole global batch:
values, gradients and running statistics, in one process and over real gloo ranks (each holding its slice
of the batch, padded to its own length), masked (valid time steps only) and unmasked."""
import pytest
import torch
import torch.multiprocessing as mp
import torch.nn as nn

from sclslt.model.batchnorm import GlobalBatchNorm1d, GlobalBatchNorm2d


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
    return torch.randn(n, c, 5, 4, generator=g) * 3 + torch.arange(c).view(1, c, 1, 1)   # offset means


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
    for path in (ours, ours._unmasked):                       # the fused fast path and the combined path
        y, yr = path(x), ref(x)
        assert torch.allclose(y, yr, atol=1e-5)
        g = torch.autograd.grad((y * w).sum(), [x, ours.weight, ours.bias])
        want = torch.autograd.grad((yr * w).sum(), [x, ref.weight, ref.bias])
        assert all(torch.allclose(a, b, atol=1e-4) for a, b in zip(g, want))
    assert torch.allclose(ours.running_var, ref.running_var, atol=1e-5)    # both updated twice by now
    # masked: only valid steps count, whatever the padding
    x1, mask = _clips([7, 3, 5], 4, 9, 2)
    x1.requires_grad_()
    m1, r1 = _pair(GlobalBatchNorm1d, nn.BatchNorm1d, 4)
    valid = x1.permute(0, 2, 1)[mask]
    assert torch.allclose(m1(x1, mask).permute(0, 2, 1)[mask], r1(valid), atol=1e-5)
    assert torch.allclose(m1.running_var, r1.running_var, atol=1e-6)
    # evaluation uses the running statistics
    m1.eval(), r1.eval()
    assert torch.allclose(m1(x1, mask), r1(x1), atol=1e-6)


def _worker(rank, world, init_file, out_file):
    import torch.distributed as dist
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    x = _frames(8, 3, 1)[rank * 8 // world:(rank + 1) * 8 // world].requires_grad_()
    ours, _ = _pair(GlobalBatchNorm2d, nn.BatchNorm2d, 3)
    w = torch.randn(8, 3, 5, 4, generator=torch.Generator().manual_seed(5))[rank * 8 // world:(rank + 1) * 8 // world]
    y = ours(x)
    gx, gw = torch.autograd.grad((y * w).sum(), [x, ours.weight])
    lengths = [7, 3, 5, 2, 6, 4][rank * 6 // world:(rank + 1) * 6 // world]
    x1, mask = _clips(lengths, 4, max(lengths), 2 + rank)        # each rank pads to its own longest clip
    x1.requires_grad_()
    m1, _ = _pair(GlobalBatchNorm1d, nn.BatchNorm1d, 4)
    y1 = m1(x1, mask)
    g1 = torch.autograd.grad((y1 * y1.detach().sign() * mask[:, None]).sum(), [x1, m1.weight])   # valid steps
    out = {"y": y.detach(), "gx": gx, "gw": gw, "rv": ours.running_var, "x1": x1.detach(), "mask": mask,
           "y1": y1.detach(), "g1x": g1[0], "g1w": g1[1], "rv1": m1.running_var}
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
    assert torch.allclose(sum(p["gw"] for p in parts), gw, atol=1e-4)          # parameter grads sum over ranks
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
    local = torch.cat([nn.BatchNorm2d(3)(_frames(8, 3, 1)[r * 8 // world:(r + 1) * 8 // world]) for r in range(world)])
    assert not torch.allclose(local, nn.BatchNorm2d(3)(_frames(8, 3, 1)), atol=1e-2)
