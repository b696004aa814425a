"""Pair Selection: curriculum global batches from the similarity dynamics of negatives (PAPER.md).

delta(i, j) = s_late(V_i, T_j) - s_early(V_i, T_j) from a reference table of pooled embeddings at an
early and a late checkpoint; never stored N x N, computed on demand for the candidates against the
members of the batch being built:
    Delta(u; C) = sum_{c in C} delta(u, c) + delta(c, u)          (both directions: our choice)
Low Delta = the pair's similarity fell during reference training (easy, stably separable);
high Delta = it rose (hard, confusable). The curriculum takes candidates at the quantile
q(alpha) of the sorted Delta, alpha = epoch / epochs, by schedule:
    easy 0 | hard 1 | linear alpha | sqrt sqrt(alpha) | log log(1 + (b - 1) alpha) / log(b).

One global pool across ranks (DESIGN.md): a rank's candidates are the samples of the shards it
reads this epoch; the global batch is built jointly in rounds. Each round every rank (with quota
left) scores its own candidates against the whole global batch so far, picks `chunk` of them at
the quantile, and the picks are all-gathered as (table index, sentence id) - a few bytes per
member; every rank holds the table, so embeddings need not travel and pixels never do. A pick
whose sentence id equals an earlier member's (or an earlier pick of the same round, in rank order)
is rejected and its rank picks again: known false negatives never enter a batch together unless a
rank has nothing else left (then they are allowed, counted, and masked in the loss anyway).
Round 0 seeds the batch with one random pick per rank. A sentence with as many unused copies in a
pool as batches left in the epoch is taken first, one copy per batch (otherwise its copies pile up
at the epoch's end and meet; see `RankPool._due_first`).

Every decision is a pure function of (seed, epoch, batch, rank, the table and the pools), computed
in the main process before the epoch starts: the plan does not depend on the number of loader
workers, and a resumed run re-plans the epoch and skips the batches it had done. `plan_epoch_local`
runs the same rounds for all ranks in one process (the reference the distributed plan must equal).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path

import torch

from sclslt.config import SelectionConfig
from sclslt.data.loader import rng_seed
from sclslt.atomic import atomic_path


def curriculum_quantile(schedule: str, alpha: float, base: float = 10.0) -> float:
    a = min(max(alpha, 0.0), 1.0)
    if schedule == "easy":
        return 0.0
    if schedule == "hard":
        return 1.0
    if schedule == "linear":
        return a
    if schedule == "sqrt":
        return math.sqrt(a)
    if schedule == "log":
        return math.log1p((base - 1) * a) / math.log(base)
    raise ValueError(f"unknown curriculum schedule {schedule!r}")


@dataclass
class Table:
    """Reference embeddings: rows aligned with `keys`; v0/t0 early, v1/t1 late (float64 for exact ties).

    delta(u, c) is v1_u . t1_c - v0_u . t0_c (pooled scoring, factorised: a round is one
    matrix-vector product), or, when the table carries `delta` (N x N, video row, text column), that
    matrix: any similarity, e.g. CiCo's, which does not factorise (tools/export_reference.py
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
                                f"finish? run tools/export_reference.py again with --resume)")
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
    """A table written as one part per exporting rank (tools/export_reference.py --out DIR)."""
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
    relaxed: int = 0                 # members admitted despite a duplicate sentence id (nothing else left)
    rejected: int = 0                # picks rejected for a duplicate sentence id and re-picked
    rounds: int = 0


