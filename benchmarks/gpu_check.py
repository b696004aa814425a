"""Everything a lent GPU should tell us, in one call of at most 8 minutes, that cannot lose a result.

Parts, in order of value (the most valuable first: a run cut short keeps what matters most):
  kernels        fused InfoNCE and CiCo on the device against the fp64 references at multi-tile shapes
                 (several row blocks, column tiles, splits, chunks, token blocks), bf16 / fp16 / fp32: loss
                 and every gradient, errors relative to the largest reference value
  infonce_train  the InfoNCE variants training compiles: d = 512, with sentence ids and without (ids None),
                 at world 1 (b = n) and a rank's share of a larger gather, bf16 and fp32, against fp64
  nccl           a 1-rank process group (NCCL on CUDA, gloo on a CPU; a FileStore in a temporary directory)
                 through sclslt.model.losses._GatherWithGrad in bf16: the gather's values, and the backward's
                 reduce-scatter (all-reduce on gloo) returning the gradient
  syncs          host synchronisations per training step (sclslt.model.objective forward + step_loss + backward
                 of a small model, pooled and CiCo heads): sclslt.runtime.syncs.HostReads counts and places
                 device-to-host reads; on CUDA, torch.cuda.set_sync_debug_mode("warn") counts the syncs too.
                 Reported, not judged
  decode         jpg clips (224 px, 64 frames) decoded on the device in batches by the loader's path
                 (sclslt.data.devdecode) against Pillow, judged by the MEAN absolute pixel difference (decoders
                 differ by a few levels at some pixels); which library and backend decoded (nvImageCodec's
                 hardware engine, nvJPEG on CUDA, CPU), clips/s, and torchvision's decode_jpeg beside it
  smoke_zero3    benchmarks/gpu_smoke.py with ZeRO-3, bf16, the CiCo head and jpg shards decoded on the
                 device, both stages, a few steps (corpus of 2,048 clips made in parallel in seconds)
  memory         the PHOENIX recipe's shapes (ResNet-18 at 224 px, mBART-large-50's dimensions with random
                 weights, LoRA 16, 2 x 300 frames): benchmarks/bench_memory.py's PHOENIX case at micro-batch
                 2 and 1, without and with activation checkpointing, each in a fresh process:
                 torch.cuda.max_memory_allocated, saved bytes, resident memory, step time
  determinism    fwd+bwd twice at a larger bf16 shape: bitwise equal
  sweep_infonce  benchmarks/bench_kernels.py, short (n 16k/64k, world 8/64, d 512; no torch.compile)
  sweep_cico     benchmarks/bench_kernels.py --cico, fused and eager (no torch.compile in the budget)
  smoke          benchmarks/gpu_smoke.py: ZeRO-2 throughput, stages 1 and 2 at a realistic size
  loader         benchmarks/bench_loader.py, short
  planner        benchmarks/bench_planner.py at a rank's share of a 1M-clip epoch in 64 canonical pools at
                 world 64 (one pool of 15,625 clips a rank, global batch 1024, chunk 1 and 16, embed_dim
                 512, float16), scored on the GPU

Each part runs in a process of its own (this script with --part, or the benchmark script), in a process
group killed at its timeout: a crash, a hang or a broken CUDA context ends only its own row. Budget: the
whole run has --budget-s (470 s); a part's timeout is min(its own budget, what is left); a part that
cannot start with at least min(its budget, --min-start-s: 10 s) left is recorded as skipped, with the reason.
The JSON (out/gpu-check-<time>.json) is rewritten atomically (temporary file + rename) before each part
starts ("running": the part, when it started, its timeout, its process id) and after each part ends (its
row): a run killed at any moment keeps every finished row and shows what was running. Each part's output
is kept in out/gpu-check-<time>.parts/<part>.log, and a benchmark script's own rows beside it.

On a machine without a GPU, `--quick` runs every part at toy sizes (kernels in the Triton interpreter; the
smoke runs' trainer on the kernels' reference path) to check the script itself; its numbers mean nothing
there (budgets x4, total 1800 s).

The lent GPU has no network and lacks deepspeed, webdataset, PyAV, zstandard and nvImageCodec: build the
wheels here with tools/device_wheels.sh, carry .whl/, then on the device
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py --out $OUT
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import signal
import subprocess
import sys
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sclslt  # noqa: E402,F401  (sclslt_kernels: this checkout's kernels/)

TOTAL_S = 470  # the whole run, under 8 minutes: the device's 10-minute command keeps room to start
QUICK_TOTAL_S = 1800  # --quick on a CPU checks the script, not the device's time
QUICK_SLACK = 4  # --quick: each part's budget times this (a CPU, the Triton interpreter)
MIN_START_S = 10  # a part starts only with at least min(its budget, this) left
TAIL = 3000  # characters of a part's output kept in its row
# dtype: loss rtol, gradient error relative to the largest reference gradient (tests/unit/kernels/test_kernels.py)
TOL = {"fp32": (1e-5, 1e-5), "fp16": (1e-4, 2e-3), "bf16": (1e-4, 1e-2)}


def _now() -> str:
    return dt.datetime.now(dt.timezone.utc).isoformat(timespec="seconds")


def _device():
    import torch

    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-12)


# ---------------------------------------------------------------------------------------------
# in-process parts: each runs in its own process, `gpu_check.py --part NAME`, and returns its row


def _infonce_case(b: int, n: int, d: int, off: int, name: str, with_ids: bool, g, dev) -> dict:
    """The fused InfoNCE loss and gradients against the fp64 reference at one shape and dtype."""
    import torch
    import torch.nn.functional as F

    from sclslt_kernels import infonce, infonce_reference

    dt_ = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    q = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dt_).to(dev)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dt_).to(dev)
    ids = torch.randint(0, max(n // 3, 1), (n,), generator=g).to(dev) if with_ids else None
    q_ids = ids[off : off + b] if with_ids else None
    s = torch.tensor(14.3, device=dev)
    qa, ka, sa = (x.clone().requires_grad_() for x in (q, k, s))
    loss = infonce(qa, ka, sa, off, q_ids, ids)
    grads = torch.autograd.grad(loss, (qa, ka, sa))
    qr, kr, sr = (x.double().requires_grad_() for x in (q, k, s))
    ref = infonce_reference(qr, kr, sr, off, q_ids, ids)
    refs = torch.autograd.grad(ref, (qr, kr, sr))
    errs = {
        "loss": abs(loss.item() - ref.item()) / max(1.0, abs(ref.item())),
        **{w: _err(a, r) for w, a, r in zip(("dq", "dk", "dscale"), grads, refs)},
    }
    rl, ga = TOL[name]
    good = errs["loss"] <= rl and max(errs["dq"], errs["dk"]) <= ga and errs["dscale"] <= max(ga, 1e-4)
    return {"shape": [b, n, d], "offset": off, "ids": with_ids, "errors": errs, "ok": bool(good)}


def _cico_case(shape: tuple, name: str, g, dev) -> dict:
    import torch
    import torch.nn.functional as F

    from sclslt_kernels import cico_similarity, cico_similarity_reference

    dt_ = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}[name]
    cb, cn, T, L, cd = shape
    v = F.normalize(torch.randn(cb, T, cd, generator=g), dim=-1).to(dt_).to(dev)
    t = F.normalize(torch.randn(cn, L, cd, generator=g), dim=-1).to(dt_).to(dev)
    vm = (torch.rand(cb, T, generator=g) > 0.3).to(dev)
    tm = (torch.rand(cn, L, generator=g) > 0.3).to(dev)
    up = torch.randn(cb, cn, generator=g).to(dev)
    va, ta = v.clone().requires_grad_(), t.clone().requires_grad_()
    sim = cico_similarity(va, vm, ta, tm)
    gv, gt = torch.autograd.grad(sim, (va, ta), up)
    vr, tr = v.double().requires_grad_(), t.double().requires_grad_()
    want = cico_similarity_reference(vr, vm, tr, tm)
    wv, wt = torch.autograd.grad(want, (vr, tr), up.double())
    errs = {"sim": (sim.double() - want).abs().max().item(), "dv": _err(gv, wv), "dt": _err(gt, wt)}
    good = errs["sim"] <= 1e-5 * (1 if name == "fp32" else 10) and max(errs["dv"], errs["dt"]) <= TOL[name][1]
    return {"shape": list(shape), "errors": errs, "ok": bool(good)}


def kernels_part(quick: bool) -> dict:
    import torch

    dev, g, out = _device(), torch.Generator().manual_seed(0), {}
    for name in ("bf16", "fp16", "fp32"):
        b, world, d = (150, 4, 100) if quick else (1000, 8, 520)
        out[f"infonce_{name}"] = _infonce_case(b, b * world, d, b, name, True, g, dev)
        for shape in [(3, 7, 70, 20, 80)] if quick else [(16, 40, 150, 30, 512), (4, 8, 64, 256, 256)]:
            out[f"cico_{name}_{shape[2]}x{shape[3]}"] = _cico_case(shape, name, g, dev)
    return {"ok": all(c["ok"] for c in out.values()), "cases": out}


def infonce_train_part(quick: bool) -> dict:
    """d = 512 with ids and without, at world 1 (b = n, offset 0) and a rank's share of a gather."""
    import torch

    dev, g, out = _device(), torch.Generator().manual_seed(2), {}
    shapes = [(16, 16, 0), (8, 32, 8)] if quick else [(256, 256, 0), (128, 1024, 384)]
    for name in ("bf16", "fp32"):
        for b, n, off in shapes:
            for with_ids in (True, False):
                out[f"{name}_b{b}_n{n}_{'ids' if with_ids else 'noids'}"] = _infonce_case(
                    b, n, 512, off, name, with_ids, g, dev
                )
    return {"ok": all(c["ok"] for c in out.values()), "cases": out}


