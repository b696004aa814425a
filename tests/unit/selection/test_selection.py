"""Pair Selection planner: invariants, the curriculum, exact greedy against a brute force, the same plan at any
world size, determinism."""

import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sclslt.config import SelectionConfig
from sclslt.selection.planner import Planner
from sclslt.selection.schedules import curriculum_quantile
from sclslt.selection.scoring import Table
from sclslt.selection.table import load_table, save_table


def make_table(n=96, e=8, n_sent=40, seed=0) -> Table:
    g = torch.Generator().manual_seed(seed)
    emb = {k: F.normalize(torch.randn(n, e, generator=g), dim=-1) for k in ("v0", "t0", "v1", "t1")}
    sids = torch.randint(0, n_sent, (n,), generator=g) if n_sent < n else torch.randperm(n, generator=g)
    return Table(keys=[f"k{i:04d}" for i in range(n)], sentence_ids=sids, **emb)


def plan(t: Table, batch: int, epoch: int = 2, epochs: int = 5, seed: int = 1, world: int = 1, **sel):
    """An epoch's global batches (keys) planned over `world` ranks, simulated with one thread per rank
    and a real exchange of their pools' plans (what `dist.all_gather_object` does across processes)."""
    import threading

    cfg = SelectionConfig(mode="ps", **sel)
    if world == 1:
        p = Planner(cfg, batch, seed)
        return p.plan_epoch(t.keys, epoch, epochs, lambda keys: t), p
    barrier, box, out = threading.Barrier(world), [None] * world, [None] * world

    def gather(dst, obj, rank):
        box[rank] = obj
        barrier.wait()
        dst[:] = list(box)
        barrier.wait()

    def run(r):
        p = Planner(cfg, batch, seed)
        out[r] = p.plan_epoch(t.keys, epoch, epochs, lambda keys: t, r, world, lambda dst, obj: gather(dst, obj, r)), p

    threads = [threading.Thread(target=run, args=(r,)) for r in range(world)]
    for th in threads:
        th.start()
    for th in threads:
        th.join()
    assert all(o[0] == out[0][0] for o in out), "ranks disagree on the plan"
    return out[0]


def rows_of(t: Table, batch_keys):
    return t.rows(batch_keys).tolist()


def delta(t: Table, i, j):
    return float(t.v1[i] @ t.t1[j] - t.v0[i] @ t.t0[j])


def batch_score(t: Table, rows):
    return sum(delta(t, i, j) for i, j in itertools.permutations(rows, 2))


def test_curriculum_quantiles():
    """Each schedule's quantile at alpha = 1/4 and 0.64, written out from docs/paper.md's formulas (log base 10).
    Mutation caught: sqrt as a ** 0.4 (0.574 at 1/4, not 0.5; checked); an unclipped alpha."""
    written = {
        ("linear", 0.25): 0.25,
        ("linear", 0.64): 0.64,
        ("sqrt", 0.25): 0.5,
        ("sqrt", 0.64): 0.8,
        ("log", 0.25): 0.5118833609788744,
        ("log", 0.64): 0.829946695941636,  # log10(1 + 9a)
        ("easy", 0.25): 0.0,
        ("hard", 0.64): 1.0,
        ("sqrt", 1.5): 1.0,
        ("linear", -0.5): 0.0,
    }
    for (sched, a), want in written.items():
        assert curriculum_quantile(sched, a) == pytest.approx(want, abs=1e-12), (sched, a)
    for sched in ("linear", "sqrt", "log"):
        qs = [curriculum_quantile(sched, a / 10) for a in range(11)]
        assert qs[0] == 0 and abs(qs[-1] - 1) < 1e-12 and qs == sorted(qs)
    assert min(curriculum_quantile("log", 0.1), curriculum_quantile("sqrt", 0.1)) > curriculum_quantile("linear", 0.1)
    assert curriculum_quantile("easy", 0.7) == 0 and curriculum_quantile("hard", 0.2) == 1


@pytest.mark.parametrize("batch,pools,chunk", [(8, 1, 1), (6, 1, 1), (8, 3, 1), (4, 5, 1), (8, 1, 3), (8, 2, 4)])
def test_plan_invariants_and_the_same_plan_at_any_world_size(batch, pools, chunk):
    t = make_table()
    batches, planner = plan(t, batch, pools=pools, chunk=chunk)
    assert len(batches) == 96 // batch and all(len(b) == batch for b in batches)
    seen = [k for b in batches for k in b]
    assert len(set(seen)) == len(seen)  # every clip at most once; all but the remainder
    assert len(seen) == 96 - 96 % batch
    for b in batches:  # no known false negatives unless counted
        sids = t.sentence_ids[rows_of(t, b)].tolist()
        assert len(set(sids)) == len(sids) or planner.stats.relaxed > 0
    for world in (2, 4):  # the plan does not depend on the world size
        assert plan(t, batch, pools=pools, chunk=chunk, world=world)[0] == batches, world
    assert plan(t, batch, pools=pools, chunk=chunk)[0] == batches
    assert plan(t, batch, epoch=3, pools=pools, chunk=chunk)[0] != batches
    assert plan(t, batch, seed=2, pools=pools, chunk=chunk)[0] != batches
    if chunk > 1:  # a config property: it changes the plan
        assert plan(t, batch, pools=pools)[0] != batches


