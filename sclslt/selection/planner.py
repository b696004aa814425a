"""Pair Selection's planner: an epoch's curriculum global batches by the paper's greedy (docs/paper.md).

The curriculum takes candidates at the quantile q(alpha) of the sorted Delta (`scoring`: low = easy,
stably separable; high = hard, confusable), alpha = epoch / epochs, by schedule (`schedules`):
    easy 0 | hard 1 | linear alpha | sqrt sqrt(alpha) | log log(1 + (b - 1) alpha) / log(b).

One sequence of global batches per (config, seed), whatever the world size: the paper's
greedy, run over the epoch's pool of clips: a batch starts from ONE random seed and grows one candidate
at a time, each the candidate at the curriculum quantile of the whole pool's Delta against the members
so far. A candidate whose sentence id equals a member's is passed over (known false negatives never
share a batch unless nothing else is left: counted, and masked in the loss anyway); which candidates a
step may take is the first rung of `LADDER` that has any. At corpora of
thousands of clips every pool is the whole epoch (`selection.pools` = 1); at millions, the epoch is cut
into a fixed number of canonical pools, each planned on its own, the ranks sharing the pools out, and
`selection.chunk` members may be added per step: both approximations are properties of the config,
never of the machine
(benchmarks/bench_planner.py measures its cost and how far its batches are from exact greedy's).

Every decision is a pure function of (seed, epoch, pool, batch, the table), computed before the epoch
starts: the plan depends neither on the number of ranks nor on the loader's workers, and a resumed run
(at any world size) re-plans the epoch and skips the batches it had done.

The table it plans from: `scoring` (in memory, Delta), `table` (its files); the thresholds of
`selection.separate_close`: `separation`.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from sclslt.config import SelectionConfig
from sclslt.data.loader import epoch_order, rng_seed
from sclslt.selection.schedules import curriculum_quantile
from sclslt.selection.scoring import Table
from sclslt.selection.separation import close_thresholds, threshold_keys


@dataclass
class PlanStats:
    relaxed: int = 0  # members admitted despite a member's sentence id (nothing else left)
    picks: int = 0
    close_relaxed: int = 0  # members admitted despite a close member (separate_close; nothing else, or due)


def nearest_rank(q: float, n: int) -> int:
    """The position nearest q (n - 1) in a sorted list of n (a tie goes to the lower position)."""
    return max(0, math.ceil(q * (n - 1) - 0.5))


@dataclass(frozen=True)
class Rung:
    """One rung of the candidate ladder: which of the unused clips a step may take.

    A rung that drops the id rule reports it relaxed (`PlanStats.relaxed`; a chunk may then take two
    copies of one sentence); one that drops the close rule reports it relaxed when an unused clip is
    close to a member (`PlanStats.close_relaxed`)."""

    name: str
    due_only: bool  # only copies of due sentences (as many unused copies as batches left)
    id_rule: bool  # no clip of a member's sentence
    close_rule: bool  # no clip close to a member (selection.separate_close; no clip is close when off)

    def mask(self, free: torch.Tensor, clash: torch.Tensor, near: torch.Tensor, due: torch.Tensor) -> torch.Tensor:
        """The rung's candidates among the unused clips `free` (all (R,) bool, see `Planner._one_batch`)."""
        out = free & ~clash if self.id_rule else free
        out = out & ~near if self.close_rule else out
        return out & due if self.due_only else out


# The candidate ladder, tried top down: a step takes from the first rung that has a candidate.
LADDER = (
    # due copies first, one per batch: held back, a sentence's copies pile up at the epoch's end and must meet
    Rung("due", due_only=True, id_rule=True, close_rule=True),
    # a due copy close to a member: being due outranks the close rule (a close pair is only likely a false negative)
    Rung("due-close", due_only=True, id_rule=True, close_rule=False),
    # the ordinary step: any clip that breaks no rule
    Rung("clean", due_only=False, id_rule=True, close_rule=True),
    # only clips close to a member are left: the close rule gives way before the id rule (a guess, not a known clash)
    Rung("close", due_only=False, id_rule=True, close_rule=False),
    # every clip left shares a member's sentence: the id rule gives way (the loss masks such pairs), due copies first
    Rung("due-same-sentence", due_only=True, id_rule=False, close_rule=False),
    # anything unused: nothing else is left
    Rung("any", due_only=False, id_rule=False, close_rule=False),
)


