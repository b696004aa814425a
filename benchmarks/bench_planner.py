"""Benchmark of the Pair Selection planner (sclslt/selection/planner.py): cost, and distance from exact greedy.

Cost rows sweep the epoch's clips N, the global batch, `selection.pools` P and `selection.chunk` on synthetic tables
(random L2-normalised early/late video and text embeddings of dimension --dim, stored in --dtype;
random sentence ids, about 0.7 N distinct). A pool of m = N / P clips is planned by exact greedy:
one random seed a batch, then (batch - 1) / chunk steps, each one sort and one matrix-vector product
over the pool's live candidates (m x 4 dim). Timed: the pool's first k batches (the pool still full, so the
epoch's most expensive batches: later ones score fewer live candidates, about half on average), k
set so a configuration takes about --target-s seconds.

Columns:
  ms_pool_batch      milliseconds per global batch of exact greedy in one pool of m clips
  ms_batch_rank_wW   a rank's planning time per global batch of the epoch at world W: it plans
                     ceil(P / W) pools of the P, each P-th of the epoch's batches
                     (= ms_pool_batch x ceil(P / W) / P), plus one all_gather_object of the plans
                     per epoch (a few KB of keys per batch), not included
  step_frac_wW       ms_batch_rank_wW / --step-ms: the planner's overhead against one training step
  table_mb_rank      the table a rank holds: its pools' rows in --dtype plus their scoring copy
                     (float64 on the CPU), at the largest --world

Fidelity rows (--fidelity-n N): whole epochs of N clips planned with P = 1, chunk 1 (exact greedy over
the epoch) and every other --pools x --chunk, at two curriculum quantiles; per plan the distribution of each batch's
mean Delta per ordered pair (mean, quartiles), its Kolmogorov-Smirnov distance to exact greedy's, and
the share of exact greedy's same-batch pairs the pooled plan also puts together (random batches:
(batch - 1) / (N - 1)).

Torch runs on one thread (torch.set_num_threads(1)) unless --threads is given, so numbers are
comparable across machines and runs; the thread count is in every row. Results are printed as tables
and written as CSV and JSON rows tagged with device, versions, date and threads under --out.

Examples:
  python benchmarks/bench_planner.py --quick                                   # CPU smoke run (seconds)
  python benchmarks/bench_planner.py --n 8000 20000 1000000 --batch 16 256 --pools 1 16 64 256 \
      --world 1 8 64 --step-ms 80 --fidelity-n 4096                            # the README's rows
"""

from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

import dataclasses  # noqa: E402

from benchio import run_tag, write_rows  # noqa: E402

from sclslt.config import SelectionConfig  # noqa: E402
from sclslt.selection.planner import Planner  # noqa: E402
from sclslt.selection.scoring import Table  # noqa: E402


def mem_available() -> int | None:
    """Bytes of MemAvailable (Linux), None where unknown."""
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def table_bytes(n: int, dim: int, dtype: torch.dtype = torch.float64) -> int:
    """Four (n, dim) matrices in `dtype`."""
    return 4 * n * dim * torch.finfo(dtype).bits // 8


def rank_bytes(n: int, dim: int, dtype: torch.dtype) -> int:
    """A pool's rows in `dtype` and its scoring copy (`Table.pool_side`: float64 on the CPU)."""
    side = dtype if torch.cuda.is_available() else torch.float64
    return table_bytes(n, dim, dtype) + table_bytes(n, dim, side)


def synthetic_table(n: int, dim: int, seed: int = 0, dtype: torch.dtype = torch.float64) -> Table:
    g = torch.Generator().manual_seed(seed)

    def unit(base=None):  # built in blocks of rows, so a million rows never need float64 copies
        out = torch.empty(n, dim, dtype=dtype)
        for i in range(0, n, 65536):
            x = torch.randn(min(65536, n - i), dim, generator=g, dtype=torch.float64)
            x /= x.norm(dim=1, keepdim=True)
            if base is not None:  # late = early moved a little, as between two checkpoints of one run
                x = base[i : i + len(x)].double() + 0.3 * x
                x /= x.norm(dim=1, keepdim=True)
            out[i : i + len(x)] = x.to(dtype)
        return out

    v0, t0 = unit(), unit()
    v1, t1 = unit(v0), unit(t0)
    sids = torch.randint(0, max(1, int(0.7 * n)), (n,), generator=g)
    return Table(
        keys=[f"s{i:07d}" for i in range(n)],
        sentence_ids=sids,
        v0=v0,
        t0=t0,
        v1=v1,
        t1=t1,
        device="cuda" if torch.cuda.is_available() else "cpu",
        dtype=dtype,
    )  # scored where a run scores


