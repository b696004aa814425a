"""Unit tests of the synthetic sign corpus (fast, CPU, small configs)."""

from __future__ import annotations

import collections
import itertools
import time

import numpy as np
import pytest

from sclslt.config import SyntheticConfig
from sclslt.data.synthetic import CATEGORIES, SyntheticCorpus


def small_cfg(**kw) -> SyntheticConfig:
    base = dict(
        seed=7,
        n_train=200,
        n_dev=20,
        n_test=30,
        frame_size=32,
        n_signers=4,
        n_templates=40,
        zipf_a=1.1,
        near_dup_frac=0.3,
    )
    base.update(kw)
    return SyntheticConfig(**base)


@pytest.fixture(scope="module")
def corpus() -> SyntheticCorpus:
    return SyntheticCorpus(small_cfg())


@pytest.fixture(scope="module")
def train(corpus) -> list[dict]:
    return list(corpus.samples("train"))


def one_word_apart(a: str, b: str) -> bool:
    wa, wb = a.split(), b.split()
    return len(wa) == len(wb) and sum(x != y for x, y in zip(wa, wb)) == 1


# -- determinism ---------------------------------------------------------------------------------


def test_same_config_gives_identical_samples():
    a, b = SyntheticCorpus(small_cfg()), SyntheticCorpus(small_cfg())
    for split, i in [("train", 0), ("train", 17), ("train", 199), ("dev", 3), ("test", 29)]:
        sa, sb = a.sample(split, i), b.sample(split, i)
        assert sa["key"] == sb["key"] == f"{split}_{i:06d}"
        assert sa["text"] == sb["text"] and sa["glosses"] == sb["glosses"]
        assert sa["signer"] == sb["signer"]
        assert sa["frames"].tobytes() == sb["frames"].tobytes()


def test_sample_does_not_depend_on_generation_order():
    a, b = SyntheticCorpus(small_cfg()), SyntheticCorpus(small_cfg())
    for i in range(10):
        a.sample("train", i)
    late = a.sample("train", 42)
    fresh = b.sample("train", 42)
    assert late["frames"].tobytes() == fresh["frames"].tobytes() and late["text"] == fresh["text"]


def test_different_seed_gives_different_corpus():
    a, b = SyntheticCorpus(small_cfg(seed=1)), SyntheticCorpus(small_cfg(seed=2))
    assert a.pool_texts != b.pool_texts
    sa = [a.sample("train", i) for i in range(5)]
    sb = [b.sample("train", i) for i in range(5)]
    assert [s["text"] for s in sa] != [s["text"] for s in sb]
    assert any(
        x["frames"].shape != y["frames"].shape or not np.array_equal(x["frames"], y["frames"]) for x, y in zip(sa, sb)
    )


def test_splits_differ_from_each_other(corpus):
    tr, dv = corpus.sample("train", 0), corpus.sample("dev", 0)
    assert tr["frames"].shape != dv["frames"].shape or not np.array_equal(tr["frames"], dv["frames"])


# -- splits and sample format --------------------------------------------------------------------


def test_split_sizes(corpus, train):
    assert corpus.split_size("train") == 200 and len(train) == 200
    assert corpus.split_size("dev") == 20 and len(list(corpus.samples("dev"))) == 20
    assert corpus.split_size("test") == 30
    assert [s["key"] for s in train[:3]] == ["train_000000", "train_000001", "train_000002"]


def test_unknown_split_raises(corpus):
    with pytest.raises(ValueError, match="validation"):
        corpus.split_size("validation")
    with pytest.raises(ValueError, match="val"):
        corpus.sample("val", 0)
    with pytest.raises(ValueError):
        list(corpus.samples("training"))
    with pytest.raises(IndexError):
        corpus.sample("dev", 20)


@pytest.mark.parametrize("size", [32, 64])
def test_frames_dtype_shape_range(size):
    cfg = small_cfg(frame_size=size)
    c = SyntheticCorpus(cfg)
    for i in range(8):
        s = c.sample("train", i)
        f = s["frames"]
        assert isinstance(f, np.ndarray) and f.dtype == np.uint8 and f.ndim == 4
        T = f.shape[0]
        assert f.shape[1:] == (size, size, 3)
        n = len(s["glosses"])
        assert n * cfg.min_frames_per_sign <= T <= n * cfg.max_frames_per_sign + 4
        assert f.max() >= 200  # saturated hands are drawn
        assert f.std() > 10  # not a blank clip


