"""The contrastive and translation losses against naive per-row loops (values and gradients)."""

import math

import pytest
import torch
import torch.nn.functional as F

from sclslt.model.losses import contrastive_from_columns, pad_cat, translation_loss_sum
from sclslt_kernels import infonce


def naive_infonce(q, k, scale, off, q_ids, k_ids):
    total = 0.0
    for i in range(q.shape[0]):
        terms, pos_logit = [], None
        for j in range(k.shape[0]):
            logit = scale * torch.dot(q[i], k[j])
            if j == off + i:
                pos_logit = logit
            elif q_ids is not None and int(q_ids[i]) == int(k_ids[j]):
                continue  # a known false negative leaves the softmax
            terms.append(logit)
        total = total + (torch.logsumexp(torch.stack(terms), 0) - pos_logit)
    return total / q.shape[0]


def _inputs(b, n, d, dup: bool, seed: int):
    g = torch.Generator().manual_seed(seed)
    q = F.normalize(torch.randn(b, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    k = F.normalize(torch.randn(n, d, generator=g, dtype=torch.float64), dim=-1).requires_grad_()
    s = torch.tensor(1 / 0.07 + torch.rand(1, generator=g).item(), dtype=torch.float64, requires_grad=True)
    if dup:
        k_ids = torch.randint(0, max(2, n // 3), (n,), generator=g)  # many duplicates among columns
    else:
        k_ids = torch.arange(n)
    return q, k, s, k_ids


@pytest.mark.parametrize("b,world,d,dup", [(3, 1, 5, False), (4, 3, 7, True), (5, 2, 16, True), (1, 4, 3, True)])
def test_infonce_matches_naive_loop(b, world, d, dup):
    for seed in range(3):
        n = b * world
        off = (seed % world) * b
        q, k, s, k_ids = _inputs(b, n, d, dup, seed * 31 + b)
        q_ids = k_ids[off : off + b]
        got = infonce(q, k, s, off, q_ids, k_ids)
        want = naive_infonce(q, k, s, off, q_ids, k_ids)
        assert torch.allclose(got, want, rtol=1e-10, atol=1e-12)
        g1 = torch.autograd.grad(got, (q, k, s))
        g2 = torch.autograd.grad(want, (q, k, s))
        for a, bb in zip(g1, g2):
            assert torch.allclose(a, bb, rtol=1e-9, atol=1e-12)


def test_masking_changes_the_loss_and_fully_masked_rows_are_finite():
    q, k, s, _ = _inputs(4, 8, 6, False, 0)
    ids = torch.zeros(8, dtype=torch.long)  # every column the same sentence
    masked = infonce(q, k, s, 0, ids[:4], ids)
    assert torch.isfinite(masked) and abs(masked.item()) < 1e-12  # only the positive is left: -log 1
    unmasked = infonce(q, k, s, 0)
    assert unmasked.item() > 0.1
    (gq,) = torch.autograd.grad(masked, (q,))
    assert torch.isfinite(gq).all()


def test_symmetric_is_mean_of_both_directions():
    q, k, s, ids = _inputs(3, 6, 4, True, 5)
    t = F.normalize(torch.randn(6, 4, dtype=torch.float64), dim=-1)
    v_loc, t_loc = q, t[3:]
    V = torch.cat([k[:3], q])
    out = {"video_emb": v_loc, "text_emb": t_loc, "logit_scale": s}
    got = contrastive_from_columns(out, ids[3:], {"video_emb": V, "text_emb": t, "ids": ids}, 3, "pooled")
    want = 0.5 * (naive_infonce(v_loc, t, s, 3, ids[3:], ids) + naive_infonce(t_loc, V, s, 3, ids[3:], ids))
    assert torch.allclose(got, want)


def test_translation_loss_sum_matches_manual_label_smoothing():
    g = torch.Generator().manual_seed(0)
    logits = torch.randn(2, 5, 11, generator=g, dtype=torch.float64)
    labels = torch.randint(0, 11, (2, 5), generator=g)
    labels[1, 3:] = -100
    eps = 0.2
    got = translation_loss_sum(logits, labels, eps)
    want = 0.0
    for i in range(2):
        for j in range(5):
            if labels[i, j] == -100:
                continue
            lp = torch.log_softmax(logits[i, j].float(), -1)
            want += -(1 - eps) * lp[labels[i, j]] - eps * lp.mean()
    assert math.isclose(got.item(), float(want), rel_tol=1e-5)


def _outputs(world, b, seed, similarity):
    """Every rank's contrastive outputs (token lengths differ per rank for CiCo)."""
    g = torch.Generator().manual_seed(seed)
    outs = []
    for r in range(world):
        if similarity == "pooled":
            o = {
                "video_emb": F.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=-1),
                "text_emb": F.normalize(torch.randn(b, 6, generator=g, dtype=torch.float64), dim=-1),
            }
        else:
            tv, tl = 3 + r, 5 - r
            o = {
                "video_tokens": F.normalize(torch.randn(b, tv, 6, generator=g, dtype=torch.float64), dim=-1),
                "video_mask": torch.rand(b, tv, generator=g) > 0.3,
                "text_tokens": F.normalize(torch.randn(b, tl, 6, generator=g, dtype=torch.float64), dim=-1),
                "text_mask": torch.rand(b, tl, generator=g) > 0.3,
            }
        outs.append(o)
    ids = torch.randint(0, b, (world * b,), generator=g)
    return outs, ids


def _gloo_worker(rank, world, init_file, b, seed, similarity, out_file):
    import torch.distributed as dist

    from sclslt.model.losses import contrastive_loss

    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    outs, ids = _outputs(world, b, seed, similarity)
    out = {k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in outs[rank].items()}
    out["logit_scale"] = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    loss = contrastive_loss(out, ids[rank * b : (rank + 1) * b], similarity)
    loss.backward()
    res = {
        "loss": loss.detach(),
        "scale_grad": out["logit_scale"].grad,
        **{k: v.grad for k, v in out.items() if k != "logit_scale" and v.is_floating_point()},
    }
    every = [None] * world
    dist.all_gather_object(every, res)
    if rank == 0:
        torch.save(every, out_file)
    dist.destroy_process_group()


@pytest.mark.parametrize("world,b,similarity", [(2, 3, "pooled"), (3, 2, "pooled"), (2, 3, "cico")])
def test_gathered_loss_across_gloo_ranks_equals_one_process(tmp_path, world, b, similarity):
    """Each rank's rows against all ranks' columns; gradients summed over ranks = one big batch."""
    import torch.multiprocessing as mp

    out = tmp_path / "out.pt"
    seed = 7 + world
    mp.spawn(_gloo_worker, args=(world, str(tmp_path / "init"), b, seed, similarity, str(out)), nprocs=world)
    got = torch.load(out, weights_only=False)
    outs, ids = _outputs(world, b, seed, similarity)
    s = torch.tensor(12.0, dtype=torch.float64, requires_grad=True)
    leaves = [{k: (v.clone().requires_grad_() if v.is_floating_point() else v) for k, v in o.items()} for o in outs]
    cat = torch.cat if similarity == "pooled" else pad_cat
    cols = {k: cat([o[k] for o in leaves]) for k in leaves[0]}
    cols["ids"] = ids
    per_rank = [
        contrastive_from_columns({**o, "logit_scale": s}, ids[r * b : (r + 1) * b], cols, r * b, similarity)
        for r, o in enumerate(leaves)
    ]
    sum(per_rank).backward()
    for r in range(world):
        assert torch.allclose(got[r]["loss"], per_rank[r].detach(), atol=1e-12)
        for k, v in leaves[r].items():
            if v.is_floating_point():
                assert torch.allclose(got[r][k], v.grad, atol=1e-12), (r, k)
    assert torch.allclose(sum(g["scale_grad"] for g in got), s.grad, atol=1e-10)


def test_stage_switch_mask_same_sentence_drops_the_id_mask():
    # the paper's GFSLT-VLP baseline does not mask same-sentence columns (the ablation's random_nomask arm,
    # experiments/pair_selection/)
    from types import SimpleNamespace

    from sclslt.config import StageConfig
    from sclslt.model.objective import step_loss

    q, k, s, ids = _inputs(6, 6, 5, True, 11)
    assert len(set(ids.tolist())) < 6  # duplicates that a mask removes
    out = {"video_emb": q, "text_emb": k, "logit_scale": s}
    batch = SimpleNamespace(frames=q, sentence_ids=ids, labels=None)
    masked, _ = step_loss(out, batch, StageConfig(translation_weight=0.0), world=1)
    plain, _ = step_loss(out, batch, StageConfig(translation_weight=0.0, mask_same_sentence=False), world=1)
    assert torch.allclose(masked, 0.5 * (naive_infonce(q, k, s, 0, ids, ids) + naive_infonce(k, q, s, 0, ids, ids)))
    assert torch.allclose(plain, 0.5 * (naive_infonce(q, k, s, 0, None, None) + naive_infonce(k, q, s, 0, None, None)))
    assert plain.item() > masked.item() + 1e-3