@dataclass
class PoolState:
    """One pool between its batches: P clips, S distinct sentences, R rows in the scoring copy now, e the
    embedding width. The scoring copy is compacted to the unused rows whenever they fall below 3/4 of it.

    rows           (P,) long      the pool's table rows, in the order of its keys
    sids           (P,) long      their sentence ids (with `selection.allow_same_sentence`: 0 .. P-1)
    sidx           (P,) long      each clip's sentence as an index into `unused_copies`
    unused_copies  (S,) long      each sentence's clips in no batch yet
    side           (P, 4e)        the pool's scoring copy (`Table.pool_side`; a dense table's: (P,) rows)
    used           (P,) bool      in a batch already
    pos            (R,) long      the pool positions of the scoring copy's rows now
    cur            (R, 4e)        `side` at `pos` (a dense table's: (R,))
    avail          (R,) bool      which of those are unused (`compact`)
    """

    rows: torch.Tensor
    sids: torch.Tensor
    sidx: torch.Tensor
    unused_copies: torch.Tensor
    side: torch.Tensor
    used: torch.Tensor
    pos: torch.Tensor
    cur: torch.Tensor
    avail: torch.Tensor

    @classmethod
    def start(cls, table: Table, keys: list[str], allow_same_sentence: bool) -> PoolState:
        rows = table.rows(keys)
        sids = table.sentence_ids[rows]
        if allow_same_sentence:  # no id rule: every clip its own "sentence" (none is ever due)
            sids = torch.arange(len(keys), dtype=torch.long)
        _, sidx = torch.unique(sids, return_inverse=True)
        side = table.pool_side(rows)
        return cls(
            rows=rows,
            sids=sids,
            sidx=sidx,
            unused_copies=torch.bincount(sidx),
            side=side,
            used=torch.zeros(len(keys), dtype=torch.bool),
            pos=torch.arange(len(keys)),
            cur=side,
            avail=torch.ones(len(keys), dtype=torch.bool),
        )

    def compact(self) -> None:
        """`avail` for the next batch; the scoring copy cut to the unused rows if they are below 3/4 of it."""
        self.avail = ~self.used[self.pos]
        if float(self.avail.float().mean()) < 0.75:
            self.pos = self.pos[self.avail]
            self.cur, self.avail = self.side[self.pos.to(self.side.device)], self.avail[self.avail]

    def due(self, batches_left: int) -> torch.Tensor:
        """(R,) bool: the clips of a sentence with as many unused copies as batches left."""
        return self.unused_copies[self.sidx[self.pos]] >= batches_left

    def take(self, picked: torch.Tensor) -> torch.Tensor:
        """Marks a batch's members (positions in the scoring copy now) used; their pool positions."""
        members = self.pos[picked]
        self.used[members] = True
        self.unused_copies -= torch.bincount(self.sidx[members], minlength=len(self.unused_copies))
        return members


