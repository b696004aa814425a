"""Pair Selection planner: invariants, the curriculum, exact greedy against a brute force, determinism."""
import itertools
import math

import pytest
import torch
import torch.nn.functional as F

from sclslt.config import SelectionConfig
from sclslt.selection.planner import Planner, Table, curriculum_quantile, load_table, save_table


def make_table(n=96, e=8, n_sent=40, seed=0) -> Table:
    g = torch.Generator().manual_seed(seed)
    emb = {k: F.normalize(torch.randn(n, e, generator=g), dim=-1) for k in ("v0", "t0", "v1", "t1")}
    sids = torch.randint(0, n_sent, (n,), generator=g) if n_sent < n else torch.randperm(n, generator=g)
    return Table(keys=[f"k{i:04d}" for i in range(n)], sentence_ids=sids, **emb)


def split_pools(n, world, seed=0):
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed))
    return {r: perm[r::world].sort().values for r in range(world)}


def delta(t: Table, i, j):
    return float(t.v1[i] @ t.t1[j] - t.v0[i] @ t.t0[j])


def batch_score(t: Table, rows):
    return sum(delta(t, i, j) for i, j in itertools.permutations(rows, 2))


def test_curriculum_quantiles():
    for sched in ("linear", "sqrt", "log"):
        qs = [curriculum_quantile(sched, a / 10) for a in range(11)]
        assert qs[0] == 0 and abs(qs[-1] - 1) < 1e-12 and qs == sorted(qs)
    assert min(curriculum_quantile("log", 0.1), curriculum_quantile("sqrt", 0.1)) > curriculum_quantile("linear", 0.1)
    assert curriculum_quantile("easy", 0.7) == 0 and curriculum_quantile("hard", 0.2) == 1


@pytest.mark.parametrize("world,micro,chunk", [(1, 8, 1), (2, 4, 1), (3, 3, 2), (4, 2, 3)])
def test_plan_invariants(world, micro, chunk):
    t = make_table()
    n_batches = 96 // (world * micro)
    planner = Planner(SelectionConfig(mode="ps", chunk=chunk), t, micro, world, seed=1)
    plans = planner.plan_epoch_local(split_pools(96, world), epoch=2, epochs=5, n_batches=n_batches)
    seen = []
    for b in range(n_batches):
        members = [row for r in range(world) for row in plans[r][b]]
        assert all(len(plans[r][b]) == micro for r in range(world))            # exact per-rank quotas
        sids = t.sentence_ids[members].tolist()
        assert len(set(sids)) == len(sids) or planner.stats.relaxed > 0       # no known false negatives
        seen += members
    pools = split_pools(96, world)
    for r in range(world):                   # a rank only ever gets its own pool's samples
        assert set(x for b in plans[r] for x in b) <= set(pools[r].tolist())
    assert len(set(seen)) == len(seen)       # no sample twice in one epoch (pools are large enough)
    again = Planner(SelectionConfig(mode="ps", chunk=chunk), t, micro, world, seed=1).plan_epoch_local(
        split_pools(96, world), epoch=2, epochs=5, n_batches=n_batches)
    assert again == plans
    other = Planner(SelectionConfig(mode="ps", chunk=chunk), t, micro, world, seed=1).plan_epoch_local(
        split_pools(96, world), epoch=3, epochs=5, n_batches=n_batches)
    assert other != plans


def brute_force_greedy(t: Table, pool, micro, n_batches, q, first_rows):
    """Exact greedy from the definitions: Delta(u; C) by explicit loops, sort, quantile position."""
    used, plan = set(), []
    for b in range(n_batches):
        batch = [first_rows[b]]
        used.add(first_rows[b])
        while len(batch) < micro:
            sids = {int(t.sentence_ids[c]) for c in batch}
            cands = [u for u in pool if u not in used and int(t.sentence_ids[u]) not in sids]
            scores = [sum(delta(t, u, c) + delta(t, c, u) for c in batch) for u in cands]
            order = [c for _, c in sorted(zip(scores, cands), key=lambda x: x[0])]
            pos = math.ceil(q * (len(order) - 1) - 0.5)      # nearest; an exact half goes to the lower
            batch.append(order[pos])
            used.add(order[pos])
        plan.append(batch)
    return plan


