"""Text-side false negatives without a reference run: sentence pairs close enough to mean the same.

The id mask removes a column from a row's InfoNCE denominator only when the two sentences are
identical. A corpus like PHOENIX-2014T has ~7.6 near partners per clip (paraphrases among them) that
no id mask catches, and treating a paraphrase as a negative pushes apart two clips that mean the same
(experiments/pair_selection/results/ps_ablation_analysis.md). This module finds close sentence pairs once per run,
over the training sentences, and gives the loss a per-pair mask:

- `jaccard`: token Jaccard of the normalised texts (|A & B| / |A | B| over their whitespace tokens);
- `cosine`: cosine of the sentences' mean-pooled text-encoder states, from the text encoder as the
  stage starts (frozen: computed once, before the first step, never refreshed).

A pair at or above `stage1.mask_close_text` is close. With `stage1.soft_close_text` = 0 close columns
leave the row's softmax (`close_ce`, hard), like identical sentences; with w > 0 they stay in it as
weighted positives: the row's target puts 1 - w on its own positive and w spread evenly over its
close columns (soft). Identical sentences are always the id mask's (left out of the softmax).

The pairs are stored as a sorted set of int64 codes a * U + b over the U training sentences (compact
indices of their sorted sentence ids), both orders: memory is the number of close pairs, never U^2,
and the mask of b rows against n columns costs two `searchsorted`s. The table is written into the run
directory by rank 0 (`CLOSE_FILE`, `train.close_pairs.stage_close_pairs`) and read back by every rank, so all
ranks and a resumed run use the same pairs (the resumed model's text encoder is no longer the initial one).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

CLOSE_FILE = "close_text.safetensors"


@dataclass
class CloseSentences:
    """Close pairs of training sentences (both orders), by sentence id; `soft` is the target weight
    w of close columns (0: they are masked out)."""

    sids: torch.Tensor  # (U,) sorted unique sentence ids, int64
    codes: torch.Tensor  # (P,) sorted a * U + b for close pairs a != b (indices into sids), int64
    soft: float = 0.0

    def mask(self, row_ids: torch.Tensor, col_ids: torch.Tensor) -> torch.Tensor:
        """(b, n) bool: row i's sentence and column j's are close (never for identical sentences)."""
        dev = row_ids.device
        sids, codes = self.sids.to(dev), self.codes.to(dev)
        u = len(sids)
        if u == 0 or len(codes) == 0:
            return torch.zeros(len(row_ids), len(col_ids), dtype=torch.bool, device=dev)
        a, a_ok = _index(sids, row_ids)
        b, b_ok = _index(sids, col_ids)
        pair = a[:, None] * u + b[None, :]
        pos = torch.searchsorted(codes, pair.flatten()).clamp_max(len(codes) - 1).view_as(pair)
        return (codes[pos] == pair) & a_ok[:, None] & b_ok[None, :]

    def pairs(self) -> torch.Tensor:
        """(P, 2) sentence ids of the close pairs, both orders."""
        u = len(self.sids)
        return torch.stack([self.sids[self.codes // u], self.sids[self.codes % u]], dim=1)

    def save(self, path, made_by: dict | None = None) -> None:
        """With `made_by` ({"kind", "threshold"}) in the file's metadata: what
        `train.close_pairs.stage_close_pairs` checks on reuse."""
        import json

        from safetensors.torch import save_file

        from sclslt.atomic import atomic_path

        with atomic_path(path) as tmp:
            save_file(
                {"sids": self.sids.contiguous(), "codes": self.codes.contiguous()},
                str(tmp),
                metadata={"made_by": json.dumps(made_by or {})},
            )

    @classmethod
    def load(cls, path, soft: float = 0.0) -> "CloseSentences":
        from safetensors.torch import load_file

        t = load_file(str(path))
        return cls(t["sids"], t["codes"], soft)

    @staticmethod
    def made_by(path) -> dict:
        import json

        from safetensors import safe_open

        with safe_open(str(path), framework="pt") as f:
            return json.loads((f.metadata() or {}).get("made_by", "{}"))


def _index(sids: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    pos = torch.searchsorted(sids, ids).clamp_max(len(sids) - 1)
    return pos, sids[pos] == ids


def from_similarity(sids: list[int], sim_rows, threshold: float, block: int = 2048) -> CloseSentences:
    """Close pairs of the sentences `sids` (distinct) where `sim_rows(i0, i1)` (the (i1 - i0, U) block of
    the U x U similarity) is >= threshold; the matrix is visited in row blocks, never whole."""
    order = torch.argsort(torch.tensor(sids, dtype=torch.long))
    sorted_ids = torch.tensor(sids, dtype=torch.long)[order]
    u = len(sids)
    rank = torch.empty(u, dtype=torch.long)
    rank[order] = torch.arange(u)  # input position -> index into sorted_ids
    codes = []
    for i0 in range(0, u, block):
        s = sim_rows(i0, min(u, i0 + block))
        hit = (s >= threshold).nonzero()
        a, b = hit[:, 0] + i0, hit[:, 1]
        keep = a != b
        codes.append(rank[a[keep]] * u + rank[b[keep]])
    codes = torch.sort(torch.cat(codes)).values if codes else torch.zeros(0, dtype=torch.long)
    return CloseSentences(sorted_ids, codes)


def jaccard_pairs(sids: list[int], texts: list[str], threshold: float) -> CloseSentences:
    """Close by token Jaccard of the (normalised) texts: |A & B| / |A | B| >= threshold (token sets as a
    sparse U x V incidence matrix; intersections a dense row block at a time)."""
    vocab: dict[str, int] = {}
    sets = [sorted({vocab.setdefault(w, len(vocab)) for w in t.split()}) for t in texts]
    r = torch.tensor([i for i, s in enumerate(sets) for _ in s], dtype=torch.long)
    c = torch.tensor([w for s in sets for w in s], dtype=torch.long)
    v = max(1, len(vocab))
    m = torch.sparse_coo_tensor(
        torch.stack([r, c]), torch.ones(len(r)), (len(texts), v), check_invariants=True
    ).coalesce()
    sizes = torch.tensor([float(len(s)) for s in sets])

    def rows(i0, i1):
        block = torch.zeros(i1 - i0, v)
        for i in range(i0, i1):
            block[i - i0, sets[i]] = 1.0
        inter = torch.sparse.mm(m, block.t()).t()
        union = sizes[i0:i1, None] + sizes[None, :] - inter
        return inter / union.clamp_min(1.0)

    return from_similarity(sids, rows, threshold)


def cosine_pairs(sids: list[int], emb: torch.Tensor, threshold: float) -> CloseSentences:
    """Close by the cosine of the sentences' embeddings `emb` (U, d)."""
    e = torch.nn.functional.normalize(emb.double(), dim=-1)
    return from_similarity(sids, lambda i0, i1: e[i0:i1] @ e.t(), threshold)


