"""Microbenchmarks of the fused contrastive kernels against the usual ways of computing the same loss.

InfoNCE over gathered negatives, one rank's view: b = n / world local rows against n gathered
columns of dimension d (`--world` simulates the cluster size). Implementations, side by side in one
run on the same inputs:
  fused     sclslt_kernels.infonce (Triton; no b x n logits)
  eager     the reference: materialised logits, id mask, logsumexp
  compile   torch.compile of the reference
  openclip  open_clip's gathered local loss (logits = s q k^T, cross entropy; no id mask)
  infcl     the `inf-cl` package (Inf-CLIP's tiled loss), where it installs
Reported per row: forward and forward+backward time (median of --repeat), peak extra memory, and
achieved TFLOP/s (2bnd forward, 6bnd forward+backward) as a fraction of plain matmuls of the same
shapes timed in the same run (`mm_frac`: 1.0 = as fast as the matmul floor).

CiCo similarity (`--cico`): fused kernel vs the eager reference (and torch.compile) at the issue's
shape b=64, n=1024, T=64, L=32, d=512 by default.

Results are printed as a table and appended as CSV and JSON rows tagged with device, versions and
date under --out. On a CPU the numbers only show that the script works (`--quick` keeps it small;
the fused path then runs in the Triton interpreter if TRITON_INTERPRET=1).

Examples:
  python benchmarks/bench_kernels.py                         # full InfoNCE sweep (GPU)
  python benchmarks/bench_kernels.py --cico                  # the CiCo comparison (GPU)
  TRITON_INTERPRET=1 python benchmarks/bench_kernels.py --quick --out /tmp/bench   # smoke test on CPU
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchio import run_tag, write_rows  # noqa: E402

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}


def sync():
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def timed(fn, repeat: int, warmup: int) -> float:
    """Median milliseconds of fn() over `repeat` runs."""
    for _ in range(warmup):
        fn()
    sync()
    times = []
    for _ in range(repeat):
        if torch.cuda.is_available():
            a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            a.record()
            fn()
            b.record()
            torch.cuda.synchronize()
            times.append(a.elapsed_time(b))
        else:
            t0 = time.perf_counter()
            fn()
            times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def peak_mb(fn) -> float:
    """Peak memory fn() allocates beyond what is live before it (CUDA only; NaN elsewhere)."""
    if not torch.cuda.is_available():
        return float("nan")
    sync()
    torch.cuda.empty_cache()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    fn()
    sync()
    return (torch.cuda.max_memory_allocated() - base) / 2**20


# ---------------------------------------------------------------------------------------------
# InfoNCE implementations: each returns a scalar loss from (q, k, scale, off, q_ids, k_ids)


def one_process_group() -> None:
    """inf-cl's loss runs its ring collectives even alone: a one-rank group for it (nothing else uses it)."""
    import torch.distributed as dist

    if not dist.is_initialized():
        dist.init_process_group(
            "nccl" if torch.cuda.is_available() else "gloo", init_method="tcp://127.0.0.1:29581", rank=0, world_size=1
        )


def impls(names: list[str]) -> dict:
    """The implementations for one shape: torch.compile gets a fresh cache per shape (with dynamic=False it
    would otherwise hit its recompile limit part-way through a sweep and quietly run eager)."""
    from sclslt_kernels import infonce, infonce_reference

    out = {}
    if "fused" in names:
        out["fused"] = infonce
    if "eager" in names:
        out["eager"] = infonce_reference
    if "compile" in names:
        torch._dynamo.reset()
        out["compile"] = torch.compile(infonce_reference, dynamic=False)
    if "openclip" in names:

        def openclip(q, k, s, off, qi, ki):
            logits = s * q @ k.t()
            labels = torch.arange(q.shape[0], device=q.device) + off
            return F.cross_entropy(logits.float(), labels)

        out["openclip"] = openclip
    if "infcl" in names:
        try:
            from inf_cl import cal_inf_loss

            one_process_group()
        except Exception as e:  # noqa: BLE001 - reported in the table
            print(f"infcl: not available ({type(e).__name__}: {e})")
        else:

            def infcl(q, k, s, off, qi, ki):
                labels = torch.arange(q.shape[0], device=q.device) + off
                return cal_inf_loss(q, k, labels=labels, scale=s).mean()

            out["infcl"] = infcl
    return out


