"""Everything a lent GPU should tell us, in one call of at most ~8 minutes: one JSON, one printed table.

Parts (each records its own failure; the rest goes on):
  kernels      fused InfoNCE and CiCo on the device against the fp64 references at multi-tile shapes
               (several row blocks, column tiles, splits, chunks, token blocks), bf16 / fp16 / fp32:
               loss and every gradient, errors relative to the largest reference value
  determinism  fwd+bwd twice at a larger bf16 shape: bitwise equal
  sweep        kernels/bench/bench_kernels.py, short (InfoNCE n 16k/64k, world 8/64, d 512; CiCo)
  smoke        benchmarks/gpu_smoke.py, short (stages 1 and 2 at a realistic size)
  loader       benchmarks/bench_loader.py, short
  decode       jpg clips (224 px, 64 frames) decoded on the device in batches by the loader's path
               (sclslt.data.devdecode: nvImageCodec / nvJPEG) against Pillow on one CPU core: clips/s,
               the pixel difference, the CPU cores per GPU left for feeding it (reading and packing the
               compressed clips), and torchvision.io.decode_jpeg(device="cuda") beside it when installed
  planner      benchmarks/bench_planner.py at a rank's share of a 1M-clip epoch in 64 canonical pools at
               world 64 (one pool of 15,625 clips a rank, global batch 1024, chunk 1 and 16, embed_dim
               512, float16), scored on the GPU
On a machine without a GPU, `--quick` runs every part at toy sizes (kernels in the Triton interpreter)
to check the script itself; its numbers mean nothing there.

The lent H200 has no network and lacks deepspeed, webdataset, PyAV and zstandard: build the wheels
here with tools/device_wheels.sh, then on the device
    python3 -m pip install -q --no-index --no-deps --target /tmp/site .whl/*.whl && \\
    PYTHONPATH=/tmp/site:. python3 benchmarks/gpu_check.py
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
import traceback
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import sclslt  # noqa: E402,F401  (sclslt_kernels: this checkout's kernels/)
# dtype: loss rtol, gradient error relative to the largest reference gradient (tests/test_kernels.py)
TOL = {"fp32": (1e-5, 1e-5), "fp16": (1e-4, 2e-3), "bf16": (1e-4, 1e-2)}


def _err(got, want) -> float:
    return (got.double() - want.double()).abs().max().item() / max(want.abs().max().item(), 1e-12)


def kernels_part(quick: bool) -> dict:
    import torch
    import torch.nn.functional as F

    from sclslt_kernels import cico_similarity, cico_similarity_reference, infonce, infonce_reference
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dts = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
    out, ok = {}, True
    g = torch.Generator().manual_seed(0)
    for name, dt in dts.items():
        b, world, d = (150, 4, 100) if quick else (1000, 8, 520)
        n = b * world
        q = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dt).to(dev)
        k = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dt).to(dev)
        ids = torch.randint(0, n // 3, (n,), generator=g).to(dev)
        off = b
        s = torch.tensor(14.3, device=dev)
        qa, ka, sa = (x.clone().requires_grad_() for x in (q, k, s))
        loss = infonce(qa, ka, sa, off, ids[off:off + b], ids)
        grads = torch.autograd.grad(loss, (qa, ka, sa))
        qr, kr, sr = (x.double().requires_grad_() for x in (q, k, s))
        ref = infonce_reference(qr, kr, sr, off, ids[off:off + b], ids)
        refs = torch.autograd.grad(ref, (qr, kr, sr))
        errs = {"loss": abs(loss.item() - ref.item()) / max(1.0, abs(ref.item())),
                **{w: _err(a, r) for w, a, r in zip(("dq", "dk", "dscale"), grads, refs)}}
        rl, ga = TOL[name]
        good = errs["loss"] <= rl and max(errs["dq"], errs["dk"]) <= ga and errs["dscale"] <= max(ga, 1e-4)
        out[f"infonce_{name}"] = {"shape": [b, n, d], "errors": errs, "ok": good}
        ok &= good
        for (cb, cn, T, L, cd) in ([(3, 7, 70, 20, 80)] if quick else [(16, 40, 150, 30, 512), (4, 8, 64, 256, 256)]):
            v = F.normalize(torch.randn(cb, T, cd, generator=g), dim=-1).to(dt).to(dev)
            t = F.normalize(torch.randn(cn, L, cd, generator=g), dim=-1).to(dt).to(dev)
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
            good = errs["sim"] <= 1e-5 * (1 if name == "fp32" else 10) and max(errs["dv"], errs["dt"]) <= ga
            out[f"cico_{name}_{T}x{L}"] = {"shape": [cb, cn, T, L, cd], "errors": errs, "ok": good}
            ok &= good
    return {"ok": bool(ok), "cases": out}


def determinism_part(quick: bool) -> dict:
    import torch

    from sclslt_kernels import cico_similarity, infonce
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    dt = torch.bfloat16 if dev == "cuda" else torch.float32
    g = torch.Generator().manual_seed(1)
    b, n, d = (64, 256, 64) if quick else (4096, 32768, 512)
    q, k = (torch.randn(*shape, generator=g).to(dt).to(dev) for shape in ((b, d), (n, d)))
    ids = torch.randint(0, n, (n,), generator=g).to(dev)
    cb, cn, T, L, cd = (2, 3, 20, 10, 32) if quick else (64, 256, 64, 32, 512)
    v, t = (torch.randn(*shape, generator=g).to(dt).to(dev) for shape in ((cb, T, cd), (cn, L, cd)))
    vm, tm = torch.ones(cb, T, dtype=torch.bool, device=dev), torch.ones(cn, L, dtype=torch.bool, device=dev)

    def once():
        qa, ka, va, ta = (x.clone().requires_grad_() for x in (q, k, v, t))
        loss = infonce(qa, ka, torch.tensor(14.3, device=dev), 0, ids[:b], ids)
        sim = cico_similarity(va, vm, ta, tm)
        return [loss, *torch.autograd.grad(loss, (qa, ka)), sim, *torch.autograd.grad(sim.sum(), (va, ta))]
    a, b2 = once(), once()
    same = [bool(torch.equal(x, y)) for x, y in zip(a, b2)]
    return {"ok": all(same), "bitwise_equal": dict(zip(["loss", "dq", "dk", "cico", "dv", "dt"], same))}


def decode_part(quick: bool) -> dict:
    import numpy as np
    import torch

    from benchmarks.bench_loader import make_clips
    from sclslt.data.codec import JpegClip, encode
    from sclslt.data.devdecode import EncodedFrames
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    n, frames, size, batch = (4, 8, 32, 2) if quick else (16, 64, 224, 8)
    clips = make_clips(n, frames, size)
    data = [encode(c, "jpg") for c in clips]
    sync = torch.cuda.synchronize if dev == "cuda" else (lambda: None)

    def rate(fn, reps):
        fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(reps):
            fn()
        sync()
        return reps * n / (time.perf_counter() - t0)
    parsed = [JpegClip.parse(d) for d in data]
    packs = [EncodedFrames.from_clips(parsed[i:i + batch], list(range(i, i + batch))) for i in range(0, n, batch)]
    out = {"device": dev, "clips": n, "frames": frames, "size": size, "batch": batch,
           "device_clips_s": rate(lambda: [p.to(dev) for p in packs], 3),
           "pillow_clips_s_1core": rate(lambda: [JpegClip.parse(d).decode() for d in data], 1),
           "feed_clips_s_1core": rate(lambda: [EncodedFrames.from_clips([JpegClip.parse(d)], [0]) for d in data], 3)}
    got = torch.cat([p.to(dev).flatten(0, 1) for p in packs]).cpu().int()
    want = torch.from_numpy(np.concatenate([JpegClip.parse(d).decode() for d in data])).int()
    diff = (got - want).abs()
    out.update(max_abs_diff=int(diff.max()), mean_abs_diff=float(diff.float().mean()),
               cores_per_gpu_at_300_clips_s=300.0 / out["feed_clips_s_1core"])
    try:
        from torchvision.io import decode_jpeg
        parts = [torch.frombuffer(bytearray(bytes(q)), dtype=torch.uint8) for c in parsed for q in c.parts]
        out["torchvision_clips_s"] = rate(lambda: decode_jpeg(parts, device=dev), 3)
    except Exception as e:  # noqa: BLE001 - torchvision is optional: say why there is no figure
        out["torchvision"] = f"{type(e).__name__}: {e}"[:300]
    out["ok"] = out["max_abs_diff"] <= 8 and out["mean_abs_diff"] < 1.0
    return out


def script_part(cmd: list[str], timeout: int, out: Path) -> dict:
    """Run a benchmark script; its own rows land in `out`; the tail of its output is kept."""
    try:
        proc = subprocess.run([sys.executable, *cmd, "--out", str(out)], cwd=ROOT, capture_output=True, text=True,
                              timeout=timeout)
    except subprocess.TimeoutExpired as e:
        return {"ok": False, "error": f"timed out after {timeout} s", "tail": str(e.stdout or "")[-3000:]}
    return {"ok": proc.returncode == 0, "returncode": proc.returncode, "tail": (proc.stdout + proc.stderr)[-3000:]}


def parts(quick: bool, out: Path) -> dict:
    sweep = ["kernels/bench/bench_kernels.py"] + (["--quick"] if quick else
                                                   ["--n", "16384", "65536", "--d", "512", "--repeat", "5",
                                                    "--impl", "fused", "eager", "openclip"])
    return {
        "kernels": lambda: kernels_part(quick),
        "determinism": lambda: determinism_part(quick),
        "sweep_infonce": lambda: script_part(sweep, 150, out),
        "sweep_cico": lambda: script_part(["kernels/bench/bench_kernels.py", "--cico",
                                           *(["--quick"] if quick else ["--repeat", "5"])], 90, out),
        "smoke": lambda: script_part(["benchmarks/gpu_smoke.py",
                                      *(["--quick"] if quick else ["--steps", "40", "--warmup", "10"])], 200, out),
        "decode": lambda: decode_part(quick),
        "loader": lambda: script_part(["benchmarks/bench_loader.py",
                                       *(["--quick"] if quick else ["--clips", "8", "--repeat", "1"])], 90, out),
        # per-rank work at 1M clips / 64 pools / world 64 / batch 1024: one pool of 15,625 clips a rank
        "planner": lambda: script_part(["benchmarks/bench_planner.py", *(["--quick"] if quick else [
            "--n", "1000000", "--batch", "1024", "--pools", "64", "--world", "64", "--chunk", "1", "16",
            "--dim", "512", "--dtype", "float16", "--step-ms", "300", "--budget-s", "60"])], 120, out),
    }


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="toy sizes: checks the script (on a CPU: interpreter)")
    ap.add_argument("--only", nargs="+", help="run only these parts")
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results")
    args = ap.parse_args(argv)
    import torch
    if args.quick and not torch.cuda.is_available():
        os.environ["TRITON_INTERPRET"] = "1"          # before sclslt_kernels is imported; children inherit it
    from sclslt.benchio import run_tag
    tag = run_tag()
    args.out.mkdir(parents=True, exist_ok=True)
    results = {}
    for name, fn in parts(args.quick, args.out).items():
        if args.only and name not in args.only:
            continue
        t0 = time.time()
        try:
            results[name] = fn()
        except Exception as e:  # noqa: BLE001 - a part's failure is its row; the others still run
            results[name] = {"ok": False, "error": f"{type(e).__name__}: {e}", "traceback": traceback.format_exc()[-3000:]}
        results[name]["seconds"] = round(time.time() - t0, 1)
        print(f"{name:14s} {'ok' if results[name]['ok'] else 'FAILED':7s} {results[name]['seconds']:7.1f} s", flush=True)
    path = args.out / f"gpu-check-{tag['date'].replace(':', '').replace('-', '')[:15]}.json"
    path.write_text(json.dumps({**tag, "quick": args.quick, "parts": results}, indent=1))
    print(f"{tag['device']} | torch {tag['versions']['torch']} | triton {tag['versions']['triton']} -> {path}")
    return 0 if all(r["ok"] for r in results.values()) else 1


if __name__ == "__main__":
    sys.exit(main())
