"""The GPU smoke run: stages 1 and 2 on the synthetic corpus at a realistic model size, timed.

Runs the trainer (one process per device: `python launch/train.py`, or N ranks through the
`deepspeed` launcher with --gpus N) on `configs/synthetic_gpu.yaml` (ResNet-18-shaped frames at
112 px, mBART-base-like dims; bf16 chosen automatically on GPUs; ZeRO-2) for `--steps` optimizer
steps per stage, with the step-time breakdown sampled every `--sample-every` steps and NVML
telemetry on. The corpus is small and made first, in parallel, in seconds (`--clips` training clips, 64 dev
and test clips; 0: the config's own corpus), as npy shards in the synthetic cache or, with `--format jpg`,
as jpg shards in the run directory, which the trainer then reads as a shards corpus (decoded where
`--data.decode` says). Arguments it does not know go to the trainer (`--model.similarity cico`,
`--train.precision bf16`, ...). Then it reads the run's CSVs and writes one tagged row per stage (device named):

  clips/s      steady state: global batch x steps / wall time, the first `--warmup` steps excluded
  phases       mean data / h2d / forward / loss / backward / optimizer ms of the sampled steps
  peak_mem_gb  the largest peak allocated device memory of the sampled steps (GPU)
  gpu_*        mean NVML utilisation, memory, power and temperature (GPU)

  python benchmarks/gpu_smoke.py                      # one GPU, 200 steps per stage
  python benchmarks/gpu_smoke.py --gpus 8             # through the deepspeed launcher
  python benchmarks/gpu_smoke.py --quick              # tiny model on CPU: checks the script
  python benchmarks/gpu_smoke.py --deepspeed configs/zero3.json --format jpg --data.decode device \
      --model.similarity cico --train.precision bf16   # ZeRO-3, CiCo, jpg frames decoded on the GPU
"""

from __future__ import annotations

import argparse
import csv
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchio import run_tag, write_rows  # noqa: E402

QUICK = [
    "--data.synthetic.frame_size",
    "16",
    "--data.samples_per_shard",
    "16",
    "--model.backbone_hidden",
    "[8, 16]",
    "--model.backbone_depths",
    "[1, 1]",
    "--model.backbone_embedding",
    "8",
    "--model.d_model",
    "32",
    "--model.layers",
    "1",
    "--model.heads",
    "2",
    "--model.ffn",
    "64",
    "--model.embed_dim",
    "16",
    "--stage1.global_batch",
    "8",
    "--stage2.global_batch",
    "8",
    "--eval.beam",
    "1",
    "--eval.max_len",
    "8",
    "--data.num_workers",
    "0",
]


def _rows(path: Path) -> list[dict]:
    if not path.is_file():
        return []
    with open(path) as f:
        return [
            {k: float(v) if k != "stage" else v for k, v in r.items() if v not in ("", None)} for r in csv.DictReader(f)
        ]


def summarise(run: Path, stage: str, global_batch: int, warmup: int) -> dict:
    metrics = _rows(run / stage / "metrics.csv")
    if len(metrics) <= warmup + 1:
        raise SystemExit(f"{run / stage}: only {len(metrics)} steps logged; use more --steps than --warmup")
    first, last = metrics[warmup], metrics[-1]
    steps = last["step"] - first["step"]
    row = {
        "stage": stage,
        "steps": int(last["step"]),
        "global_batch": global_batch,
        "clips_per_s": steps * global_batch / max(last["wall_s"] - first["wall_s"], 1e-9),
        "final_loss": last["loss"],
    }
    timing = [r for r in _rows(run / stage / "timing.csv") if r["step"] > warmup]
    if timing:
        for k in [k for k in timing[0] if k.endswith("_ms")]:
            row[k] = sum(r[k] for r in timing) / len(timing)
        if "peak_mem_gb" in timing[0]:
            row["peak_mem_gb"] = max(r["peak_mem_gb"] for r in timing)
        row["sampled_steps"] = len(timing)
    tele = [r for r in _rows(run / stage / "telemetry.csv") if r["step"] > warmup]
    for k in ("gpu_util", "gpu_mem_gb", "gpu_power_w", "gpu_temp_c"):
        if tele:
            row[k] = sum(r[k] for r in tele) / len(tele)
    return row