def nccl_part(quick: bool) -> dict:
    """_GatherWithGrad at world 1, bf16: gathered = input; the backward returns the incoming gradient."""
    import tempfile
    from datetime import timedelta

    import torch
    import torch.distributed as dist

    from sclslt.model.losses import _GatherWithGrad

    dev = _device()
    backend = "nccl" if dev.type == "cuda" else "gloo"
    rows, d = (8, 16) if quick else (4096, 512)
    with tempfile.TemporaryDirectory(prefix="gpu-check-store.") as tmp:
        store = dist.FileStore(os.path.join(tmp, "store"), 1)
        if dev.type == "cuda":
            torch.cuda.set_device(0)
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=60))
        try:
            g = torch.Generator().manual_seed(3)
            x = torch.randn(rows, d, generator=g).to(torch.bfloat16).to(dev).requires_grad_()
            up = torch.randn(rows, d, generator=g).to(torch.bfloat16).to(dev)
            y = _GatherWithGrad.apply(x)
            (grad,) = torch.autograd.grad(y, x, up)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            for _ in range(10):
                torch.autograd.grad(_GatherWithGrad.apply(x), x, up)
            if dev.type == "cuda":
                torch.cuda.synchronize()
            out = {
                "backend": dist.get_backend(),
                "shape": [rows, d],
                "dtype": "bf16",
                "gather_equal": bool(y.shape == x.shape and torch.equal(y, x)),
                "grad_equal": bool(grad.dtype == up.dtype and torch.equal(grad, up)),
                "backward": "reduce_scatter" if dist.get_backend() == "nccl" else "all_reduce",
                "fwd_bwd_ms": (time.perf_counter() - t0) * 100,
            }
        finally:
            dist.destroy_process_group()
    if dev.type == "cuda":
        out["nccl_version"] = ".".join(map(str, torch.cuda.nccl.version()))
    out["ok"] = out["gather_equal"] and out["grad_equal"]
    return out


