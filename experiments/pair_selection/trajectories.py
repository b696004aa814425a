"""Trajectories of negative pairs over the checkpoints of a reference run (docs/paper.md, "The evidence").

Embeds the training split at every checkpoint of a run, draws one seeded random sample of its
video-text pairs (the same samples at every checkpoint) and follows the similarity of every
negative pair (i, j), i != j within the sample: s(i, j) = video_i . text_j, the cosine of the
L2-normalised pooled embeddings. Each negative pair is High or Low at the FIRST and at the LAST
checkpoint, which gives four classes:
  H->L  High, then Low: pushed away, as contrastive training intends
  H->H  High, then High: stays close (semantic neighbours, false negatives)
  L->H  Low, then High: becomes confusable
  L->L  Low, then Low: uninformative

High threshold (--threshold-mode, --high):
  first (default): High = similarity above the FIRST checkpoint's --high quantile (default 0.5, the
            median) of all negative-pair similarities of the sample, the same value at every checkpoint
            (so the classes say how similarities moved: H->L and L->H can differ, as in the paper's
            35.9% against 17.8%);
  quantile: High = above each checkpoint's own --high quantile (a per-checkpoint median puts half the
            pairs High at both ends, which forces H->L = L->H);
  absolute: High = similarity > --high, a cosine value (e.g. --high 0.3).

Reported: class counts and fractions; H->H pairs that share a sentence id (known false negatives:
identical sentences) as a count and as a fraction of H->H, next to the same fraction among all
negative pairs; the mean similarity of each class at each checkpoint; a few example trajectories.
Outputs in --out (default <run>/<stage>/trajectories/): report.json and trajectories.png (left:
class fractions; right: mean similarity per class across the checkpoints, example trajectories as
thin lines). Each checkpoint's embedding pass of the split is kept in --cache (default
<run>/<stage>/trajectories/embeddings/<split>.<tag>.safetensors) and reused by later calls (other
thresholds, samples or outputs) unless the checkpoint is newer, --recompute or --no-cache is given.

  python -m experiments.pair_selection.trajectories --run runs/ref
  python -m experiments.pair_selection.trajectories --run runs/ref --tags epoch0000 epoch0005 epoch0010 --sample 2048
  deepspeed --num_gpus 8 --module experiments.pair_selection.trajectories --run runs/ref --threshold-mode absolute
  --high 0.3

Default tags: every `epochNNNN` checkpoint of the stage (a reference run saves them every
`checkpoint.every_epochs` epochs), in epoch order; --tags keeps the order given. Every rank embeds
its slice of the split; rank 0 does the analysis and writes. Memory: a few sample x sample
matrices at a time, whatever the number of checkpoints.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
from collections.abc import Sequence
from pathlib import Path

import torch

from sclslt.atomic import write_text

CLASSES = ("H->L", "H->H", "L->H", "L->L")
COLORS = {"H->L": "tab:green", "H->H": "tab:orange", "L->H": "tab:red", "L->L": "tab:gray"}
EPOCH_TAG = re.compile(r"^epoch(\d+)$")


# ---------------------------------------------------------------------------------------------
# analysis (pure functions)


def quantile(values: torch.Tensor, q: float) -> float:
    """Linear-interpolation quantile (numpy's and torch.quantile's default) of a 1-D tensor, by
    selection: no size limit and no sorted copy with indices."""
    m = values.numel()
    if m == 0:
        raise ValueError("quantile of an empty set")
    pos = q * (m - 1)
    lo = int(math.floor(pos))
    a = float(values.kthvalue(lo + 1).values)
    if lo + 1 >= m or pos == lo:
        return a
    b = float(values.kthvalue(lo + 2).values)
    return a + (pos - lo) * (b - a)


def threshold(sim: torch.Tensor, off: torch.Tensor, high: float, mode: str) -> float:
    """The High threshold of one checkpoint's similarities (mode "first" asks it of the first only)."""
    if mode in ("quantile", "first"):
        return quantile(sim[off], high)
    if mode == "absolute":
        return float(high)
    raise ValueError(f"unknown threshold mode {mode!r} (first, quantile or absolute)")


def _nan_to_none(x):
    if isinstance(x, float) and math.isnan(x):
        return None
    if isinstance(x, dict):
        return {k: _nan_to_none(v) for k, v in x.items()}
    if isinstance(x, (list, tuple)):
        return [_nan_to_none(v) for v in x]
    return x


