"""Benchmark of the Pair Selection planner (sclslt/selection/planner.py): time per global batch.

Sweeps pool size N (rows of the reference table), global batch, simulated world size and chunk
(members each rank adds per round) on synthetic tables: random L2-normalised early/late video and
text embeddings of dimension --dim, stored in --dtype (`Table.dtype`: float64 by default; float16
is the setting for millions of clips), and random sentence ids with duplicates (about 0.7 N
distinct sentences). The N rows are split at random over the `world` ranks
and the epoch is planned with
    Planner(SelectionConfig(mode="ps", chunk=c, schedule="log"), table, micro=batch // world,
            world=world, seed=0).plan_epoch_local(pools, epoch=1, epochs=4, n_batches=K)
A first call with K=1 (cold; also the budget probe) sets K so that one configuration takes about
--target-s seconds (K <= N / batch: within one epoch); the reported time is the second call's / K,
or the probe itself where one batch already takes --target-s or more (note "cold single batch").

Columns:
  ms_batch       planner time per global batch, all ranks together: `plan_epoch_local` simulates
                 every rank in one process, so this is the total work of the cluster
  ms_batch_rank  per-rank estimate ms_batch / world: in a real run each rank scores only its own
                 pool and the ranks run in parallel (plus one all_gather_object per round, not
                 included here: add rounds_batch x the gather latency of the cluster)
  rounds_batch   planner rounds per global batch (1 seed round + ceil(micro / chunk))
  setup_s        the epoch's pool set-up (all ranks), once per epoch: excluded from ms_batch
  table_mb_rank  a rank's table in memory: its pool's rows (N / world) in --dtype, plus the pool's
                 contiguous scoring copy (`RankPool.side`: 4 x dim values per row, in --dtype on a GPU,
                 widened to float64 on the CPU, where widening every round would cost more than scoring)
  comm_kb_batch  bytes one rank receives per global batch through the per-round all_gather_object:
                 every member once (its pickled pick: row, sentence id, position, the member-side
                 vector of 4 x dim values in --dtype); sent: its own micro-batch's share
  step_frac      ms_batch_rank / --step-ms: the planner's overhead relative to one training step
                 (an epoch is planned before it starts, n_batches x ms_batch_rank, against
                 n_batches x step_ms of training). Empty without --step-ms; the README's measured
                 main job (stage 1, tiny model, 1 CPU rank) runs at ~80 ms per step on this
                 project's 2-core CPU machine, so quote it with `--step-ms 80` there.

Configurations with batch > N or batch // world < 1 are not run (not valid). A configuration
whose cold probe would exceed --budget-s (predicted from the measured smaller N / smaller batch of
the same world and chunk: time ~ N x rounds), or whose table would not fit in memory, is recorded
as skipped with the reason; one that exceeds it when measured stops its sweep (larger N and batch).

Torch runs on one thread (torch.set_num_threads(1)) unless --threads is given, so numbers are
comparable across machines and runs; the thread count is in every row.

Results are printed as a table and written as CSV and JSON rows tagged with device, versions,
date and threads under --out (planner-<date>.csv/json).

Examples:
  python benchmarks/bench_planner.py --quick                         # CPU smoke run (seconds)
  python benchmarks/bench_planner.py --n 1000 4000 16000 64000 --batch 16 64 256 --world 1 8 \\
      --chunk 1 16 --budget-s 20 --step-ms 80                        # medium sweep (minutes)
  python benchmarks/bench_planner.py                                 # full sweep, N up to 1M
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))    # run from a checkout

from sclslt.config import SelectionConfig  # noqa: E402
from sclslt.benchio import run_tag, write_rows  # noqa: E402
from sclslt.selection.planner import Planner, Table  # noqa: E402


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

    def unit(base=None):      # built in blocks of rows, so a million rows never need float64 copies
        out = torch.empty(n, dim, dtype=dtype)
        for i in range(0, n, 65536):
            x = torch.randn(min(65536, n - i), dim, generator=g, dtype=torch.float64)
            x /= x.norm(dim=1, keepdim=True)
            if base is not None:      # late = early moved a little, as between two checkpoints of one run
                x = base[i:i + len(x)].double() + 0.3 * x
                x /= x.norm(dim=1, keepdim=True)
            out[i:i + len(x)] = x.to(dtype)
        return out
    v0, t0 = unit(), unit()
    v1, t1 = unit(v0), unit(t0)
    sids = torch.randint(0, max(1, int(0.7 * n)), (n,), generator=g)
    return Table(keys=[f"s{i:07d}" for i in range(n)], sentence_ids=sids, v0=v0, t0=t0, v1=v1, t1=t1,
                 device="cuda" if torch.cuda.is_available() else "cpu", dtype=dtype)   # scored where a run scores


def split_pools(n: int, world: int, seed: int = 0) -> dict[int, torch.Tensor]:
    g = torch.Generator().manual_seed(seed + 1)
    perm = torch.randperm(n, generator=g)
    return {r: rows for r, rows in enumerate(torch.tensor_split(perm, world))}


def plan(table: Table, pools: dict, batch: int, world: int, chunk: int, k: int) -> tuple[float, Planner, dict]:
    """Seconds for k batches, the epoch's pool set-up (once per epoch: the pools' scoring copies) excluded;
    the set-up's seconds are in planner.setup_s."""
    cfg = SelectionConfig(mode="ps", chunk=chunk, schedule="log")
    planner = Planner(cfg, table, micro=batch // world, world=world, seed=0)
    t0 = time.perf_counter()
    built = planner._pools(pools, 1, k)
    t1 = time.perf_counter()
    plans = planner._run(built, k, planner.quantile(1, 4), lambda x: x)
    planner.setup_s = t1 - t0
    return time.perf_counter() - t1, planner, plans


def pick_bytes(table: Table) -> int:
    """Pickled size of one pick as the planner's gather sends it (row, sid, position, relaxed, vector)."""
    import pickle
    return len(pickle.dumps((123456, 2**62, 1234, False, table.member_vec(0).cpu())))


def rounds_per_batch(micro: int, chunk: int) -> int:
    return 1 + math.ceil(max(0, micro - 1) / chunk)


def predict_s(cfg: dict, measured: list[dict]) -> float:
    """Cold-probe seconds of cfg from measured rows of the same world and chunk with N' <= N and
    batch' <= batch, scaled by N / N' x rounds / rounds' (a lower bound: sorting is N log N)."""
    best = 0.0
    r = rounds_per_batch(cfg["batch"] // cfg["world"], cfg["chunk"])
    for m in measured:
        if (m["world"], m["chunk"]) != (cfg["world"], cfg["chunk"]) or m["n"] > cfg["n"] or m["batch"] > cfg["batch"]:
            continue
        rm = rounds_per_batch(m["micro"], m["chunk"])
        best = max(best, m["probe_s"] * cfg["n"] / m["n"] * r / rm)
    return best


def bench(args) -> list[dict]:
    rows: list[dict] = []
    measured: list[dict] = []
    over: list[dict] = []             # configurations that exceeded the budget when measured
    invalid = 0
    for n in sorted(args.n):
        valid = [(w, c, b) for w in args.world for c in args.chunk for b in sorted(args.batch)
                 if b <= n and b // w >= 1]
        invalid += len(args.world) * len(args.chunk) * len(args.batch) - len(valid)
        if not valid:
            continue
        avail = mem_available()
        need = int(1.25 * rank_bytes(n, args.dim, args.dtype))
        if avail is not None and need > 0.8 * avail:
            reason = f"memory: needs ~{need / 2**30:.1f} GiB, {avail / 2**30:.1f} GiB available"
            for w, c, b in valid:
                rows.append(dict(n=n, batch=b, world=w, chunk=c, micro=b // w, dim=args.dim, skipped=reason))
            print(f"N={n}: skipped ({reason})", flush=True)
            continue
        t0 = time.perf_counter()
        table = synthetic_table(n, args.dim, dtype=args.dtype)
        print(f"N={n}: table built in {time.perf_counter() - t0:.1f} s", flush=True)
        pools_by_world = {}
        for w, c, b in valid:
            micro = b // w
            row = dict(n=n, batch=b, world=w, chunk=c, micro=micro, dim=args.dim, dtype=str(args.dtype)[6:])
            stop = [o for o in over if (o["world"], o["chunk"]) == (w, c) and o["n"] <= n and o["batch"] <= b]
            pred = predict_s(row, measured)
            if stop:
                o = stop[0]
                row["skipped"] = (f"budget: N={o['n']} batch={o['batch']} took {o['probe_s']:.1f} s "
                                  f"> {args.budget_s:g} s")
            elif pred > args.budget_s:
                row["skipped"] = f"budget: predicted {pred:.1f} s > {args.budget_s:g} s"
            if "skipped" in row:
                rows.append(row)
                print(fmt(row), flush=True)
                continue
            if w not in pools_by_world:
                pools_by_world[w] = split_pools(n, w)
            pools = pools_by_world[w]
            probe_s, probe, _ = plan(table, pools, b, w, c, 1)          # cold; also the budget probe
            row["probe_s"] = probe_s
            if probe_s > args.budget_s:                                # report it, stop the sweep
                secs, planner, k = probe_s, probe, 1
                over.append(row)
                row["note"] = "over budget: cold single batch; larger N / batch skipped"
            elif probe_s >= args.target_s:                             # slow enough: the probe is the measurement
                secs, planner, k = probe_s, probe, 1
                row["note"] = "cold single batch"
            else:
                k = max(1, min(args.max_k, n // b, int(args.target_s / max(probe_s, 1e-6))))
                secs, planner, plans = plan(table, pools, b, w, c, k)
                for r in pools:                                        # sanity: full micro-batches
                    assert all(len(mb) == micro for mb in plans[r]), "planner returned a short micro-batch"
            row["k_batches"] = k
            row["ms_batch"] = secs / k * 1e3
            row["ms_batch_rank"] = row["ms_batch"] / w
            row["rounds_batch"] = planner.stats.rounds / k
            row["setup_s"] = planner.setup_s
            row["table_mb_rank"] = rank_bytes(-(-n // w), args.dim, args.dtype) / 2**20
            row["comm_kb_batch"] = b * pick_bytes(table) / 1024
            row["rejected_batch"] = planner.stats.rejected / k
            row["relaxed_batch"] = planner.stats.relaxed / k
            if args.step_ms:
                row["step_frac"] = row["ms_batch_rank"] / args.step_ms
            rows.append(row)
            measured.append(row)
            print(fmt(row), flush=True)
        del table, pools_by_world
    if invalid:
        print(f"{invalid} configurations not valid (batch > N or batch // world < 1): not run")
    return rows


def fmt(row: dict) -> str:
    keys = ("n", "batch", "world", "chunk", "micro", "k_batches", "ms_batch", "ms_batch_rank", "rounds_batch",
            "table_mb_rank", "comm_kb_batch", "step_frac", "skipped")
    return " ".join(f"{k}={row[k]:.3f}" if isinstance(row[k], float) else f"{k}={row[k]}" for k in keys if k in row)


def write(rows: list[dict], out: Path, tag: dict) -> Path:
    from rich.console import Console
    from rich.table import Table as RichTable
    base = write_rows(rows, out, "planner", tag)
    rows = [{**tag, **r} for r in rows]
    threads = tag["threads"]
    title = (f"Pair Selection planner | {tag['device']} | torch {tag['versions']['torch']} | {threads} thread"
             f"{'s' if threads != 1 else ''} | dim {rows[0]['dim'] if rows else ''} | step_ms {tag['step_ms']}")
    table = RichTable(title=title, caption="ms_batch: all ranks simulated in one process (total work); "
                      "ms_batch_rank = ms_batch / world: ranks plan in parallel (gather latency not included)")
    cols = ["n", "batch", "world", "chunk", "micro", "dtype", "k_batches", "rounds_batch", "setup_s", "ms_batch",
            "ms_batch_rank",
            "table_mb_rank", "comm_kb_batch", "step_frac", "note", "skipped"]
    cols = [c for c in cols if any(c in r for r in rows)]
    for c in cols:
        table.add_column(c, justify="left" if c in ("note", "skipped") else "right")
    for r in rows:
        table.add_row(*[(f"{r[c]:.3g}" if c == "step_frac" and c in r else f"{r[c]:.2f}" if isinstance(r.get(c), float)
                         else str(r.get(c, ""))) for c in cols])
    Console(width=200).print(table)
    print(f"wrote {base}.csv and {base}.json")
    return base


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--n", type=int, nargs="+", default=[1000, 4000, 16000, 64000, 256000, 1000000],
                   help="pool size N: rows of the table, split over the ranks (default 1k..1M)")
    p.add_argument("--batch", type=int, nargs="+", default=[16, 64, 256, 1024, 4096], help="global batch")
    p.add_argument("--world", type=int, nargs="+", default=[1, 8, 64], help="simulated world size")
    p.add_argument("--chunk", type=int, nargs="+", default=[1, 4, 16], help="members each rank adds per round")
    p.add_argument("--dim", type=int, default=256, help="embedding dimension of the synthetic table")
    p.add_argument("--dtype", default="float64", choices=("float64", "float32", "float16", "bfloat16"),
                   help="table storage dtype (selection.table_dtype)")
    p.add_argument("--budget-s", type=float, default=30.0,
                   help="skip a configuration whose single cold batch takes (or is predicted to take) longer")
    p.add_argument("--target-s", type=float, default=2.0, help="about this many seconds of timing per configuration")
    p.add_argument("--max-k", type=int, default=50, help="at most this many batches timed per configuration")
    p.add_argument("--step-ms", type=float, default=None,
                   help="measured training step time in ms (README main job: ~80 on the 2-core CPU); "
                        "without it step_frac is left empty")
    p.add_argument("--threads", type=int, default=None, help="torch threads (default 1, for comparable numbers)")
    p.add_argument("--quick", action="store_true",
                   help="tiny sweep (N 1k/4k, batch 16/64, world 1/8, chunk 1/4): checks the script on a CPU")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    args.dtype = getattr(torch, args.dtype)
    if args.quick:
        args.n, args.batch, args.world, args.chunk = [1000, 4000], [16, 64], [1, 8], [1, 4]
        args.target_s = min(args.target_s, 0.2)
    torch.set_num_threads(args.threads or 1)
    threads = torch.get_num_threads()
    print(f"torch threads: {threads}" + ("" if args.threads else " (default; --threads to change)"))
    tag = run_tag(threads=threads, step_ms=args.step_ms, bench="planner")
    rows = bench(args)
    write(rows, args.out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