def pool_cost(table: Table, n_pool: int, batch: int, k: int, chunk: int = 1) -> float:
    """Seconds per global batch of exact greedy in one canonical pool of `n_pool` clips: the pool's first
    k batches (`Planner.plan_pool` stopped after k; the pool still full, so the epoch's most expensive
    batches), the pool's scoring copy (`Table.pool_side`) included."""
    planner = Planner(SelectionConfig(mode="ps", schedule="log", chunk=chunk), batch, seed=0)
    keys = table.keys[:n_pool]
    t0 = time.perf_counter()
    got = planner.plan_pool(table, keys, 1, 0, planner.quantile(1, 4), max_batches=k)
    return (time.perf_counter() - t0) / len(got)


def rank_ms(ms_pool_batch: float, pools: int, world: int) -> float:
    """A rank's planning time per global batch of the epoch: it plans ceil(pools / world) of the pools,
    each pools-th of the epoch's batches."""
    return ms_pool_batch * math.ceil(pools / world) / pools


def bench(args) -> list[dict]:
    rows: list[dict] = []
    for n in sorted(args.n):
        table = None
        for p in sorted(args.pools):
            m = n // p
            avail, need = mem_available(), int(1.25 * rank_bytes(m, args.dim, args.dtype))  # one pool's table
            if avail is not None and need > 0.8 * avail:
                reason = f"memory: a pool needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
                rows += [
                    dict(kind="cost", n=n, batch=b, pools=p, chunk=c, pool_size=m, dim=args.dim, skipped=reason)
                    for b in args.batch
                    for c in args.chunk
                    if b <= m
                ]
                continue
            for b, c in [(b, c) for b in sorted(args.batch) for c in sorted(args.chunk)]:
                row = dict(
                    kind="cost", n=n, batch=b, pools=p, chunk=c, pool_size=m, dim=args.dim, dtype=str(args.dtype)[6:]
                )
                if b > m:
                    continue  # not valid: a pool smaller than a batch
                rate = 1e12 if torch.cuda.is_available() else 1e9  # bytes/s a product reads, roughly
                pred = b / c * m * 4 * args.dim * 8 / rate  # ~ seconds for one batch: b / c products
                if pred > args.budget_s:
                    row["skipped"] = f"budget: predicted {pred:.1f} s a batch > {args.budget_s:g} s"
                    rows.append(row)
                    print(fmt(row), flush=True)
                    continue
                if table is None or len(table.keys) < m:
                    table = synthetic_table(m, args.dim, dtype=args.dtype)
                probe = pool_cost(table, m, b, 1, c)
                k = max(1, min(args.max_k, m // b, int(args.target_s / max(probe, 1e-6))))
                secs = pool_cost(table, m, b, k, c) if k > 1 else probe
                row.update(
                    k_batches=k,
                    ms_pool_batch=secs * 1e3,
                    table_mb_rank=rank_bytes(m * math.ceil(p / max(args.world)), args.dim, args.dtype) / 2**20,
                )
                for w in args.world:
                    row[f"ms_batch_rank_w{w}"] = rank_ms(row["ms_pool_batch"], p, w)
                    if args.step_ms:
                        row[f"step_frac_w{w}"] = row[f"ms_batch_rank_w{w}"] / args.step_ms
                rows.append(row)
                print(fmt(row), flush=True)
        del table
    return rows


def fidelity(args) -> list[dict]:
    """How far canonical pools' batches are from exact greedy's over one epoch of --fidelity-n clips:
    each batch's mean Delta per ordered pair, their distribution over the epoch (mean, quartiles) and
    the Kolmogorov-Smirnov distance to exact greedy's; the share of exact greedy's same-batch pairs that
    the pooled plan also puts together (random batches: (batch - 1) / (N - 1))."""
    n, b = args.fidelity_n, args.fidelity_batch
    table = synthetic_table(n, args.dim, dtype=args.dtype)
    cfg = SelectionConfig(mode="ps", schedule="log")
    delta = table.v1 @ table.t1.T - table.v0 @ table.t0.T

    def scores(plan):
        out = []
        for batch in plan:
            r = table.rows(batch)
            d = delta[r][:, r]
            out.append(float((d.sum() - d.diagonal().sum()) / (len(r) * (len(r) - 1))))
        return torch.tensor(out, dtype=torch.float64)

    def pairs(plan):
        return {(min(x, y), max(x, y)) for batch in plan for i, x in enumerate(batch) for y in batch[i + 1 :]}

    rows, exact, exact_pairs = [], None, None
    for epoch in (1, 3):
        for p, c in sorted({(1, 1), *((p, c) for p in args.pools for c in args.chunk)}):
            t0 = time.perf_counter()
            plan = Planner(dataclasses.replace(cfg, pools=p, chunk=c), b, 0).plan_epoch(
                table.keys, epoch, 4, lambda keys: table
            )
            secs = time.perf_counter() - t0
            sc = scores(plan)
            if (p, c) == (1, 1):
                exact, exact_pairs = sc, pairs(plan)
            grid = torch.sort(torch.cat([exact, sc])).values
            ks = float(
                (
                    torch.searchsorted(torch.sort(exact).values, grid, right=True) / len(exact)
                    - torch.searchsorted(torch.sort(sc).values, grid, right=True) / len(sc)
                )
                .abs()
                .max()
            )
            q = torch.quantile(sc, torch.tensor([0.25, 0.5, 0.75], dtype=torch.float64)).tolist()
            rows.append(
                dict(
                    kind="fidelity",
                    n=n,
                    batch=b,
                    pools=p,
                    chunk=c,
                    epoch=epoch,
                    quantile=Planner(cfg, b, 0).quantile(epoch, 4),
                    plan_s=secs,
                    mean_delta=float(sc.mean()),
                    q25=q[0],
                    q50=q[1],
                    q75=q[2],
                    ks_vs_exact=ks,
                    pair_overlap=len(pairs(plan) & exact_pairs) / len(exact_pairs),
                    pair_overlap_random=(b - 1) / (n - 1),
                )
            )
            print(fmt(rows[-1]), flush=True)
    return rows


def fmt(row: dict) -> str:
    return " ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items())


def write(rows: list[dict], out: Path, tag: dict) -> Path:
    from rich.console import Console
    from rich.table import Table as RichTable

    base = write_rows(rows, out, "planner", tag)
    threads = tag["threads"]
    for kind in ("cost", "fidelity"):
        part = [r for r in rows if r.get("kind", "cost") == kind]
        if not part:
            continue
        title = (
            f"Pair Selection planner ({kind}) | {tag['device']} | torch {tag['versions']['torch']} | {threads} "
            f"thread{'s' if threads != 1 else ''} | dim {part[0].get('dim', '')} | step_ms {tag['step_ms']}"
        )
        table = RichTable(title=title)
        cols = [c for c in dict.fromkeys(k for r in part for k in r) if c not in ("kind", "dim", "dtype")]
        for c in cols:
            table.add_column(c, justify="left" if c == "skipped" else "right")
        for r in part:
            table.add_row(*[f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols])
        Console(width=220).print(table)
    print(f"wrote {base}.csv and {base}.json")
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[1000, 4000, 16000, 64000, 256000, 1000000],
        help="pool size N: rows of the table, split over the ranks (default 1k..1M)",
    )
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256], help="global batch")
    p.add_argument("--pools", type=int, nargs="+", default=[1, 16, 64, 256], help="selection.pools")
    p.add_argument("--chunk", type=int, nargs="+", default=[1], help="selection.chunk")
    p.add_argument(
        "--world",
        type=int,
        nargs="+",
        default=[1, 8, 64],
        help="world sizes the per-rank cost is given for (ranks share the pools out)",
    )
    p.add_argument(
        "--fidelity-n",
        type=int,
        default=0,
        help="also plan whole epochs of this many clips with every --pools against exact greedy (pools 1)",
    )
    p.add_argument("--fidelity-batch", type=int, default=16, help="global batch of the fidelity epochs")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension of the synthetic table")
    p.add_argument(
        "--dtype",
        default="float64",
        choices=("float64", "float32", "float16", "bfloat16"),
        help="table storage dtype (selection.table_dtype)",
    )
    p.add_argument(
        "--budget-s",
        type=float,
        default=30.0,
        help="skip a configuration whose single batch is predicted to take longer",
    )
    p.add_argument("--target-s", type=float, default=2.0, help="about this many seconds of timing per configuration")
    p.add_argument("--max-k", type=int, default=50, help="at most this many batches timed per configuration")
    p.add_argument(
        "--step-ms",
        type=float,
        default=None,
        help="measured training step time in ms (README main job: ~80 on the 2-core CPU); "
        "without it step_frac is left empty",
    )
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1, for comparable numbers)")
    p.add_argument(
        "--quick",
        action="store_true",
        help="tiny sweep (N 1k/4k, batch 16/64, pools 1/4, chunk 1/4, fidelity at N 512): checks the script",
    )
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.quick:
        args.n, args.batch, args.pools, args.world, args.chunk = [1000, 4000], [16, 64], [1, 4], [1, 8], [1, 4]
        args.target_s, args.fidelity_n = min(args.target_s, 0.2), 512
    torch.set_num_threads(args.threads or 1)
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}" + ("" if args.threads else " (default; --threads to change)"))
    tag = run_tag(threads=threads, step_ms=args.step_ms, bench="planner")
    rows = bench(args) + (fidelity(args) if args.fidelity_n else [])
    write(rows, args.out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
