"""The false-negative methods (docs/pair_selection.md, "Keeping false negatives out") against brute force: the
close-text pairs (Jaccard, cosine) and their
masks on known pairs, the hard and soft close-text losses against per-row loops (values and gradients),
the heads' close-text path with no close pair against their own loss, and the planner's separation rule
(`selection.separate_close`) and `allow_same_sentence` against brute-force greedy."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from sclslt.data.shards import ManifestRow
from sclslt.data.text import sentence_id
from sclslt.model import close_text
from sclslt.model.close_text import CloseSentences, close_ce, jaccard_pairs
from sclslt.model.heads import get_head
from sclslt.selection.scoring import Table
from tests.unit.selection.test_selection import make_table, plan, rows_of

WORDS = "the rain falls in the north today tomorrow wind strong weak sun cloud snow".split()


def random_texts(n: int, seed: int) -> list[str]:
    r = random.Random(seed)
    return list(dict.fromkeys(" ".join(r.choice(WORDS[:8]) for _ in range(r.randint(2, 5))) for _ in range(n)))


def jaccard(a: str, b: str) -> float:
    x, y = set(a.split()), set(b.split())
    return len(x & y) / len(x | y)


@pytest.mark.parametrize("threshold", [0.5, 0.7])
def test_jaccard_pairs_equal_brute_force_and_mask_known_pairs(threshold):
    texts = random_texts(120, 0)
    sids = [sentence_id(t) for t in texts]
    close = jaccard_pairs(sids, texts, threshold)
    want = {
        (sids[i], sids[j])
        for i in range(len(texts))
        for j in range(len(texts))
        if i != j and jaccard(texts[i], texts[j]) >= threshold
    }
    got = {tuple(p) for p in close.pairs().tolist()}
    assert got == want and len(want) > 10
    # the (b, n) mask of rows against columns, columns repeated and one unknown sentence id
    rows = torch.tensor(sids[:7])
    cols = torch.tensor(sids[:20] + sids[:3] + [12345])
    m = close.mask(rows, cols)
    assert m.tolist() == [[(int(a), int(b)) in want for b in cols] for a in rows]
    assert not m[:, -1].any() and not m[torch.arange(7), torch.arange(7)].any()  # never a sentence with itself


def test_cosine_pairs_equal_brute_force_and_the_table_round_trips(tmp_path):
    g = torch.Generator().manual_seed(1)
    emb = torch.randn(50, 4, generator=g)
    sids = torch.randperm(10**6, generator=g)[:50].tolist()
    close = close_text.cosine_pairs(sids, emb, 0.8)
    cos = F.normalize(emb.double(), dim=-1) @ F.normalize(emb.double(), dim=-1).t()
    want = {(sids[i], sids[j]) for i in range(50) for j in range(50) if i != j and cos[i, j] >= 0.8}
    assert {tuple(p) for p in close.pairs().tolist()} == want and want
    close.save(tmp_path / "c.safetensors")
    back = CloseSentences.load(tmp_path / "c.safetensors", soft=0.3)
    assert torch.equal(back.codes, close.codes) and torch.equal(back.sids, close.sids) and back.soft == 0.3


def test_build_from_manifest_rows_takes_each_sentence_once():
    texts = ["rain in the north", "rain in the north today", "sun", "rain in the north"]
    rows = [ManifestRow(f"k{i}", 0, sentence_id(t), 5, t) for i, t in enumerate(texts)]
    close = close_text.build("jaccard", 0.7, rows)
    a, b, c = (sentence_id(t) for t in texts[:3])
    assert {tuple(p) for p in close.pairs().tolist()} == {(a, b), (b, a)} and len(close.sids) == 3
    with pytest.raises(ValueError, match="kind"):
        close_text.build("edit", 0.7, rows)


def loop_ce(logits, offset, ids, col_ids, close, soft):
    """Row by row from the definition, in float64."""
    total = 0.0
    for i in range(logits.shape[0]):
        p = offset + i
        keep = [j for j in range(logits.shape[1]) if j == p or ids[i] != col_ids[j]]
        near = [j for j in keep if j != p and close[i, j]]
        if soft == 0:
            keep = [j for j in keep if j not in near]
        lse = torch.logsumexp(logits[i, keep], 0)
        if soft == 0 or not near:
            total = total + lse - logits[i, p]
        else:
            total = (
                total + (1 - soft) * (lse - logits[i, p]) + sum(soft / len(near) * (lse - logits[i, j]) for j in near)
            )
    return total / logits.shape[0]


@pytest.mark.parametrize("soft", [0.0, 0.3])
def test_close_ce_equals_the_row_loop_in_values_and_gradients(soft):
    g = torch.Generator().manual_seed(2)
    b, n, offset = 6, 18, 6
    logits = torch.randn(b, n, generator=g, dtype=torch.float64, requires_grad=True)
    col_ids = torch.randint(0, 7, (n,), generator=g)
    ids = col_ids[offset : offset + b].clone()
    close = torch.rand(b, n, generator=g) < 0.3
    close[0] = False  # a row without close columns
    got = close_ce(logits, offset, ids, col_ids, close.clone(), soft)
    want = loop_ce(logits, offset, ids, col_ids, close, soft)
    assert float(got) == pytest.approx(float(want), rel=1e-12)
    (ga,) = torch.autograd.grad(got, logits)
    (gb,) = torch.autograd.grad(want, logits)
    assert torch.allclose(ga, gb, atol=1e-12)
    plain = close_ce(logits, offset, ids, col_ids, torch.zeros(b, n, dtype=torch.bool), soft)
    assert abs(float(plain) - float(got)) > 1e-3  # the close columns change the loss


def head_outputs(sim: str, b: int, n: int, seed: int):
    g = torch.Generator().manual_seed(seed)
    if sim == "pooled":
        mk = lambda m: F.normalize(torch.randn(m, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        cols = {"video_emb": mk(n), "text_emb": mk(n)}
    else:
        mk = lambda m, t: F.normalize(torch.randn(m, t, 16, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
        cols = {
            "video_tokens": mk(n, 5),
            "video_mask": torch.rand(n, 5, generator=g) < 0.8,
            "text_tokens": mk(n, 4),
            "text_mask": torch.rand(n, 4, generator=g) < 0.8,
        }
        cols["video_mask"][:, 0] = cols["text_mask"][:, 0] = True
    return cols


@pytest.mark.parametrize("sim", ["pooled", "cico"])
def test_a_head_close_loss_without_close_pairs_is_its_loss_and_with_them_the_row_loop(sim):
    """Local rows (the columns' slice at `offset`) against the columns: no close pair gives the head's own
    (fused path) loss and gradients; close pairs give the per-row definition in both directions."""
    head = get_head(sim)
    b, n, offset = 4, 12, 4
    cols = head_outputs(sim, b, n, 3)
    col_ids = torch.tensor([1, 2, 3, 1, 5, 6, 7, 8, 9, 5, 2, 4])
    ids = col_ids[offset : offset + b]
    out = {k: v[offset : offset + b] for k, v in cols.items()}
    out["logit_scale"] = torch.tensor(10.0, dtype=torch.float64)
    leaves = [v for v in cols.values() if v.requires_grad]
    cols["ids"] = col_ids
    none = CloseSentences(torch.unique(col_ids), torch.zeros(0, dtype=torch.long))
    a = head.close_loss(out, ids, cols, offset, 0.07, none)
    want = head.loss(out, ids, cols, offset, 0.07)
    assert float(a) == pytest.approx(float(want), rel=1e-9)
    for x, y in zip(torch.autograd.grad(a, leaves), torch.autograd.grad(want, leaves)):
        assert torch.allclose(x, y, atol=1e-9)
    # sentences 5 and 9 close, 8 and 2 close: row 0 (sentence 5) with column 8, row 3 (8) with columns 1, 10
    sids = torch.unique(col_ids)
    u = len(sids)
    ix = {int(s): i for i, s in enumerate(sids)}
    codes = torch.tensor(sorted(ix[x] * u + ix[y] for x, y in [(5, 9), (9, 5), (8, 2), (2, 8)]))
    for soft in (0.0, 0.4):
        close = CloseSentences(sids, codes, soft)
        got = head.close_loss(out, ids, cols, offset, 0.07, close)
        fields = head.columns
        v2t = head.scores({k: out[k] if k.startswith("video") else cols[k] for k in fields}, 0.07) * 10.0
        t2v = head.scores({k: cols[k] if k.startswith("video") else out[k] for k in fields}, 0.07).t() * 10.0
        m = close.mask(ids, col_ids)
        assert m.nonzero().tolist() == [[0, 8], [3, 1], [3, 10]]
        ref = 0.5 * (loop_ce(v2t, offset, ids, col_ids, m, soft) + loop_ce(t2v, offset, ids, col_ids, m, soft))
        assert float(got) == pytest.approx(float(ref), rel=1e-9)
        assert abs(float(got) - float(want)) > 1e-4


def sym(t, which, i, j):
    v, tt = (t.v0, t.t0) if which == 0 else (t.v1, t.t1)
    return float(v[i] @ tt[j] + tt[i] @ v[j]) / 2


def test_close_thresholds_are_the_top_q_of_negative_pairs_at_each_checkpoint():
    from sclslt.selection.separation import close_thresholds, threshold_keys

    t = make_table(n=200, n_sent=150, seed=7)
    q = 0.05
    sample = threshold_keys(t.keys, 3)
    assert sorted(sample) == sorted(t.keys)  # fewer clips than THRESHOLD_ROWS: all of them
    th = close_thresholds(t, sample, q)
    neg = [(i, j) for i in range(200) for j in range(200) if t.sentence_ids[i] != t.sentence_ids[j]]
    for k in (0, 1):
        above = sum(sym(t, k, i, j) >= th[k] for i, j in neg) / len(neg)
        assert above == pytest.approx(q, abs=0.002)
    # a property of the table, not of the rows' order (a pool's table lists its rows in the epoch's order)
    perm = torch.randperm(200, generator=torch.Generator().manual_seed(1))
    shuffled = Table(
        keys=[t.keys[i] for i in perm],
        sentence_ids=t.sentence_ids[perm],
        v0=t.v0[perm],
        t0=t.t0[perm],
        v1=t.v1[perm],
        t1=t.t1[perm],
    )
    assert threshold_keys(shuffled.keys, 3) == sample
    assert close_thresholds(shuffled, threshold_keys(shuffled.keys, 3), q) == pytest.approx(th, abs=1e-12)
    few = threshold_keys(t.keys, 3, rows=50)
    assert len(few) == 50 and few == threshold_keys(list(reversed(t.keys)), 3, rows=50)


def brute_force_separated(t, pool, batch, n_batches, q, first_rows, th):
    """Exact greedy from the definitions with the separation rule: candidates that share a member's
    sentence or are close to a member (s_early and s_late both at or above the thresholds) are passed over,
    unless no other candidate is left (then only the sentence rule holds)."""
    used, out = set(), []
    close = lambda u, c: sym(t, 0, u, c) >= th[0] and sym(t, 1, u, c) >= th[1]
    d = lambda i, j: float(t.v1[i] @ t.t1[j] - t.v0[i] @ t.t0[j])
    for b in range(n_batches):
        members = [first_rows[b]]
        used.add(first_rows[b])
        while len(members) < batch:
            sids = {int(t.sentence_ids[c]) for c in members}
            free = [u for u in pool if u not in used and int(t.sentence_ids[u]) not in sids]
            cands = [u for u in free if not any(close(u, c) for c in members)] or free  # the relaxation
            scores = [sum(d(u, c) + d(c, u) for c in members) for u in cands]
            order = [c for _, c in sorted(zip(scores, cands), key=lambda x: x[0])]
            members.append(order[math.ceil(q * (len(order) - 1) - 0.5)])
            used.add(members[-1])
        out.append(members)
    return out


def false_negative_table() -> "Table":
    """48 clips whose views barely move between the checkpoints (Delta near 0), except six partners j of clips
    i: one direction for all four views of i, and j's views near it, closer at the late checkpoint. The
    pairs (i, j) are close at both checkpoints and the only pairs whose similarity rose: the hard
    schedule's first choice whenever one of them is a member."""
    t = make_table(n=48, e=64, n_sent=48, seed=3)
    g = torch.Generator().manual_seed(9)
    drift = lambda x: F.normalize(x + 0.1 * torch.randn(x.shape, generator=g, dtype=x.dtype), dim=-1)
    t.v1, t.t1 = drift(t.v0), drift(t.t0)  # small moves (no exact ties of Delta)
    for i, j in [(0, 1), (2, 3), (4, 5), (6, 7), (8, 9), (10, 11)]:
        d, r = t.v0[i], F.normalize(torch.randn(64, generator=g, dtype=torch.float64), dim=-1)
        t.t0[i] = t.v1[i] = t.t1[i] = d
        t.v0[j] = t.t0[j] = F.normalize(d + 0.6 * r, dim=-1)
        t.v1[j] = t.t1[j] = F.normalize(d + 0.1 * r, dim=-1)
    return t


@pytest.mark.parametrize("schedule,world", [("hard", 1), ("log", 2)])
def test_separation_rule_equals_brute_force_and_keeps_close_pairs_apart(schedule, world):
    t = false_negative_table()
    batches, planner = plan(t, 6, epoch=1, epochs=4, seed=4, world=world, schedule=schedule, separate_close=0.005)
    th = planner.close
    pool = rows_of(t, planner.pools(t.keys, 1)[0])
    got = [rows_of(t, b) for b in batches]
    assert got == brute_force_separated(t, pool, 6, 8, planner.quantile(1, 4), [b[0] for b in got], th)
    together = lambda bs: sum(
        sym(t, 0, i, j) >= th[0] and sym(t, 1, i, j) >= th[1] for b in bs for i in b for j in b if i < j
    )
    assert th is not None and together(got) <= planner.stats.close_relaxed < 6 and planner.stats.relaxed == 0
    # the rule is what keeps them apart: without it the hard schedule puts such pairs together
    plain, _ = plan(t, 6, epoch=1, epochs=4, seed=4, world=world, schedule=schedule)
    if schedule == "hard":
        assert together([rows_of(t, b) for b in plain]) >= 2 > together(got)


def test_allow_same_sentence_plans_as_if_every_clip_had_its_own_sentence():
    t = make_table(n=64, n_sent=10, seed=8)
    allowed, p = plan(t, 8, epoch=1, epochs=3, seed=2, allow_same_sentence=True)
    distinct = make_table(n=64, n_sent=10, seed=8)
    distinct.sentence_ids = torch.arange(64)
    want, _ = plan(distinct, 8, epoch=1, epochs=3, seed=2)
    assert allowed == want and p.stats.relaxed == 0
    kept, q = plan(t, 8, epoch=1, epochs=3, seed=2)
    dup = lambda bs: sum(len(b) - len(set(t.sentence_ids[rows_of(t, b)].tolist())) for b in bs)
    assert dup(allowed) > dup(kept)


def test_cico_split_directions_score_each_direction_with_its_own_term():
    """model.cico_directions split: video->text rows by i2t, text->video rows by t2i (CiCo's code); the
    default averages the two in both directions."""
    from sclslt_kernels import cico_similarity_reference, masked_ce

    head = get_head("cico")
    b, n, offset = 3, 9, 3
    cols = head_outputs("cico", b, n, 4)
    col_ids = torch.arange(n)
    ids = col_ids[offset : offset + b]
    out = {k: v[offset : offset + b] for k, v in cols.items()}
    out["logit_scale"] = torch.tensor(10.0, dtype=torch.float64)
    cols["ids"] = col_ids
    keys = ("video_tokens", "video_mask", "text_tokens", "text_mask")
    ref = lambda vsrc, tsrc, part: cico_similarity_reference(
        *(vsrc[k] for k in keys[:2]), *(tsrc[k] for k in keys[2:]), 0.07, part
    )
    for mode, (pv, pt) in (("split", ("i2t", "t2i")), ("average", ("mean", "mean"))):
        got = head.loss({**out, "cico_directions": mode}, ids, cols, offset, 0.07)
        want = 0.5 * (
            masked_ce(10.0 * ref(out, cols, pv), offset, ids, col_ids)
            + masked_ce(10.0 * ref(cols, out, pt).t(), offset, ids, col_ids)
        )
        assert float(got) == pytest.approx(float(want), rel=1e-9), mode
    split = head.loss({**out, "cico_directions": "split"}, ids, cols, offset, 0.07)
    assert abs(float(split) - float(head.loss(out, ids, cols, offset, 0.07))) > 1e-4


def test_close_text_logits_of_bf16_embeddings_are_fp32_products():
    """The close-text loss of bf16 embeddings (what GPUs train with) at logit scale 100, 256 near-duplicate
    columns: equal to the fp64 loss of the same rounded embeddings within 1e-4, and so are its gradients.
    Mutation caught: the pooled head's scores as a bf16 matmul widened afterwards (the product rounded to 2^-8,
    +-0.2 at scale 100: loss off by ~1e-2; checked)."""
    g = torch.Generator().manual_seed(7)
    b, n, d, offset = 16, 256, 512, 32
    base = torch.randn(1, d, generator=g)  # similar sentences: logits crowd near 1
    cols = {
        k: F.normalize(base + 0.15 * torch.randn(n, d, generator=g), dim=-1).bfloat16()
        for k in ("video_emb", "text_emb")
    }
    col_ids = torch.arange(n) % 200
    sids = torch.unique(col_ids)
    codes = torch.tensor(sorted({int(i) * len(sids) + int(i + 1) for i in range(0, 198, 7)}))
    close = CloseSentences(sids, codes, 0.0)
    head = get_head("pooled")

    def loss(dtype):
        leaves = {k: v.to(dtype).requires_grad_() for k, v in cols.items()}
        out = {k: v[offset : offset + b] for k, v in leaves.items()}
        out["logit_scale"] = torch.tensor(100.0, dtype=dtype)
        value = head.close_loss(out, col_ids[offset : offset + b], {**leaves, "ids": col_ids}, offset, 0.07, close)
        return value, torch.autograd.grad(value, list(leaves.values()))

    got, got_grads = loss(torch.bfloat16)
    want, want_grads = loss(torch.float64)
    assert got.dtype == torch.float32
    got, want = float(got.detach()), float(want.detach())
    assert abs(got - want) <= 1e-4 * abs(want), (got, want)
    for a, w in zip(got_grads, want_grads):
        assert (a.double() - w).abs().max() <= 1e-2 * w.abs().max()  # bf16 gradients: their own rounding
