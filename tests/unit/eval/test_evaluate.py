"""Metrics against the reference implementations: sacrebleu's command line, n-gram counts, the
rouge-score package and a brute-force LCS; the per-split report file."""

import itertools
import json
import os
import random
import subprocess
import sys

import pytest

from sclslt.eval.metrics import compute_metrics, most_frequent_sentence, rouge_l, write_report

WORDS = "der die das abend morgen regen sonne wind nord sued heute morgen kalt warm wolken".split()
HANZI = list("我你他是的不了在有人这中大为上个国和地到以说时要就出会可也天气明")


def _corpus(seed, n=40, zh=False):
    """Hypotheses = references with a few tokens replaced and some truncated; zh: Chinese characters
    without spaces (a CSL-Daily-like text), else space-separated German words."""
    rng = random.Random(seed)
    vocab, sep = (HANZI, "") if zh else (WORDS, " ")
    refs = [[rng.choice(vocab) for _ in range(rng.randint(3, 9))] for _ in range(n)]
    hyps = []
    for r in refs:
        w = list(r)
        for _ in range(rng.randint(0, 3)):  # corrupt a few tokens
            w[rng.randrange(len(w))] = rng.choice(vocab)
        if rng.random() < 0.3:
            w = w[: max(1, len(w) - 2)]
        hyps.append(sep.join(w))
    return hyps, [sep.join(r) for r in refs]


def _sacrebleu_cli(tmp_path, hyps, refs, tokenize):
    """sacrebleu's own command line on the same files: [{name, score, signature, ...}] for BLEU, chrF."""
    (tmp_path / "hyp.txt").write_text("\n".join(hyps) + "\n", encoding="utf-8")
    (tmp_path / "ref.txt").write_text("\n".join(refs) + "\n", encoding="utf-8")
    out = subprocess.run(
        [
            sys.executable,
            "-m",
            "sacrebleu",
            str(tmp_path / "ref.txt"),
            "-i",
            str(tmp_path / "hyp.txt"),
            "-m",
            "bleu",
            "chrf",
            "-tok",
            tokenize,
            "-w",
            "6",
        ],
        capture_output=True,
        text=True,
        check=True,
        env={**os.environ, "PYTHONIOENCODING": "utf-8"},
    )
    return {d["name"]: d for d in json.loads(out.stdout)}


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
            hc = Counter(tuple(h[i : i + n]) for i in range(len(h) - n + 1))
            rc = Counter(tuple(r[i : i + n]) for i in range(len(r) - n + 1))
            match[n - 1] += sum(min(c, rc[g]) for g, c in hc.items())
            total[n - 1] += sum(hc.values())
    bp = 1.0 if hl > rl else math.exp(1 - rl / hl)
    return 100 * bp * math.exp(sum(math.log(m / t) for m, t in zip(match, total)) / n_max)


@pytest.mark.parametrize("seed", [0, 1])
def test_bleu_equals_counts(seed):
    hyps, refs = _corpus(seed)
    ours = compute_metrics(hyps, refs, "13a")
    for n in range(1, 5):  # the CLI has no n-gram order option: BLEU-1..4 against the counts
        assert ours[f"bleu{n}"] == pytest.approx(naive_bleu(hyps, refs, n), rel=1e-9), n
    assert "tok:13a" in ours["bleu_signature"] and "version" in ours["bleu_signature"]


@pytest.mark.parametrize("tokenize,zh,seed", [("13a", False, 0), ("13a", False, 1), ("zh", True, 2), ("char", True, 3)])
def test_bleu_and_chrf_equal_sacrebleu_command_line(tmp_path, tokenize, zh, seed):
    """BLEU-4 and chrF2, scores and signatures, as `python -m sacrebleu ref -i hyp -m bleu chrf -tok T`."""
    hyps, refs = _corpus(seed, zh=zh)
    ours = compute_metrics(hyps, refs, tokenize)
    cli = _sacrebleu_cli(tmp_path, hyps, refs, tokenize)
    assert set(cli) == {"BLEU", "chrF2"}
    assert abs(cli["BLEU"]["score"] - ours["bleu4"]) < 1e-5
    assert abs(cli["chrF2"]["score"] - ours["chrf"]) < 1e-5
    assert cli["BLEU"]["signature"] == ours["bleu_signature"]
    assert cli["chrF2"]["signature"] == ours["chrf_signature"]
    assert f"tok:{tokenize}" in ours["bleu_signature"]
    assert "nc:6|nw:0" in ours["chrf_signature"]
    assert 0 < ours["bleu4"] < 100 and 0 < ours["chrf"] < 100


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


