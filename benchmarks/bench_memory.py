"""Memory of one training step per rank against the global batch and the micro-batch (stageN.micro_batch).

Measured: bytes autograd keeps for backward (`torch.autograd.graph.saved_tensors_hooks`, distinct storages,
parameters excluded: they are model states) at the largest moment of a stage-1 step on one rank:
- whole share (micro-batch = share): the step's one graph;
- micro-batches (gradient caching, sclslt/train/accumulate.py): the largest chunk's graph, plus the cached
  feature gradients of the whole share (the only per-step memory that grows with the share).
On a GPU, `torch.cuda.max_memory_allocated` of the same step is added (everything: weights, workspace).
Also the step's wall time (chunked steps pay a second forward), with and without activation checkpointing.

Shapes (random weights, random frames; built from configs, nothing downloaded):
  synthetic   the test suite's tiny model at 16 px (CPU-friendly): global batch 16 / 256 / 4096 at world 1,
              micro-batch 2 / 8 / 32 and the whole share (where it fits --max-share)
  phoenix     the PHOENIX recipe's shapes (configs/phoenix2014t/base.yaml): ResNet-18 at 224 px, mBART-large-50's
              dimensions (d 1024, 12 + 12 layers, ffn 4096), LoRA 16, 300 frames a clip, 30 text tokens,
              micro-batch 1 and 2 of a global batch of 2 (--phoenix-micro), fp32 on a CPU, bf16 parameters on
              a GPU; each case in a fresh process, whose peak resident memory (ru_maxrss) is reported too: saved
              bytes hide what a recompute holds for a moment (activation checkpointing's region) and the
              forward's temporaries
BatchNorm rows: forward + backward time of one ResNet-sized BatchNorm2d input under torch's BatchNorm2d,
'global' and 'group N'.

  python benchmarks/bench_memory.py --quick                 # seconds: synthetic at 16 / 256, micro 2 / 8
  python benchmarks/bench_memory.py                         # synthetic rows of the README
  python benchmarks/bench_memory.py --phoenix               # + the PHOENIX shapes (~10 min on a CPU, ~16 GB RAM)
Rows are printed and written as CSV/JSON tagged with device and versions under --out.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout

from benchio import run_tag, write_rows  # noqa: E402

from sclslt.config import StageConfig, from_dict  # noqa: E402
from sclslt.data.loader import Batch, frame_fields  # noqa: E402
from sclslt.data.text import train_tokenizer  # noqa: E402
from sclslt.model.batchnorm import configure, finish_step  # noqa: E402
from sclslt.model.objective import forward, step_loss  # noqa: E402
from sclslt.model.slt import SLTModel  # noqa: E402
from sclslt.train.accumulate import CachedStep  # noqa: E402

MB = 2**20
SYNTHETIC = {
    "backbone_embedding": 8,
    "backbone_hidden": [8, 16],
    "backbone_depths": [1, 1],
    "d_model": 32,
    "layers": 1,
    "heads": 2,
    "ffn": 64,
    "dropout": 0.1,
    "embed_dim": 16,
    "max_positions": 64,
}
PHOENIX = {
    "backbone_embedding": 64,
    "backbone_hidden": [64, 128, 256, 512],
    "backbone_depths": [2, 2, 2, 2],
    "d_model": 1024,
    "layers": 12,
    "heads": 16,
    "ffn": 4096,
    "dropout": 0.1,
    "embed_dim": 1024,
    "max_positions": 1024,
    "lora_rank": 16,
    "similarity": "cico",
}


class _Meter:
    """Saved-for-backward bytes since the last `take`, parameters' storages excluded."""

    def __init__(self, model, batch: Batch):
        inputs = [v for v in vars(batch).values() if isinstance(v, torch.Tensor)]
        self.params = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *inputs]}
        self.seen: dict[int, int] = {}

    def pack(self, t):
        ptr = t.untyped_storage().data_ptr()
        if ptr not in self.params:
            self.seen[ptr] = t.untyped_storage().nbytes()
        return t

    def take(self) -> int:
        n, self.seen = sum(self.seen.values()), {}
        return n


