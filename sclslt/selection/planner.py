"""Pair Selection: curriculum global batches from the similarity dynamics of negatives (docs/paper.md).

delta(i, j) = s_late(V_i, T_j) - s_early(V_i, T_j) from a reference table of pooled embeddings at an
early and a late checkpoint; never stored N x N, computed on demand for the candidates against the
members of the batch being built:
    Delta(u; C) = sum_{c in C} delta(u, c) + delta(c, u)          (both directions: our choice)
Low Delta = the pair's similarity fell during reference training (easy, stably separable);
high Delta = it rose (hard, confusable). The curriculum takes candidates at the quantile
q(alpha) of the sorted Delta, alpha = epoch / epochs, by schedule (`schedules`):
    easy 0 | hard 1 | linear alpha | sqrt sqrt(alpha) | log log(1 + (b - 1) alpha) / log(b).

One sequence of global batches per (config, seed), whatever the world size (issue 20): the paper's
greedy, run over the epoch's pool of clips: a batch starts from ONE random seed and grows one candidate
at a time, each the candidate at the curriculum quantile of the whole pool's Delta against the members
so far. A candidate whose sentence id equals a member's is passed over (known false negatives never
share a batch unless nothing else is left: counted, and masked in the loss anyway). At corpora of
thousands of clips every pool is the whole epoch (`selection.pools` = 1); at millions, the epoch is cut
into a fixed number of canonical pools, each planned on its own, the ranks sharing the pools out, and
`selection.chunk` members may be added per step: both approximations are properties of the config,
never of the machine
(benchmarks/bench_planner.py measures its cost and how far its batches are from exact greedy's).

Every decision is a pure function of (seed, epoch, pool, batch, the table), computed before the epoch
starts: the plan depends neither on the number of ranks nor on the loader's workers, and a resumed run
(at any world size) re-plans the epoch and skips the batches it had done.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sclslt.config import SelectionConfig
from sclslt.data.loader import epoch_order, rng_seed
from sclslt.atomic import atomic_path
from sclslt.selection.schedules import curriculum_quantile


@dataclass
class Table:
    """Reference embeddings: rows aligned with `keys`; v0/t0 early, v1/t1 late (float64 for exact ties).

    delta(u, c) is v1_u . t1_c - v0_u . t0_c (pooled scoring, factorised: a round is one
    matrix-vector product), or, when the table carries `delta` (N x N, video row, text column), that
    matrix: any similarity, e.g. CiCo's, which does not factorise (sclslt/selection/reference.py
    --score cico; N^2 memory, so for corpora up to some ten thousand clips).
    The embeddings live on `device` (the training GPU when there is one), where the candidates are
    scored; ids and the selection logic stay on the CPU.

    Scale: the planner never needs another rank's rows (a pick travels with its member-side vector,
    `member_vec`), so a rank's table may hold its own pool's rows only (`load_table(keys=...)`), and
    in a compact `dtype` (float16: 8 e bytes a clip; the epoch's scoring copy of the pool, `pool_side`,
    as much again on a GPU, 32 e bytes on the CPU). Scores are float64 sums of the stored values, so
    a plan is exactly the float64 planner's plan on the table rounded to `dtype` (tests/test_selection.py);
    rounding can only reorder candidates whose Delta differ by less than the rounding (~1e-3 relative).
    """
    keys: list
    sentence_ids: torch.Tensor      # (N,) long, CPU
    v0: torch.Tensor
    t0: torch.Tensor
    v1: torch.Tensor
    t1: torch.Tensor
    device: torch.device | str = "cpu"
    delta: torch.Tensor | None = None
    dtype: torch.dtype = torch.float64
    index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.index = _key_rows(self.keys)
        self.sentence_ids = self.sentence_ids.cpu()
        for name in ("v0", "t0", "v1", "t1"):
            setattr(self, name, getattr(self, name).to(self.device, self.dtype))
        if self.delta is not None:
            n = len(self.keys)
            if tuple(self.delta.shape) != (n, n):
                raise ValueError(f"reference table: delta is {tuple(self.delta.shape)}, expected ({n}, {n})")
            self.delta = self.delta.to(self.device, torch.float64)

    def pool_side(self, rows: torch.Tensor) -> torch.Tensor:
        """What a pool keeps for an epoch to score its candidates `rows` (see `candidate_delta`).
        On the CPU it is widened to float64 once here: widening a compact dtype there costs ~14x the
        product itself, and every round would pay it (on a GPU it is cheap and memory is not)."""
        r = rows.to(self.v1.device)
        if self.delta is not None:
            return r
        side = torch.cat([self.v1[r], -self.v0[r], self.t1[r], -self.t0[r]], dim=1)
        return side.double() if side.device.type == "cpu" else side

    def candidate_delta(self, side: torch.Tensor, members: list[int], sums: torch.Tensor | None = None,
                        block: int = 16384) -> torch.Tensor:
        """Delta(u; C) = sum over members c of delta(u, c) + delta(c, u), for every candidate of `side`.

        Factorised tables take the members' summed vectors `sums` (`member_vec`, float64; from the rows
        `members` of this table when not given); dense ones take the member rows."""
        if self.delta is not None:
            m = torch.tensor(members, dtype=torch.long, device=self.delta.device)
            return self.delta[side][:, m].sum(1) + self.delta[m][:, side].sum(0)
        if sums is None:
            sums = self.member_sums(members)
        sums = sums.to(side.device, torch.float64)
        if side.dtype == torch.float64:
            return side @ sums
        return torch.cat([side[i:i + block].double() @ sums for i in range(0, len(side), block)])

    def member_vec(self, row: int) -> torch.Tensor:
        """[t1, t0, v1, v0] of one row (stored dtype): what a pick contributes to Delta's batch side."""
        return torch.cat([self.t1[row], self.t0[row], self.v1[row], self.v0[row]])

    def rows(self, keys: list[str]) -> torch.Tensor:
        return _positions(self.index, keys)

    def pair_similarity(self, side: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_early, s_late) of table row `row` with every candidate of the scoring copy `side`: the pooled
        similarity of the pair, symmetric (the mean of its two directions, as Delta sums both), float64."""
        if self.delta is not None:                     # a dense table's side is its rows
            r = side.to(self.v0.device)
            pair = lambda v, t: ((v[r] @ t[row] + t[r] @ v[row]).double() / 2)
            return pair(self.v0, self.t0), pair(self.v1, self.t1)
        e = self.v0.shape[1]
        mv = self.member_vec(row).double()              # [t1, t0, v1, v0] against side's [v1, -v0, t1, -t0]
        late, early = mv.clone(), mv.clone()
        late[e:2 * e], late[3 * e:] = 0, 0
        early[:e], early[2 * e:3 * e] = 0, 0
        return -self.candidate_delta(side, [], early) / 2, self.candidate_delta(side, [], late) / 2

    def member_sums(self, members: list[int]) -> torch.Tensor:
        """[sum t1_c, sum t0_c, sum v1_c, sum v0_c] over the members: Delta's batch side."""
        m = torch.tensor(members, dtype=torch.long, device=self.v1.device)
        return torch.cat([self.t1[m].double().sum(0), self.t0[m].double().sum(0), self.v1[m].double().sum(0),
                          self.v0[m].double().sum(0)])



