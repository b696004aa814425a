"""Similarity heads: how a video and a sentence are scored against each other, one class per head.

A head owns everything that differs between similarities: the features the model's forward gives
the contrastive loss (`features`), the columns every rank gathers and whether they carry a token axis
to pad (`columns`, `token_level`), the symmetric loss of local rows against the gathered columns
(`loss`), the parts it trains (`parts`), what retrieval and the reference export embed (`features` in
eval mode) and its pairwise score matrix over a split (`scores`). Heads are
picked by `model.similarity` from `sclslt.registry.SIMILARITY_HEADS`; a new head is one class here (or
in any module that registers it) plus its test.

- `pooled`  mean-pooled, projected, L2-normalised embeddings; dot product (`sclslt_kernels.infonce`, fused)
- `cico`    CiCo's token-level similarity (`sclslt_kernels.cico_similarity`, fused; docs/paper.md)
"""

from __future__ import annotations

from abc import ABC, abstractmethod

import torch
import torch.nn.functional as F

from sclslt.model.close_text import CloseSentences, close_ce, masked_mean
from sclslt.registry import SIMILARITY_HEADS
from sclslt_kernels import cico_similarity, infonce, masked_ce

CONTRASTIVE_PARTS = ("text_encoder", "text_proj", "video_proj", "log_logit_scale")


class SimilarityHead(ABC):
    """Columns named `video_*` are a clip's features, `text_*` a sentence's (what `close_loss` pairs)."""

    name = ""
    columns: tuple[str, ...] = ()  # the features gathered from all ranks (with gradient when float)
    token_level = False  # columns have a token axis (dim 1), padded to the longest first
    parts = CONTRASTIVE_PARTS  # top-level modules that only the contrastive loss trains

    @abstractmethod
    def features(self, model, enc, mask, text, text_mask) -> dict:
        """The contrastive outputs of a forward: `columns` from the encoders' outputs."""

    def rows(self, out: dict) -> int:
        return out[self.columns[0]].shape[0]

    @abstractmethod
    def loss(self, out: dict, ids, cols: dict, offset: int, tau: float) -> torch.Tensor:
        """(video->text + text->video) / 2 of the local rows (global rows offset..) against `cols`."""

    @abstractmethod
    def scores(self, emb: dict, tau: float) -> torch.Tensor:
        """(N, M) similarity of every video (row) with every text (column) of a split's features
        (`retrieval.embed_split(head=...)`), or of the local rows against the gathered columns."""

    def pair_scores(self, out: dict, cols: dict, tau: float) -> tuple[torch.Tensor, torch.Tensor]:
        """(b, n) similarities of the local rows against the gathered columns: videos against texts, and
        texts against videos (`scores` both ways)."""
        v2t = self.scores({k: out[k] if k.startswith("video") else cols[k] for k in self.columns}, tau)
        t2v = self.scores({k: cols[k] if k.startswith("video") else out[k] for k in self.columns}, tau).t()
        return v2t, t2v

    def close_loss(self, out: dict, ids, cols: dict, offset: int, tau: float, close: CloseSentences) -> torch.Tensor:
        """`loss` with close-text columns masked or weighted (`close_text`): the local rows' logits against
        the gathered columns in both directions, materialised (b x n: `pair_scores`), then `close_ce`."""
        wide = lambda x: x.to(torch.promote_types(x.dtype, torch.float32))  # fp32 (fp64 stays), as the fused
        s = wide(out["logit_scale"])  # path computes the logits
        v2t, t2v = (wide(x) for x in self.pair_scores(out, cols, tau))
        m = close.mask(ids, cols["ids"])
        return 0.5 * (
            close_ce(s * v2t, offset, ids, cols["ids"], m, close.soft)
            + close_ce(s * t2v, offset, ids, cols["ids"], m, close.soft)
        )


@SIMILARITY_HEADS.register("pooled")
class PooledHead(SimilarityHead):
    name = "pooled"
    columns = ("video_emb", "text_emb")

    def features(self, model, enc, mask, text, text_mask) -> dict:
        v = F.normalize(model.video_proj(masked_mean(enc, mask)), dim=-1)
        t = F.normalize(model.text_proj(masked_mean(text, text_mask.bool())), dim=-1)
        return {"video_emb": v, "text_emb": t}

    def loss(self, out, ids, cols, offset, tau):
        s = out["logit_scale"]
        return 0.5 * (
            infonce(out["video_emb"], cols["text_emb"], s, offset, ids, cols["ids"])
            + infonce(out["text_emb"], cols["video_emb"], s, offset, ids, cols["ids"])
        )

    def scores(self, emb, tau):
        """Products of 16-bit embeddings in fp32: a bf16 product of unit vectors near 1 is rounded to 2^-8, up to
        +-0.2 once multiplied by a logit scale of 100 (the close-text loss and retrieval read these)."""
        v, t = emb["video_emb"], emb["text_emb"]
        acc = torch.promote_types(v.dtype, torch.float32)
        return v.to(acc) @ t.to(acc).t()


@SIMILARITY_HEADS.register("cico")
class CiCoHead(SimilarityHead):
    name = "cico"
    columns = ("video_tokens", "video_mask", "text_tokens", "text_mask")
    token_level = True

    def features(self, model, enc, mask, text, text_mask) -> dict:
        return {
            "video_tokens": F.normalize(model.video_proj(enc), dim=-1),
            "video_mask": mask,
            "text_tokens": F.normalize(model.text_proj(text), dim=-1),
            "text_mask": text_mask.bool(),
            "cico_directions": model.cfg.cico_directions,
        }

    def pair_scores(self, out, cols, tau):
        """model.cico_directions: "average" scores both directions with (i2t + t2i) / 2; "split" scores
        video->text with i2t and text->video with t2i, one term per direction as CiCo's own code does."""
        split = out.get("cico_directions") == "split"
        v2t = cico_similarity(
            out["video_tokens"],
            out["video_mask"],
            cols["text_tokens"],
            cols["text_mask"],
            tau,
            "i2t" if split else "mean",
        )
        t2v = cico_similarity(
            cols["video_tokens"],
            cols["video_mask"],
            out["text_tokens"],
            out["text_mask"],
            tau,
            "t2i" if split else "mean",
        ).t()
        return v2t, t2v

    def loss(self, out, ids, cols, offset, tau):
        s = out["logit_scale"]
        v2t, t2v = self.pair_scores(out, cols, tau)
        return 0.5 * (masked_ce(s * v2t, offset, ids, cols["ids"]) + masked_ce(s * t2v, offset, ids, cols["ids"]))

    def scores(self, emb, tau, chunk_elems: int = 1 << 26):
        """In row chunks whose (rows, N, T, L) intermediate stays under `chunk_elems`."""
        v, vm, t, tm = (emb[k] for k in self.columns)
        n = v.shape[0]
        rows = max(1, chunk_elems // max(1, n * v.shape[1] * t.shape[1]))
        return torch.cat([cico_similarity(v[i : i + rows], vm[i : i + rows], t, tm, tau) for i in range(0, n, rows)])


def get_head(name: str) -> SimilarityHead:
    """The registered head `name` (an instance)."""
    head = SIMILARITY_HEADS.get(name)
    return head() if isinstance(head, type) else head