def test_the_epoch_holds_the_clips_of_random_mode():
    # Pair Selection reorders the clips random mode's epoch holds: the same remainder sits the epoch out
    from sclslt.data.loader import epoch_order

    t = make_table(n=90)
    batches, _ = plan(t, 8, epoch=1)
    want = {k for b in epoch_order(t.keys, 1, 1, 8) for k in b}
    assert {k for b in batches for k in b} == want and len(want) == 88


def brute_force_greedy(t: Table, pool, batch, n_batches, q, first_rows):
    """Exact greedy from the definitions: Delta(u; C) by explicit loops, sort, quantile position."""
    used, out = set(), []
    for b in range(n_batches):
        members = [first_rows[b]]
        used.add(first_rows[b])
        while len(members) < batch:
            sids = {int(t.sentence_ids[c]) for c in members}
            cands = [u for u in pool if u not in used and int(t.sentence_ids[u]) not in sids]
            scores = [sum(delta(t, u, c) + delta(t, c, u) for c in members) for u in cands]
            order = [c for _, c in sorted(zip(scores, cands), key=lambda x: x[0])]
            pos = math.ceil(q * (len(order) - 1) - 0.5)  # nearest; an exact half goes to the lower
            members.append(order[pos])
            used.add(order[pos])
        out.append(members)
    return out


@pytest.mark.parametrize(
    "schedule,epoch,world", [("easy", 0, 1), ("hard", 1, 2), ("linear", 1, 1), ("log", 1, 2), ("sqrt", 3, 4)]
)
def test_exact_greedy_equals_brute_force_at_any_world(schedule, epoch, world):
    t = make_table(n=48, n_sent=48, seed=3)  # all sentences distinct: no relaxations
    batches, planner = plan(t, 6, epoch=epoch, epochs=4, seed=4, world=world, schedule=schedule)
    q = planner.quantile(epoch, 4)
    pool = rows_of(t, planner.pools(t.keys, epoch)[0])  # one pool: the whole epoch, in its candidate order
    got = [rows_of(t, b) for b in batches]
    # every pick is the candidate nearest position q (M - 1) of the whole pool, M shrinking over the epoch
    assert got == brute_force_greedy(t, pool, 6, 8, q, [b[0] for b in got])


def test_curriculum_moves_from_low_to_high_delta():
    t = make_table(n=200, n_sent=150, seed=5)

    def mean_score(schedule, epoch):
        batches, _ = plan(t, 8, epoch=epoch, epochs=10, seed=0, schedule=schedule)
        return sum(batch_score(t, rows_of(t, b)) for b in batches) / len(batches)

    easy, hard = mean_score("easy", 0), mean_score("hard", 0)
    early, late = mean_score("linear", 1), mean_score("linear", 9)
    assert easy < early < late < hard


def test_duplicate_sentences_are_kept_apart_until_nothing_else_is_left():
    t = make_table(n=32, n_sent=4, seed=6)  # 4 sentences only: at most 4 distinct per batch
    batches, planner = plan(t, 8, epoch=0, epochs=2, seed=0)
    assert len(set(t.sentence_ids[rows_of(t, batches[0])].tolist())) == 4  # as many distinct as exist
    assert planner.stats.relaxed > 0  # the rest admitted, counted


def test_table_round_trip(tmp_path):
    t = make_table(n=10)
    early = {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v0.float(), "text": t.t0.float()}
    late = {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v1.float(), "text": t.t1.float()}
    save_table(tmp_path / "t.safetensors", early, late, {"what": "test"})
    u = load_table(tmp_path / "t.safetensors")
    assert u.keys == t.keys and torch.equal(u.sentence_ids, t.sentence_ids)
    assert torch.allclose(u.v1, t.v1.float().double())
    with pytest.raises(KeyError, match="not in the reference table"):
        u.rows(["k0001", "nope"])


def test_frequent_sentences_are_spread_over_the_epoch_not_piled_at_its_end():
    """Zipf-like copies: sentence 0 has as many copies as the epoch has batches. Keeping identical
    sentences apart must not defer them to the last batches, where they could only meet."""
    counts = [12, 9, 7, 6, 5, 4, 4, 3, 3, 3] + [2] * 8 + [1] * 24  # 96 samples, 42 sentences
    sids = torch.tensor([s for s, c in enumerate(counts) for _ in range(c)])
    g = torch.Generator().manual_seed(0)
    emb = {k: F.normalize(torch.randn(96, 8, generator=g), dim=-1) for k in ("v0", "t0", "v1", "t1")}
    t = Table(keys=[f"k{i:04d}" for i in range(96)], sentence_ids=sids[torch.randperm(96, generator=g)], **emb)
    for schedule in ("easy", "hard", "log"):
        batches, planner = plan(t, 8, epoch=1, epochs=3, seed=2, schedule=schedule)
        for b in batches:
            assert len(set(t.sentence_ids[rows_of(t, b)].tolist())) == 8, (schedule, b)
        assert planner.stats.relaxed == 0


