"""Fused kernels against their plain-PyTorch references: values and every gradient, on fresh random
inputs, odd shapes, masks with duplicates, fully masked rows, large logit scales, three dtypes.

On CPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on CUDA natively.
The reference is evaluated in fp64 on the same (already rounded) inputs, so the tolerances measure
the kernel's own error: fp32 accumulation, and gradients rounded to the input dtype.
"""
import pytest
import torch
import torch.nn.functional as F

import importlib

from sclslt_kernels import cico_similarity, cico_similarity_reference, infonce, infonce_reference
from sclslt_kernels._dispatch import use_triton

INFONCE = importlib.import_module("sclslt_kernels.infonce")     # the modules (the package exports functions)
CICO = importlib.import_module("sclslt_kernels.cico")

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# dtype: (loss rtol, grad atol relative to the largest reference gradient)
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-4, 2e-3), torch.bfloat16: (1e-4, 1e-2)}
DTYPES = list(TOL)


def test_the_kernel_path_is_the_one_tested(monkeypatch):
    x = torch.zeros(2, 2, device=DEVICE)
    assert use_triton(x), "these tests must exercise Triton (interpreter on CPU, native on CUDA)"
    monkeypatch.setenv("SCLSLT_KERNELS", "reference")
    assert not use_triton(x)
    monkeypatch.setenv("SCLSLT_KERNELS", "bogus")
    with pytest.raises(ValueError, match="SCLSLT_KERNELS"):
        use_triton(x)


def _close(got, want, rtol_loss, atol_grad, what):
    scale = max(want.abs().max().item(), 1e-12)
    err = (got.double() - want.double()).abs().max().item()
    assert err <= atol_grad * scale + 1e-7, f"{what}: max error {err:.3e} (scale {scale:.3e})"


