"""`sclslt reference`: a Pair Selection reference table from two checkpoints of a reference run.

Every rank embeds its own slice of the training split (pooled video and text embeddings at the
early and the late checkpoint); rank 0 writes one safetensors file with the sample keys and
sentence ids. Use it as `selection.table` with `selection.mode: ps`.

--score pooled (default): delta(i, j) is the change of the pooled cosine, factorised in the table.
--score cico: delta(i, j) is the change of CiCo's token-level similarity (what a CiCo run trains),
which does not factorise: the table carries the dense N x N matrix (4 N^2 bytes: 0.2 GB at PHOENIX's
7,096 clips; use pooled scoring beyond some ten thousand clips). The export also reports how well
pooled delta ranks the pairs against CiCo delta (Spearman over a sample of pairs) in the table's meta.

  sclslt reference --run runs/ref --early epoch0000 --late epoch0005 --out ref.safetensors
  deepspeed --num_gpus 8 --module sclslt.cli reference --run runs/ref --early epoch0000 --late epoch0005 \
      --out ref.safetensors

--out DIR (no .safetensors suffix): a sharded table for corpora of millions of clips. Every rank embeds
its contiguous slice and writes it as DIR/part-RRRRR-of-WWWWW.safetensors (nothing is gathered);
rank 0 writes DIR/index.json last. With --resume, a part that exists for the same slice (its keys)
is kept, so an interrupted export continues where it stopped. Training ranks then read only the
rows of their own pools (`selection.table_dtype`). Pooled scoring only.

Checkpoint tags are the directory names under <run>/<stage>/checkpoints (a reference run saves
`epochNNNN` tags every `checkpoint.every_epochs` epochs, `epoch0000` being the stage's start).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from sclslt.config import eval_batch
from sclslt.registry import SIMILARITY_HEADS

if TYPE_CHECKING:
    import torch


def head_delta(views: dict, score: str, tau: float) -> torch.Tensor:
    """The similarity head `score`'s score at the late checkpoint minus at the early one, every video
    against every text (`SimilarityHead.scores`)."""
    from sclslt.model.heads import get_head

    head = get_head(score)
    return head.scores(views["late"], tau) - head.scores(views["early"], tau)


def spearman_pooled_vs(delta, views: dict, pairs: int, seed: int = 0) -> float:
    """Spearman correlation of pooled delta against `delta` over a seeded sample of off-diagonal pairs."""
    import torch

    n = delta.shape[0]
    g = torch.Generator().manual_seed(seed)
    i, j = torch.randint(0, n, (pairs,), generator=g), torch.randint(0, n, (pairs,), generator=g)
    keep = i != j
    i, j = i[keep], j[keep]
    e, la = views["early"], views["late"]
    pooled = (la["video"][i] * la["text"][j]).sum(1).double() - (e["video"][i] * e["text"][j]).sum(1).double()
    ranks = [
        torch.empty(len(x), dtype=torch.float64).index_put_((x.argsort(),), torch.arange(len(x), dtype=torch.float64))
        for x in (pooled, delta[i, j].double())
    ]
    return float(torch.corrcoef(torch.stack(ranks))[0, 1])


def export_sharded(args, d, ckpt: Path) -> int:
    """Each rank writes its slice as one part (resumable); rank 0 writes index.json when all are done."""
    import hashlib
    import json

    import torch.distributed as dist

    from sclslt.atomic import write_text
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.devdecode import resolve
    from sclslt.data.shards import manifest_rows, read_manifest
    from sclslt.eval.retrieval import embed_split
    from sclslt.runtime.rundir import RunDir, load_run_model
    from sclslt.selection.table import TABLE_INDEX, save_table

    cfg = RunDir(args.run).config()
    shards = resolve_shards_dir(cfg.data)
    keys = [r.key for r in manifest_rows(read_manifest(shards, args.split))]
    lo, hi = len(keys) * d.rank // d.world, len(keys) * (d.rank + 1) // d.world
    mine = keys[lo:hi]
    digest = hashlib.sha256(json.dumps(mine).encode()).hexdigest()
    name = f"part-{d.rank:05d}-of-{d.world:05d}.safetensors"
    part = args.out / name
    done = False
    if args.resume and part.is_file():
        from safetensors import safe_open

        with safe_open(str(part), framework="pt") as f:
            done = json.loads(f.metadata().get("meta", "{}")).get("keys_sha256") == digest
    if not done:
        views = {}
        for view, tag in (("early", args.early), ("late", args.late)):
            model, tok, _ = load_run_model(args.run, ckpt, tag)
            model.to(d.device)
            views[view] = embed_split(
                model,
                shards,
                args.split,
                tok,
                d.device,
                args.batch_size or eval_batch(cfg),
                max_frames=cfg.data.max_frames,
                gather=False,
                decode=resolve(cfg.data.decode, d.device),
            )
            if views[view]["keys"] != mine:
                raise RuntimeError(
                    f"rank {d.rank}: embedded {len(views[view]['keys'])} samples, not the slice "
                    f"{lo}..{hi} of the manifest"
                )
        args.out.mkdir(parents=True, exist_ok=True)
        save_table(
            part,
            views["early"],
            views["late"],
            {
                "run": str(args.run),
                "early": args.early,
                "late": args.late,
                "split": args.split,
                "rows": [lo, hi],
                "keys_sha256": digest,
            },
        )
    print(f"rank {d.rank}: {'kept' if done else 'wrote'} {part} ({len(mine)} samples)", flush=True)
    parts = [None] * d.world
    dist.all_gather_object(parts, {"name": name, "rows": len(mine)})
    if d.rank == 0:
        write_text(
            args.out / TABLE_INDEX,
            json.dumps(
                {"parts": parts, "split": args.split, "run": str(args.run), "early": args.early, "late": args.late},
                indent=1,
            ),
        )
        print(f"wrote {args.out / TABLE_INDEX}: {len(keys)} samples in {d.world} parts")
    dist.barrier()
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="sclslt reference",
        description=__doc__.split("\n\n")[0],
        epilog="\n\n".join(__doc__.split("\n\n")[1:]),
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    add_arguments(p)
    return run_command(p.parse_args(argv))


def add_arguments(p: argparse.ArgumentParser) -> None:
    """`sclslt reference`'s options."""
    p.add_argument("--run", required=True, type=Path, help="the reference run directory")
    p.add_argument("--early", required=True, help="checkpoint tag of the early view (e.g. epoch0000)")
    p.add_argument("--late", required=True, help="checkpoint tag of the late view (e.g. epoch0005)")
    p.add_argument("--out", required=True, type=Path, help="output .safetensors")
    p.add_argument("--stage", default="stage1")
    p.add_argument("--split", default="train")
    p.add_argument(
        "--batch-size",
        type=int,
        default=0,
        help="clips per forward (default: the run's eval.batch_size, capped at its micro-batch)",
    )
    p.add_argument(
        "--score",
        choices=SIMILARITY_HEADS.names(),
        default="pooled",
        help="the similarity head that delta is of (pooled: the planner scores the pooled views itself)",
    )
    p.add_argument("--pairs", type=int, default=1_000_000, help="pairs sampled for the rank correlation")
    p.add_argument("--resume", action="store_true", help="sharded --out: keep the parts already written")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)


