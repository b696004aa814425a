"""Retrieval metrics against a brute-force count, in one process and sharded over 2-3 gloo ranks."""

import pytest
import torch
import torch.nn.functional as F

from sclslt.eval.retrieval import retrieval_recall


def _embeddings(n, d, seed, n_sentences):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(n, d, generator=g), dim=-1)
    t = F.normalize(v + 0.8 * torch.randn(n, d, generator=g), dim=-1)
    sids = torch.randint(0, n_sentences, (n,), generator=g)  # many duplicate sentences
    return v, t, sids


def _brute_force(v, t, sids, ks):
    n = len(sids)
    out = {}
    for name, (q, c) in {"v2t": (v, t), "t2v": (t, v)}.items():
        sims = q @ c.t()
        for k in ks:
            hits = sum(int((sids[sims[i].topk(k).indices] == sids[i]).any()) for i in range(n))
            out[f"{name}_r{k}"] = 100 * hits / n
    return out


def test_retrieval_recall_counts_same_sentence_as_hit():
    v, t, sids = _embeddings(30, 8, 0, 12)
    got = retrieval_recall(v, t, sids, ks=(1, 5), chunk=7)
    want = _brute_force(v, t, sids, (1, 5))
    assert got.keys() == want.keys()
    for key in want:
        assert abs(got[key] - want[key]) < 1e-9, key
    assert got["v2t_r1"] <= got["v2t_r5"]


def _gloo_worker(rank, world, init_file, n, seed, chunk, out_file):
    import torch.distributed as dist

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    v, t, sids = _embeddings(n, 16, seed, n // 4)
    rows = []  # the rows this rank scores, per similarity chunk
    orig = torch.Tensor.topk

    def counting_topk(self, *a, **k):
        rows.append(tuple(self.shape))
        return orig(self, *a, **k)

    torch.Tensor.topk = counting_topk
    try:
        got = retrieval_recall(v, t, sids, ks=(1, 5, 10), chunk=chunk)
    finally:
        torch.Tensor.topk = orig
    every = [None] * world
    dist.all_gather_object(every, {"result": got, "rows": rows})
    if rank == 0:
        torch.save(every, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("world,n,chunk", [(2, 37, 8), (3, 50, 6)])
def test_sharded_retrieval_equals_one_process(tmp_path, world, n, chunk):
    """Each rank scores its contiguous slice of the queries in chunks; the summed hits equal one process."""
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    seed = 100 + world * n
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), n, seed, chunk, str(out)), nprocs=world)
    every = torch.load(out, weights_only=False)
    v, t, sids = _embeddings(n, 16, seed, n // 4)
    single = retrieval_recall(v, t, sids, ks=(1, 5, 10), chunk=chunk)
    assert single == _brute_force(v, t, sids, (1, 5, 10))
    assert len(set(sids.tolist())) < n  # duplicates are there
    for r, part in enumerate(every):
        assert part["result"] == single, r  # exactly, on every rank
        lo, hi = n * r // world, n * (r + 1) // world
        # both directions: only this rank's queries, never more than `chunk` rows against all n candidates
        assert sum(s[0] for s in part["rows"]) == 2 * (hi - lo), r
        assert all(s[0] <= chunk and s[1] == n for s in part["rows"]), part["rows"]