def test_a_dense_delta_table_plans_by_its_matrix(tmp_path):
    # a table carrying the pooled delta as a dense matrix plans exactly as the factorised one; any other
    # matrix (here CiCo-like: a non-factorising perturbation) changes the plans; the file round-trips it
    t = make_table(seed=3)
    dense_pooled = t.v1 @ t.t1.t() - t.v0 @ t.t0.t()
    args = dict(keys=t.keys, sentence_ids=t.sentence_ids, v0=t.v0, t0=t.t0, v1=t.v1, t1=t.t1)
    want = plan(t, 8, epoch=3)[0]
    assert plan(Table(**args, delta=dense_pooled), 8, epoch=3, world=2)[0] == want
    g = torch.Generator().manual_seed(9)
    other = dense_pooled + 0.5 * torch.rand(96, 96, generator=g, dtype=torch.float64) ** 3
    assert plan(Table(**args, delta=other), 8, epoch=3)[0] != want
    # the dense planner's picks are the brute-force Delta order of its matrix: check one round by hand
    tab = Table(**args, delta=other)
    members, cand = [3, 17, 40], torch.tensor([5, 6, 7, 50, 60])
    by_hand = torch.tensor(
        [sum(float(other[u, c] + other[c, u]) for c in members) for u in cand.tolist()], dtype=torch.float64
    )
    assert torch.allclose(tab.candidate_delta(tab.pool_side(cand), members), by_hand)
    save_table(
        tmp_path / "t.safetensors",
        {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v0, "text": t.t0},
        {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v1, "text": t.t1},
        {},
        delta=other,
    )
    back = load_table(tmp_path / "t.safetensors")
    assert back.delta is not None and torch.allclose(back.delta, other.float().double())
    with pytest.raises(ValueError, match="delta is"):
        Table(**args, delta=other[:5])


def _save(t: Table, path):
    save_table(
        path,
        {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v0, "text": t.t0},
        {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v1, "text": t.t1},
        {},
    )


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_pool_tables_in_a_compact_dtype_plan_as_the_float64_planner_on_the_rounded_table(tmp_path, dtype):
    # at scale a rank holds its pools' rows only, in float16: the plans equal the float64 planner's on the
    # whole table rounded to that dtype (exact: scores are float64 sums of the stored values)
    n = 120
    t = make_table(n=n, e=16, n_sent=70, seed=5)
    _save(t, tmp_path / "t.safetensors")
    rounded = Table(
        keys=t.keys,
        sentence_ids=t.sentence_ids,
        **{k: getattr(t, k).to(dtype).double() for k in ("v0", "t0", "v1", "t1")},
    )
    cfg = SelectionConfig(mode="ps", pools=3)
    for epoch in (0, 2, 4):
        want = Planner(cfg, 8, 7).plan_epoch(t.keys, epoch, 5, lambda keys: rounded)
        loaded = []

        def part(keys):
            loaded.append(load_table(tmp_path / "t.safetensors", keys=keys, dtype=dtype))
            return loaded[-1]

        got = Planner(cfg, 8, 7).plan_epoch(t.keys, epoch, 5, part)
        assert got == want
        assert len(loaded) == 3 and all(len(p.keys) == 40 and p.v1.dtype == dtype for p in loaded)
    # rounding only reorders near-ties: most batches agree with the unrounded planner's
    full = Planner(cfg, 8, 7).plan_epoch(t.keys, 4, 5, lambda keys: t)
    same = sum(set(a) == set(b) for a, b in zip(full, want))
    assert same >= 0.5 * len(full)


def test_a_rank_table_reads_only_its_rows_in_the_order_asked(tmp_path):
    t = make_table(n=50, e=4, seed=1)
    _save(t, tmp_path / "t.safetensors")
    keys = [t.keys[i] for i in (40, 3, 4, 5, 17, 41)]
    part = load_table(tmp_path / "t.safetensors", keys=keys, dtype=torch.float32)
    idx = torch.tensor([40, 3, 4, 5, 17, 41])
    assert part.keys == keys and torch.equal(part.sentence_ids, t.sentence_ids[idx])
    assert torch.allclose(part.v1.double(), t.v1[idx].float().double()) and part.v1.dtype == torch.float32
    with pytest.raises(KeyError, match="not in the reference table"):
        load_table(tmp_path / "t.safetensors", keys=["nope"])
