"""ZeRO-3's evaluation copy (Engine.eval_module): built once a run, in the training precision with BatchNorm's
running statistics fp32, refilled from the trained parameters at every call, and parked in host memory while
training runs. The engine's DeepSpeed side is a stand-in holding a bf16 module (what ZeRO-3 + bf16 trains);
the real ZeRO-3 path (gathered parameters, ranks in step) runs end to end in tests/e2e/test_distributed.py."""

from types import SimpleNamespace

import torch
import torch.nn as nn

from sclslt.model.batchnorm import BatchNorm1d
from sclslt.runtime.engine import Engine


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(4, 3), BatchNorm1d(3))


def test_the_evaluation_copy_is_built_once_in_the_training_precision_and_follows_training():
    """Mutations caught (checked): building the copy at every call (two builds), loading into an fp32 copy (its
    parameters fp32: the old code decoded in fp32), a copy filled once and never refreshed (stale weights)."""
    trained = _net()
    for p in trained.parameters():
        p.data = p.data.bfloat16()
    engine = Engine.__new__(Engine)
    engine.ds = SimpleNamespace(
        module=trained, device=torch.device("cpu"), zero_optimization_partition_weights=lambda: True
    )
    engine._eval_copy = None
    builds = []

    def build():
        builds.append(1)
        return _net()

    first = engine.eval_module(build)
    assert first[0].weight.dtype == torch.bfloat16 and first[1].running_mean.dtype == torch.float32
    assert torch.equal(first[0].weight, trained[0].weight)
    with torch.no_grad():
        trained[0].weight.add_(1.0)
        trained[1].running_mean.add_(0.5)
    engine.park_eval_copy()
    second = engine.eval_module(build)
    assert len(builds) == 1 and second is first
    assert torch.equal(second[0].weight, trained[0].weight) and torch.equal(
        second[1].running_mean, trained[1].running_mean
    )
