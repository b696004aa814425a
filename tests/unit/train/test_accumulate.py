"""Gradient caching (sclslt/train/accumulate.py) in one process, with dropout on, as users train: a share in
micro-batches gives the gradient of the same share in one graph with the same dropout masks; the micro-batch
and BatchNorm settings that cannot give the global batch's step are configuration errors."""

import copy

import pytest
import torch

from sclslt.config import ConfigError, StageConfig, eval_batch, from_dict, micro_batch
from sclslt.data.loader import Collate, ShardStream
from sclslt.data.shards import read_manifest
from sclslt.data.text import train_tokenizer
from sclslt.model.objective import forward, step_loss
from sclslt.model.slt import SLTModel
from sclslt.runtime.checkpoints import rng_state, set_rng_state
from sclslt.train.accumulate import CachedStep
from tests.helpers import ROOT


class _Accumulator:
    """What the loop needs of `Engine` here: backward accumulates into .grad, step counts."""

    device = torch.device("cpu")

    def __init__(self):
        self.steps = 0

    def backward(self, loss):
        loss.backward()

    def step(self):
        self.steps += 1


@pytest.fixture(scope="module")
def setup(tiny_shards, tiny_cfg_dict, tmp_path_factory):
    texts = [s[4] for s in read_manifest(tiny_shards, "train")["samples"]]
    tok = train_tokenizer(texts, tmp_path_factory.mktemp("tok"))
    batch = Collate(tok)(next(iter(ShardStream(tiny_shards, "train", 8))))
    d = copy.deepcopy(tiny_cfg_dict)
    d["model"].update(dropout=0.3, batchnorm="group 2", similarity="pooled")
    return d, tok, batch


def _grads(model) -> dict:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _one_graph(model, chunks, st, states) -> tuple[torch.Tensor, dict]:
    """The share in one graph: every chunk forwarded from the random state `states[i]` (the masks the cached
    step drew for it), the loss over their concatenated outputs, one backward."""
    outs = []
    for c, s in zip(chunks, states):
        set_rng_state(s)
        outs.append(forward(model, c, st))
    whole = {k: torch.cat([o[k] for o in outs]) for k in ("video_emb", "text_emb")}
    whole["logit_scale"] = outs[0]["logit_scale"]
    ce = sum(
        torch.nn.functional.cross_entropy(
            o["logits"].flatten(0, 1),
            c.labels.flatten(),
            ignore_index=-100,
            label_smoothing=st.label_smoothing,
            reduction="sum",
        )
        for o, c in zip(outs, chunks)
    )
    tokens = sum((c.labels != -100).sum() for c in chunks)
    labels_batch = copy.copy(chunks[0])
    labels_batch.sentence_ids = torch.cat([c.sentence_ids for c in chunks])
    loss, _ = step_loss({**whole, "logits": None}, labels_batch, StageConfig(translation_weight=0.0), world=1)
    loss = loss + ce / tokens
    model.zero_grad(set_to_none=True)
    loss.backward()
    return loss.detach(), _grads(model)


