"""Embedding passes over a split: reference tables for Pair Selection, retrieval metrics, trajectories.

`embed_split` runs the model's pooled video and text heads over a split in eval mode; every rank
embeds its own contiguous slice of the split (no clip is read twice) and the slices are gathered,
so every rank ends with the whole split in split order. `retrieval_recall` splits the scoring the
same way (each rank its slice of the queries, hit counts summed).
"""

from __future__ import annotations

import torch
import torch.distributed as dist

from sclslt.data.loader import Collate, ShardStream, make_loader
from sclslt.model.heads import get_head
from sclslt.model.losses import pad_cat
from sclslt.model.slt import SLTModel


def _cat(parts: list[torch.Tensor], head=None) -> torch.Tensor:
    """Concatenate along dim 0 (a token-level head's columns padded on dim 1: `losses.pad_cat`); a rank
    with no clip of the split contributes nothing."""
    kept = [p for p in parts if p.shape[0]]
    if not kept:
        return parts[0] if parts else torch.zeros(0)
    return pad_cat(kept) if head is not None and head.token_level and kept[0].ndim >= 2 else torch.cat(kept)


@torch.no_grad()
def embed_split(
    model: SLTModel,
    shards_dir,
    split: str,
    tokenizer,
    device,
    batch_size: int = 64,
    num_workers: int = 0,
    max_frames: int = 0,
    head: str | None = None,
    gather: bool = True,
    decode: str = "cpu",
) -> dict:
    """{keys, sentence_ids, video (N, e), text (N, e)} of the whole split, on every rank, split order
    (with `gather` False: this rank's contiguous slice of it);
    with `head`, that similarity head's features too (`SimilarityHead.features` in eval mode: its `columns`;
    a token-level head's padded to the split's longest), what its `scores` reads.
    `max_frames` > 0: longer clips are subsampled to evenly spaced frames (pass `data.max_frames`);
    `decode`: where `jpg` frames are decoded (`sclslt.data.devdecode.resolve`)."""
    rank, world = (dist.get_rank(), dist.get_world_size()) if dist.is_initialized() else (0, 1)
    was_training = model.training
    model.eval()
    stream = ShardStream(shards_dir, split, batch_size, rank=rank, world=world, max_frames=max_frames, decode=decode)
    e = model.video_proj.out_features  # a rank with no clip of the split contributes empty tensors
    keys, sids, vs, ts = [], [torch.zeros(0, dtype=torch.long)], [torch.zeros(0, e)], [torch.zeros(0, e)]
    sim = get_head(head) if head else None
    cols = {k: [] for k in (sim.columns if sim else ())}
    for batch in make_loader(stream, Collate(tokenizer), num_workers):
        batch = batch.to(device)
        enc, mask = model.encode_video(batch.frames, batch.frame_mask)  # once: the pooled and the head's
        text = model.encode_text(batch.input_ids, batch.attention_mask)  # features share the encoders
        v, t = model.pooled_embeddings(enc, mask, text, batch.attention_mask)
        keys += batch.keys
        sids.append(batch.sentence_ids.cpu())
        vs.append(v.float().cpu())
        ts.append(t.float().cpu())
        if sim:
            f = sim.features(model, enc, mask, text, batch.attention_mask)
            for k in sim.columns:
                cols[k].append(f[k].float().cpu() if f[k].is_floating_point() else f[k].cpu())
    mine = {"keys": keys, "sentence_ids": torch.cat(sids), "video": torch.cat(vs), "text": torch.cat(ts)}
    if sim:
        mine.update({k: _cat(v, sim) for k, v in cols.items()})
    model.train(was_training)
    if world == 1 or not gather:  # gather=False: this rank's contiguous slice only (sharded tables)
        return mine
    parts = [None] * world
    dist.all_gather_object(parts, mine)
    out = {"keys": [k for p in parts for k in p["keys"]]}
    for k in mine:
        if k != "keys":
            out[k] = _cat([p[k] for p in parts], sim if sim and k in sim.columns else None)
    return out


def retrieval_recall(
    video: torch.Tensor,
    text: torch.Tensor,
    sentence_ids: torch.Tensor,
    ks=(1, 5, 10),
    chunk: int = 4096,
    distributed: bool | None = None,
) -> dict:
    """video->text and text->video R@k (%); a retrieved item with the query's sentence is a hit
    (identical sentences are not errors).

    Every caller holds all N embeddings (as `embed_split` returns them). Queries are scored against
    all candidates in row chunks of `chunk`, so no N x N matrix exists at once. When torch.distributed
    is initialised with world > 1 (and `distributed` is not False), the call is a collective: each rank
    scores only its contiguous slice of the queries and the hit counts are summed with one all_reduce,
    so every rank returns the same numbers as a single process would."""
    if distributed is None:
        distributed = dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1
    rank, world = (dist.get_rank(), dist.get_world_size()) if distributed else (0, 1)
    n = video.shape[0]
    if text.shape[0] != n or sentence_ids.shape[0] != n:
        raise ValueError(f"retrieval_recall: {n} videos, {text.shape[0]} texts, {sentence_ids.shape[0]} ids")
    lo, hi = n * rank // world, n * (rank + 1) // world
    directions = {"v2t": (video, text), "t2v": (text, video)}
    ids = sentence_ids.to(video.device)
    hits = torch.zeros(len(directions), len(ks), dtype=torch.long)
    for d, (q, c) in enumerate(directions.values()):
        top_n = min(max(ks), c.shape[0])
        for start in range(lo, hi, chunk):
            stop = min(start + chunk, hi)
            top = (q[start:stop] @ c.t()).topk(top_n, dim=1).indices
            same = ids[top] == ids[start:stop, None]
            for j, k in enumerate(ks):
                hits[d, j] += int(same[:, :k].any(1).sum())
    if distributed:
        dev = torch.device("cuda", torch.cuda.current_device()) if dist.get_backend() == "nccl" else torch.device("cpu")
        hits = hits.to(dev)
        dist.all_reduce(hits)  # one collective: both directions, every k
        hits = hits.cpu()
    out = {}
    for d, name in enumerate(directions):
        out.update({f"{name}_r{k}": 100.0 * int(hits[d, j]) / max(n, 1) for j, k in enumerate(ks)})
    return out
