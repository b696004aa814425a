"""One optimizer step over a rank's share of the global batch in micro-batches, the same update as one pass.

A rank whose share does not fit its memory runs it in chunks of `stageN.micro_batch` clips (open_clip's
`--accum-freq`, GradCache of Gao et al. 2021):

1. Every chunk is forwarded without a graph, with the random state (dropout) recorded before it: its
   translation cross-entropy sum and the similarity head's features (pooled embeddings or CiCo's tokens) are
   kept, nothing else.
2. The contrastive loss is the whole share's against the columns gathered from all ranks (`step_loss`'s, on the
   cached features as leaves); its gradient with respect to this rank's features (and the logit scale) is
   taken at once, through the gather's backward. The loss values (every rank's verdict on them) are known
   before any gradient is accumulated, so a skipped step never applies half a gradient.
3. Every chunk is forwarded again with its graph, from the random state recorded for it (so it is the first
   forward, dropout masks included), and backpropagates its features times their cached gradient plus its
   translation loss, through DeepSpeed's accumulation (`Engine.backward` per chunk, `Engine.step` at the end).

The sum of the chunks' surrogates has the gradient of the share's loss: the update equals the unchunked one
up to the order of floating-point sums. Cost: a second forward of every chunk. BatchNorm statistics must not
depend on the chunking (`model.batchnorm` 'group N' or 'frozen'; `config.micro_batch` says so).
"""

from __future__ import annotations

import torch

from sclslt.model.heads import get_head
from sclslt.model.losses import all_reduce_sum, contrastive_loss, translation_loss_sum
from sclslt.runtime.checkpoints import rng_state, set_rng_state


class CachedStep:
    """Steps 1-2 (`losses`) and 3 (`backward`) for one global batch's share on this rank."""

    def __init__(self, forward, st, world: int, similarity: str, tau: float, close, replay: bool = True):
        """`forward(chunk)`: the model's outputs for a micro-batch; `replay` False only in the test that shows
        the replay matters."""
        self.forward, self.st, self.world = forward, st, world
        self.similarity, self.tau, self.close, self.replay = similarity, tau, close, replay

    def losses(self, chunks: list, device: torch.device) -> tuple[torch.Tensor, dict]:
        """This rank's share of the global-batch loss (as `objective.step_loss` gives it) and its parts, detached."""
        st, head = self.st, get_head(self.similarity)
        self.states, ce_sums, feats = [], [], []
        with torch.no_grad():
            for chunk in chunks:
                self.states.append(rng_state())
                out = self.forward(chunk)
                if st.translation_weight > 0:
                    ce_sums.append(translation_loss_sum(out.pop("logits"), chunk.labels, st.label_smoothing))
                feats.append(out)
        loss, parts = torch.zeros((), device=device), {}
        self.tokens = None
        if st.translation_weight > 0:
            tok = sum((c.labels != -100).sum() for c in chunks)
            self.tokens = all_reduce_sum(tok.float())
            tl = torch.stack(ce_sums).sum() * self.world / self.tokens
            loss, parts["ce"] = loss + st.translation_weight * tl, tl
        self.grads = None
        if st.contrastive_weight > 0:
            cached = {k: torch.cat([f[k] for f in feats]) for k in head.columns}
            leaves = {k: v.detach().requires_grad_() for k, v in cached.items() if v.is_floating_point()}
            scale = feats[0]["logit_scale"].detach().requires_grad_()
            out = {**feats[0], **cached, **leaves, "logit_scale": scale}
            ids = torch.cat([c.sentence_ids for c in chunks]) if st.mask_same_sentence else None
            with torch.enable_grad():
                cl = contrastive_loss(out, ids, self.similarity, self.tau, self.close)
                g = torch.autograd.grad(st.contrastive_weight * cl, [*leaves.values(), scale])
            self.grads = (dict(zip(leaves, g[:-1])), g[-1])
            loss, parts["nce"] = loss + st.contrastive_weight * cl.detach(), cl.detach()
        return loss, parts

    def backward(self, chunks: list, engine) -> None:
        """Step 3: each chunk forwarded again with its graph and backpropagated; the optimizer steps after the
        last one (DeepSpeed's accumulation boundary)."""
        st, device, at = self.st, engine.device, 0
        for i, chunk in enumerate(chunks):
            if self.replay:
                set_rng_state(self.states[i])
            out = self.forward(chunk)
            surrogate = torch.zeros((), device=device)
            if st.translation_weight > 0:
                ce = translation_loss_sum(out["logits"], chunk.labels, st.label_smoothing)
                surrogate = surrogate + st.translation_weight * ce * self.world / self.tokens
            if self.grads is not None:
                feature_grads, scale_grad = self.grads
                rows = len(chunk)
                for k, g in feature_grads.items():
                    surrogate = surrogate + (out[k] * g[at : at + rows]).sum()
                if i == 0:
                    surrogate = surrogate + out["logit_scale"] * scale_grad
                at += rows
            engine.backward(surrogate)
            engine.step()