def save_table(path, early: dict, late: dict, meta: dict, delta: torch.Tensor | None = None) -> None:
    """A reference table: two embedding passes (same samples) in one safetensors file, and the dense
    delta matrix where the scoring similarity does not factorise (`Table.delta`)."""
    import json

    from safetensors.torch import save_file
    if early["keys"] != late["keys"]:
        raise ValueError("the early and late embedding passes cover different samples")
    tensors = {"sentence_ids": early["sentence_ids"].long().contiguous(),
               "v0": early["video"].float().contiguous(), "t0": early["text"].float().contiguous(),
               "v1": late["video"].float().contiguous(), "t1": late["text"].float().contiguous()}
    if delta is not None:
        tensors["delta"] = delta.float().contiguous()
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata={"keys": json.dumps(early["keys"]), "meta": json.dumps(meta)})


TABLE_INDEX = "index.json"


def table_info(path) -> tuple[int, bool]:
    """(samples, whether the table is dense: CiCo-scored) of a table file or sharded table directory,
    without reading its tensors."""
    import json

    from safetensors import safe_open
    if Path(path).is_dir():
        return sum(p["rows"] for p in _table_index(path)["parts"]), False
    with safe_open(str(path), framework="pt") as f:
        return len(json.loads(f.metadata()["keys"])), "delta" in f.keys()