class RankPool:
    """One rank's candidates for an epoch (table rows), with per-epoch use and cycling."""

    def __init__(self, rows: torch.Tensor, table: Table, seed_parts: tuple, n_batches: int):
        self.rows = rows
        self.n_batches = n_batches
        self.table = table
        self.sids = table.sentence_ids[rows]
        # pooled: Delta(u; C) = [v1_u, -v0_u, t1_u, -t0_u] . [sum t1_c, sum t0_c, sum v1_c, sum v0_c]: the
        # pool's side is gathered once per epoch, contiguous; a round is one matrix-vector product
        self.side = table.pool_side(rows)
        self.used = torch.zeros(len(rows), dtype=torch.bool)
        self.cycles = 0
        self.seed_parts = seed_parts

    def available(self, member_rows: list) -> torch.Tensor:
        """Unused candidates not already in the batch; when none is left the pool starts over (a rank
        with fewer samples than its share reuses its own, as in random mode)."""
        in_batch = (torch.isin(self.rows, torch.tensor(member_rows, dtype=torch.long)) if member_rows
                    else torch.zeros(len(self.rows), dtype=torch.bool))
        avail = ~self.used & ~in_batch
        if not bool(avail.any()):
            self.used.zero_()
            self.cycles += 1
            avail = ~in_batch
        return avail

    def pick(self, k: int, member_rows: list, member_sids: set, q: float, batch_no: int,
             round_no: int, blocked: set, sums: torch.Tensor | None = None,
             own: list | None = None) -> tuple[list[int], bool]:
        """Up to k positions in this pool (round 0 random, later at quantile q of Delta), and whether
        they had to be duplicates of members' sentences (nothing else left: relaxed). `sums`: the
        members' summed `member_vec`s; `own`: this pool's rows already in the batch."""
        avail = self.available(member_rows if own is None else own)
        free = avail.clone()
        if blocked:                       # rejected this batch for a clash; back only if nothing else
            free[torch.tensor(sorted(blocked), dtype=torch.long)] = False
        if not bool(free.any()):
            free = avail
        ok = free
        if member_sids:
            ok = free & ~torch.isin(self.sids, torch.tensor(sorted(member_sids), dtype=torch.long))
        relaxed = not bool(ok.any())
        cand = (free if relaxed else ok).nonzero().flatten()
        if len(cand) == 0:
            return [], relaxed
        if not member_rows:                                  # seed: random
            g = torch.Generator().manual_seed(rng_seed(*self.seed_parts, batch_no, round_no))
            order = cand[torch.randperm(len(cand), generator=g)]
        else:
            delta = self.table.candidate_delta(self.side, member_rows, sums).cpu()[cand]
            by_delta = torch.argsort(delta, stable=True)     # ascending: easy first; ties in pool order
            dist = (torch.arange(len(cand), dtype=torch.float64) - q * (len(cand) - 1)).abs()
            order = cand[by_delta[torch.argsort(dist, stable=True)]]   # nearest the quantile first
        order = self._due_first(order, batch_no, member_sids)
        picked, sids = [], set()
        for pos in order.tolist():
            sid = int(self.sids[pos])
            if sid in sids and not relaxed:
                continue                                     # no two same sentences within one pick
            picked.append(pos)
            sids.add(sid)
            if len(picked) == k:
                break
        return picked, relaxed


    def _due_first(self, order: torch.Tensor, batch_no: int, member_sids: set) -> torch.Tensor:
        """Candidates of a sentence with as many unused copies as there are batches left come first.

        Without this, keeping identical sentences apart defers a frequent sentence's copies to the end
        of the epoch, where they can only share batches (measured: 3.4% vs 1.0% exact-duplicate pairs,
        benchmarks/results/ps_experiment.md). Taking one copy per batch once a sentence is due spreads
        them, so duplicates meet only when a sentence has more copies than the epoch has batches.
        """
        left = self.n_batches - batch_no
        sids, counts = torch.unique(self.sids[~self.used], return_counts=True)
        due = sids[counts >= left]
        if member_sids:
            due = due[~torch.isin(due, torch.tensor(sorted(member_sids), dtype=torch.long))]
        if len(due) == 0:
            return order
        is_due = torch.isin(self.sids[order], due)
        return torch.cat([order[is_due], order[~is_due]])