def masked_mean(x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """The mean of `x` (B, L, D) over the positions `mask` (B, L) keeps: the cosine kind's sentence embedding,
    and the pooled similarity head's (`heads.PooledHead`)."""
    m = mask.to(x.dtype)[..., None]
    return (x * m).sum(1) / m.sum(1).clamp_min(1.0)


@torch.no_grad()
def text_embeddings(model, tokenizer, texts: list[str], device, batch: int = 256) -> torch.Tensor:
    """Mean-pooled last hidden states of `model.text_encoder` (eval mode, no grad), computed on `device` (the
    training GPU: before the engine exists the model is still in host memory, so the text encoder visits the
    device for this pass); its mode and place are restored."""
    was, home = model.training, next(model.text_encoder.parameters()).device
    model.eval()
    model.text_encoder.to(device)
    out = []
    try:
        for i in range(0, len(texts), batch):
            enc = tokenizer(texts[i : i + batch], padding=True, truncation=True, max_length=128, return_tensors="pt")
            ids, att = enc["input_ids"].to(device), enc["attention_mask"].to(device)
            out.append(masked_mean(model.encode_text(ids, att).float(), att.bool()).double().cpu())
    finally:
        model.text_encoder.to(home)
        model.train(was)
    return torch.cat(out)


def build(kind: str, threshold: float, rows, model=None, tokenizer=None, device="cpu") -> CloseSentences:
    """The close pairs of a split's manifest rows (`shards.ManifestRow`: sentence_id, text)."""
    first = {}
    for r in rows:
        first.setdefault(int(r.sentence_id), r.text)
    sids, texts = list(first), list(first.values())
    if kind == "jaccard":
        return jaccard_pairs(sids, texts, threshold)
    if kind == "cosine":
        return cosine_pairs(sids, text_embeddings(model, tokenizer, texts, device), threshold)
    raise ValueError(f"close-text kind {kind!r}: use 'cosine' or 'jaccard'")


def close_ce(
    logits: torch.Tensor, pos_offset: int, q_ids: torch.Tensor, k_ids: torch.Tensor, close: torch.Tensor, soft: float
) -> torch.Tensor:
    """Mean over rows of the InfoNCE of (b, n) `logits` (row i's positive at column pos_offset + i):
    identical-sentence columns leave the softmax; `close` (b, n) columns leave it too (soft = 0) or are
    weighted positives (soft = w > 0: target 1 - w on the positive, w / |close_i| on each close column;
    a row without close columns keeps target 1 on its positive)."""
    b = logits.shape[0]
    rows = torch.arange(b, device=logits.device)
    pos = rows + pos_offset
    same = q_ids[:, None] == k_ids[None, :]
    same[rows, pos] = False
    close = close & ~same
    close[rows, pos] = False
    if soft == 0:
        z = logits.masked_fill(same | close, float("-inf"))
        return (torch.logsumexp(z, dim=1) - z[rows, pos]).mean()
    z = logits.masked_fill(same, float("-inf"))
    logp = z - torch.logsumexp(z, dim=1, keepdim=True)
    k = close.sum(1, keepdim=True).to(logp.dtype)
    target = torch.where(close, soft / k.clamp_min(1), torch.zeros((), dtype=logp.dtype, device=logp.device))
    target[rows, pos] = 1.0 - soft * (k[:, 0] > 0).to(logp.dtype)
    return -(target * logp.masked_fill(same, 0.0)).sum(1).mean()