def _table_index(path) -> dict:
    import json
    f = Path(path) / TABLE_INDEX
    if not f.is_file():
        raise FileNotFoundError(f"{path}: a sharded reference table needs {TABLE_INDEX} (an export that did not "
                                f"finish? run sclslt reference again with --resume)")
    return json.loads(f.read_text())


def _positions(pos: dict, keys: list[str], path="") -> torch.Tensor:
    """Row positions of `keys` in a table whose key -> row map is `pos`; a key that is not there is
    an error naming it."""
    missing = [k for k in keys if k not in pos]
    if missing:
        raise KeyError(f"{len(missing)} training samples are not in the reference table{f' {path}' if path else ''} "
                       f"(e.g. {missing[:5]}): it was made from other shards; re-export it")
    return torch.tensor([pos[k] for k in keys], dtype=torch.long)


def _key_rows(all_keys: list[str]) -> dict:
    return {k: i for i, k in enumerate(all_keys)}


def _load_sharded(path, device, keys, dtype) -> Table:
    """A table written as one part per exporting rank (sclslt reference --out DIR)."""
    import json

    from safetensors import safe_open
    parts = _table_index(path)["parts"]
    if keys is None:
        tabs = [load_table(Path(path) / p["name"], "cpu", None, dtype) for p in parts]
    else:
        want, tabs = set(keys), []
        for p in parts:
            with safe_open(str(Path(path) / p["name"]), framework="pt") as f:
                mine = [k for k in json.loads(f.metadata()["keys"]) if k in want]
            if mine:
                tabs.append(load_table(Path(path) / p["name"], "cpu", mine, dtype))
    all_keys = [k for tb in tabs for k in tb.keys]
    r = None if keys is None else _positions(_key_rows(all_keys), keys, path)   # back to the order asked for
    cols = {v: torch.cat([getattr(tb, v) for tb in tabs]) for v in ("sentence_ids", "v0", "t0", "v1", "t1")}
    if r is not None:
        cols, all_keys = {v: x[r] for v, x in cols.items()}, list(keys)
    return Table(keys=all_keys, **cols, device=device, dtype=dtype)


def load_table(path, device="cpu", keys: list[str] | None = None, dtype: torch.dtype = torch.float64) -> Table:
    """A reference table; with `keys`, only those rows (a rank's pool: the file is read in contiguous
    slices, never whole), stored in `dtype` (see `Table`: float16 for corpora of millions of clips)."""
    import json

    from safetensors import safe_open
    if Path(path).is_dir():
        return _load_sharded(path, device, keys, dtype)
    with safe_open(str(path), framework="pt") as f:
        md = f.metadata()
        all_keys = json.loads(md["keys"])
        if keys is None:
            t = {k: f.get_tensor(k) for k in f.keys()}
            return Table(keys=all_keys, sentence_ids=t["sentence_ids"], v0=t["v0"], t0=t["t0"], v1=t["v1"],
                         t1=t["t1"], device=device, delta=t.get("delta"), dtype=dtype)
        if "delta" in f.keys():
            raise ValueError(f"{path}: a dense (CiCo-scored) table is whole on every rank; load it without keys")
        want = _positions(_key_rows(all_keys), keys, path)
        order = torch.sort(want)
        idx = order.values
        runs = torch.nonzero(idx[1:] != idx[:-1] + 1).flatten() + 1       # starts of contiguous runs
        bounds = list(zip([0] + runs.tolist(), runs.tolist() + [len(idx)]))
        t = {}
        for name in ("sentence_ids", "v0", "t0", "v1", "t1"):
            sl = f.get_slice(name)
            parts = [sl[int(idx[a]):int(idx[b - 1]) + 1] for a, b in bounds]
            x = torch.cat(parts) if parts else sl[0:0]
            x = x if name == "sentence_ids" else x.to(dtype)
            t[name] = torch.empty_like(x).index_copy_(0, order.indices, x)   # back to the order of `keys`
    return Table(keys=list(keys), sentence_ids=t["sentence_ids"], v0=t["v0"], t0=t["t0"], v1=t["v1"],
                 t1=t["t1"], device=device, dtype=dtype)