def _tokenizer():
    import tempfile

    from sclslt.data.text import train_tokenizer

    with tempfile.TemporaryDirectory() as d:  # as benchmarks/bench_memory.py makes its tokenizer
        words = [f"w{i}" for i in range(300)]
        return train_tokenizer([" ".join(words[j : j + 12]) for j in range(0, 288, 3)], Path(d))


def _cuda_syncs(step, steps: int) -> tuple[float, dict]:
    """torch.cuda.set_sync_debug_mode("warn") around `steps` steps: warnings a step, and where they arose."""
    import warnings

    import torch

    torch.cuda.synchronize()
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        torch.cuda.set_sync_debug_mode("warn")
        try:
            for _ in range(steps):
                step()
        finally:
            torch.cuda.set_sync_debug_mode(0)
    syncs = [w for w in caught if "synchroniz" in str(w.message).lower()]
    where = Counter(f"{Path(w.filename).parent.name}/{Path(w.filename).name}:{w.lineno}" for w in syncs)
    return len(syncs) / steps, {k: v / steps for k, v in where.most_common()}


def syncs_part(quick: bool) -> dict:
    """Device-to-host reads (and, on CUDA, synchronisations) per training step; reported, not judged."""
    import torch

    from benchmarks.bench_memory import SYNTHETIC, build, make_batch
    from sclslt.config import StageConfig
    from sclslt.model.batchnorm import finish_step
    from sclslt.model.objective import forward, step_loss
    from sclslt.runtime.syncs import HostReads

    dev, tok, steps = _device(), _tokenizer(), 3
    if dev.type == "cpu":  # the interpreter's own copies to numpy would count as reads
        os.environ["SCLSLT_KERNELS"] = "reference"
    n, frames, size = (8, 8, 16) if quick else (32, 16, 32)
    batch = make_batch(n, frames, size, 12, len(tok), dev)
    out = {"device": str(dev), "batch": [n, frames, size], "steps": steps}
    for sim in ("pooled", "cico"):
        model = build({**SYNTHETIC, "similarity": sim}, tok, "group 2", False, dev, torch.float32)
        st = StageConfig()

        def step():
            model.zero_grad(set_to_none=True)
            loss, _ = step_loss(forward(model, batch, st), batch, st, 1, sim)
            loss.backward()
            finish_step(model)

        step()  # warm-up: first-call work is not a step's
        with HostReads() as reads:
            for _ in range(steps):
                step()
        row = {
            "host_reads_per_step": reads.count / steps,
            "where": {k: v / steps for k, v in Counter(reads.where).most_common()},
        }
        if dev.type == "cuda":
            row["cuda_syncs_per_step"], row["cuda_sync_where"] = _cuda_syncs(step, steps)
        out[sim] = row
    out["ok"] = True
    return out


