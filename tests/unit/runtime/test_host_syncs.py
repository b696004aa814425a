"""A training step reads the device once: its verdict (finite loss, preemption), as users train (dropout on,
padded clips and sentences, both heads, whole shares and micro-batches).

On a GPU each device-to-host read idles the GPU until the host catches up; on this CPU nothing waits, but
`sclslt.runtime.syncs.HostReads` sees every read a step would make (aten reads through a dispatch mode,
`.item()/.tolist()/bool()` through the tensor methods). DeepSpeed's own step is not ours and not counted here
(`_Accumulator` stands in for the engine); benchmarks/gpu_check.py's `syncs` part counts a real step on a GPU.
"""

import copy

import pytest
import torch

from sclslt.config import StageConfig, from_dict
from sclslt.data.loader import Collate, ShardStream
from sclslt.data.shards import read_manifest
from sclslt.data.text import train_tokenizer
from sclslt.model.batchnorm import finish_step
from sclslt.model.objective import forward, step_loss
from sclslt.model.slt import SLTModel
from sclslt.runtime.syncs import HostReads
from sclslt.train.accumulate import CachedStep
from sclslt.train.verdict import verdict


class _Accumulator:
    device = torch.device("cpu")

    def backward(self, loss):
        loss.backward()

    def step(self):
        pass


@pytest.fixture(scope="module")
def setup(tiny_shards, tiny_cfg_dict, tmp_path_factory):
    texts = [s[4] for s in read_manifest(tiny_shards, "train")["samples"]]
    tok = train_tokenizer(texts, tmp_path_factory.mktemp("tok"))
    batch = Collate(tok)(next(iter(ShardStream(tiny_shards, "train", 8))))
    assert not batch.frame_mask.all() and not batch.attention_mask.bool().all()  # padding on both sides
    return tiny_cfg_dict, tok, batch


def _step_reads(setup, similarity: str, batchnorm: str, micro: int, checkpointing: bool) -> list[str]:
    d, tok, batch = setup
    d = copy.deepcopy(d)
    d["model"].update(dropout=0.1, batchnorm=batchnorm, similarity=similarity)
    model = SLTModel(from_dict(d).model, tok).train()
    if checkpointing:
        model.checkpoint_activations()
    st = StageConfig()
    with HostReads() as reads:
        b = batch.to("cpu")
        if micro:
            step = CachedStep(lambda c: forward(model, c, st), st, 1, similarity, 0.07, None)
            loss, parts = step.losses(b.split(micro), b.frame_mask.device)
        else:
            loss, parts = step_loss(forward(model, b, st), b, st, 1, similarity)
        logged, finite, preempted = verdict(loss, parts, 1)
        if finite:
            step.backward(b.split(micro), _Accumulator()) if micro else loss.backward()
        finish_step(model)
    assert finite and not preempted and set(logged) == {"loss", "ce", "nce"}
    return reads.where


@pytest.mark.parametrize(
    "similarity,batchnorm,micro,checkpointing",
    [("pooled", "global", 0, False), ("cico", "group 2", 0, True), ("pooled", "group 2", 2, False)],
)
def test_a_training_step_reads_the_device_once(setup, similarity, batchnorm, micro, checkpointing):
    """Forward, both losses, the verdict, backward and BatchNorm's update make one device read.
    Mutations caught (each checked): the valid frames picked by a boolean mask again (`frames[frame_mask]`, its
    backward too), the step's finiteness read apart from its loss values (`bool(torch.isfinite(loss).all())`),
    transformers handed the visual encoder's 2-D padding mask (it asks `mask.all()` before the attention stack)."""
    where = _step_reads(setup, similarity, batchnorm, micro, checkpointing)
    assert len(where) == 1 and "train/verdict.py" in where[0] and "tolist" in where[0], "\n".join(where)