def make_corpus(config: str, extra: list[str], fmt: str, workers: int, run: Path) -> list[str]:
    """Make the smoke corpus before the trainer starts (it would make it in one process); returns the
    trainer arguments that point it there (none for npy: the trainer finds the synthetic cache)."""
    import time

    from sclslt.config import load_config
    from sclslt.data.corpus import make_synthetic_shards, synthetic_shards_dir

    data = load_config(ROOT / config, extra).data
    if data.corpus != "synthetic":
        return []
    n = data.synthetic.n_train + data.synthetic.n_dev + data.synthetic.n_test
    workers = workers or max(1, min(os.cpu_count() or 1, n // 256))
    t0 = time.perf_counter()
    if fmt == "npy":
        where, args = synthetic_shards_dir(data, workers=workers), []
    else:
        where = run / "shards"
        make_synthetic_shards(
            data.synthetic, where, data.samples_per_shard, data.lowercase, workers=workers, frame_format=fmt
        )
        args = ["--data.corpus", "shards", "--data.shards_dir", str(where)]
    print(
        f"gpu_smoke: corpus of {n} {fmt} clips in {time.perf_counter() - t0:.1f} s ({workers} processes): {where}",
        flush=True,
    )
    return args


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", default="configs/synthetic_gpu.yaml")
    p.add_argument("--deepspeed", default="configs/zero2.json")
    p.add_argument("--steps", type=int, default=200, help="optimizer steps per stage")
    p.add_argument("--warmup", type=int, default=20, help="steps left out of the rates (compilation, caches)")
    p.add_argument("--sample-every", type=int, default=10, help="step-time breakdown period")
    p.add_argument("--gpus", type=int, default=1, help=">1: N ranks through the deepspeed launcher")
    p.add_argument("--run-dir", default="", help="default: a temporary directory, removed afterwards")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    p.add_argument(
        "--clips",
        type=int,
        default=2048,
        help="training clips of the smoke corpus (dev, test: 64 each); 0: the config's corpus",
    )
    p.add_argument("--format", choices=["npy", "jpg"], default="npy", help="how the corpus's frames are stored")
    p.add_argument(
        "--workers",
        type=int,
        default=0,
        help="processes making the corpus (0: one per 256 clips, at most one per core)",
    )
    p.add_argument("--quick", action="store_true", help="tiny model, 6 steps, on whatever device there is")
    args, extra = p.parse_known_args(argv)
    if args.quick:
        args.steps, args.warmup, args.sample_every, args.clips = 6, 1, 2, 64
        extra = QUICK + extra
    if args.clips:
        held_out = "8" if args.quick else "64"
        extra = [
            "--data.synthetic.n_train",
            str(args.clips),
            "--data.synthetic.n_dev",
            held_out,
            "--data.synthetic.n_test",
            held_out,
            *extra,
        ]
    run = Path(args.run_dir or tempfile.mkdtemp(prefix="sclslt-smoke-"))
    try:
        return train_and_report(args, extra + make_corpus(args.config, extra, args.format, args.workers, run), run)
    finally:
        if not args.run_dir:
            shutil.rmtree(run, ignore_errors=True)


def train_and_report(args, extra: list[str], run: Path) -> int:
    train = [
        "launch/train.py",
        "--deepspeed",
        args.deepspeed,
        "--config",
        args.config,
        "--train.run_dir",
        str(run),
        "--train.max_steps",
        str(args.steps),
        "--train.timing_every",
        str(args.sample_every),
        "--train.telemetry_every",
        str(args.sample_every),
        "--train.log_every",
        str(max(args.steps // 10, 1)),
        "--eval.dev_every_epochs",
        "1000",
        *extra,
    ]
    if args.gpus > 1:
        deepspeed = Path(sys.executable).with_name("deepspeed")
        cmd = [str(deepspeed) if deepspeed.exists() else "deepspeed", "--num_gpus", str(args.gpus), *train]
    else:
        cmd = [sys.executable, *train]
    env = {**os.environ, "SCLSLT_PLAIN_LOG": "1"}
    print(" ".join(cmd), flush=True)
    proc = subprocess.run(cmd, cwd=ROOT, env=env)
    if proc.returncode != 0:
        print(f"gpu_smoke: the training run failed ({proc.returncode}); its output is above", file=sys.stderr)
        return proc.returncode
    from sclslt.config import load_config

    cfg = load_config(ROOT / args.config, extra)
    rows = [
        summarise(run, s, getattr(cfg, s).global_batch, args.warmup)
        for s in ("stage1", "stage2")
        if getattr(cfg, s).enabled
    ]
    tag = run_tag(
        benchmark="gpu_smoke",
        config=args.config,
        world=args.gpus,
        quick=args.quick,
        precision=cfg.train.precision,
        deepspeed=args.deepspeed,
        similarity=cfg.model.similarity,
        frames=args.format,
        decode=cfg.data.decode,
    )
    base = write_rows(rows, Path(args.out), "gpu_smoke", tag)
    from rich.console import Console
    from rich.table import Table

    t = Table(title=f"smoke run on {tag['device']} ({args.gpus} rank(s), {args.config})")
    cols = list(dict.fromkeys(k for r in rows for k in r))
    for c in cols:
        t.add_column(c)
    for r in rows:
        t.add_row(*(f"{r[c]:.4g}" if isinstance(r.get(c), float) else str(r.get(c, "")) for c in cols))
    Console(width=200).print(t)
    print(f"rows: {base}.json / .csv")
    return 0


if __name__ == "__main__":
    sys.exit(main())