def save_snapshot(path, emb: dict) -> None:
    """One embedding pass (keys, sentence ids, pooled video/text) as safetensors."""
    import json

    from safetensors.torch import save_file
    with atomic_path(path) as tmp:
        save_file({"sentence_ids": emb["sentence_ids"].long().contiguous(), "video": emb["video"].float().contiguous(),
                   "text": emb["text"].float().contiguous()}, str(tmp), metadata={"keys": json.dumps(emb["keys"])})


def load_snapshot(path) -> dict:
    import json

    from safetensors import safe_open
    with safe_open(str(path), framework="pt") as f:
        out = {k: f.get_tensor(k) for k in f.keys()}
        out["keys"] = json.loads(f.metadata()["keys"])
    return out


def table_from_snapshots(early: dict, late: dict, device="cpu") -> Table:
    if early["keys"] != late["keys"]:
        raise ValueError("the early and late embedding passes cover different samples")
    return Table(keys=list(early["keys"]), sentence_ids=early["sentence_ids"], v0=early["video"], t0=early["text"],
                 v1=late["video"], t1=late["text"], device=device)


@dataclass
class PlanStats:
    relaxed: int = 0                 # members admitted despite a member's sentence id (nothing else left)
    picks: int = 0
    close_relaxed: int = 0           # members admitted despite a close member (separate_close; nothing else, or due)


THRESHOLD_ROWS = 2000


def threshold_keys(keys: list[str], seed: int, rows: int = THRESHOLD_ROWS) -> list[str]:
    """The clips `close_thresholds` reads: `rows` of the training keys drawn with `seed` from their sorted
    order (the same whatever order, pool or epoch the keys come in)."""
    ordered = sorted(keys)
    pick = torch.randperm(len(ordered), generator=torch.Generator().manual_seed(seed))[:rows]
    return [ordered[i] for i in pick.sort().values.tolist()]


def close_thresholds(table: Table, keys: list[str], q: float) -> tuple[float, float]:
    """`selection.separate_close`'s High at each checkpoint: the (1 - q) quantiles of s_early and s_late
    (`Table.pair_similarity`: symmetric pooled similarity) over every pair of different sentences among
    the clips `keys` (`threshold_keys`: a fixed sample of the whole table, so the thresholds are a property
    of the table and the seed, not of a pool or an epoch)."""
    r = table.rows(keys).to(table.v0.device)
    sid = table.sentence_ids[r.cpu()]
    neg = (sid[:, None] != sid[None, :]).to(table.v0.device)
    if not bool(neg.any()):
        raise ValueError("selection.separate_close: the reference table's sample holds one sentence only")

    def sym(v, t):
        a, b = v[r].double(), t[r].double()
        return ((a @ b.t() + b @ a.t()) / 2)[neg]
    return tuple(float(torch.quantile(sym(v, t).cpu().float(), 1 - q)) for v, t in ((table.v0, table.t0),
                                                                                     (table.v1, table.t1)))


