"""Evaluation: decode a split (sharded across ranks), BLEU-1..4 with sacrebleu's signature, ROUGE-L.

BLEU is sacrebleu's corpus BLEU at max n-gram order 1..4 with the tokenizer stated in the config
(13a for German/English, zh or char for Chinese) and its signature printed and saved, so a number
can always be reproduced. ROUGE-L is the sentence-level LCS F-measure (beta = 1.2) averaged over
the corpus, the variant SLT papers report (NMT's rouge script); tests check it against the
`rouge-score` package on whitespace tokens.
"""
from __future__ import annotations

from collections import Counter

import torch


def lcs_length(a: list[str], b: list[str]) -> int:
    if not a or not b:
        return 0
    prev = [0] * (len(b) + 1)
    for x in a:
        cur = [0] * (len(b) + 1)
        for j, y in enumerate(b, 1):
            cur[j] = prev[j - 1] + 1 if x == y else max(prev[j], cur[j - 1])
        prev = cur
    return prev[-1]


def rouge_l_sentence(hyp: str, ref: str, beta: float = 1.2) -> float:
    h, r = hyp.split(), ref.split()
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return (1 + beta ** 2) * p * rc / (rc + beta ** 2 * p)


def rouge_l(hyps: list[str], refs: list[str], beta: float = 1.2) -> float:
    """Corpus ROUGE-L F (x100): mean of sentence scores."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    return 100.0 * sum(rouge_l_sentence(h, r, beta) for h, r in zip(hyps, refs)) / max(len(refs), 1)


def compute_metrics(hyps: list[str], refs: list[str], tokenize: str = "13a") -> dict:
    from sacrebleu.metrics import BLEU
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    out: dict = {}
    for n in range(1, 5):
        bleu = BLEU(max_ngram_order=n, tokenize=tokenize)
        out[f"bleu{n}"] = bleu.corpus_score(hyps, [refs]).score
        if n == 4:
            out["bleu_signature"] = str(bleu.get_signature())
    out["rouge_l"] = rouge_l(hyps, refs)
    out["n"] = len(refs)
    return out


def most_frequent_sentence(texts: list[str]) -> str:
    counts = Counter(texts)
    best = max(counts.values())
    return min(t for t, c in counts.items() if c == best)   # ties broken deterministically


@torch.no_grad()
def decode_loader(model, loader, tokenizer, device, beam: int, max_len: int) -> list[dict]:
    """Hypotheses for every batch of `loader`: [{key, hyp, ref}]."""
    model.eval()
    rows = []
    for batch in loader:
        batch = batch.to(device)
        out = model.generate(batch.frames, batch.frame_mask, beam=beam, max_len=max_len)
        hyps = tokenizer.batch_decode(out, skip_special_tokens=True)
        rows += [{"key": k, "hyp": h.strip(), "ref": r} for k, h, r in zip(batch.keys, hyps, batch.texts)]
    return rows