@pytest.mark.parametrize("schedule,epoch", [("easy", 0), ("hard", 1), ("linear", 1), ("log", 1), ("sqrt", 3)])
def test_exact_greedy_equals_brute_force(schedule, epoch):
    t = make_table(n=48, n_sent=48, seed=3)         # all sentences distinct: no relaxations
    pool = torch.arange(48)
    planner = Planner(SelectionConfig(mode="ps", chunk=1, schedule=schedule), t, 6, 1, seed=4)
    plan = planner.plan_epoch_local({0: pool}, epoch=epoch, epochs=4, n_batches=8)[0]
    q = planner.quantile(epoch, 4)
    # the quantile picks the candidate nearest position q (M - 1), M shrinking as the epoch goes on
    want = brute_force_greedy(t, pool.tolist(), 6, 8, q, [b[0] for b in plan])
    assert plan == want


def test_curriculum_moves_from_low_to_high_delta():
    t = make_table(n=200, n_sent=150, seed=5)
    pools = split_pools(200, 2)

    def mean_score(schedule, epoch):
        planner = Planner(SelectionConfig(mode="ps", schedule=schedule), t, 4, 2, seed=0)
        plans = planner.plan_epoch_local(pools, epoch=epoch, epochs=10, n_batches=10)
        return sum(batch_score(t, plans[0][b] + plans[1][b]) for b in range(10)) / 10
    easy, hard = mean_score("easy", 0), mean_score("hard", 0)
    early, late = mean_score("linear", 1), mean_score("linear", 9)
    assert easy < early < late < hard


def test_duplicate_sentences_are_kept_apart_until_nothing_else_is_left():
    t = make_table(n=32, n_sent=4, seed=6)           # 4 sentences only: at most 4 distinct per batch
    planner = Planner(SelectionConfig(mode="ps"), t, 4, 2, seed=0)
    plans = planner.plan_epoch_local(split_pools(32, 2), epoch=0, epochs=2, n_batches=4)
    first = plans[0][0] + plans[1][0]
    assert len(set(t.sentence_ids[first].tolist())) == 4          # as many distinct as exist
    assert planner.stats.relaxed > 0                              # and the rest admitted, counted


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
    counts = [12, 9, 7, 6, 5, 4, 4, 3, 3, 3] + [2] * 8 + [1] * 24      # 96 samples, 42 sentences
    sids = torch.tensor([s for s, c in enumerate(counts) for _ in range(c)])
    g = torch.Generator().manual_seed(0)
    emb = {k: F.normalize(torch.randn(96, 8, generator=g), dim=-1) for k in ("v0", "t0", "v1", "t1")}
    t = Table(keys=[f"k{i:04d}" for i in range(96)], sentence_ids=sids[torch.randperm(96, generator=g)], **emb)
    for schedule in ("easy", "hard", "log"):
        planner = Planner(SelectionConfig(mode="ps", schedule=schedule), t, 8, 1, seed=2)
        plan = planner.plan_epoch_local({0: torch.arange(96)}, epoch=1, epochs=3, n_batches=12)[0]
        for b in plan:
            assert len(set(t.sentence_ids[b].tolist())) == 8, (schedule, b)
        assert planner.stats.relaxed == 0


