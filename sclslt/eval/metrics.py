"""Evaluation: decode a split (sharded across ranks), BLEU-1..4 and chrF with sacrebleu's signatures, ROUGE-L.

- BLEU is sacrebleu's corpus BLEU at max n-gram order 1..4 with the tokenizer stated in the config
  (`eval.bleu_tokenize`: 13a for German/English, zh or char for Chinese). Its signature (of BLEU-4)
  is printed and saved, so a number can always be reproduced with `python -m sacrebleu`.
- chrF is sacrebleu's `CHRF` with its defaults: chrF2 (beta 2), character n-grams up to 6, no word
  n-grams, whitespace ignored. It works on characters and does not use the BLEU tokenizer; its own
  signature is saved as `chrf_signature`.
- ROUGE-L is the sentence-level LCS F-measure (beta = 1.2) averaged over the corpus, the variant SLT
  papers report (NMT's rouge script). Its tokens are sacrebleu's tokenizer output for the configured
  `tokenize`, split on whitespace: 13a-tokenized words for de/en (punctuation split off), single
  characters for zh/char (`zh` keeps runs of Latin letters or digits together, as sacrebleu does;
  `char` makes every non-space character a token). So CSL-Daily's ROUGE-L is character-level like
  its BLEU. `rouge_l(..., tokenize=None)` splits on whitespace only; tests check that path against
  the `rouge-score` package and the zh path against a brute-force LCS on characters.

`write_report` writes one split's metrics, signatures and every hypothesis as one JSON file.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import torch

from sclslt.atomic import write_text


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


def rouge_tokenizer(tokenize: str | None):
    """str -> list of ROUGE-L tokens: sacrebleu's tokenizer `tokenize` then whitespace split
    (None: whitespace split only)."""
    if tokenize is None:
        return str.split
    from sacrebleu.metrics import BLEU

    tok = BLEU(tokenize=tokenize).tokenizer  # the very tokenizer BLEU uses (it rstrips lines too)
    return lambda text: tok(text.rstrip()).split()


def rouge_l_sentence(hyp: str, ref: str, beta: float = 1.2, tokenize: str | None = None) -> float:
    split = rouge_tokenizer(tokenize)
    return _rouge_l_tokens(split(hyp), split(ref), beta)


def _rouge_l_tokens(h: list[str], r: list[str], beta: float) -> float:
    lcs = lcs_length(h, r)
    if lcs == 0:
        return 0.0
    p, rc = lcs / len(h), lcs / len(r)
    return (1 + beta**2) * p * rc / (rc + beta**2 * p)


def rouge_l(hyps: list[str], refs: list[str], beta: float = 1.2, tokenize: str | None = None) -> float:
    """Corpus ROUGE-L F (x100): mean of sentence scores. Tokens: see the module docstring."""
    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    split = rouge_tokenizer(tokenize)
    total = sum(_rouge_l_tokens(split(h), split(r), beta) for h, r in zip(hyps, refs))
    return 100.0 * total / max(len(refs), 1)


def compute_metrics(hyps: list[str], refs: list[str], tokenize: str = "13a") -> dict:
    """{bleu1..bleu4, bleu_signature, chrf, chrf_signature, rouge_l, n} of a corpus (one reference each).

    `tokenize` is sacrebleu's tokenizer for BLEU and ROUGE-L (13a for de/en, zh or char for Chinese);
    chrF is on characters whatever it is (sacrebleu's default chrF2)."""
    from sacrebleu.metrics import BLEU, CHRF

    if len(hyps) != len(refs):
        raise ValueError(f"{len(hyps)} hypotheses vs {len(refs)} references")
    out: dict = {}
    for n in range(1, 5):
        bleu = BLEU(max_ngram_order=n, tokenize=tokenize)
        out[f"bleu{n}"] = bleu.corpus_score(hyps, [refs]).score
        if n == 4:
            out["bleu_signature"] = str(bleu.get_signature())
    chrf = CHRF()
    out["chrf"] = chrf.corpus_score(hyps, [refs]).score
    out["chrf_signature"] = str(chrf.get_signature())
    out["rouge_l"] = rouge_l(hyps, refs, tokenize=tokenize)
    out["n"] = len(refs)
    return out


def write_report(path, result: dict, rows: list[dict]) -> Path:
    """One split's report as JSON: `result` (split, metrics with their signatures, baseline, beam, ...)
    plus every hypothesis as {key, hyp, ref}, in split order. Written to a temporary file in the same
    directory, flushed to disk and renamed over `path`, so a reader never sees a partial file."""
    path = Path(path)
    hyps = []
    for i, r in enumerate(rows):
        missing = [k for k in ("key", "hyp", "ref") if k not in r]
        if missing:
            raise ValueError(f"report row {i} lacks {missing} (has {sorted(r)})")
        hyps.append({"key": r["key"], "hyp": r["hyp"], "ref": r["ref"]})
    if "hypotheses" in result:
        raise ValueError("result already has a 'hypotheses' entry")
    doc = {**result, "hypotheses": hyps}
    return write_text(path, json.dumps(doc, ensure_ascii=False, indent=1) + "\n")


def most_frequent_sentence(texts: list[str]) -> str:
    counts = Counter(texts)
    best = max(counts.values())
    return min(t for t, c in counts.items() if c == best)  # ties broken deterministically


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