class Planner:
    """An epoch of curriculum global batches: the paper's greedy, world-independent (module docstring).

    The epoch's clips are those of `epoch_order` (random mode's shuffle, the same remainder left out),
    split into `selection.pools` canonical pools of whole batches; each pool is planned on its own by
    exact greedy (`plan_pool`), the ranks share the pools out (pool p on rank p % world) and exchange
    the plans (a few KB of keys); the epoch interleaves the pools' batches round-robin. Every batch is
    a function of (seed, epoch, pool, the table): the same at any world size. pools = 1 is the
    paper's algorithm over the whole epoch; more pools bound the cost for corpora of millions of clips.
    """

    def __init__(self, cfg: SelectionConfig, global_batch: int, seed: int):
        self.cfg, self.batch, self.seed = cfg, global_batch, seed
        self.stats = PlanStats()
        self.close = None  # (s_early, s_late) thresholds of separate_close, set by plan_epoch

    def quantile(self, epoch: int, epochs: int) -> float:
        return curriculum_quantile(self.cfg.schedule, epoch / max(1, epochs), self.cfg.log_base)

    def pools(self, keys: list[str], epoch: int) -> list[list[str]]:
        """The epoch's canonical pools: `epoch_order`'s batches, flattened, cut into whole-batch pools."""
        order = epoch_order(keys, self.seed, epoch, self.batch)
        n, p = len(order), min(self.cfg.pools, max(1, len(order)))
        cuts = [n * i // p for i in range(p + 1)]
        return [[k for b in order[cuts[i] : cuts[i + 1]] for k in b] for i in range(p)]

    def plan_epoch(
        self, keys: list[str], epoch: int, epochs: int, table_for, rank: int = 0, world: int = 1, all_gather_object=None
    ) -> list[list[str]]:
        """The epoch's global batches (keys, in global order). `table_for(pool_keys)` gives a table that
        holds at least those keys' rows; with world > 1, `all_gather_object` exchanges the pools' plans."""
        pools, q = self.pools(keys, epoch), self.quantile(epoch, epochs)
        # the separate_close thresholds: from a fixed sample of the whole table, the same for every pool
        if self.cfg.separate_close > 0:
            sample = threshold_keys(keys, rng_seed(self.seed, 8))
            self.close = close_thresholds(table_for(sample), sample, self.cfg.separate_close)
        # this rank's pools, each planned on its own
        mine = {p: self.plan_pool(table_for(pk), pk, epoch, p, q) for p, pk in enumerate(pools) if p % world == rank}
        # every rank's plans (and counts) to every rank
        if world > 1:
            out = [None] * world
            all_gather_object(out, (mine, self.stats))
            mine, self.stats = {}, PlanStats()
            for plans, stats in out:
                mine.update(plans)
                for f in ("relaxed", "picks", "close_relaxed"):
                    setattr(self.stats, f, getattr(self.stats, f) + getattr(stats, f))
        # the pools' batches interleaved round-robin
        longest = max(len(b) for b in mine.values())
        return [mine[p][j] for j in range(longest) for p in range(len(pools)) if j < len(mine[p])]

    def plan_pool(
        self, table: Table, keys: list[str], epoch: int, pool: int, q: float, max_batches: int | None = None
    ) -> list[list[str]]:
        """Exact greedy over one pool: batches of `global_batch` keys, every key of the pool in one batch
        (the first `max_batches` only, if given: the benchmark's timing).

        Batch j: a random seed, then one member at a time (`selection.chunk` at a time: `_one_batch`),
        the candidate at quantile q of Delta(u; C) against the members so far, among the pool's unused
        candidates whose sentence no member has (all unused ones if none is left: counted as relaxed), and,
        with `selection.separate_close` q, that no member is close to: the pair's symmetric pooled
        similarity at or above the table's (1 - q) quantile of negatives at BOTH checkpoints (H->H at the
        top q: a likely false negative, e.g. a paraphrase). `selection.allow_same_sentence`
        drops the id rule (and its due copies): the planner the paper describes.
        A sentence with as many unused copies as batches left is due: its copies go first, one per batch
        (otherwise keeping copies apart piles them up at the epoch's end, where they must meet; measured
        in benchmarks/results/ps_experiment.md). The order of the rules is `LADDER`'s. Delta is kept per
        candidate and grows by one matrix-vector product per step, over the scoring copy of the pool's
        rows, which is compacted to the unused ones whenever they fall below 3/4 of it (so a batch costs
        its steps' products only: `PoolState`)."""
        state = PoolState.start(table, keys, self.cfg.allow_same_sentence)
        n_batches = len(keys) // self.batch
        plan = []
        for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
            # the scoring copy: cut to the unused rows when they fall below 3/4 of it
            state.compact()
            # one batch, from a generator of (seed, epoch, pool, batch): the same on whichever rank plans it
            gen = torch.Generator().manual_seed(rng_seed(self.seed, epoch, pool, b, 6))
            picked = self._one_batch(table, state, state.due(n_batches - b), q, gen)
            # its members used, their sentences' unused copies one fewer
            members = state.take(picked)
            plan.append([keys[i] for i in members.tolist()])
        return plan

    def _one_batch(
        self, table: Table, state: PoolState, due: torch.Tensor, q: float, gen: torch.Generator
    ) -> torch.Tensor:
        """One global batch, as positions in the pool's scoring copy now (`state.cur`, rows `state.pos`;
        unused: `state.avail`). `due` (R,) bool: copies of due sentences (`PoolState.due`); q: the
        curriculum quantile; `gen` draws the seed member.
        With `selection.chunk` c > 1, each step after the seed takes the c candidates nearest the quantile
        (distinct sentences), all scored against the same members: c times fewer steps and products.
        `self.close` (s_early, s_late thresholds: `selection.separate_close`): a candidate at or above both
        with a member clashes with it as a member's sentence does (a chunk's members are checked against the
        members before the step, not against each other)."""
        rows, side, sids, close = state.rows[state.pos], state.cur, state.sids[state.pos], self.close
        dense = table.delta is not None
        rows_dev = rows.to(table.v1.device)
        acc = torch.zeros(len(rows), dtype=torch.float64, device=table.v1.device)  # Delta(u; members), (R,)
        taken = ~state.avail
        clash = torch.zeros(len(rows), dtype=torch.bool)  # a member's sentence
        near = torch.zeros(len(rows), dtype=torch.bool)  # close to a member (separate_close)
        picked: list[int] = []
        while len(picked) < self.batch:
            # the candidates: the first rung of the ladder that has any
            cand, relaxed, close_relaxed = self._candidates(~taken, clash, near, due)
            cand = cand.nonzero().flatten()
            # the step's picks: the seed at random, then the candidate(s) nearest the quantile of Delta
            if not picked:
                new = [int(cand[torch.randint(len(cand), (1,), generator=gen)])]
            else:
                new = self._nearest(
                    acc[cand.to(acc.device)].cpu(),
                    cand,
                    sids,
                    q,
                    min(self.cfg.chunk, self.batch - len(picked)),
                    relaxed,
                )
            # admit them: taken; their sentence's clips, and the clips close to them, now clash
            for i in new:
                taken[i] = True
                clash |= sids == sids[i]
                if close is not None:
                    s0, s1 = table.pair_similarity(side, int(rows[i]))
                    near |= ((s0 >= close[0]) & (s1 >= close[1])).cpu()
                picked.append(i)
            # Delta grows by the picks' terms against every candidate: one product per step, whatever chunk
            r = rows_dev[torch.tensor(new, device=rows_dev.device)]
            if dense:
                acc += table.delta[:, r][rows_dev].sum(1) + table.delta[r][:, rows_dev].sum(0)
            else:
                acc += table.candidate_delta(side, [], table.member_sums(r.tolist()))
            # count the picks that a relaxed rule let in
            self.stats.relaxed += len(new) if relaxed else 0
            self.stats.close_relaxed += len(new) if close_relaxed else 0
        self.stats.picks += len(picked)
        return torch.tensor(picked, dtype=torch.long)

    @staticmethod
    def _candidates(free, clash, near, due) -> tuple[torch.Tensor, bool, bool]:
        """(candidate mask, id rule relaxed, close rule relaxed): the first rung of `LADDER` with a
        candidate (the last one, every unused clip, when none has). The close rule counts as relaxed when
        the rung drops it and some unused clip is close to a member."""
        for rung in LADDER:
            mask = rung.mask(free, clash, near, due)
            if bool(mask.any()):
                break
        return mask, not rung.id_rule, not rung.close_rule and bool((free & near).any())

    @staticmethod
    def _nearest(
        delta: torch.Tensor, cand: torch.Tensor, sids: torch.Tensor, q: float, k: int, relaxed: bool
    ) -> list[int]:
        """The k candidates nearest position q (n - 1) of the ascending Delta order (ties: pool order, then
        the lower position), no two of one sentence unless `relaxed`."""
        by_delta = torch.argsort(delta, stable=True)
        if k == 1:
            return [int(cand[by_delta[nearest_rank(q, len(cand))]])]
        dist = (torch.arange(len(cand), dtype=torch.float64) - q * (len(cand) - 1)).abs()
        out, seen = [], set()
        for pos in by_delta[torch.argsort(dist, stable=True)].tolist():
            sid = int(sids[cand[pos]])
            if sid in seen and not relaxed:
                continue
            out.append(int(cand[pos]))
            seen.add(sid)
            if len(out) == k:
                break
        return out