class _Engine:
    """What CachedStep needs of the engine: a backward that first records the chunk's graph size."""

    def __init__(self, meter, device):
        self.meter, self.device, self.graphs = meter, device, []

    def backward(self, loss):
        self.graphs.append(self.meter.take())
        loss.backward()

    def step(self):
        pass


def make_batch(n: int, frames: int, size: int, tokens: int, vocab: int, device) -> Batch:
    g = torch.Generator().manual_seed(n)
    lengths = torch.randint(frames * 3 // 4, frames + 1, (n,), generator=g)
    mask = torch.arange(frames)[None] < lengths[:, None]
    ids = torch.randint(4, vocab, (n, tokens), generator=g)
    att = torch.ones(n, tokens, dtype=torch.long)
    return Batch(
        frames=torch.randint(0, 256, (n, frames, size, size, 3), dtype=torch.uint8, generator=g),
        frame_mask=mask,
        input_ids=ids,
        attention_mask=att,
        labels=ids.clone(),
        sentence_ids=torch.arange(n),
        keys=[str(i) for i in range(n)],
        texts=[""] * n,
        **frame_fields(mask),
    ).to(device)


def one_step(model, batch: Batch, micro: int, st: StageConfig, similarity: str) -> dict:
    """Saved bytes (largest graph, cached gradients) and wall time of one stage-1 step at world 1."""
    meter = _Meter(model, batch)
    engine = _Engine(meter, batch.frames.device)
    model.zero_grad(set_to_none=True)
    if batch.frames.is_cuda:
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    with torch.autograd.graph.saved_tensors_hooks(meter.pack, lambda t: t):
        if micro >= len(batch):
            loss, _ = step_loss(forward(model, batch, st), batch, st, 1, similarity)
            engine.backward(loss)
            cached = 0
        else:
            chunks = batch.split(micro)
            step = CachedStep(lambda c: forward(model, c, st), st, 1, similarity, 0.07, None)
            step.losses(chunks, engine.device)
            meter.take()  # the loss over cached leaves: freed at once
            cached = sum(g.numel() * g.element_size() for g in step.grads[0].values())
            meter.params |= {g.untyped_storage().data_ptr() for g in step.grads[0].values()}  # counted here
            step.backward(chunks, engine)
    finish_step(model)
    if batch.frames.is_cuda:
        torch.cuda.synchronize()
    row = {
        "graph_mb": max(engine.graphs) / MB,
        "cached_mb": cached / MB,
        "saved_mb": (max(engine.graphs) + cached) / MB,
        "step_s": time.perf_counter() - t0,
    }
    if batch.frames.is_cuda:
        row["max_allocated_mb"] = torch.cuda.max_memory_allocated() / MB
    return row


def build(model_cfg: dict, tok, batchnorm: str, checkpointing: bool, device, dtype) -> SLTModel:
    cfg = from_dict({"model": {**model_cfg, "batchnorm": batchnorm}}).model
    torch.manual_seed(0)
    model = SLTModel(cfg, tok).train()
    if checkpointing:
        model.checkpoint_activations()
    for p in model.parameters():  # DeepSpeed's bf16: parameters cast, buffers (running stats) fp32
        p.data = p.data.to(dtype)
    return model.to(device)


def synthetic_rows(tok, device, globals_, micros, max_share) -> list[dict]:
    rows = []
    st = StageConfig()
    for ckpt in (False, True):
        model = build(SYNTHETIC, tok, "group 2", ckpt, device, torch.float32)
        for g in globals_:
            batch = make_batch(g, 16, 16, 12, len(tok), device)
            for m in [*micros, g]:
                if m > g or (m == g and g > max_share):
                    continue
                rows.append(
                    {
                        "shapes": "synthetic",
                        "global_batch": g,
                        "world": 1,
                        "micro_batch": m,
                        "chunks": g // m,
                        "checkpointing": ckpt,
                        **one_step(model, batch, m, st, "pooled"),
                    }
                )
                print(_fmt(rows[-1]), flush=True)
    return rows


def phoenix_case(tok, device, micro: int, ckpt: bool) -> dict:
    """One PHOENIX-shaped stage-1 step (global batch 2) in this process; with the process's resident memory
    after building the model and at its peak (ru_maxrss), which include everything (weights, temporaries)."""
    import resource

    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    st = StageConfig(freeze_text_encoder=True)
    model = build(PHOENIX, tok, "group 1", ckpt, device, dtype)
    from sclslt.model.objective import set_trainable

    set_trainable(model, st)
    batch = make_batch(2, 300, 224, 30, len(tok), device)
    built = _rss_mb()
    row = {
        "shapes": "phoenix",
        "global_batch": 2,
        "world": 1,
        "micro_batch": micro,
        "chunks": 2 // micro,
        "checkpointing": ckpt,
        "dtype": str(dtype).split(".")[-1],
        **one_step(model, batch, micro, st, "cico"),
        "weights_mb": sum(p.numel() * p.element_size() for p in model.parameters()) / MB,
        "trainable_params": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "rss_built_mb": built,
        "rss_peak_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }
    row["rss_step_mb"] = row["rss_peak_mb"] - built
    return row


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def phoenix_rows(micros) -> list[dict]:
    """Each case in a fresh process (its peak memory its own)."""
    import json
    import subprocess

    rows = []
    for ckpt in (False, True):
        for m in micros:
            cmd = [sys.executable, __file__, "--phoenix-case", str(m), str(int(ckpt))]
            out = subprocess.run(cmd, capture_output=True, text=True, check=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
            print(_fmt(rows[-1]), flush=True)
    return rows


def bn_rows(device) -> list[dict]:
    """Forward + backward of a ResNet-18 stage-1-sized BatchNorm2d input (64 frames x 64 x 56 x 56)."""
    rows = []
    x = torch.randn(64, 64, 56, 56, device=device)
    for name in ("torch", "global", "group 8"):
        bn = torch.nn.BatchNorm2d(64).to(device)
        if name != "torch":
            bn = configure(torch.nn.Sequential(bn), name)[0]
        seg = (torch.arange(64, device=device) // 8, 8) if name == "group 8" else None
        xi = x.clone().requires_grad_()
        times = []
        for _ in range(4):
            t0 = time.perf_counter()
            y = bn(xi, segments=seg) if seg else bn(xi)
            y.sum().backward()
            if device.type == "cuda":
                torch.cuda.synchronize()
            times.append(time.perf_counter() - t0)
        rows.append({"shapes": "batchnorm2d 64x64x56x56", "batchnorm": name, "fwd_bwd_ms": 1e3 * min(times[1:])})
        print(_fmt(rows[-1]), flush=True)
    return rows


def _fmt(r: dict) -> str:
    return "  ".join(f"{k}={v:.1f}" if isinstance(v, float) else f"{k}={v}" for k, v in r.items())


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true", help="global batch 16 and 256, micro-batch 2 and 8")
    p.add_argument("--phoenix", action="store_true", help="also the PHOENIX recipe's shapes")
    p.add_argument("--max-share", type=int, default=4096, help="largest whole share measured unchunked")
    p.add_argument("--phoenix-micro", type=int, nargs="+", default=[1, 2], help="the PHOENIX micro-batches")
    p.add_argument("--phoenix-case", nargs=2, type=int, help=argparse.SUPPRESS)  # micro, checkpointing
    p.add_argument("--out", type=Path, default=Path(__file__).resolve().parent / "results")
    a = p.parse_args(argv)
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    with tempfile.TemporaryDirectory() as d:
        words = [f"w{i}" for i in range(300)]
        tok = train_tokenizer([" ".join(words[j : j + 12]) for j in range(0, 288, 3)], Path(d))
    if a.phoenix_case:
        import json

        print(json.dumps(phoenix_case(tok, device, a.phoenix_case[0], bool(a.phoenix_case[1]))))
        return 0
    globals_, micros = ((16, 256), (2, 8)) if a.quick else ((16, 256, 4096), (2, 8, 32))
    rows = synthetic_rows(tok, device, globals_, micros, a.max_share) + bn_rows(device)
    if a.phoenix:
        rows += phoenix_rows(a.phoenix_micro)
    base = write_rows(rows, a.out, "memory", run_tag())
    print(f"wrote {base}.csv / .json")
    return 0


if __name__ == "__main__":
    sys.exit(main())
