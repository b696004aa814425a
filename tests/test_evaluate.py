"""Metrics against the reference implementations: sacrebleu's command line and the rouge-score package."""
import random
import subprocess
import sys

import pytest

from sclslt.evaluate import compute_metrics, most_frequent_sentence, rouge_l

WORDS = "der die das abend morgen regen sonne wind nord sued heute morgen kalt warm wolken".split()


def _corpus(seed, n=40):
    rng = random.Random(seed)
    refs = [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 9))) for _ in range(n)]
    hyps = []
    for r in refs:
        w = r.split()
        for _ in range(rng.randint(0, 3)):               # corrupt a few words
            w[rng.randrange(len(w))] = rng.choice(WORDS)
        if rng.random() < 0.3:
            w = w[: max(1, len(w) - 2)]
        hyps.append(" ".join(w))
    return hyps, refs


def naive_bleu(hyps, refs, n_max):
    """Corpus BLEU-n from clipped n-gram counts on 13a tokens (no smoothing needed: no zero counts here)."""
    import math
    from collections import Counter
    from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
    tok = Tokenizer13a()
    match, total = [0] * n_max, [0] * n_max
    hl = rl = 0
    for h, r in zip(hyps, refs):
        h, r = tok(h).split(), tok(r).split()
        hl, rl = hl + len(h), rl + len(r)
        for n in range(1, n_max + 1):
            hc = Counter(tuple(h[i:i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i:i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += sum(hc.values())
    bp = 1.0 if hl > rl else math.exp(1 - rl / hl)
    return 100 * bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / n_max)


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_equals_sacrebleu_command_line_and_counts(tmp_path, seed):
    hyps, refs = _corpus(seed)
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n")
    ours = compute_metrics(hyps, refs, "13a")
    out = subprocess.run([sys.executable, "-m", "sacrebleu", str(tmp_path / "ref.txt"), "-i",
                          str(tmp_path / "hyp.txt"), "-m", "bleu", "-tok", "13a", "-b", "-w", "6"],
                         capture_output=True, text=True, check=True)
    assert abs(float(out.stdout.strip()) - ours["bleu4"]) < 1e-4
    for n in range(1, 5):           # the CLI has no n-gram order option: BLEU-1..3 against the counts
        assert ours[f"bleu{n}"] == pytest.approx(naive_bleu(hyps, refs, n), rel=1e-9), n
    assert "tok:13a" in ours["bleu_signature"] and "version" in ours["bleu_signature"]


@pytest.mark.parametrize("seed", [0, 3])
def test_rouge_l_equals_rouge_score_package(seed):
    from rouge_score import rouge_scorer, tokenizers

    class Whitespace(tokenizers.Tokenizer):
        def tokenize(self, text):
            return text.split()
    hyps, refs = _corpus(seed)
    # rouge-score's F-measure is beta = 1; ours defaults to the SLT papers' beta = 1.2
    sc = rouge_scorer.RougeScorer(["rougeL"], tokenizer=Whitespace())
    want = 100 * sum(sc.score(r, h)["rougeL"].fmeasure for h, r in zip(hyps, refs)) / len(refs)
    assert abs(rouge_l(hyps, refs, beta=1.0) - want) < 1e-9
    assert rouge_l(refs, refs) == pytest.approx(100.0)


def test_most_frequent_sentence_breaks_ties_deterministically():
    assert most_frequent_sentence(["b", "a", "b", "a", "c"]) == "a"
    assert most_frequent_sentence(["x", "y", "y"]) == "y"