def test_a_dense_delta_table_plans_by_its_matrix(tmp_path):
    # a table carrying the pooled delta as a dense matrix plans exactly as the factorised one; any other
    # matrix (here CiCo-like: a non-factorising perturbation) changes the plans; the file round-trips it
    t = make_table(seed=3)
    dense_pooled = t.v1 @ t.t1.t() - t.v0 @ t.t0.t()
    args = dict(keys=t.keys, sentence_ids=t.sentence_ids, v0=t.v0, t0=t.t0, v1=t.v1, t1=t.t1)
    cfg = SelectionConfig(mode="ps", chunk=1)
    pools = split_pools(96, 2)
    want = Planner(cfg, t, 4, 2, seed=1).plan_epoch_local(pools, epoch=3, epochs=5, n_batches=12)
    same = Planner(cfg, Table(**args, delta=dense_pooled), 4, 2, seed=1).plan_epoch_local(pools, 3, 5, 12)
    assert same == want
    g = torch.Generator().manual_seed(9)
    other = dense_pooled + 0.5 * torch.rand(96, 96, generator=g, dtype=torch.float64) ** 3
    got = Planner(cfg, Table(**args, delta=other), 4, 2, seed=1).plan_epoch_local(pools, 3, 5, 12)
    assert got != want
    # the dense planner's picks are the brute-force Delta order of its matrix: check one round by hand
    tab = Table(**args, delta=other)
    members, cand = [3, 17, 40], torch.tensor([5, 6, 7, 50, 60])
    by_hand = torch.tensor([sum(float(other[u, c] + other[c, u]) for c in members) for u in cand.tolist()],
                           dtype=torch.float64)
    assert torch.allclose(tab.candidate_delta(tab.pool_side(cand), members), by_hand)
    save_table(tmp_path / "t.safetensors", {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v0,
                                            "text": t.t0}, {"keys": t.keys, "sentence_ids": t.sentence_ids,
                                                            "video": t.v1, "text": t.t1}, {}, delta=other)
    back = load_table(tmp_path / "t.safetensors")
    assert back.delta is not None and torch.allclose(back.delta, other.float().double())
    with pytest.raises(ValueError, match="delta is"):
        Table(**args, delta=other[:5])


def _save(t: Table, path):
    save_table(path, {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v0, "text": t.t0},
               {"keys": t.keys, "sentence_ids": t.sentence_ids, "video": t.v1, "text": t.t1}, {})


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_per_rank_tables_in_a_compact_dtype_plan_as_the_float64_planner_on_the_rounded_table(tmp_path, dtype):
    # at scale every rank holds its own pool's rows only, in float16: the plans equal the float64 planner's
    # on the whole table rounded to that dtype (exact: scores are float64 sums of the stored values)
    n, world = 120, 3
    t = make_table(n=n, e=16, n_sent=70, seed=5)
    _save(t, tmp_path / "t.safetensors")
    rounded = Table(keys=t.keys, sentence_ids=t.sentence_ids,
                    **{k: getattr(t, k).to(dtype).double() for k in ("v0", "t0", "v1", "t1")})
    pools = split_pools(n, world, seed=2)
    cfg = SelectionConfig(mode="ps", chunk=2)
    for epoch in (0, 2, 4):
        want = Planner(cfg, rounded, 4, world, seed=7).plan_epoch_local(pools, epoch, 5, 10)
        tables = {r: load_table(tmp_path / "t.safetensors", keys=[t.keys[i] for i in pools[r].tolist()], dtype=dtype)
                  for r in range(world)}
        assert all(len(tables[r].keys) == len(pools[r]) and tables[r].v1.dtype == dtype for r in range(world))
        local = {r: torch.arange(len(pools[r])) for r in range(world)}
        got = Planner(cfg, tables[0], 4, world, seed=7).plan_epoch_local(local, epoch, 5, 10, tables=tables)
        assert {r: [[tables[r].keys[i] for i in b] for b in got[r]] for r in range(world)} == \
               {r: [[t.keys[i] for i in b] for b in want[r]] for r in range(world)}
    # rounding only reorders near-ties: most batch members agree with the unrounded planner's
    full = Planner(cfg, t, 4, world, seed=7).plan_epoch_local(pools, 4, 5, 10)
    rnd = Planner(cfg, rounded, 4, world, seed=7).plan_epoch_local(pools, 4, 5, 10)
    same = sum(set(a) == set(b) for r in range(world) for a, b in zip(full[r], rnd[r]))
    assert same >= 0.5 * world * 10


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
