"""How many false-negative-like partners a clip has in its corpus: the numbers a test bed is calibrated to.

For every clip of a split, its partners are the other clips whose normalised text is
  exact  identical (the sentence-id mask catches these), or
  near   not identical but sharing most words: token-set Jaccard >= --jaccard (default 0.6).
Reported as the mean number of partners per clip, and as the expected number per row of a global
batch of --batch clips drawn at random (partners x (batch - 1) / (N - 1)), the rate at which a loss
meets them. For the synthetic corpus, whose meanings are known, near partners are split into
paraphrases (same meaning: false negatives no id mask catches) and other meanings (hard
negatives), and paraphrase partners below the Jaccard threshold are counted too.

  python -m experiments.pair_selection.partners --config experiments/pair_selection/configs/ps_paraphrase.yaml
                                                        # the synthetic corpus
  python -m experiments.pair_selection.partners --manifest data/shards/train.json          # any sharded corpus

PHOENIX-2014T train (from GFSLT-VLP's labels, 800 clips against all 7,096): exact 1.23,
near 7.61 partners per clip.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import Counter

PHOENIX = {"clips": 7096, "exact": 1.23, "near": 7.61}


def partner_stats(texts: list[str], meanings: list[int] | None = None, jaccard: float = 0.6, batch: int = 16) -> dict:
    """Mean partners per clip of each kind; `meanings` (one per clip) enables the paraphrase split."""
    n = len(texts)
    if n < 2:
        raise ValueError(f"partner_stats needs at least 2 clips, got {n}")
    count = Counter(texts)
    distinct = sorted(count)
    sets = {t: frozenset(t.split()) for t in distinct}
    meaning_of: dict[str, int] = {}
    if meanings is not None:
        for t, m in zip(texts, meanings):
            if meaning_of.setdefault(t, m) != m:
                raise ValueError(f"text {t!r} has two meanings ({meaning_of[t]}, {m})")
    totals = Counter()
    for a in distinct:
        ca, sa = count[a], sets[a]
        totals["exact"] += ca * (ca - 1)
        for b in distinct:
            if b == a:
                continue
            close = len(sa & sets[b]) / len(sa | sets[b]) >= jaccard
            same = meanings is not None and meaning_of[a] == meaning_of[b]
            w = ca * count[b]
            totals["near"] += w * close
            if meanings is not None:
                totals["near_paraphrase"] += w * (close and same)
                totals["near_other_meaning"] += w * (close and not same)
                totals["paraphrase_all"] += w * same
    per_clip = {k: v / n for k, v in totals.items()}
    scale = (batch - 1) / (n - 1)
    return {
        "clips": n,
        "distinct_texts": len(distinct),
        "jaccard": jaccard,
        "batch": batch,
        "per_clip": per_clip,
        "per_batch_row": {k: v * scale for k, v in per_clip.items()},
        "near_over_exact": per_clip["near"] / per_clip["exact"] if per_clip.get("exact") else None,
    }


def synthetic_texts(config_path: str, split: str) -> tuple[list[str], list[int]]:
    """Texts and meanings of a synthetic split, from the pool alone (no clip is rendered)."""
    from sclslt.config import load_config
    from sclslt.data.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(load_config(config_path).data.synthetic)
    sids = [corpus.pool_index(split, i) for i in corpus.indices(split)]
    return [corpus.pool_texts[s] for s in sids], [corpus.pool_meaning[s] for s in sids]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--config", help="a run config whose data.synthetic describes the corpus")
    src.add_argument("--manifest", help="a shards manifest ({split}.json) of any corpus")
    p.add_argument("--split", default="train")
    p.add_argument("--jaccard", type=float, default=0.6)
    p.add_argument("--batch", type=int, default=16)
    args = p.parse_args(argv)
    if args.config:
        texts, meanings = synthetic_texts(args.config, args.split)
    else:
        from pathlib import Path

        from sclslt.data.shards import manifest_rows, read_manifest

        m = Path(args.manifest)
        texts = [r.text for r in manifest_rows(read_manifest(m.parent, m.stem))]
        meanings = None
    stats = partner_stats(texts, meanings, args.jaccard, args.batch)
    ph = {k: PHOENIX[k] * (args.batch - 1) / (PHOENIX["clips"] - 1) for k in ("exact", "near")}
    stats["phoenix2014t"] = {**PHOENIX, "per_batch_row": ph, "near_over_exact": PHOENIX["near"] / PHOENIX["exact"]}
    print(json.dumps(stats, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
