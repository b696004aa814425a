"""The reference table in memory and Pair Selection's scoring maths on it (docs/paper.md).

delta(i, j) = s_late(V_i, T_j) - s_early(V_i, T_j) from a reference table of pooled embeddings at an
early and a late checkpoint; never stored N x N, computed on demand for the candidates against the
members of the batch being built:
    Delta(u; C) = sum_{c in C} delta(u, c) + delta(c, u)          (both directions: our choice)
Low Delta = the pair's similarity fell during reference training (easy, stably separable);
high Delta = it rose (hard, confusable). The planner (`planner`) takes candidates at a curriculum
quantile of it; the table's files are `table`'s, the separate_close thresholds `close_pairs`'.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch


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
    a plan is exactly the float64 planner's plan on the table rounded to `dtype`
    (tests/unit/selection/test_selection.py); rounding can only reorder candidates whose Delta differ by
    less than the rounding (~1e-3 relative).
    """

    keys: list
    sentence_ids: torch.Tensor  # (N,) long, CPU
    v0: torch.Tensor
    t0: torch.Tensor
    v1: torch.Tensor
    t1: torch.Tensor
    device: torch.device | str = "cpu"
    delta: torch.Tensor | None = None
    dtype: torch.dtype = torch.float64
    index: dict = field(default_factory=dict)

    def __post_init__(self):
        self.index = key_rows(self.keys)
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

    def candidate_delta(
        self, side: torch.Tensor, members: list[int], sums: torch.Tensor | None = None, block: int = 16384
    ) -> torch.Tensor:
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
        return torch.cat([side[i : i + block].double() @ sums for i in range(0, len(side), block)])

    def member_vec(self, row: int) -> torch.Tensor:
        """[t1, t0, v1, v0] of one row (stored dtype): what a pick contributes to Delta's batch side."""
        return torch.cat([self.t1[row], self.t0[row], self.v1[row], self.v0[row]])

    def rows(self, keys: list[str]) -> torch.Tensor:
        return key_positions(self.index, keys)

    def pair_similarity(self, side: torch.Tensor, row: int) -> tuple[torch.Tensor, torch.Tensor]:
        """(s_early, s_late) of table row `row` with every candidate of the scoring copy `side`: the pooled
        similarity of the pair, symmetric (the mean of its two directions, as Delta sums both), float64."""
        if self.delta is not None:  # a dense table's side is its rows
            r = side.to(self.v0.device)
            pair = lambda v, t: (v[r] @ t[row] + t[r] @ v[row]).double() / 2
            return pair(self.v0, self.t0), pair(self.v1, self.t1)
        e = self.v0.shape[1]
        mv = self.member_vec(row).double()  # [t1, t0, v1, v0] against side's [v1, -v0, t1, -t0]
        late, early = mv.clone(), mv.clone()
        late[e : 2 * e], late[3 * e :] = 0, 0
        early[:e], early[2 * e : 3 * e] = 0, 0
        return -self.candidate_delta(side, [], early) / 2, self.candidate_delta(side, [], late) / 2

    def member_sums(self, members: list[int]) -> torch.Tensor:
        """[sum t1_c, sum t0_c, sum v1_c, sum v0_c] over the members: Delta's batch side."""
        m = torch.tensor(members, dtype=torch.long, device=self.v1.device)
        return torch.cat(
            [
                self.t1[m].double().sum(0),
                self.t0[m].double().sum(0),
                self.v1[m].double().sum(0),
                self.v0[m].double().sum(0),
            ]
        )


def key_positions(pos: dict, keys: list[str], path="") -> torch.Tensor:
    """Row positions of `keys` in a table whose key -> row map is `pos`; a key that is not there is
    an error naming it."""
    missing = [k for k in keys if k not in pos]
    if missing:
        raise KeyError(
            f"{len(missing)} training samples are not in the reference table{f' {path}' if path else ''} "
            f"(e.g. {missing[:5]}): it was made from other shards; re-export it"
        )
    return torch.tensor([pos[k] for k in keys], dtype=torch.long)


def key_rows(all_keys: list[str]) -> dict:
    """The key -> row map of a table whose rows are `all_keys`."""
    return {k: i for i, k in enumerate(all_keys)}