def _decoder_backends(pack, dev) -> dict:
    """Which nvImageCodec backends decode our frames on this device, and how fast (one batch)."""
    from sclslt.data import devdecode

    nv = devdecode._nvimgcodec()
    buf, off = pack.data.numpy(), pack.offsets.tolist()
    streams = [buf[off[i] : off[i + 1]] for i in range(len(off) - 1)]
    kinds = ("HW_GPU_ONLY", "GPU_ONLY", "HYBRID_CPU_GPU") if dev.type == "cuda" else ("CPU_ONLY",)
    out = {}
    for kind in kinds:
        try:
            index = nv.NVIMGCODEC_DEVICE_CPU_ONLY if dev.type == "cpu" else 0
            dec = nv.Decoder(device_id=index, backends=[nv.Backend(getattr(nv.BackendKind, kind))])
            t0 = time.perf_counter()
            images = dec.decode(streams)
            ok = all(im is not None for im in images)
            out[kind] = {
                "decodes": ok,
                "ms": (time.perf_counter() - t0) * 1e3,
                "buffer": str(images[0].buffer_kind) if ok else None,
            }
        except Exception as e:  # noqa: BLE001 - a backend that is not there is a finding, not a failure
            out[kind] = {"decodes": False, "error": f"{type(e).__name__}: {e}"[:200]}
    return out


def _decode_library(dev) -> dict:
    """The library that decoded: nvImageCodec's version, its codec wheels, what its loader said."""
    from importlib import metadata

    from sclslt.data import devdecode

    lib = {
        "library": "nvImageCodec " + getattr(devdecode._nvimgcodec(), "__version__", "?"),
        "codec": "nvJPEG" if dev.type == "cuda" else "libjpeg-turbo (CPU backend)",
    }
    for dist_name in ("nvidia-nvimgcodec-cu12", "nvidia-nvjpeg-cu12"):
        try:
            lib[dist_name] = metadata.version(dist_name)
        except metadata.PackageNotFoundError:
            lib[dist_name] = None
    import re

    notes = re.sub(r"\x1b\[[0-9;]*m", "", " ".join(devdecode._LOADER_NOTES)).strip()
    if notes:
        lib["loader_notes"] = notes[-400:]
    return lib