def bench_infonce(args, emit) -> None:
    dtype = DTYPES[args.dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    for world in args.world:
        for d in args.d:
            for n in args.n:
                todo = impls(args.impl)
                b = max(1, n // world)
                g = torch.Generator(device=dev).manual_seed(0)
                q = F.normalize(torch.randn(b, d, device=dev, generator=g), dim=-1).to(dtype)
                k = F.normalize(torch.randn(n, d, device=dev, generator=g), dim=-1).to(dtype)
                ids = torch.randint(0, n, (n,), device=dev, generator=g)
                off = (world // 2) * b if n >= (world // 2 + 1) * b else 0
                qi = ids[off : off + b]
                s = torch.tensor(1 / 0.07, device=dev)
                # matmul floor of the same shapes: forward q k^T; backward the two gradient products
                try:
                    logit_buf = q @ k.t()
                    t_mm_f = timed(lambda: q @ k.t(), args.repeat, args.warmup)
                    t_mm_fb = t_mm_f + timed(lambda: (logit_buf @ k, logit_buf.t() @ q), args.repeat, args.warmup)
                    logit_buf = None  # free it before the implementations run
                except Exception as e:  # noqa: BLE001 - the b x n product does not fit: no floor at this point
                    t_mm_f = t_mm_fb = float("nan")
                    print(f"matmul floor at n={n} b={b} d={d}: {type(e).__name__}", flush=True)
                    release()
                flops_f, flops_fb = 2 * b * n * d, 6 * b * n * d
                for name, fn in todo.items():
                    row = dict(kind="infonce", impl=name, n=n, b=b, d=d, world=world, dtype=args.dtype)
                    qa, ka, sa = q.clone().requires_grad_(), k.clone().requires_grad_(), s.clone().requires_grad_()

                    def fwd():
                        with torch.no_grad():
                            return fn(q, k, s, off, qi, ids)

                    def fwdbwd():
                        loss = fn(qa, ka, sa, off, qi, ids)
                        loss.backward()
                        qa.grad = ka.grad = sa.grad = None

                    try:
                        row["fwd_ms"] = timed(fwd, args.repeat, args.warmup)
                        row["fwdbwd_ms"] = timed(fwdbwd, args.repeat, args.warmup)
                        row["peak_mb"] = peak_mb(fwdbwd)
                    except Exception as e:  # noqa: BLE001 - OOM, Triton's OutOfResources/CompilationError, ...
                        row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
                        release()
                        emit(row)
                        continue
                    row["tflops_fwdbwd"] = flops_fb / row["fwdbwd_ms"] / 1e9
                    row["mm_frac"] = t_mm_fb / row["fwdbwd_ms"]
                    row["mm_floor_fwd_ms"], row["mm_floor_fwdbwd_ms"] = t_mm_f, t_mm_fb
                    row["tflops_fwd"] = flops_f / row["fwd_ms"] / 1e9
                    emit(row)


def release() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()
        torch.cuda.empty_cache()


def bench_cico(args, emit) -> None:
    from sclslt_kernels import cico_similarity, cico_similarity_reference

    dtype = DTYPES[args.dtype]
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    b, n, T, L, d = args.cico_shape
    g = torch.Generator(device=dev).manual_seed(0)
    v = F.normalize(torch.randn(b, T, d, device=dev, generator=g), dim=-1).to(dtype)
    t = F.normalize(torch.randn(n, L, d, device=dev, generator=g), dim=-1).to(dtype)
    vm = torch.rand(b, T, device=dev, generator=g) > 0.2
    tm = torch.rand(n, L, device=dev, generator=g) > 0.2
    up = torch.randn(b, n, device=dev, generator=g)
    fns = {"fused": cico_similarity, "eager": cico_similarity_reference}
    if "compile" in args.impl:
        fns["compile"] = torch.compile(cico_similarity_reference, dynamic=False)
    for name, fn in fns.items():
        row = dict(kind="cico", impl=name, b=b, n=n, T=T, L=L, d=d, dtype=args.dtype)
        va, ta = v.clone().requires_grad_(), t.clone().requires_grad_()

        def fwd():
            with torch.no_grad():
                return fn(v, vm, t, tm)

        def fwdbwd():
            fn(va, vm, ta, tm).backward(up)
            va.grad = ta.grad = None

        try:
            row["fwd_ms"] = timed(fwd, args.repeat, args.warmup)
            row["fwdbwd_ms"] = timed(fwdbwd, args.repeat, args.warmup)
            row["peak_mb"] = peak_mb(fwdbwd)
            flops = 2 * b * n * T * L * d
            row["tflops_fwdbwd"] = 3 * flops / row["fwdbwd_ms"] / 1e9  # the three GEMMs' floor
        except Exception as e:  # noqa: BLE001 - OOM, Triton's OutOfResources/CompilationError, ...
            row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:120] if str(e) else ''}"
            release()
        emit(row)


def fmt(row: dict) -> str:
    keys = (
        "impl",
        "n",
        "b",
        "d",
        "world",
        "T",
        "L",
        "fwd_ms",
        "fwdbwd_ms",
        "peak_mb",
        "tflops_fwdbwd",
        "mm_frac",
        "error",
    )
    parts = []
    for k in keys:
        if k in row:
            v = row[k]
            parts.append(f"{k}={v:.3f}" if isinstance(v, float) else f"{k}={v}")
    return " ".join(parts)


def write(rows: list[dict], out: Path, tag: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    base = write_rows(rows, out, "bench", tag)
    rows = [{**tag, **r} for r in rows]
    table = Table(title=f"{tag['device']} | torch {tag['versions']['torch']} | triton {tag['versions']['triton']}")
    cols = [
        c
        for c in (
            "kind",
            "impl",
            "n",
            "b",
            "d",
            "world",
            "T",
            "L",
            "dtype",
            "fwd_ms",
            "fwdbwd_ms",
            "peak_mb",
            "tflops_fwdbwd",
            "mm_frac",
            "error",
        )
        if any(c in r for r in rows)
    ]
    for c in cols:
        table.add_column(c)
    for r in rows:
        table.add_row(*[(f"{r[c]:.3f}" if isinstance(r.get(c), float) else str(r.get(c, ""))) for c in cols])
    Console(width=200).print(table)
    print(f"wrote {base}.csv and {base}.json")


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument(
        "--n",
        type=int,
        nargs="+",
        default=[1024 * 2**i for i in range(0, 9, 1)],
        help="gathered columns n (default 1k..256k)",
    )
    p.add_argument("--world", type=int, nargs="+", default=[8, 64], help="simulated world size: b = n / world")
    p.add_argument("--d", type=int, nargs="+", default=[256, 512, 1024], help="embedding dimension")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument(
        "--impl",
        nargs="+",
        default=["fused", "eager", "compile", "openclip", "infcl"],
        help="implementations to compare",
    )
    p.add_argument("--cico", action="store_true", help="run the CiCo comparison instead of InfoNCE")
    p.add_argument(
        "--cico-shape", type=int, nargs=5, default=[64, 1024, 64, 32, 512], metavar=("B", "N", "T", "L", "D")
    )
    p.add_argument("--repeat", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="tiny sizes, few repeats: checks the script on a CPU")
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    args = p.parse_args(argv)
    if args.quick:
        args.n, args.world, args.d, args.repeat, args.warmup = [64, 128], [8], [32], 2, 1
        args.cico_shape = [2, 4, 8, 6, 32]
        args.impl = [i for i in args.impl if i not in ("compile",)]
        if not torch.cuda.is_available():
            args.dtype = "fp32"
    tag = run_tag(triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    rows = []

    def emit(row: dict) -> None:
        """Print the row and rewrite the run's CSV/JSON with it: a crash later loses nothing measured."""
        rows.append(row)
        print(fmt(row), flush=True)
        write_rows(rows, args.out, "bench", tag)

    (bench_cico if args.cico else bench_infonce)(args, emit)
    write(rows, args.out, tag)
    return 0


if __name__ == "__main__":
    sys.exit(main())