class Planner:
    """Builds an epoch of global batches; `gather(picks)` exchanges one round's picks across ranks."""

    def __init__(self, cfg: SelectionConfig, table: Table, micro: int, world: int, seed: int):
        self.cfg, self.table, self.micro, self.world, self.seed = cfg, table, micro, world, seed
        self.stats = PlanStats()

    def quantile(self, epoch: int, epochs: int) -> float:
        return curriculum_quantile(self.cfg.schedule, epoch / max(1, epochs), self.cfg.log_base)

    def _run(self, pools: dict[int, RankPool], n_batches: int, q: float, gather) -> dict[int, list]:
        """The rounds for the ranks in `pools` (all of them, or this rank's alone with a real gather)."""
        plans = {r: [] for r in pools}
        for batch_no in range(n_batches):
            member_rows: list[int] = []        # rows of this table (meaningful where it is whole: dense scoring)
            member_sids: set[int] = set()
            sums = torch.zeros(4 * self.table.v1.shape[1], dtype=torch.float64)   # the members' member_vecs
            mine = {r: [] for r in pools}
            quota = {r: self.micro for r in range(self.world)}
            blocked = {r: set() for r in pools}
            round_no = 0
            while any(quota.values()):
                k_round = 1 if round_no == 0 else self.cfg.chunk
                proposals = {}
                for r, pool in pools.items():
                    k = min(k_round, quota[r])
                    picked, relaxed = pool.pick(k, member_rows, member_sids, q, batch_no, round_no,
                                                blocked[r], sums, mine[r]) if k else ([], False)
                    proposals[r] = [(int(pool.rows[p]), int(pool.sids[p]), p, relaxed,
                                     pool.table.member_vec(int(pool.rows[p])).cpu()) for p in picked]
                everyone = gather(proposals)
                if not any(everyone[r] for r in range(self.world)):
                    raise RuntimeError(f"Pair Selection: no rank could offer a candidate in batch {batch_no} "
                                       f"(quotas {quota}): pools too small for the global batch")
                for r in range(self.world):                   # rank order: the same verdicts everywhere
                    for row, sid, pos, relaxed, vec in everyone[r]:
                        if sid in member_sids and not relaxed:
                            self.stats.rejected += 1          # a same-round clash: the rank picks again
                            if r in pools:
                                blocked[r].add(pos)
                            continue
                        self.stats.relaxed += int(sid in member_sids)
                        sums += vec.double()
                        member_rows.append(row)
                        member_sids.add(sid)
                        quota[r] -= 1
                        if r in pools:
                            pools[r].used[pos] = True
                            mine[r].append(row)
                round_no += 1
            self.stats.rounds += round_no
            for r in pools:
                plans[r].append(mine[r])
        return plans

    def _pools(self, rank_rows: dict[int, torch.Tensor], epoch: int, n_batches: int,
               tables: dict[int, Table] | None = None) -> dict[int, RankPool]:
        return {r: RankPool(rows, (tables or {}).get(r, self.table), (self.seed, epoch, r), n_batches)
                for r, rows in rank_rows.items()}

    def plan_epoch(self, rows: torch.Tensor, rank: int, epoch: int, epochs: int, n_batches: int,
                   all_gather_object) -> list[list[int]]:
        """This rank's micro-batches (table rows) for the epoch, planned jointly with the other ranks."""
        pools = self._pools({rank: rows}, epoch, n_batches)

        def gather(local: dict) -> dict:
            out = [None] * self.world
            all_gather_object(out, local[rank])
            return dict(enumerate(out))
        return self._run(pools, n_batches, self.quantile(epoch, epochs), gather)[rank]

    def plan_epoch_local(self, rank_rows: dict[int, torch.Tensor], epoch: int, epochs: int,
                         n_batches: int, tables: dict[int, Table] | None = None) -> dict[int, list[list[int]]]:
        """All ranks' plans in one process: the reference for the distributed planner. `tables`: each
        rank's own table (rows of its pool only, as at scale); `rank_rows` then index those."""
        return self._run(self._pools(rank_rows, epoch, n_batches, tables), n_batches,
                         self.quantile(epoch, epochs), lambda x: x)