def decode_part(quick: bool) -> dict:
    import numpy as np
    import torch

    from benchmarks.bench_loader import make_clips
    from sclslt.data.codec import JpegClip, encode
    from sclslt.data.devdecode import EncodedFrames

    dev = _device()
    n, frames, size, batch = (4, 8, 32, 2) if quick else (16, 64, 224, 8)
    data = [encode(c, "jpg") for c in make_clips(n, frames, size)]
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)

    def rate(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return reps * n / (time.perf_counter() - t0)

    parsed = [JpegClip.parse(d) for d in data]
    packs = [EncodedFrames.from_clips(parsed[i : i + batch], list(range(i, i + batch))) for i in range(0, n, batch)]
    out = {
        "device": str(dev),
        "clips": n,
        "frames": frames,
        "size": size,
        "batch": batch,
        "device_clips_s": rate(lambda: [p.to(dev) for p in packs], 3),
        "pillow_clips_s_1core": rate(lambda: [JpegClip.parse(d).decode() for d in data], 1),
        "feed_clips_s_1core": rate(lambda: [EncodedFrames.from_clips([JpegClip.parse(d)], [0]) for d in data], 3),
    }
    got = torch.cat([p.to(dev).flatten(0, 1) for p in packs]).cpu().int()
    want = torch.from_numpy(np.concatenate([JpegClip.parse(d).decode() for d in data])).int()
    diff = (got - want).abs()
    out.update(
        mean_abs_diff=float(diff.float().mean()),
        max_abs_diff=int(diff.max()),
        frac_pixels_over_8=float((diff > 8).float().mean()),
        cores_per_gpu_at_300_clips_s=300.0 / out["feed_clips_s_1core"],
        decoder=_decode_library(dev),
        backends=_decoder_backends(packs[0], dev),
    )
    try:
        from torchvision.io import decode_jpeg

        parts = [torch.frombuffer(bytearray(bytes(q)), dtype=torch.uint8) for c in parsed for q in c.parts]
        out["torchvision_clips_s"] = rate(lambda: decode_jpeg(parts, device=dev), 3)
    except Exception as e:  # noqa: BLE001 - torchvision is optional: say why there is no figure
        out["torchvision"] = f"{type(e).__name__}: {e}"[:300]
    out["ok"] = out["mean_abs_diff"] < 1.0  # the mean: decoders differ by a few levels at some pixels
    return out


def memory_part(quick: bool) -> dict:
    """The PHOENIX shapes, one case a fresh process (bench_memory.py --phoenix-case MICRO CHECKPOINTING);
    --quick: the same code path at toy sizes (`toy_phoenix_case`), the chunked, checkpointed case only."""
    cases = [(1, 1)] if quick else [(2, 0), (1, 0), (2, 1), (1, 1)]
    rows = []
    for micro, ckpt in cases:
        cmd = (
            [sys.executable, __file__, "--toy-phoenix-case", str(micro), str(ckpt)]
            if quick
            else [sys.executable, "benchmarks/bench_memory.py", "--phoenix-case", str(micro), str(ckpt)]
        )
        proc = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
        case = {"micro_batch": micro, "checkpointing": bool(ckpt)}
        try:
            full = json.loads(proc.stdout.strip().splitlines()[-1])
            case.update(
                {
                    k: full[k]
                    for k in (
                        "max_allocated_mb",
                        "step_s",
                        "saved_mb",
                        "graph_mb",
                        "weights_mb",
                        "rss_peak_mb",
                        "rss_step_mb",
                        "trainable_params",
                        "dtype",
                    )
                    if k in full
                }
            )
        except (IndexError, ValueError):
            case["error"] = f"exit {proc.returncode}: {(proc.stdout + proc.stderr)[-1500:]}"
        print(json.dumps(case), flush=True)  # in the log (and the row's tail) if the part is cut off
        rows.append(case)
    return {
        "ok": all("error" not in c for c in rows),
        "cases": rows,
        "note": "step_s is one step, the first (no warm-up); max_allocated_mb only on CUDA",
    }


def toy_phoenix_case(micro: int, ckpt: int) -> int:
    """bench_memory's PHOENIX case (its --phoenix-case path) with its shapes shrunk to a CPU's toy size."""
    import benchmarks.bench_memory as bm

    bm.PHOENIX = {**bm.SYNTHETIC, "lora_rank": 4, "similarity": "cico", "embed_dim": 16}
    make = bm.make_batch
    bm.make_batch = lambda n, frames, size, tokens, vocab, device: make(n, 8, 16, 8, vocab, device)
    return bm.main(["--phoenix-case", str(micro), str(ckpt)])


def determinism_part(quick: bool) -> dict:
    import torch

    from sclslt_kernels import cico_similarity, infonce

    dev = _device()
    dt_ = torch.bfloat16 if dev.type == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    b, n, d = (64, 256, 64) if quick else (4096, 32768, 512)
    q, k = (torch.randn(*shape, generator=g).to(dt_).to(dev) for shape in ((b, d), (n, d)))
    ids = torch.randint(0, n, (n,), generator=g).to(dev)
    cb, cn, T, L, cd = (2, 3, 20, 10, 32) if quick else (64, 256, 64, 32, 512)
    v, t = (torch.randn(*shape, generator=g).to(dt_).to(dev) for shape in ((cb, T, cd), (cn, L, cd)))
    vm, tm = torch.ones(cb, T, dtype=torch.bool, device=dev), torch.ones(cn, L, dtype=torch.bool, device=dev)

    def once():
        qa, ka, va, ta = (x.clone().requires_grad_() for x in (q, k, v, t))
        loss = infonce(qa, ka, torch.tensor(14.3, device=dev), 0, ids[:b], ids)
        sim = cico_similarity(va, vm, ta, tm)
        return [loss, *torch.autograd.grad(loss, (qa, ka)), sim, *torch.autograd.grad(sim.sum(), (va, ta))]

    a, b2 = once(), once()
    same = [bool(torch.equal(x, y)) for x, y in zip(a, b2)]
    return {"ok": all(same), "bitwise_equal": dict(zip(["loss", "dq", "dk", "cico", "dv", "dt"], same))}


FUNCTIONS = {
    "kernels": kernels_part,
    "infonce_train": infonce_train_part,
    "nccl": nccl_part,
    "syncs": syncs_part,
    "decode": decode_part,
    "memory": memory_part,
    "determinism": determinism_part,
}


# ---------------------------------------------------------------------------------------------
# the plan: which parts, in which order, with which budgets


@dataclass
class Part:
    name: str
    budget_s: int
    script: list = field(default_factory=list)  # a benchmark script and its arguments; [] = FUNCTIONS[name]
    quick_env: dict = field(default_factory=dict)  # --quick: environment for the part (on a CPU)


def plan(quick: bool) -> list[Part]:
    q = ["--quick"] if quick else []
    # --quick: the trainer's kernels on the reference path (the interpreter would take a minute a run)
    reference = {"SCLSLT_KERNELS": "reference"}
    smoke3 = [
        "--deepspeed",
        "configs/zero3.json",
        "--format",
        "jpg",
        "--data.decode",
        "device",
        "--model.similarity",
        "cico",
        "--train.precision",
        "bf16",
    ]
    return [
        Part("kernels", 90),
        Part("infonce_train", 45),
        Part("nccl", 30),
        Part("syncs", 45),
        Part("decode", 40),
        Part(
            "smoke_zero3",
            150,
            ["benchmarks/gpu_smoke.py", *smoke3, *(q or ["--steps", "16", "--warmup", "4", "--sample-every", "4"])],
            reference,
        ),
        Part("memory", 150),
        Part("determinism", 40),
        Part(
            "sweep_infonce",
            90,
            [
                "benchmarks/bench_kernels.py",
                *(q or ["--n", "16384", "65536", "--d", "512", "--repeat", "5"]),
                "--impl",
                "fused",
                "eager",
                "openclip",
            ],
        ),
        Part(
            "sweep_cico",
            45,
            ["benchmarks/bench_kernels.py", "--cico", *(q or ["--repeat", "5"]), "--impl", "fused", "eager"],
        ),
        Part(
            "smoke",
            120,
            [
                "benchmarks/gpu_smoke.py",
                *(q + ["--stage2.enabled", "false"] if quick else ["--steps", "40", "--warmup", "10"]),
            ],
            reference,
        ),
        Part(
            "loader",
            60,
            [
                "benchmarks/bench_loader.py",
                *(["--quick", "--cores", "1"] if quick else ["--clips", "8", "--repeat", "1"]),
            ],
        ),
        # per-rank work at 1M clips / 64 pools / world 64 / batch 1024: one pool of 15,625 clips a rank
        Part(
            "planner",
            90,
            [
                "benchmarks/bench_planner.py",
                *(
                    q
                    or [
                        "--n",
                        "1000000",
                        "--batch",
                        "1024",
                        "--pools",
                        "64",
                        "--world",
                        "64",
                        "--chunk",
                        "1",
                        "16",
                        "--dim",
                        "512",
                        "--dtype",
                        "float16",
                        "--step-ms",
                        "300",
                        "--budget-s",
                        "60",
                    ]
                ),
            ],
        ),
    ]


# ---------------------------------------------------------------------------------------------
# running: every part a process group with a timeout; the report rewritten whole after every change


class Interrupted(Exception):
    """SIGTERM: the part running is stopped and recorded, the report written, the run ends."""


class Report:
    """The run's JSON, written atomically (temporary file + rename) whenever it changes."""

    def __init__(self, path: Path, head: dict):
        self.path, self.data = path, {**head, "running": None, "finished": None, "parts": {}}
        self.write()

    def write(self) -> None:
        from sclslt.atomic import write_text

        write_text(self.path, json.dumps(self.data, indent=1, default=str))

    def start(self, name: str, timeout: float, pid: int) -> None:
        self.data["running"] = {"part": name, "started": _now(), "timeout_s": round(timeout, 1), "pid": pid}
        self.write()

    def finish(self, name: str, row: dict) -> None:
        self.data["parts"][name] = row
        self.data["running"] = None
        self.write()


def _kill_group(proc: subprocess.Popen) -> None:
    """The part's whole process group (its scripts' own children: the trainer, bench_memory's cases):
    SIGTERM, up to 2 s for the part's process to end, then SIGKILL for whatever is left."""
    for sig in (signal.SIGTERM, signal.SIGKILL):
        try:
            os.killpg(proc.pid, sig)
        except (ProcessLookupError, PermissionError):
            break
        if sig == signal.SIGTERM:
            try:
                proc.wait(timeout=2)
            except subprocess.TimeoutExpired:
                pass
    proc.wait()


def _tail(log: Path) -> str:
    try:
        return log.read_text(errors="replace")[-TAIL:]
    except OSError:
        return ""


def _script_rows(folder: Path) -> list[dict]:
    """The rows a benchmark script wrote under its --out folder, less each row's device/version tag."""
    rows = []
    for f in sorted(folder.glob("*.json")):
        try:
            rows += [
                {k: v for k, v in r.items() if k not in ("device", "versions", "date")}
                for r in json.loads(f.read_text())
            ]
        except (ValueError, TypeError, AttributeError):
            continue
    return rows[:200]


def _command(part: Part, quick: bool, parts_dir: Path) -> list[str]:
    if part.script:
        (parts_dir / part.name).mkdir(parents=True, exist_ok=True)
        return [sys.executable, *part.script, "--out", str(parts_dir / part.name)]
    return [
        sys.executable,
        __file__,
        "--part",
        part.name,
        "--row",
        str(parts_dir / f"{part.name}.row.json"),
        *(["--quick"] if quick else []),
    ]


def run_part(part: Part, quick: bool, timeout: float, parts_dir: Path, report: Report) -> dict:
    """Start the part's process group, record it as running, wait at most `timeout`; its row."""
    log = parts_dir / f"{part.name}.log"
    t0 = time.monotonic()
    with open(log, "w") as f:
        proc = subprocess.Popen(
            _command(part, quick, parts_dir),
            cwd=ROOT,
            stdout=f,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            env={**os.environ, **(part.quick_env if quick else {})},
        )
    row = {"pid": proc.pid, "timeout_s": round(timeout, 1), "log": str(log.relative_to(parts_dir.parent))}
    try:
        report.start(part.name, timeout, proc.pid)
        rc = proc.wait(timeout=timeout)
        status = None
    except subprocess.TimeoutExpired:
        rc, status = None, "timeout"
        row["error"] = f"timed out after {timeout:.0f} s (its budget {part.budget_s} s, or what was left)"
    except Interrupted:
        rc, status = None, "interrupted"
        row["error"] = "the check was stopped (SIGTERM) while this part ran"
    finally:
        _kill_group(proc)  # at a timeout, and anything a finished part left behind
    row["seconds"] = round(time.monotonic() - t0, 1)
    row.update(_outcome(part, rc, parts_dir, log))
    if status:
        row.update(status=status, ok=False)
    if status == "interrupted":
        report.finish(part.name, row)
        raise Interrupted
    return row


def _outcome(part: Part, rc, parts_dir: Path, log: Path) -> dict:
    """What the finished (or stopped) process left: its row file, or its exit status and output."""
    out = {"returncode": rc}
    if part.script:
        out.update(
            ok=rc == 0, status="ok" if rc == 0 else "failed", rows=_script_rows(parts_dir / part.name), tail=_tail(log)
        )
        return out
    row_file = parts_dir / f"{part.name}.row.json"
    if rc is not None and row_file.is_file():
        out.update(json.loads(row_file.read_text()))
        out["status"] = "ok" if out.get("ok") else "failed"
    else:
        out.update(ok=False, status="crashed" if rc is not None else "stopped")
    if not out.get("ok"):
        out["tail"] = _tail(log)
    return out


def child(name: str, quick: bool, row_path: Path) -> int:
    """`--part NAME`: run one in-process part here and write its row (a failure is its row)."""
    from sclslt.atomic import write_text

    try:
        row = FUNCTIONS[name](quick)
    except Exception as e:  # noqa: BLE001 - the part's failure is its row
        row = {"ok": False, "error": f"{type(e).__name__}: {e}"[:2000], "traceback": traceback.format_exc()[-TAIL:]}
    write_text(row_path, json.dumps(row, indent=1, default=str))
    return 0


def run_all(
    parts: list[Part], quick: bool, total_s: float, parts_dir: Path, report: Report, min_start_s: float = MIN_START_S
) -> None:
    t_start = time.monotonic()
    for part in parts:
        budget = part.budget_s * (QUICK_SLACK if quick else 1)
        left = total_s - (time.monotonic() - t_start)
        need = min(budget, min_start_s)
        if left < need:
            report.finish(
                part.name,
                {
                    "status": "skipped",
                    "ok": False,
                    "seconds": 0.0,
                    "reason": f"{max(left, 0):.0f} s left of the {total_s:.0f} s budget; "
                    f"it needs at least {need:.0f} s to start",
                },
            )
        else:
            report.finish(part.name, run_part(part, quick, min(budget, left), parts_dir, report))
        row = report.data["parts"][part.name]
        print(f"{part.name:14s} {row['status']:8s} {row['seconds']:7.1f} s", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the script (on a CPU: interpreter)")
    ap.add_argument("--only", nargs="+", help="run only these parts (in the plan's order)")
    ap.add_argument(
        "--budget-s", type=float, help=f"the whole run's budget (default {TOTAL_S}; --quick {QUICK_TOTAL_S})"
    )
    ap.add_argument(
        "--min-start-s",
        type=float,
        default=MIN_START_S,
        help=f"a part starts only with at least min(its budget, this) left (default {MIN_START_S})",
    )
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    ap.add_argument("--part", help=argparse.SUPPRESS)  # a child: run this part
    ap.add_argument("--row", type=Path, help=argparse.SUPPRESS)  # where the child writes its row
    ap.add_argument("--toy-phoenix-case", nargs=2, type=int, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    import torch

    if args.quick and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"  # before sclslt_kernels is imported; children inherit it
    if args.toy_phoenix_case:
        return toy_phoenix_case(*args.toy_phoenix_case)
    if args.part:
        return child(args.part, args.quick, args.row)
    parts = plan(args.quick)
    unknown = set(args.only or []) - {p.name for p in parts}
    if unknown:
        ap.error(f"--only: no part named {sorted(unknown)}; the parts: {[p.name for p in parts]}")
    parts = [p for p in parts if not args.only or p.name in args.only]
    total = args.budget_s if args.budget_s is not None else (QUICK_TOTAL_S if args.quick else TOTAL_S)
    from benchio import run_tag

    tag = run_tag(triton_interpret=os.environ.get("TRITON_INTERPRET", "0"))
    stamp = tag["date"].replace(":", "").replace("-", "")[:15]
    args.out.mkdir(parents=True, exist_ok=True)
    parts_dir = args.out / f"gpu-check-{stamp}.parts"
    parts_dir.mkdir(exist_ok=True)
    report = Report(
        args.out / f"gpu-check-{stamp}.json",
        {**tag, "quick": args.quick, "budget_s": total, "started": _now(), "order": [p.name for p in parts]},
    )

    def stop(signum, frame):
        raise Interrupted

    signal.signal(signal.SIGTERM, stop)
    try:
        run_all(parts, args.quick, total, parts_dir, report, args.min_start_s)
    except Interrupted:
        print("gpu_check: stopped (SIGTERM); the rows so far are in the report", flush=True)
    report.data["finished"] = _now()
    report.write()
    print(f"{tag['device']} | torch {tag['versions']['torch']} | triton {tag['versions']['triton']} -> {report.path}")
    return 0 if all(r["ok"] for r in report.data["parts"].values()) and report.data["parts"] else 1


if __name__ == "__main__":
    sys.exit(main())