def _infonce_case(b, world, d, dtype, ids_kind, scale_value, seed):
    g = torch.Generator().manual_seed(seed)
    n = b * world
    off = (seed % world) * b
    q = F.normalize(torch.randn(b, d, generator=g), dim=-1).to(dtype)
    k = F.normalize(torch.randn(n, d, generator=g), dim=-1).to(dtype)
    if ids_kind == "none":
        q_ids = k_ids = None
    elif ids_kind == "dups":
        k_ids = torch.randint(0, max(2, n // 3), (n,), generator=g)
        q_ids = k_ids[off:off + b]
    else:                                    # every negative of every row is a duplicate
        k_ids = torch.zeros(n, dtype=torch.long)
        q_ids = k_ids[off:off + b]
    to = dict(device=DEVICE)
    return (q.to(**to), k.to(**to), torch.tensor(scale_value, **to), off,
            None if q_ids is None else q_ids.to(**to), None if k_ids is None else k_ids.to(**to))


def _check_infonce(q, k, s, off, qi, ki, dtype):
    """Loss and the three gradients of the kernel path against the fp64 reference; returns the loss."""
    rl, ga = TOL[dtype]
    qa, ka, sa = (x.clone().requires_grad_() for x in (q, k, s))
    got = infonce(qa, ka, sa, off, qi, ki)
    gq, gk, gs = torch.autograd.grad(got, (qa, ka, sa))
    qr, kr, sr = (x.double().requires_grad_() for x in (q, k, s))
    want = infonce_reference(qr, kr, sr, off, qi, ki)
    wq, wk, ws = torch.autograd.grad(want, (qr, kr, sr))
    assert torch.isfinite(got) and got.dtype == torch.float32
    assert abs(got.item() - want.item()) <= rl * max(1.0, abs(want.item())), (got.item(), want.item())
    assert gq.dtype == dtype and gk.dtype == dtype
    _close(gq, wq, rl, ga, "dq")
    _close(gk, wk, rl, ga, "dk")
    _close(gs.reshape(()), ws.reshape(()), rl, max(ga, 1e-4), "dscale")
    return got


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,world,d,ids_kind,scale", [
    (5, 3, 20, "dups", 14.3),       # nothing a multiple of the tile
    (16, 2, 64, "none", 14.3),
    (1, 7, 3, "dups", 50.0),        # one row, tiny d
    (9, 2, 130, "dups", 100.0),     # d over several K chunks, CLIP's maximum scale
    (6, 3, 17, "all", 14.3),        # fully masked rows: only the positive is left
    (4, 5, 32, "dups", 1000.0),     # far beyond the clamp: must stay finite
])
def test_infonce_matches_reference(dtype, b, world, d, ids_kind, scale):
    for seed in range(2):
        got = _check_infonce(*_infonce_case(b, world, d, dtype, ids_kind, scale, seed), dtype)
        if ids_kind == "all":
            assert abs(got.item()) < 1e-6        # -log 1


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,world,d,ids_kind", [(300, 3, 200, "dups"), (150, 4, 100, "none")])
def test_infonce_at_gpu_tiles_over_many_tiles_splits_and_chunks(dtype, b, world, d, ids_kind, monkeypatch):
    """The GPU's own tile configuration (the interpreter runs the same one) at shapes spanning several
    row blocks, column tiles, d chunks, forward column splits and backward column chunks, so online
    rescaling across tiles and splits, edge masks and the chunked gradient products are all exercised."""
    cfg = INFONCE.config(b, dtype)
    n = b * world
    chunk = 2 * cfg["BLOCK_N"]
    monkeypatch.setattr(INFONCE, "CHUNK_ELEMS", b * chunk)
    assert INFONCE.chunk_columns(b, n, cfg["BLOCK_N"]) == chunk
    row_blocks, col_tiles = -(-b // cfg["BLOCK_M"]), -(-n // cfg["BLOCK_N"])
    assert row_blocks >= 2 and col_tiles >= 5 and -(-d // cfg["BLOCK_K"]) >= 2 and b % cfg["BLOCK_M"]
    assert INFONCE.column_splits(row_blocks, col_tiles, torch.device(DEVICE)) >= 2 and -(-n // chunk) >= 3
    _check_infonce(*_infonce_case(b, world, d, dtype, ids_kind, 14.3, 5), dtype)


def test_infonce_is_deterministic_and_accepts_a_python_scale():
    q, k, s, off, qi, ki = _infonce_case(7, 3, 40, torch.float32, "dups", 20.0, 3)
    runs = []
    for _ in range(2):
        qa, ka = q.clone().requires_grad_(), k.clone().requires_grad_()
        loss = infonce(qa, ka, s, off, qi, ki)
        runs.append((loss, *torch.autograd.grad(loss, (qa, ka))))
    assert all(torch.equal(a, b) for a, b in zip(*runs))
    assert torch.allclose(infonce(q, k, 20.0, off, qi, ki), runs[0][0])


def test_infonce_takes_the_products_63_bit_sentence_ids():
    """The trainer's sentence ids are 63-bit hashes: the kernels compare all 64 bits (as two int32 words)."""
    q, k, s, off, qi, ki = _infonce_case(9, 3, 24, torch.float32, "dups", 14.3, 2)
    big = 2 ** 62 - 7919 * 2 ** 20
    assert torch.equal(infonce(q, k, s, off, qi * 7919 * 2 ** 20 + big - 1, ki * 7919 * 2 ** 20 + big - 1),
                       infonce(q, k, s, off, qi, ki))
    assert not torch.equal(infonce(q, k, s, off, qi, ki), infonce(q, k, s, off, qi, ki + 1))


def test_infonce_rejects_bad_shapes():
    q = torch.zeros(3, 4, device=DEVICE)
    with pytest.raises(ValueError, match="positives"):
        infonce(q, torch.zeros(4, 4, device=DEVICE), torch.tensor(1.0), pos_offset=2)
    with pytest.raises(ValueError, match=r"\(b, d\)"):
        infonce(q, torch.zeros(4, 5, device=DEVICE), torch.tensor(1.0))


def _cico_case(b, n, T, L, d, dtype, seed, empty):
    g = torch.Generator().manual_seed(seed)
    v = F.normalize(torch.randn(b, T, d, generator=g), dim=-1).to(dtype)
    t = F.normalize(torch.randn(n, L, d, generator=g), dim=-1).to(dtype)
    vm = torch.rand(b, T, generator=g) > 0.3
    tm = torch.rand(n, L, generator=g) > 0.3
    vm[:, 0] = True
    tm[:, 0] = True
    if empty:                       # a clip and a sentence with no valid token
        vm[-1] = False
        tm[0] = False
    up = torch.randn(b, n, generator=g)
    return [x.to(DEVICE) for x in (v, vm, t, tm, up)]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,T,L,d,tau,empty", [
    (3, 5, 7, 5, 24, 0.07, False),
    (2, 3, 17, 9, 40, 0.07, True),      # T over one 16-tile, empty clip and sentence
    (1, 4, 3, 20, 16, 0.5, False),
    (2, 2, 5, 4, 70, 0.02, True),       # sharp softmax, d over several chunks
])
def test_cico_matches_reference(dtype, b, n, T, L, d, tau, empty):
    v, vm, t, tm, up = _cico_case(b, n, T, L, d, dtype, b * 100 + n, empty)
    rl, ga = TOL[dtype]
    va, ta = v.clone().requires_grad_(), t.clone().requires_grad_()
    got = cico_similarity(va, vm, ta, tm, tau)
    gv, gt = torch.autograd.grad(got, (va, ta), up)
    vr, tr = v.double().requires_grad_(), t.double().requires_grad_()
    want = cico_similarity_reference(vr, vm, tr, tm, tau)
    wv, wt = torch.autograd.grad(want, (vr, tr), up.double())
    assert got.shape == (b, n) and got.dtype == torch.float32 and torch.isfinite(got).all()
    assert (got.double() - want).abs().max().item() <= 1e-5
    _close(gv, wv, rl, ga, "dv")
    _close(gt, wt, rl, ga, "dt")
    if empty:
        assert torch.isfinite(gv).all() and torch.isfinite(gt).all()


@pytest.mark.parametrize("part", ["i2t", "t2i"])
def test_cico_one_direction_matches_reference(part):
    """One direction alone (model.cico_directions split: CiCo's own i2t for video->text, t2i for
    text->video): values and both gradients against the reference, over two clip-token blocks; and the
    default is the mean of the two."""
    b, n, T, L, d = 2, 3, 17, 9, 40
    v, vm, t, tm, up = _cico_case(b, n, T, L, d, torch.float32, 5, True)
    rl, ga = TOL[torch.float32]
    va, ta = v.clone().requires_grad_(), t.clone().requires_grad_()
    got = cico_similarity(va, vm, ta, tm, 0.07, part)
    gv, gt = torch.autograd.grad(got, (va, ta), up)
    vr, tr = v.double().requires_grad_(), t.double().requires_grad_()
    want = cico_similarity_reference(vr, vm, tr, tm, 0.07, part)
    wv, wt = torch.autograd.grad(want, (vr, tr), up.double())
    assert (got.double() - want).abs().max().item() <= 1e-5
    _close(gv, wv, rl, ga, "dv")
    _close(gt, wt, rl, ga, "dt")
    other = cico_similarity(v, vm, t, tm, 0.07, "t2i" if part == "i2t" else "i2t")
    mean = cico_similarity(v, vm, t, tm, 0.07)
    assert torch.allclose(mean, (got.detach() + other) / 2, atol=1e-6) and (got.detach() - other).abs().max() > 1e-3
    with pytest.raises(ValueError, match="part"):
        cico_similarity(v, vm, t, tm, 0.07, "both")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("b,n,T,L,d", [(3, 7, 70, 20, 80), (2, 5, 40, 150, 48)])
def test_cico_at_gpu_tiles_over_token_blocks_and_sentence_chunks(dtype, b, n, T, L, d, monkeypatch):
    """GPU tile sizes, clip tokens over several blocks (the online column softmax), long sentences (the
    L >= 128 tiles) and the backward over several sentence chunks."""
    cfg = CICO.config(T, L, dtype)
    assert -(-T // cfg["BLOCK_T"]) >= 2 and -(-d // cfg["BLOCK_K"]) >= 2
    monkeypatch.setattr(CICO, "CHUNK_ELEMS", 2 * b * T * L)
    assert CICO.chunk_sentences(b, n, T, L) == 2
    v, vm, t, tm, up = _cico_case(b, n, T, L, d, dtype, 11, True)
    rl, ga = TOL[dtype]
    va, ta = v.clone().requires_grad_(), t.clone().requires_grad_()
    got = cico_similarity(va, vm, ta, tm, 0.07)
    gv, gt = torch.autograd.grad(got, (va, ta), up)
    vr, tr = v.double().requires_grad_(), t.double().requires_grad_()
    want = cico_similarity_reference(vr, vm, tr, tm, 0.07)
    wv, wt = torch.autograd.grad(want, (vr, tr), up.double())
    assert (got.double() - want).abs().max().item() <= 1e-5
    _close(gv, wv, rl, ga, "dv")
    _close(gt, wt, rl, ga, "dt")


def test_every_token_count_up_to_the_limit_has_a_configuration():
    """The launcher's choice for any T, L the kernel accepts is one the compile check covers."""
    variants = {(dt, tuple(c.values()), tuple(o.values())) for _, dt, _, c, o in CICO.launch_variants()}
    for dtype in DTYPES:
        for T in range(1, CICO.MAX_TOKENS + 1, 7):
            for L in (1, 16, 17, 33, 64, 100, 128, 129, 256):
                cfg = CICO.config(T, L, dtype)
                blocks = tuple(v for k, v in cfg.items() if k.startswith("BLOCK"))
                opts = (cfg["num_warps"], cfg["num_stages"])
                assert any(dt == dtype and c[-3:] == blocks and o == opts for dt, c, o in variants), (T, L, cfg)
    for dtype in DTYPES:
        for b in (1, 64, 255, 256, 100_000):
            cfg = INFONCE.config(b, dtype)
            assert any(dt == dtype and tuple(c.values())[-3:] == tuple(v for k, v in cfg.items() if k.startswith("BLOCK"))
                       and tuple(o.values()) == (cfg["num_warps"], cfg["num_stages"])
                       for _, dt, _, c, o in INFONCE.launch_variants())
    v = torch.zeros(1, CICO.MAX_TOKENS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        cico_similarity(v, torch.ones(1, CICO.MAX_TOKENS + 1, dtype=torch.bool, device=DEVICE), v[:, :3],
                        torch.ones(1, 3, dtype=torch.bool, device=DEVICE))


def test_cico_of_a_clip_with_itself_is_high_and_shapes_are_checked():
    v, vm, _, _, _ = _cico_case(3, 1, 6, 6, 16, torch.float32, 0, False)
    sim = cico_similarity(v, vm, v, vm)
    assert (sim.diagonal() >= sim.max(1).values - 1e-6).all()
    with pytest.raises(ValueError, match="masks"):
        cico_similarity(v, vm[:, :3], v, vm)


def test_benchmark_script_runs_and_writes_tagged_rows(tmp_path):
    """The microbenchmark stays runnable (on a CPU at toy sizes; its numbers there mean nothing)."""
    import json
    import subprocess
    import sys
    from pathlib import Path
    script = Path(__file__).resolve().parents[1] / "kernels" / "bench" / "bench_kernels.py"
    for extra in ([], ["--cico"]):
        subprocess.run([sys.executable, str(script), "--quick", "--out", str(tmp_path), "--impl", "fused", "eager",
                        *extra], check=True, capture_output=True, timeout=600)
    rows = [r for f in sorted(tmp_path.glob("*.json")) for r in json.loads(f.read_text())]
    assert {r["kind"] for r in rows} == {"infonce", "cico"}
    assert all(r["fwdbwd_ms"] > 0 and r["device"] and r["versions"]["torch"] for r in rows)
    assert {r["impl"] for r in rows} == {"fused", "eager"}