def brute_force_lcs(a: str, b: str) -> int:
    """The longest subsequence of `a` (every subset of its positions, longest first) found in `b`."""

    def is_subseq(s, t):
        it = iter(t)
        return all(c in it for c in s)

    for n in range(min(len(a), len(b)), 0, -1):
        if any(is_subseq([a[i] for i in idx], b) for idx in itertools.combinations(range(len(a)), n)):
            return n
    return 0


@pytest.mark.parametrize("tokenize", ["zh", "char"])
def test_rouge_l_chinese_is_on_characters(tokenize):
    hyps, refs = _corpus(5, n=30, zh=True)
    beta = 1.2
    want = 0.0
    for h, r in zip(hyps, refs):
        lcs = brute_force_lcs(h, r)
        if lcs:
            p, rc = lcs / len(h), lcs / len(r)
            want += (1 + beta**2) * p * rc / (rc + beta**2 * p)
    want = 100 * want / len(refs)
    assert compute_metrics(hyps, refs, tokenize)["rouge_l"] == pytest.approx(want, rel=1e-12)
    assert rouge_l(hyps, refs, tokenize=tokenize) == pytest.approx(want, rel=1e-12)
    # on whitespace tokens each Chinese sentence would be one token: ROUGE-L would be all-or-nothing
    assert rouge_l(hyps, refs) != pytest.approx(want)
    # sacrebleu's zh keeps a Latin word whole; char splits it
    assert rouge_l(["abc天"], ["abd天"], tokenize="zh") < rouge_l(["abc天"], ["abd天"], tokenize="char")


def test_rouge_l_13a_tokens_split_punctuation():
    """de/en: ROUGE-L on 13a tokens (the BLEU tokens), so a comma is its own token."""
    assert rouge_l(["regen , sonne"], ["regen, sonne"], tokenize="13a") == pytest.approx(100.0)
    assert rouge_l(["regen , sonne"], ["regen, sonne"]) < 100.0
    hyps, refs = _corpus(4)  # no punctuation: 13a = whitespace tokens
    assert compute_metrics(hyps, refs, "13a")["rouge_l"] == pytest.approx(rouge_l(hyps, refs), rel=1e-12)


def test_write_report_is_complete_json_and_atomic(tmp_path, monkeypatch):
    hyps, refs = _corpus(0, n=5)
    rows = [{"key": f"k{i}", "hyp": h, "ref": r, "extra": 1} for i, (h, r) in enumerate(zip(hyps, refs))]
    rows[0]["hyp"] = "ünïcode 天气"
    result = {"split": "test", "model": compute_metrics([r["hyp"] for r in rows], refs), "beam": 4}
    path = tmp_path / "sub" / "report.test.json"
    write_report(path, result, rows)
    doc = json.loads(path.read_text(encoding="utf-8"))
    assert doc["split"] == "test" and doc["beam"] == 4
    assert doc["model"]["bleu_signature"].startswith("nrefs:1") and "chrf_signature" in doc["model"]
    assert doc["hypotheses"] == [{"key": r["key"], "hyp": r["hyp"], "ref": r["ref"]} for r in rows]
    assert "ünïcode 天气" in path.read_text(encoding="utf-8")  # written as UTF-8, not ASCII-escaped

    # a failure while writing leaves the previous report in place and no temporary file behind
    import sclslt.atomic

    def boom(*a, **k):  # the temporary file is written, then its fsync fails
        raise OSError("disk full")

    monkeypatch.setattr(sclslt.atomic, "_fsync", boom)
    with pytest.raises(OSError, match="disk full"):
        write_report(path, {"split": "test"}, rows[:1])
    monkeypatch.undo()
    assert json.loads(path.read_text(encoding="utf-8")) == doc
    assert sorted(p.name for p in path.parent.iterdir()) == ["report.test.json"]
    with pytest.raises(ValueError, match="lacks"):
        write_report(path, result, [{"key": "a", "hyp": "b"}])


def test_most_frequent_sentence_breaks_ties_deterministically():
    assert most_frequent_sentence(["b", "a", "b", "a", "c"]) == "a"
    assert most_frequent_sentence(["x", "y", "y"]) == "y"
