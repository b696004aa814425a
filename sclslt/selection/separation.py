"""`selection.separate_close`'s thresholds: where a pair of clips counts as close at both reference
checkpoints (likely false negatives, e.g. paraphrases). The planner keeps such pairs apart
(`planner.LADDER`); experiments/pair_selection/ablation.py reports them.
"""

from __future__ import annotations

import torch

from sclslt.selection.scoring import Table

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

    return tuple(
        float(torch.quantile(sym(v, t).cpu().float(), 1 - q)) for v, t in ((table.v0, table.t0), (table.v1, table.t1))
    )
