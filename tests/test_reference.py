"""Retrieval metrics against a brute-force count."""
import torch
import torch.nn.functional as F

from sclslt.reference import retrieval_recall


def test_retrieval_recall_counts_same_sentence_as_hit():
    g = torch.Generator().manual_seed(0)
    v = F.normalize(torch.randn(30, 8, generator=g), dim=-1)
    t = F.normalize(v + 0.8 * torch.randn(30, 8, generator=g), dim=-1)
    sids = torch.randint(0, 12, (30,), generator=g)
    got = retrieval_recall(v, t, sids, ks=(1, 5), chunk=7)
    for name, (q, c) in {"v2t": (v, t), "t2v": (t, v)}.items():
        sims = q @ c.t()
        for k in (1, 5):
            hits = sum(int((sids[sims[i].topk(k).indices] == sids[i]).any()) for i in range(30))
            assert abs(got[f"{name}_r{k}"] - 100 * hits / 30) < 1e-9
    assert got["v2t_r1"] <= got["v2t_r5"]