def run_command(args) -> int:
    """Embed the split at both checkpoints on every rank; write the table (see the module docstring)."""
    from sclslt.runtime.distributed import finish_distributed, init_distributed

    d = init_distributed()
    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.data.devdecode import resolve
    from sclslt.eval.retrieval import embed_split
    from sclslt.runtime.rundir import RunDir, load_run_model
    from sclslt.selection.table import save_table

    ckpt = RunDir(args.run).checkpoints(args.stage)
    if args.out.suffix != ".safetensors":
        if args.score != "pooled":
            print(
                f"error: a sharded table (--out DIR) holds pooled scoring only; {args.score} scoring needs one file",
                file=sys.stderr,
            )
            return 2
        code = export_sharded(args, d, ckpt)
        finish_distributed()
        return code
    views = {}
    for name, tag in (("early", args.early), ("late", args.late)):
        if not (ckpt / tag).is_dir():
            have = sorted(p.name for p in ckpt.iterdir()) if ckpt.is_dir() else []
            print(f"error: no checkpoint {tag!r} under {ckpt} (have {have})", file=sys.stderr)
            return 2
        model, tok, cfg = load_run_model(args.run, ckpt, tag)
        model.to(d.device)
        views[name] = embed_split(
            model,
            resolve_shards_dir(cfg.data),
            args.split,
            tok,
            d.device,
            args.batch_size or eval_batch(cfg),
            max_frames=cfg.data.max_frames,
            head=None if args.score == "pooled" else args.score,
            decode=resolve(cfg.data.decode, d.device),
        )
    if d.rank == 0:
        meta = {
            "run": str(args.run),
            "stage": args.stage,
            "early": args.early,
            "late": args.late,
            "split": args.split,
            "score": args.score,
        }
        delta = None
        if args.score != "pooled":
            delta = head_delta(views, args.score, cfg.model.cico_tau)
            meta[f"spearman_pooled_vs_{args.score}"] = rho = spearman_pooled_vs(delta, views, args.pairs)
            print(
                f"delta: Spearman rank correlation of pooled vs {args.score} scoring over "
                f"{min(args.pairs, delta.numel() - len(delta))} pairs: {rho:.4f}"
            )
        args.out.parent.mkdir(parents=True, exist_ok=True)
        save_table(args.out, views["early"], views["late"], meta, delta)
        print(
            f"wrote {args.out}: {len(views['early']['keys'])} samples, "
            f"dim {views['early']['video'].shape[1]}, {args.score} scoring"
        )
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