def test_text_and_glosses(corpus, train):
    vocab = set(corpus.vocabulary)
    assert 25 <= len(vocab) <= 40 and len(vocab) == len(corpus.vocabulary)
    names = {f"signer{i:02d}" for i in range(corpus.cfg.n_signers)}
    for s in train:
        words = s["text"].split(" ")
        assert s["text"] == " ".join(words) and s["text"] == s["text"].lower()
        assert all(w.isascii() and w.isalpha() for w in words)
        assert 3 <= len(words) <= 8 and set(words) <= vocab
        assert all(g == g.upper() for g in s["glosses"])
        assert sorted(g.lower() for g in s["glosses"]) == sorted(words)
        assert s["signer"] in names
    assert len({s["signer"] for s in train}) == corpus.cfg.n_signers


def test_signers_speed_within_range(corpus):
    cfg = corpus.cfg
    for sg in corpus.signers:
        assert cfg.min_frames_per_sign <= sg.frames_per_sign <= cfg.max_frames_per_sign


# -- statistics: order change, duplicates, near-duplicates -----------------------------------------


def test_sign_order_differs_from_text_order(train):
    differ = sum([g.lower() for g in s["glosses"]] != s["text"].split() for s in train)
    assert differ >= 0.9 * len(train)


def test_adjective_follows_its_noun_in_sign(corpus):
    adjectives = set(CATEGORIES["adjective"])
    nouns = set(CATEGORIES["subject"]) | set(CATEGORIES["object"])
    for text, glosses in zip(corpus.pool_texts, corpus.pool_glosses):
        words, signs = text.split(), [g.lower() for g in glosses]
        for i, w in enumerate(words):
            if w in adjectives:
                noun = words[i + 1]
                assert noun in nouns and signs[signs.index(noun) + 1] == w


def test_exact_duplicates_are_frequent(train):
    counts = collections.Counter(s["text"] for s in train)
    text, n = counts.most_common(1)[0]
    assert n > 1 and n >= 0.05 * len(train)
    assert len(counts) < len(train)


def test_pool_is_distinct_and_has_near_duplicates(corpus, train):
    cfg = corpus.cfg
    assert len(corpus.pool_texts) == cfg.n_templates == len(set(corpus.pool_texts))
    marked = [i for i, p in enumerate(corpus.pool_near_dup_of) if p is not None]
    assert len(marked) == round(cfg.near_dup_frac * cfg.n_templates)
    for i in marked:
        assert one_word_apart(corpus.pool_texts[i], corpus.pool_texts[corpus.pool_near_dup_of[i]])
    distinct_train = sorted({s["text"] for s in train})
    assert any(one_word_apart(a, b) for a, b in itertools.combinations(distinct_train, 2))


def test_zipf_frequencies(corpus):
    p = corpus.pool_probs
    assert np.isclose(p.sum(), 1.0) and np.all(np.diff(p) < 0)
    expected = np.arange(1, len(p) + 1) ** -corpus.cfg.zipf_a
    assert np.allclose(p, expected / expected.sum())


# -- signs are visually distinct ----------------------------------------------------------------------


@pytest.mark.parametrize("seed", [7, 1234])
def test_every_word_has_a_distinct_sign(seed):
    c = SyntheticCorpus(small_cfg(seed=seed))
    keys = [c.signs[w].key() for w in c.vocabulary]
    assert len(set(keys)) == len(keys)
    clips = np.stack([c.render_sign(w).astype(np.float32) for w in c.vocabulary])
    n = len(clips)
    flat = clips.reshape(n, -1)
    dist = np.abs(flat[:, None, :] - flat[None, :, :]).mean(-1)
    off_diag = dist[~np.eye(n, dtype=bool)]
    assert off_diag.min() > 1.0, "two words render (almost) the same sign"


def test_render_sign_unknown_word(corpus):
    with pytest.raises(KeyError):
        corpus.render_sign("xylophone")


def test_invalid_config_raises():
    with pytest.raises(ValueError, match="frames_per_sign"):
        SyntheticCorpus(small_cfg(min_frames_per_sign=6, max_frames_per_sign=4))
    with pytest.raises(ValueError, match="near_dup_frac"):
        SyntheticCorpus(small_cfg(near_dup_frac=1.0))


def test_generation_is_fast():
    c = SyntheticCorpus(small_cfg())
    t = time.perf_counter()
    for i in range(200):
        c.sample("train", i)
    assert time.perf_counter() - t < 5.0  # ~0.3 s expected; 1450 clips must take well under 20 s


# -- paraphrase families ---------------------------------------------------------------


def _fingerprint(c: SyntheticCorpus) -> str:
    import hashlib
    import json

    texts = [c.sample("train", i)["text"] for i in range(50)]
    return hashlib.sha256(
        json.dumps([c.pool_texts, texts]).encode() + c.sample("train", 5)["frames"].tobytes()
    ).hexdigest()[:16]


