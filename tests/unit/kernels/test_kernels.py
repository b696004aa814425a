"""Fused kernels against their plain-PyTorch references: values and every gradient, on fresh random
inputs, odd shapes, masks with duplicates, fully masked rows, large logit scales, three dtypes.

On CPU these run under the Triton interpreter (conftest sets TRITON_INTERPRET=1); on CUDA natively.
The reference is evaluated in fp64 on the same (already rounded) inputs, so the tolerances measure
the kernel's own error: fp32 accumulation, and gradients rounded to the input dtype.
"""

import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from sclslt_kernels import cico_similarity, cico_similarity_reference, infonce, infonce_reference
from sclslt_kernels._dispatch import use_triton

INFONCE = importlib.import_module("sclslt_kernels.infonce")  # the modules (the package exports functions)
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
        q_ids = k_ids[off : off + b]
    else:  # every negative of every row is a duplicate
        k_ids = torch.zeros(n, dtype=torch.long)
        q_ids = k_ids[off : off + b]
    to = dict(device=DEVICE)
    return (
        q.to(**to),
        k.to(**to),
        torch.tensor(scale_value, **to),
        off,
        None if q_ids is None else q_ids.to(**to),
        None if k_ids is None else k_ids.to(**to),
    )


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
@pytest.mark.parametrize(
    "b,world,d,ids_kind,scale",
    [
        (5, 3, 20, "dups", 14.3),  # nothing a multiple of the tile
        (16, 2, 64, "none", 14.3),
        (1, 7, 3, "dups", 50.0),  # one row, tiny d
        (9, 2, 130, "dups", 100.0),  # d over several K chunks, CLIP's maximum scale
        (6, 3, 17, "all", 14.3),  # fully masked rows: only the positive is left
        (4, 5, 32, "dups", 1000.0),  # far beyond the clamp: must stay finite
    ],
)
def test_infonce_matches_reference(dtype, b, world, d, ids_kind, scale):
    for seed in range(2):
        got = _check_infonce(*_infonce_case(b, world, d, dtype, ids_kind, scale, seed), dtype)
        if ids_kind == "all":
            assert abs(got.item()) < 1e-6  # -log 1


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
    assert INFONCE.column_splits(row_blocks, col_tiles, INFONCE.device_sms(torch.device(DEVICE))) >= 2
    assert -(-n // chunk) >= 3
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
    big = 2**62 - 7919 * 2**20
    assert torch.equal(
        infonce(q, k, s, off, qi * 7919 * 2**20 + big - 1, ki * 7919 * 2**20 + big - 1), infonce(q, k, s, off, qi, ki)
    )
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
    if empty:  # a clip and a sentence with no valid token
        vm[-1] = False
        tm[0] = False
    up = torch.randn(b, n, generator=g)
    return [x.to(DEVICE) for x in (v, vm, t, tm, up)]


def _check_cico_against_reference(v, vm, t, tm, up, dtype) -> None:
    """The kernel path's similarities and both gradients (upstream `up`) against the fp64 reference."""
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


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "b,n,T,L,d,tau,empty",
    [
        (3, 5, 7, 5, 24, 0.07, False),
        (2, 3, 17, 9, 40, 0.07, True),  # T over one 16-tile, empty clip and sentence
        (1, 4, 3, 20, 16, 0.5, False),
        (2, 2, 5, 4, 70, 0.02, True),  # sharp softmax, d over several chunks
        (2, 3, 50, 12, 80, 0.07, True),  # 64 x 16 tiles: the backward's d chunks (32) narrower than the forward's
    ],
)
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
    for kernel in CICO.KERNELS:
        cfg = CICO.config(T, L, dtype, kernel)
        assert -(-T // cfg["BLOCK_T"]) >= 2 and -(-d // cfg["BLOCK_K"]) >= 2
    monkeypatch.setattr(CICO, "CHUNK_ELEMS", 2 * b * T * L)
    assert CICO.chunk_sentences(b, n, T, L) == 2
    _check_cico_against_reference(*_cico_case(b, n, T, L, d, dtype, 11, True), dtype)


def test_every_token_count_up_to_the_limit_has_a_configuration():
    """The launcher's choice for any T, L the kernel accepts is one the compile check covers."""
    variants = {
        (v["kernel"], v["dtype"], tuple(v["constexprs"].values()), tuple(v["options"].values()))
        for v in CICO.launch_variants()
    }
    assert {v[0] for v in variants} == set(CICO.KERNELS)
    for kernel in CICO.KERNELS:  # each kernel's own configuration (the backward's may differ)
        for dtype in DTYPES:
            for T in range(1, CICO.MAX_TOKENS + 1, 7):
                for L in (1, 16, 17, 33, 64, 100, 128, 129, 256):
                    cfg = CICO.config(T, L, dtype, kernel)
                    blocks = tuple(v for k, v in cfg.items() if k.startswith("BLOCK"))
                    opts = (cfg["num_warps"], cfg["num_stages"])
                    assert any(
                        kn == kernel and dt == dtype and c[-3:] == blocks and o == opts for kn, dt, c, o in variants
                    ), (kernel, T, L, cfg)
    with pytest.raises(ValueError, match="kernel"):
        CICO.config(16, 16, torch.float32, "_cico_bwd")
    for dtype in DTYPES:
        for b in (1, 64, 255, 256, 100_000):
            cfg = INFONCE.config(b, dtype)
            assert any(
                v["dtype"] == dtype
                and tuple(v["constexprs"].values())[-3:] == tuple(x for k, x in cfg.items() if k.startswith("BLOCK"))
                and tuple(v["options"].values()) == (cfg["num_warps"], cfg["num_stages"])
                for v in INFONCE.launch_variants()
            )
    v = torch.zeros(1, CICO.MAX_TOKENS + 1, 16, device=DEVICE)
    with pytest.raises(ValueError, match="at most"):
        cico_similarity(
            v,
            torch.ones(1, CICO.MAX_TOKENS + 1, dtype=torch.bool, device=DEVICE),
            v[:, :3],
            torch.ones(1, 3, dtype=torch.bool, device=DEVICE),
        )


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

    from tests.helpers import ROOT

    script = ROOT / "benchmarks" / "bench_kernels.py"
    for extra in ([], ["--cico"]):
        subprocess.run(
            [sys.executable, str(script), "--quick", "--out", str(tmp_path), "--impl", "fused", "eager", *extra],
            check=True,
            capture_output=True,
            timeout=600,
        )
    rows = [r for f in sorted(tmp_path.glob("*.json")) for r in json.loads(f.read_text())]
    assert {r["kind"] for r in rows} == {"infonce", "cico"}
    assert all(r["fwdbwd_ms"] > 0 and r["device"] and r["versions"]["torch"] for r in rows)
    assert {r["impl"] for r in rows} == {"fused", "eager"}


# --- launch shapes: every grid axis within CUDA's limits ---------------------------------------------


def test_no_launch_grid_exceeds_cudas_limits_at_a_million_columns():
    """The launchers' grids (`grids`: the same functions the launchers call, computed without launching)
    at n = 10^6 columns / sentences (and 10^8 InfoNCE columns), for b = 1 .. 10^6 local rows / clips and
    CiCo's T, L 16..256: every axis within CUDA's limit (x < 2^31, y and z <= 65,535) and the programs
    cover every tile. Catches: reverting `_infonce_dlogits` to the grid (row blocks, column tiles)
    (1.56M column tiles on axis y at b = 1, n = 10^8), CiCo's forward or gradient back to grid (b, n) / (b, J) (n =
    10^6 on axis y), and dropping
    the clip groups (b = 10^6 clips on axis y)."""
    from sclslt_kernels._dispatch import GRID_LIMITS

    n = 10**6

    def ok(grid):
        return 1 <= len(grid) <= 3 and all(1 <= g <= lim for g, lim in zip(grid, GRID_LIMITS))

    for b in (1, 2, 64, 4096, n):
        for dtype, cols, sms in itertools.product(DTYPES, (n, 10**8), (4, 108, 132)):
            launches = INFONCE.grids(b, cols, dtype, sms)
            assert [k for k, _ in launches][0] == "_infonce_fwd" and all(ok(g) for _, g in launches), (b, launches)
            cfg = INFONCE.config(b, dtype)
            c = INFONCE.chunk_columns(b, cols, cfg["BLOCK_N"])
            rb = -(-b // cfg["BLOCK_M"])
            widths = [g[0] // rb for k, g in launches if k == "_infonce_dlogits"]
            assert max(widths) * cfg["BLOCK_N"] >= c and launches[0][1][0] == rb
        for T in (16, 17, 64, 256):
            for L in (16, 33, 128, 256):
                launches = CICO.grids(b, n, T, L)
                assert all(ok(g) for _, g in launches), (b, T, L, launches)
                assert max(g[0] for k, g in launches if k == "_cico_fwd") == n
        groups = CICO.clip_groups(b)
        assert sum(i1 - i0 for i0, i1 in groups) == b and all(i0 % 16 == 0 for i0, _ in groups)


def test_cico_launches_in_clip_groups_match_the_reference(monkeypatch):
    """The clip-group loop (grid axis y holds at most 65,535 clips; each launch gets 16-byte aligned slices
    of v, masks, S, the upstream gradient and G) with groups shrunk to 16 clips: 40 clips = 3 launches per
    kernel, two sentence chunks, values and both gradients against the reference. Catches: launching
    every group with the whole tensors (no slicing at i0: the groups after the first are never written),
    and a group size that is not a multiple of 16 (misaligned slices fail the alignment check)."""
    monkeypatch.setattr(CICO, "CLIP_GROUP", 16)
    b, n, T, L, d = 40, 5, 5, 4, 24
    monkeypatch.setattr(CICO, "CHUNK_ELEMS", 3 * b * T * L)
    assert len(CICO.clip_groups(b)) == 3 and CICO.chunk_sentences(b, n, T, L) == 3
    case = _cico_case(b, n, T, L, d, torch.float32, 7, True)
    _check_cico_aligned(monkeypatch)
    _check_cico_against_reference(*case, torch.float32)


class _Recorder:
    """Wraps a kernel: records each launch's (grid, arguments by name), then launches it."""

    def __init__(self, kernel):
        import inspect

        self.kernel, self.calls = kernel, []
        self.names = list(inspect.signature(getattr(kernel, "fn", kernel)).parameters)

    def __getitem__(self, grid):
        def launch(*args, **kw):
            self.calls.append((grid, {**dict(zip(self.names, args)), **kw}))
            return self.kernel[grid](*args, **kw)

        return launch


def _check_cico_aligned(monkeypatch):
    for name in ("_cico_fwd", "_cico_grad"):
        monkeypatch.setattr(CICO, name, _AlignedOnly(getattr(CICO, name), ()))


class _AlignedOnly(_Recorder):
    """A recorder that fails a launch with a pointer not 16-byte aligned, or an integer named in `always`
    that is not a multiple of 16 (what resources.py compiles is all the GPU may be asked to run)."""

    def __init__(self, kernel, always):
        super().__init__(kernel)
        self.always = always

    def __getitem__(self, grid):
        inner = super().__getitem__(grid)

        def launch(*args, **kw):
            named = {**dict(zip(self.names, args)), **kw}
            bad = [k for k, x in named.items() if torch.is_tensor(x) and x.data_ptr() % 16]
            bad += [k for k in self.always if named[k] % 16]
            assert not bad, f"launched with {bad} not aligned"
            return inner(*args, **kw)

        return launch


@pytest.mark.parametrize("d,ids_kind", [(20, "dups"), (3, "none"), (130, "dups")])
def test_infonce_launches_only_the_variant_compiled_offline(d, ids_kind, monkeypatch):
    """Every launch passes 16-byte aligned pointers (ids given as views at 8-byte offsets, the
    forward's three statistics from one buffer) and the integers of infonce.ALWAYS_ALIGNED as multiples of
    16 (d padded to 16: the unpadded variant spills on sm_90), and the padded result equals the reference.
    Catches: dropping `_pad16` (d = 20 reaches the kernel), dropping `aligned` on the id words, and the
    statistics as views of a (3, splits, b) buffer (offset splits * b * 4 bytes)."""
    for name in ("_infonce_fwd", "_infonce_dlogits"):
        monkeypatch.setattr(INFONCE, name, _AlignedOnly(getattr(INFONCE, name), INFONCE.ALWAYS_ALIGNED[name]))
    q, k, s, off, qi, ki = _infonce_case(5, 3, d, torch.float32, ids_kind, 14.3, 1)
    views = [None if x is None else torch.cat([x[:1], x])[1:] for x in (qi, ki)]  # 8-byte offsets
    _check_infonce(q, k, s, off, *views, torch.float32)
    assert all(
        named["d"] % 16 == 0
        for kern in ("_infonce_fwd", "_infonce_dlogits")
        for _, named in getattr(INFONCE, kern).calls
    )


# --- fp32 backward products: bf16 inputs whose chunk products cancel ---------------------------------


def _cone_infonce(b, n, d0, seed):
    """bf16 q (b, d0) and k (n, d0) whose logits are all equal (q lives in dims 0..15, k's variation in dims
    16..: orthogonal to every q), so every softmax is exactly uniform and dS = 1/n - onehot is exact in
    bf16 for n <= 256: only the backward's products can round. The keys share a large component w (the
    cone of real embeddings) that cancels in dS k (sum_j dS_ij = 0) but not in each chunk's part of it."""
    g = torch.Generator().manual_seed(seed)
    q = torch.zeros(b, d0)
    q[:, 0] = 0.5
    q[:, 1:16] = 0.2 * torch.randn(b, 15, generator=g)
    k = torch.zeros(n, d0)
    k[:, 0] = 0.75
    k[:, 16:] = torch.randn(d0 - 16, generator=g) + 0.02 * torch.randn(n, d0 - 16, generator=g)
    return q.bfloat16().to(DEVICE), k.bfloat16().to(DEVICE)


def _bf16_ulps(got, want):
    """Elementwise error of got in units of bf16's last place at the reference's magnitude (floored at
    2^-10 of the largest, where fp32 sums of cancelling terms set the error)."""
    w = want.abs().clamp_min(want.abs().max().item() * 2**-10)
    return ((got.double() - want).abs() / torch.exp2(torch.floor(torch.log2(w)) - 7)).max().item()


def test_infonce_bf16_backward_products_are_not_rounded_to_bf16(monkeypatch):
    """bf16 inputs, 4 backward column chunks, dS exact in bf16 (`_cone_infonce`): dq and d scale must
    match the fp64 reference as if the products were exact (dq within bf16's final rounding, d scale,
    exactly 0, within fp32 error), and dk within half a bf16 unit in the last place (one rounding). Catches:
    `g += (part @ k[...]).float()` (each chunk's dS k rounded to bf16: the shared component's cancellation
    leaves about 10% of dq) and `dk[...] = coef * s * (part.t() @ q).float()`
    (rounded twice: errors up to ~1 unit in the last place)."""
    b, world, d0, s = 64, 4, 64, 14.3
    cfg = INFONCE.config(b, torch.bfloat16)
    monkeypatch.setattr(INFONCE, "CHUNK_ELEMS", b * cfg["BLOCK_N"])
    assert -(-b * world // INFONCE.chunk_columns(b, b * world, cfg["BLOCK_N"])) == 4
    q, k = _cone_infonce(b, b * world, d0, 0)
    qa, ka, sa = q.clone().requires_grad_(), k.clone().requires_grad_(), torch.tensor(s, device=DEVICE).requires_grad_()
    gq, gk, gs = torch.autograd.grad(infonce(qa, ka, sa), (qa, ka, sa))
    qr, kr, sr = (
        q.double().requires_grad_(),
        k.double().requires_grad_(),
        torch.tensor(s, dtype=torch.float64).requires_grad_(),
    )
    wq, wk, ws = torch.autograd.grad(infonce_reference(qr, kr, sr), (qr, kr, sr))
    _close(gq, wq, 0, 2**-8, "dq")  # bf16's rounding of dq: at most 2^-9 relative
    term = (q.double() @ k.double().t()).abs().max().item()  # the size of the logits that cancel in d scale
    assert abs(gs.item() - ws.item()) <= 1e-6 * term, (gs.item(), ws.item())
    assert _bf16_ulps(gk, wk) <= 0.5 + 1e-3, _bf16_ulps(gk, wk)


def test_cico_bf16_dv_products_are_not_rounded_to_bf16(monkeypatch):
    """bf16 inputs whose dot tiles are constant (v lives in dims 0..15, the sentences' variation in dims
    16..), so both softmaxes are uniform and G = g / (T L) is exact in bf16 (g dyadic); the sentences share
    a large component that cancels in dv = sum_j G_j t_j (each clip's upstream gradients sum to 0) but not
    within one chunk of 2 sentences. dv must then match the fp64 reference within bf16's final rounding.
    Catches: `dv += (gm @ t[...]).float()` (each chunk's product rounded to bf16: ~10% of dv)."""
    b, n, T, L, d = 2, 8, 16, 16, 64
    monkeypatch.setattr(CICO, "CHUNK_ELEMS", 2 * b * T * L)
    assert CICO.chunk_sentences(b, n, T, L) == 2
    g = torch.Generator().manual_seed(3)
    v = torch.zeros(b, T, d)
    v[:, :, 0] = 0.5
    v[:, :, 1:16] = 0.2 * torch.randn(b, T, 15, generator=g)
    t = torch.zeros(n, L, d)
    t[:, :, 0] = 0.75
    t[:, :, 16:] = torch.randn(d - 16, generator=g) + 0.02 * torch.randn(n, L, d - 16, generator=g)
    v, t = v.bfloat16().to(DEVICE), t.bfloat16().to(DEVICE)
    vm = torch.ones(b, T, dtype=torch.bool, device=DEVICE)
    tm = torch.ones(n, L, dtype=torch.bool, device=DEVICE)
    up = torch.tensor(
        [[1.0, 1.0, -1.0, -1.0, 2.0, 0.5, -0.5, -2.0], [1.0, -1.0, 1.0, -1.0, 2.0, 2.0, -2.0, -2.0]], device=DEVICE
    )
    va = v.clone().requires_grad_()
    (gv,) = torch.autograd.grad(cico_similarity(va, vm, t, tm, 0.07), (va,), up)
    vr = v.double().requires_grad_()
    (wv,) = torch.autograd.grad(cico_similarity_reference(vr, vm, t.double(), tm, 0.07), (vr,), up.double())
    _close(gv, wv, 0, 2**-8, "dv")