def nearest_rank(q: float, n: int) -> int:
    """The position nearest q (n - 1) in a sorted list of n (a tie goes to the lower position)."""
    return max(0, math.ceil(q * (n - 1) - 0.5))


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
        self.close = None              # (s_early, s_late) thresholds of separate_close, set by plan_epoch

    def quantile(self, epoch: int, epochs: int) -> float:
        return curriculum_quantile(self.cfg.schedule, epoch / max(1, epochs), self.cfg.log_base)

    def pools(self, keys: list[str], epoch: int) -> list[list[str]]:
        """The epoch's canonical pools: `epoch_order`'s batches, flattened, cut into whole-batch pools."""
        order = epoch_order(keys, self.seed, epoch, self.batch)
        n, p = len(order), min(self.cfg.pools, max(1, len(order)))
        cuts = [n * i // p for i in range(p + 1)]
        return [[k for b in order[cuts[i]:cuts[i + 1]] for k in b] for i in range(p)]

    def plan_epoch(self, keys: list[str], epoch: int, epochs: int, table_for, rank: int = 0, world: int = 1,
                   all_gather_object=None) -> list[list[str]]:
        """The epoch's global batches (keys, in global order). `table_for(pool_keys)` gives a table that
        holds at least those keys' rows; with world > 1, `all_gather_object` exchanges the pools' plans."""
        pools, q = self.pools(keys, epoch), self.quantile(epoch, epochs)
        if self.cfg.separate_close > 0:
            sample = threshold_keys(keys, rng_seed(self.seed, 8))
            self.close = close_thresholds(table_for(sample), sample, self.cfg.separate_close)
        mine = {p: self.plan_pool(table_for(pk), pk, epoch, p, q) for p, pk in enumerate(pools) if p % world == rank}
        if world > 1:
            out = [None] * world
            all_gather_object(out, (mine, self.stats))
            mine, self.stats = {}, PlanStats()
            for plans, stats in out:
                mine.update(plans)
                for f in ("relaxed", "picks", "close_relaxed"):
                    setattr(self.stats, f, getattr(self.stats, f) + getattr(stats, f))
        longest = max(len(b) for b in mine.values())
        return [mine[p][j] for j in range(longest) for p in range(len(pools)) if j < len(mine[p])]

    def plan_pool(self, table: Table, keys: list[str], epoch: int, pool: int, q: float,
                  max_batches: int | None = None) -> list[list[str]]:
        """Exact greedy over one pool: batches of `global_batch` keys, every key of the pool in one batch
        (the first `max_batches` only, if given: the benchmark's timing).

        Batch j: a random seed, then one member at a time (`selection.chunk` at a time: `_one_batch`),
        the candidate at quantile q of Delta(u; C) against the members so far, among the pool's unused
        candidates whose sentence no member has (all unused ones if none is left: counted as relaxed), and,
        with `selection.separate_close` q, that no member is close to: the pair's symmetric pooled
        similarity at or above the table's (1 - q) quantile of negatives at BOTH checkpoints (H->H at the
        top q: a likely false negative, e.g. a paraphrase; issue 24). `selection.allow_same_sentence`
        drops the id rule (and its due copies): the planner the paper describes.
        A sentence with as many unused copies as batches left is due: its copies go first, one per batch
        (otherwise keeping copies apart piles them up at the epoch's end, where they must meet; measured
        in benchmarks/results/ps_experiment.md). Delta is kept per candidate and grows by one
        matrix-vector product per step, over the scoring copy of the pool's rows, which is compacted to
        the unused ones whenever they fall below 3/4 of it (so a batch costs its steps' products only)."""
        rows = table.rows(keys)
        n_batches = len(keys) // self.batch
        sids = table.sentence_ids[rows]
        if self.cfg.allow_same_sentence:      # no id rule: every clip its own "sentence" (none is ever due)
            sids = torch.arange(len(keys), dtype=torch.long)
        _, sidx = torch.unique(sids, return_inverse=True)
        unused_copies = torch.bincount(sidx)
        side = table.pool_side(rows)
        used = torch.zeros(len(keys), dtype=torch.bool)
        pos, cur = torch.arange(len(keys)), side            # pool positions of the scoring copy's rows
        plan = []
        for b in range(n_batches if max_batches is None else min(n_batches, max_batches)):
            avail = ~used[pos]
            if float(avail.float().mean()) < 0.75:
                pos = pos[avail]
                cur, avail = side[pos.to(side.device)], avail[avail]
            members = self._one_batch(table, rows[pos], cur, avail, sids[pos],
                                      unused_copies[sidx[pos]] >= n_batches - b, q,
                                      torch.Generator().manual_seed(rng_seed(self.seed, epoch, pool, b, 6)), self.close)
            members = pos[members]
            used[members] = True
            unused_copies -= torch.bincount(sidx[members], minlength=len(unused_copies))
            plan.append([keys[i] for i in members.tolist()])
        return plan

    def _one_batch(self, table: Table, rows, side, avail, sids, due, q: float, gen, close=None) -> torch.Tensor:
        """One global batch, as positions in `rows` (the scoring copy `side`'s rows; `avail`: unused).
        With `selection.chunk` c > 1, each step after the seed takes the c candidates nearest the quantile
        (distinct sentences), all scored against the same members: c times fewer steps and products.
        `close` (s_early, s_late thresholds: `selection.separate_close`): a candidate at or above both with
        a member clashes with it as a member's sentence does (a chunk's members are checked against the
        members before the step, not against each other)."""
        dense = table.delta is not None
        rows_dev = rows.to(table.v1.device)
        acc = torch.zeros(len(rows), dtype=torch.float64, device=table.v1.device)
        taken = ~avail
        clash = torch.zeros(len(rows), dtype=torch.bool)       # a member's sentence
        near = torch.zeros(len(rows), dtype=torch.bool)        # close to a member (separate_close)
        picked: list[int] = []
        while len(picked) < self.batch:
            cand, relaxed, close_relaxed = self._candidates(~taken, clash, near, due)
            cand = cand.nonzero().flatten()
            if not picked:
                new = [int(cand[torch.randint(len(cand), (1,), generator=gen)])]
            else:
                new = self._nearest(acc[cand.to(acc.device)].cpu(), cand, sids, q,
                                    min(self.cfg.chunk, self.batch - len(picked)), relaxed)
            for i in new:
                taken[i] = True
                clash |= sids == sids[i]
                if close is not None:
                    s0, s1 = table.pair_similarity(side, int(rows[i]))
                    near |= ((s0 >= close[0]) & (s1 >= close[1])).cpu()
                picked.append(i)
            r = rows_dev[torch.tensor(new, device=rows_dev.device)]      # one product per step, whatever chunk
            if dense:
                acc += table.delta[:, r][rows_dev].sum(1) + table.delta[r][:, rows_dev].sum(0)
            else:
                acc += table.candidate_delta(side, [], table.member_sums(r.tolist()))
            self.stats.relaxed += len(new) if relaxed else 0
            self.stats.close_relaxed += len(new) if close_relaxed else 0
        self.stats.picks += len(picked)
        return torch.tensor(picked, dtype=torch.long)

    @staticmethod
    def _candidates(free, clash, near, due) -> tuple[torch.Tensor, bool, bool]:
        """(candidate mask, id rule relaxed, close rule relaxed). Due copies first (one per batch, or they pile
        up at the epoch's end), even close to a member; then candidates that break no rule; the close rule
        goes before the id rule when nothing else is left."""
        id_ok = free & ~clash
        ok = id_ok & ~near
        blocked = bool((free & near).any())
        for mask, id_relaxed, close_relaxed in ((ok & due, False, False), (id_ok & due, False, True), (ok, False, False),
                                                (id_ok, False, True), (free & due, True, blocked), (free, True, blocked)):
            if bool(mask.any()):
                return mask, id_relaxed, close_relaxed
        return free, True, blocked

    @staticmethod
    def _nearest(delta: torch.Tensor, cand: torch.Tensor, sids: torch.Tensor, q: float, k: int,
                 relaxed: bool) -> list[int]:
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