@pytest.mark.parametrize(
    "kw,want", [({}, "f8b26ede6b9594c4"), ({"near_dup_frac": 0.6, "frame_size": 24}, "1a813ef49637553d")]
)
def test_settings_without_paraphrases_are_the_corpora_made_before_them(kw, want):
    # fingerprints of the default and of experiments/pair_selection/configs/ps_synthetic.yaml's corpus, taken
    # with the generator as it was before paraphrase families existed (git 49a3ba2): old results stay reproducible
    assert _fingerprint(SyntheticCorpus(SyntheticConfig(**kw))) == want


def test_paraphrases_are_other_words_for_the_same_signs():
    cfg = small_cfg(n_templates=120, near_dup_frac=0.3, paraphrase_frac=0.4, paraphrases_per_meaning=3)
    c = SyntheticCorpus(cfg)
    assert len(set(c.pool_texts)) == cfg.n_templates
    paraphrases = [i for i, m in enumerate(c.pool_meaning) if m != i]
    assert len(paraphrases) == round(cfg.paraphrase_frac * cfg.n_templates)
    families = collections.Counter(c.pool_meaning[i] for i in paraphrases)
    assert max(families.values()) >= 2 and len(families) <= len(paraphrases)
    seen = set()
    for i in paraphrases:
        m = c.pool_meaning[i]
        assert c.pool_meaning[m] == m and c.pool_near_dup_of[i] is None  # a root meaning, not a near-dup
        assert c.pool_glosses[i] == c.pool_glosses[m] and c.pool_texts[i] != c.pool_texts[m]
        a, b = c.pool_texts[i].split(), c.pool_texts[m].split()
        content = [w for w in a if w != "the"]
        if "the" in a and "the" not in b:
            seen.add("article")
        if sorted(content) != sorted(w for w in b if w != "the"):
            seen.add("synonym")
        elif content != [w for w in b if w != "the"]:
            seen.add("front_time")
    assert seen == {"article", "synonym", "front_time"}
    # a clip of a paraphrase is signed as its meaning: same glosses, its own words
    for i in range(cfg.n_train):
        sid = c.pool_index("train", i)
        if c.pool_meaning[sid] != sid:
            s = c.sample("train", i)
            assert s["text"] == c.pool_texts[sid] and s["glosses"] == c.pool_glosses[c.pool_meaning[sid]]
            break
    else:
        pytest.fail("no paraphrase drawn in the training split")


def test_paraphrase_settings_are_checked():
    with pytest.raises(ValueError, match="paraphrase_frac"):
        SyntheticCorpus(small_cfg(near_dup_frac=0.5, paraphrase_frac=0.5))
    with pytest.raises(ValueError, match="paraphrases_per_meaning"):
        SyntheticCorpus(small_cfg(paraphrase_frac=0.2, paraphrases_per_meaning=0))


def test_partner_statistics_count_each_kind():
    from experiments.pair_selection import partners as cp

    texts = ["a b c d", "a b c d", "a b c e", "the a b c d", "x y z"]
    meanings = [0, 0, 1, 0, 2]
    st = cp.partner_stats(texts, meanings, jaccard=0.6, batch=3)
    # identical: 0<->1 (2 ordered pairs); near (Jaccard >= 0.6): {0,1}<->2 (3/5: yes), {0,1}<->3 (4/5),
    # 2<->3 (3/6 = 0.5: no) -> 8 ordered pairs, 4 of them paraphrases (same meaning 0)
    assert st["per_clip"]["exact"] == pytest.approx(2 / 5)
    assert st["per_clip"]["near"] == pytest.approx(8 / 5)
    assert st["per_clip"]["near_paraphrase"] == pytest.approx(4 / 5)
    assert st["per_clip"]["near_other_meaning"] == pytest.approx(4 / 5)
    assert st["per_batch_row"]["near"] == pytest.approx(8 / 5 * 2 / 4)
    with pytest.raises(ValueError, match="two meanings"):
        cp.partner_stats(["a", "a"], [0, 1])


def test_train_offset_gives_the_later_clips_of_the_same_language():
    # a pretraining corpus of clips the test bed never trains on: same signs, pool and signers
    bed, pre = SyntheticCorpus(small_cfg(n_train=60)), SyntheticCorpus(small_cfg(n_train=20, train_offset=60))
    assert pre.indices("train") == range(60, 80) and not set(pre.indices("train")) & set(bed.indices("train"))
    longer = SyntheticCorpus(small_cfg(n_train=80))
    a, b = pre.sample("train", 65), longer.sample("train", 65)
    assert a["key"] == b["key"] == "train_000065" and np.array_equal(a["frames"], b["frames"])
    assert [s["key"] for s in pre.samples("dev")] == [s["key"] for s in bed.samples("dev")]
    with pytest.raises(IndexError):
        pre.sample("train", 10)
