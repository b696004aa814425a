"""The training objective: which parts a stage trains, the model's forward on a batch, and the step's loss.

A stage's `StageConfig` says which losses count (stage 1: symmetric InfoNCE over gathered negatives + joint
translation CE; stage 2: translation only); these three functions turn that into trainable parameters, the
forward's switches and this rank's share of the global-batch loss. The training loop (`sclslt.train.stage`),
its micro-batch variant (`sclslt.train.accumulate`) and the memory benchmark all go through them.
"""

from __future__ import annotations

import torch

from sclslt.config import StageConfig
from sclslt.model.heads import get_head
from sclslt.model.losses import all_reduce_sum, contrastive_loss, translation_loss_sum
from sclslt.model.slt import SLTModel


def set_trainable(model: SLTModel, st: StageConfig) -> None:
    """Stage 2 (no contrastive loss) freezes the contrastive parts; stage 1 may freeze the text encoder;
    LoRA's base weights stay frozen in both (`SLTModel.frozen_by_design`). The contrastive parts are
    the similarity head's (`heads.SimilarityHead.parts`)."""
    contrastive_parts = get_head(model.cfg.similarity).parts
    for name, p in model.named_parameters():
        top = name.split(".")[0]
        frozen = (
            (st.contrastive_weight == 0 and top in contrastive_parts)
            or (st.freeze_text_encoder and top == "text_encoder")
            or model.frozen_by_design(name)
        )
        p.requires_grad_(not frozen)


def step_loss(
    out: dict, batch, st: StageConfig, world: int, similarity: str = "pooled", tau: float = 0.07, close=None
) -> tuple[torch.Tensor, dict]:
    """This rank's share of the global-batch loss (the mean over ranks is the global loss)."""
    loss = torch.zeros((), device=batch.frames.device)
    parts = {}
    if st.translation_weight > 0:
        tok = (batch.labels != -100).sum()
        n_global = all_reduce_sum(tok.float())
        tl = translation_loss_sum(out["logits"], batch.labels, st.label_smoothing) * world / n_global
        loss = loss + st.translation_weight * tl
        parts["ce"] = tl.detach()
    if st.contrastive_weight > 0:
        cl = contrastive_loss(out, batch.sentence_ids if st.mask_same_sentence else None, similarity, tau, close)
        loss = loss + st.contrastive_weight * cl
        parts["nce"] = cl.detach()
    return loss, parts


def forward(model_call, batch, st: StageConfig) -> dict:
    """`model_call`'s outputs for a batch, with the heads the stage's losses use (the model, or its engine)."""
    return model_call(
        batch.frames,
        batch.frame_mask,
        batch.input_ids,
        batch.attention_mask,
        batch.labels,
        contrastive=st.contrastive_weight > 0,
        translation=st.translation_weight > 0,
        draws=batch.draws,
        valid_frames=batch.valid_frames,
    )