@pytest.mark.parametrize("replay", [True, False])
def test_a_cached_step_with_dropout_is_the_gradient_of_its_masks(setup, replay):
    """Micro-batches of 2 of a share of 8, dropout 0.3 in mBART: the cached step's gradient (two passes,
    second from the recorded random states) equals one graph over the share with the masks of the first pass.
    Turning the replay off (second pass draws new masks) breaks the equality, so the test can fail."""
    d, tok, batch = setup
    torch.manual_seed(0)
    model = SLTModel(from_dict(d).model, tok).train()
    st = StageConfig()
    chunks = batch.split(2)
    torch.manual_seed(1)
    start = rng_state()
    step = CachedStep(lambda c: forward(model, c, st), st, 1, "pooled", 0.07, None, replay=replay)
    loss, parts = step.losses(chunks, torch.device("cpu"))
    engine = _Accumulator()
    model.zero_grad(set_to_none=True)
    step.backward(chunks, engine)
    cached = _grads(model)
    assert engine.steps == len(chunks)
    set_rng_state(start)
    want_loss, want = _one_graph(model, chunks, st, step.states)
    assert loss.item() == pytest.approx(want_loss.item(), rel=1e-5)
    worst = max((cached[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12) for n, g in want.items())
    if replay:
        assert set(cached) == set(want)
        assert worst < 1e-4, worst
    else:
        assert worst > 1e-2, worst


def test_micro_batch_settings_that_cannot_be_the_global_step_are_errors(tiny_cfg_dict):
    """A micro-batch that does not split a rank's share, 'global' BatchNorm across micro-batches of one rank, and a
    share or micro-batch that splits a BatchNorm group are errors naming the fix; the same settings at a world
    where they fit resolve.
    Mutation caught: dropping the whole-groups check from config.micro_batch (a share of 2 in groups of 4 passes;
    checked)."""
    d = copy.deepcopy(tiny_cfg_dict)
    d["stage1"].update(global_batch=16, micro_batch=4)
    cfg = from_dict(d)
    with pytest.raises(ConfigError, match="group N.*frozen"):
        micro_batch(cfg, "stage1", 1)  # 'global' split into 4 chunks
    assert micro_batch(cfg, "stage1", 4) == 4  # the whole share: global is fine
    d["model"]["batchnorm"] = "group 2"
    cfg = from_dict(d)
    assert micro_batch(cfg, "stage1", 1) == 4 and micro_batch(cfg, "stage1", 2) == 4
    with pytest.raises(ConfigError, match="share of 2 clips"):
        micro_batch(cfg, "stage1", 8)
    with pytest.raises(ConfigError, match="not divisible by the world size 3"):
        micro_batch(cfg, "stage1", 3)
    d4 = copy.deepcopy(d)
    d4["model"]["batchnorm"], d4["stage1"]["micro_batch"] = "group 4", 0
    with pytest.raises(ConfigError, match="share in stage1 at 8 ranks is 2 clips"):
        micro_batch(from_dict(d4), "stage1", 8)  # a share of 2 cannot hold a group of 4
    assert micro_batch(from_dict(d4), "stage1", 4) == 4
    # evaluation and embedding passes hold no more clips at once than the smallest micro-batch set
    assert eval_batch(cfg) == 4 and cfg.eval.batch_size > 4
    d["stage1"]["enabled"] = False
    assert eval_batch(from_dict(d)) == cfg.eval.batch_size
    d["stage1"].update(enabled=True, micro_batch=3)
    with pytest.raises(ConfigError, match="multiple of 2|does not divide"):
        from_dict(d)


@pytest.mark.parametrize("batchnorm", ["global", "group 2", "frozen"])
def test_activation_checkpointing_changes_no_gradient_and_keeps_less(setup, batchnorm):
    """train.activation_checkpointing (backbone in regions of whole BatchNorm groups, every mBART layer), dropout
    0.3: the loss, every gradient and the running statistics after the step equal those without it, from the
    same random state, and fewer bytes are kept for backward.
    Mutations caught: a backbone region that splits a BatchNorm group (statistics change; checked), checkpointing
    that does nothing (the bytes kept)."""
    from sclslt.model.batchnorm import finish_step

    d, tok, batch = setup
    d = copy.deepcopy(d)
    d["model"]["batchnorm"] = batchnorm
    st = StageConfig()
    results = []
    for checkpointing in (False, True):
        torch.manual_seed(0)
        model = SLTModel(from_dict(d).model, tok).train()
        if checkpointing:
            model.checkpoint_activations()
        torch.manual_seed(3)
        saved = {}

        def pack(t):
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
            return t

        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            out = forward(model, batch, st)
            loss, _ = step_loss(out, batch, st, world=1)
        loss.backward()
        finish_step(model)
        buffers = {n: b.clone() for n, b in model.named_buffers() if "running" in n}
        results.append((loss.item(), _grads(model), buffers, sum(saved.values())))
    (l0, g0, b0, s0), (l1, g1, b1, s1) = results
    assert l1 == pytest.approx(l0, rel=1e-6)
    assert set(g0) == set(g1)
    worst = max((g1[n] - g).abs().max().item() / max(g.abs().max().item(), 1e-12) for n, g in g0.items())
    assert worst < 1e-4, worst
    assert all(torch.allclose(b1[n], b, atol=1e-6) for n, b in b0.items())
    assert s1 < 0.7 * s0, (s1, s0)


def test_engine_config_accumulates_micro_batches_in_fp32_under_bf16():
    """DeepSpeed's config for a share in micro-batches: its micro-batch, accumulation over the share's chunks, and
    under bf16 fp32 gradient accumulation (bf16 sums of the chunks' gradients would lose what one pass keeps);
    a whole share keeps DeepSpeed's defaults.
    Mutation caught: removing the grad_accum_dtype line from build_ds_config (checked)."""
    from sclslt.runtime.engine import build_ds_config

    zero2 = ROOT / "configs" / "zero2.json"
    ds = build_ds_config(zero2, 16, 2, 1.0, "bf16", micro_batch=2)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"]) == (2, 4)
    assert ds["data_types"]["grad_accum_dtype"] == "fp32"
    whole = build_ds_config(zero2, 16, 2, 1.0, "bf16")
    assert (whole["train_micro_batch_size_per_gpu"], whole["gradient_accumulation_steps"]) == (8, 1)
    assert "grad_accum_dtype" not in whole.get("data_types", {})
    assert "grad_accum_dtype" not in build_ds_config(zero2, 16, 2, 1.0, "fp32", micro_batch=2).get("data_types", {})