def pair_share(flat: torch.Tensor, mask: torch.Tensor, counts: torch.Tensor) -> dict:
    """How the negative pairs in `mask` (n x n bool, diagonal False) fall into the classes: their share of
    H->H next to their share of all negatives (the paper's evidence when the pairs are false negatives)."""
    by_class = torch.bincount(flat[mask.reshape(-1)], minlength=5)[:4]
    hh, negatives = int(counts[1]), int(counts.sum())
    return {
        "hh_count": int(by_class[1]),
        "hh_fraction": int(by_class[1]) / hh if hh else float("nan"),
        "negatives_count": int(mask.sum()),
        "negatives_fraction": int(mask.sum()) / negatives,
        "counts_by_class": {name: int(by_class[c]) for c, name in enumerate(CLASSES)},
    }


def classify(
    sims: Sequence, sids, high: float = 0.5, mode: str = "first", examples: int = 5, seed: int = 0, meanings=None
) -> dict:
    """Trajectory classes of the negative pairs of one sample.

    sims: one (n x n) similarity matrix per checkpoint, in checkpoint order (row i = video i,
    column j = text j); any sequence works: a lazy one computing each matrix on access keeps the
    memory at a few n x n (sims[0] and sims[-1] are read twice, every other matrix once).
    sids: (n,) sentence ids; meanings: optional (n,) ground-truth meanings (a synthetic corpus knows
    them), which adds the pairs of one meaning and different sentences (paraphrases: false negatives
    no id mask catches). The diagonal (positives) is ignored; every ordered pair i != j is a
    negative. High at a checkpoint: similarity > threshold (see `threshold`); classes from the
    first and the last checkpoint. Empty classes have mean None.
    """
    sids = torch.as_tensor(sids).reshape(-1)
    n, k = sids.numel(), len(sims)
    if k < 2:
        raise ValueError(f"need at least 2 checkpoints, got {k}")
    if n < 2:
        raise ValueError(f"need at least 2 samples, got {n}")
    if mode in ("quantile", "first") and not 0.0 <= high <= 1.0:
        raise ValueError(f"--high {high} is not a quantile in [0, 1]")
    off = ~torch.eye(n, dtype=torch.bool)
    first = sims[0]
    if tuple(first.shape) != (n, n):
        raise ValueError(f"similarity matrices must be {n} x {n}, got {tuple(first.shape)}")
    t_first = threshold(first, off, high, mode)
    h0 = first > t_first
    del first
    last = sims[-1]
    t_last = t_first if mode == "first" else threshold(last, off, high, mode)
    h1 = last > t_last
    del last
    # class index: H->L 0, H->H 1, L->H 2, L->L 3 (= 2 * low_first + same_state); diagonal 4
    label = 2 * (~h0).to(torch.uint8) + (h0 == h1).to(torch.uint8)
    del h0, h1
    label[~off] = 4
    flat = label.reshape(-1).long()
    del label
    counts = torch.bincount(flat, minlength=5)[:4]
    same = (sids[:, None] == sids[None, :]) & off
    negatives = n * (n - 1)

    g = torch.Generator().manual_seed(seed)
    picks = {}
    for c, name in enumerate(CLASSES):
        idx = (flat == c).nonzero().reshape(-1)
        idx = idx[torch.randperm(len(idx), generator=g)[:examples]].sort().values
        picks[name] = idx
    means = {name: [] for name in CLASSES}
    thresholds, high_frac = [], []
    traj = {name: [[] for _ in picks[name]] for name in CLASSES}
    for i in range(k):
        s = sims[i]
        t = t_first if i == 0 or mode == "first" else t_last if i == k - 1 else threshold(s, off, high, mode)
        thresholds.append(t)
        high_frac.append(float(((s > t) & off).sum()) / negatives)
        sums = torch.bincount(flat, weights=s.reshape(-1).double(), minlength=5)[:4]
        for c, name in enumerate(CLASSES):
            means[name].append(float(sums[c] / counts[c]) if counts[c] else float("nan"))
            for e, p in enumerate(picks[name].tolist()):
                traj[name][e].append(float(s.reshape(-1)[p]))
        del s
    out = {
        "mode": mode,
        "high": high,
        "n": n,
        "negatives": negatives,
        "checkpoints": k,
        "thresholds": thresholds,
        "high_fraction": high_frac,
        "counts": {name: int(counts[c]) for c, name in enumerate(CLASSES)},
        "fractions": {name: int(counts[c]) / negatives for c, name in enumerate(CLASSES)},
        "same_sentence": pair_share(flat, same, counts),
        "mean_similarity": means,
        "examples": {
            name: [
                {"video": p // n, "text": p % n, "similarity": traj[name][e]}
                for e, p in enumerate(picks[name].tolist())
            ]
            for name in CLASSES
        },
    }
    if meanings is not None:
        m = torch.as_tensor(meanings).reshape(-1)
        out["paraphrase"] = pair_share(flat, (m[:, None] == m[None, :]) & ~same & off, counts)
    return _nan_to_none(out)


class PairSims(Sequence):
    """The (n x n) video-text cosine matrices of a sample, one per checkpoint, computed on access."""

    def __init__(self, views: list[tuple[torch.Tensor, torch.Tensor]]):
        self.views = views

    def __len__(self):
        return len(self.views)

    def __getitem__(self, i):
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        v, t = self.views[i]
        return v @ t.t()


# ---------------------------------------------------------------------------------------------
# checkpoints, output


def find_tags(ckpt_dir: Path) -> list[str]:
    """The `epochNNNN` checkpoint directories under ckpt_dir, in epoch order."""
    if not ckpt_dir.is_dir():
        return []
    tags = [p.name for p in ckpt_dir.iterdir() if p.is_dir() and EPOCH_TAG.match(p.name)]
    return sorted(tags, key=lambda t: int(EPOCH_TAG.match(t).group(1)))


def sample_indices(n_total: int, sample: int, seed: int) -> torch.Tensor:
    """A seeded random subset of min(sample, n_total) row indices, in split order."""
    g = torch.Generator().manual_seed(seed)
    return torch.randperm(n_total, generator=g)[: min(sample, n_total)].sort().values


def _cache_fresh(path: Path, tag_dir: Path) -> bool:
    if not path.is_file():
        return False
    newest = max((f.stat().st_mtime for f in tag_dir.rglob("*") if f.is_file()), default=0.0)
    return path.stat().st_mtime >= newest


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import matplotlib.ticker

    tags = report["tags"]
    epochs = [EPOCH_TAG.match(t) for t in tags]
    x = [int(m.group(1)) for m in epochs] if all(epochs) else list(range(len(tags)))
    fig, (ax0, ax1) = plt.subplots(1, 2, figsize=(12, 4.5))
    fr = [report["fractions"][c] for c in CLASSES]
    bars = ax0.bar(CLASSES, [100 * f for f in fr], color=[COLORS[c] for c in CLASSES])
    for b, f in zip(bars, fr):
        ax0.annotate(
            f"{100 * f:.1f}%", (b.get_x() + b.get_width() / 2, b.get_height()), ha="center", va="bottom", fontsize=9
        )
    rule = {
        "quantile": f"above each checkpoint's {report['high']:g} quantile",
        "first": f"above the first checkpoint's {report['high']:g} quantile",
    }.get(report["mode"], f"cosine > {report['high']:g}")
    ax0.set_ylabel("% of negative pairs")
    ax0.set_title(
        f"{tags[0]} -> {tags[-1]}: {report['negatives']} negatives of {report['n']} pairs\nHigh = {rule}", fontsize=10
    )
    for c in CLASSES:
        for ex in report["examples"][c]:
            ax1.plot(x, ex["similarity"], color=COLORS[c], lw=0.7, alpha=0.45)
        m = report["mean_similarity"][c]
        if all(v is not None for v in m):
            ax1.plot(x, m, color=COLORS[c], lw=2.5, marker="o", ms=4, label=f"{c} mean")
    ax1.plot(x, report["thresholds"], color="black", ls="--", lw=1, label="High threshold")
    ax1.set_xlabel("epoch" if all(epochs) else "checkpoint")
    ax1.xaxis.set_major_locator(matplotlib.ticker.MaxNLocator(integer=True))
    if not all(epochs):
        ax1.set_xticks(x, tags, rotation=30, fontsize=8)
    ax1.set_ylabel("cosine similarity video_i . text_j")
    ax1.set_title("mean per class (thick) and example pairs (thin)", fontsize=10)
    ax1.legend(fontsize=8, loc="best")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def print_table(report: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    console = Console(highlight=False, soft_wrap=True, width=None if sys.stdout.isatty() else 120)
    t = Table(
        title=f"negative-pair trajectories {report['tags'][0]} -> {report['tags'][-1]} "
        f"({report['n']} pairs, {report['negatives']} negatives, {report['mode']} {report['high']:g})"
    )
    for c in (
        "class",
        "count",
        "fraction",
        f"mean s {report['tags'][0]}",
        f"mean s {report['tags'][-1]}",
        "same sentence",
    ):
        t.add_column(c, justify="left" if c == "class" else "right")
    fmt = lambda v: "-" if v is None else f"{v:.4f}"  # noqa: E731
    for c in CLASSES:
        m = report["mean_similarity"][c]
        t.add_row(
            c,
            str(report["counts"][c]),
            f"{100 * report['fractions'][c]:.1f}%",
            fmt(m[0]),
            fmt(m[-1]),
            str(report["same_sentence"]["counts_by_class"][c]),
        )
    console.print(t)
    for key, what in (
        ("same_sentence", "the same sentence (known false negatives)"),
        ("paraphrase", "one meaning in other words (paraphrases: unmasked false negatives)"),
    ):
        if key in report:
            ss = report[key]
            hh = "-" if ss["hh_fraction"] is None else f"{100 * ss['hh_fraction']:.2f}%"
            console.print(
                f"H->H pairs with {what}: {ss['hh_count']} ({hh} of H->H; "
                f"{100 * ss['negatives_fraction']:.2f}% of all negatives)"
            )


# ---------------------------------------------------------------------------------------------


def synthetic_meanings(run: Path, keys: list[str]) -> list[int] | None:
    """Ground-truth meanings of the sampled clips when the run's corpus is the synthetic one (else None)."""
    from sclslt.runtime.rundir import RunDir

    cfg = RunDir(run).config()
    if cfg.data.corpus != "synthetic":
        return None
    from sclslt.data.synthetic import SyntheticCorpus

    corpus = SyntheticCorpus(cfg.data.synthetic)
    return [corpus.meaning_of_key(k) for k in keys]


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--run", required=True, type=Path, help="the reference run directory")
    p.add_argument("--stage", default="stage1", help="stage whose checkpoints to read (default stage1)")
    p.add_argument(
        "--tags",
        nargs="+",
        default=None,
        help="checkpoint tags in order, at least 2 (default: every epochNNNN tag of the stage)",
    )
    p.add_argument("--sample", type=int, default=512, help="pairs drawn from the split (default 512)")
    p.add_argument("--seed", type=int, default=0, help="seed of the sample and of the example pairs (default 0)")
    p.add_argument("--split", default="train", help="split to embed (default train)")
    p.add_argument(
        "--high",
        type=float,
        default=0.5,
        help="High threshold: a quantile in [0, 1] (quantile mode, default 0.5) or a cosine (absolute)",
    )
    p.add_argument(
        "--threshold-mode",
        choices=("first", "quantile", "absolute"),
        default="first",
        help="first (default): High = above the first checkpoint's --high quantile of the negatives' "
        "similarities, fixed; quantile: each checkpoint's own; absolute: similarity > --high",
    )
    p.add_argument("--examples", type=int, default=5, help="example trajectories per class in the plot (default 5)")
    p.add_argument("--out", type=Path, default=None, help="output directory (default <run>/<stage>/trajectories)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument(
        "--cache",
        type=Path,
        default=None,
        help="directory of the embedding passes (default <run>/<stage>/trajectories/embeddings)",
    )
    p.add_argument("--recompute", action="store_true", help="embed again even where a cached embedding pass exists")
    p.add_argument("--no-cache", action="store_true", help="neither read nor write cached embedding passes")
    p.add_argument("--local_rank", "--local-rank", type=int, default=None, help=argparse.SUPPRESS)
    return p


def checked_tags(args, ckpt: Path) -> list[str] | None:
    """The checkpoint tags to embed, or None after printing why the arguments cannot work."""
    have = sorted(q.name for q in ckpt.iterdir() if q.is_dir()) if ckpt.is_dir() else []
    tags = args.tags if args.tags else find_tags(ckpt)
    missing = [t for t in tags if not (ckpt / t).is_dir()]
    if missing:
        print(f"error: no checkpoint {missing} under {ckpt} (have {have})", file=sys.stderr)
        return None
    if len(tags) < 2:
        print(
            f"error: need at least 2 checkpoints, found {tags} under {ckpt} (have {have}); a reference run "
            f"saves epochNNNN tags with --checkpoint.every_epochs N",
            file=sys.stderr,
        )
        return None
    if args.sample < 2:
        print("error: --sample must be at least 2", file=sys.stderr)
        return None
    if args.threshold_mode in ("quantile", "first") and not 0.0 <= args.high <= 1.0:
        print(
            f"error: --high {args.high} is not a quantile in [0, 1] (use --threshold-mode absolute for a "
            f"cosine threshold)",
            file=sys.stderr,
        )
        return None
    return tags


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from sclslt.runtime.rundir import RunDir

    ckpt = RunDir(args.run).checkpoints(args.stage)
    tags = checked_tags(args, ckpt)
    if tags is None:
        return 2
    out = args.out or args.run / args.stage / "trajectories"

    from sclslt.data.devdecode import resolve
    from sclslt.runtime.distributed import finish_distributed, init_distributed

    d = init_distributed()
    import torch.distributed as dist

    from sclslt.data.corpus import resolve_shards_dir
    from sclslt.eval.retrieval import embed_split
    from sclslt.runtime.rundir import load_run_model
    from sclslt.selection.table import load_snapshot, save_snapshot

    rank0 = d.rank == 0
    cache = args.cache or args.run / args.stage / "trajectories" / "embeddings"
    views, keys, sids, idx, n_total = [], None, None, None, None
    for tag in tags:
        path = cache / f"{args.split}.{tag}.safetensors"
        reuse = [not (args.recompute or args.no_cache) and _cache_fresh(path, ckpt / tag)]
        dist.broadcast_object_list(reuse, src=0)  # every rank takes the same (collective) path
        if reuse[0]:
            emb = load_snapshot(path) if rank0 else None
        else:
            model, tok, cfg = load_run_model(args.run, ckpt, tag)
            model.to(d.device)
            emb = embed_split(
                model,
                resolve_shards_dir(cfg.data),
                args.split,
                tok,
                d.device,
                args.batch_size,
                max_frames=cfg.data.max_frames,
                decode=resolve(cfg.data.decode, d.device),
            )
            del model
            if rank0 and not args.no_cache:
                save_snapshot(path, emb)
        error = [None]
        if rank0:
            if keys is None:
                keys, n_total = list(emb["keys"]), len(emb["keys"])
                idx = sample_indices(n_total, args.sample, args.seed)
                sids = emb["sentence_ids"][idx].long()
            elif list(emb["keys"]) != keys:
                error = [
                    f"the {args.split} split of {tag} holds other samples than {tags[0]}'s "
                    f"(a stale embedding cache in {cache}? pass --recompute)"
                ]
            if error[0] is None:
                views.append((emb["video"][idx].float().clone(), emb["text"][idx].float().clone()))
                print(f"{tag}: {'cached' if reuse[0] else 'embedded'} {n_total} {args.split} samples", flush=True)
        del emb
        dist.broadcast_object_list(error, src=0)
        if error[0] is not None:
            if rank0:
                print(f"error: {error[0]}", file=sys.stderr)
            return 1
    if rank0:
        meanings = synthetic_meanings(args.run, [keys[i] for i in idx.tolist()])
        res = classify(PairSims(views), sids, args.high, args.threshold_mode, args.examples, args.seed, meanings)
        report = {
            "args": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items() if k != "local_rank"},
            "run": str(args.run),
            "stage": args.stage,
            "split": args.split,
            "tags": list(tags),
            "sample_requested": args.sample,
            "sample_size": len(idx),
            "split_size": n_total,
            "seed": args.seed,
            "sample_keys": [keys[i] for i in idx.tolist()],
            **res,
        }
        write_text(out / "report.json", json.dumps(report, indent=1))
        plot(report, out / "trajectories.png")
        print_table(report)
        print(f"wrote {out / 'report.json'} and {out / 'trajectories.png'}", flush=True)
    finish_distributed()
    return 0


if __name__ == "__main__":
    sys.exit(main())
