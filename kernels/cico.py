"""CiCo fine-grained video-text similarity, fused: the contract, its reference, and the Triton kernels.

`cico_similarity(v, v_mask, t, t_mask, tau=0.07, part="mean")`: v (b, T, d) video tokens, t (n, L, d)
text tokens, both L2-normalised by the caller; boolean masks of valid tokens. For a pair (i, j),
dot = v_i t_j^T (T x L) and
    i2t = mean over valid t of  sum_l dot[t, l] * softmax_l(dot[t, :] / tau)[l]
    t2i = mean over valid l of  sum_t dot[t, l] * softmax_t(dot[:, l] / tau)[t]
    s(i, j) = (i2t + t2i) / 2                                       (docs/paper.md; part "mean")
or one direction alone (part "i2t" or "t2i": CiCo's own code scores video->text with i2t and
text->video with t2i).
Returns the (b, n) similarities in fp32, differentiable in v and t. A clip or sentence with no
valid token has similarity 0 (no NaN).

Design (for the GPU; b x n x T x L never exists whole):
- forward (`_cico_fwd`): one program per pair (i, j) (sentence j on grid axis x, up to 2^31 - 1;
  clip i on axis y, at most 65,535: b is launched in groups of CLIP_GROUP clips, `grids` is pure)
  walks the clip's tokens in blocks of BLOCK_T
  rows (the dot tile BLOCK_T x L, fp32 accumulation over d on tensor cores). The row softmax over L
  is complete inside a block; the column softmax over T is folded online (running max, sum of exp
  and of exp * dot per text token), as flash attention does. Tiles are at most 4096 elements, so every
  T, L up to MAX_TOKENS launches within registers and shared memory.
- backward: d s / d dot = G (T x L per pair; with p the row softmax and f_t = sum_l dot p,
  d i2t / d dot[t, l] = p[t, l] (1 + (dot[t, l] - f_t) / tau) / n_valid_t, and t2i alike over t).
  For a chunk of J sentences (J * b * T * L <= CHUNK_ELEMS: memory bounded) `_cico_grad` recomputes
  the column statistics, then writes g_ij G_ij into a (b, T, J, L) buffer in the input dtype; as a
  (b T) x (J L) matrix that buffer gives both gradients as cuBLAS GEMMs: dV += G [t_j] (fp32 output,
  `mm32`: each chunk's part of dV is not rounded to 16 bits before the sum) and dT_chunk = G^T V. No
  atomics: deterministic. Pointers are 16-byte aligned (`aligned`); integer arguments may or may not
  be multiples of 16: both variants are compiled offline (`launch_variants`).
Tile configurations come from `config()`; every one it can return is compiled for sm_80 and sm_90 by
tests/e2e/test_kernel_compile.py (no spills, shared memory fits).
"""

from __future__ import annotations

import torch

from ._dispatch import GRID_LIMITS, TRITON_TYPES, aligned, dot_meta, dot_precision, int_variants, mm32, use_triton

MAX_TOKENS = 256


PARTS = {"mean": (0.5, 0.5), "i2t": (1.0, 0.0), "t2i": (0.0, 1.0)}  # weights of (i2t, t2i)


def cico_similarity_reference(
    v: torch.Tensor, v_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor, tau: float = 0.07, part: str = "mean"
) -> torch.Tensor:
    """The spec: materialises (b, n, T, L); fp32 (fp64 stays fp64)."""
    _check(v, v_mask, t, t_mask)
    acc = torch.promote_types(v.dtype, torch.float32)
    dot = torch.einsum("btd,nld->bntl", v.to(acc), t.to(acc))
    vm = v_mask.bool()[:, None, :, None]
    tm = t_mask.bool()[None, :, None, :]
    valid = vm & tm
    x = (dot / tau).masked_fill(~valid, -1e30)
    p_row = torch.softmax(x, dim=-1).masked_fill(~valid, 0.0)  # over L, per video token
    p_col = torch.softmax(x, dim=-2).masked_fill(~valid, 0.0)  # over T, per text token
    f = (dot * p_row).sum(-1)  # (b, n, T)
    h = (dot * p_col).sum(-2)  # (b, n, L)
    n_t = v_mask.sum(-1).clamp_min(1).to(acc)[:, None]
    n_l = t_mask.sum(-1).clamp_min(1).to(acc)[None, :]
    i2t = (f * v_mask.bool()[:, None, :]).sum(-1) / n_t
    t2i = (h * t_mask.bool()[None, :, :]).sum(-1) / n_l
    w_i2t, w_t2i = _weights(part)
    return w_i2t * i2t + w_t2i * t2i


def _weights(part: str) -> tuple[float, float]:
    if part not in PARTS:
        raise ValueError(f"cico_similarity: part {part!r}; use one of {', '.join(PARTS)}")
    return PARTS[part]


def _check(v, v_mask, t, t_mask):
    if v.ndim != 3 or t.ndim != 3 or v.shape[-1] != t.shape[-1]:
        raise ValueError(
            f"cico_similarity: v must be (b, T, d) and t (n, L, d), got {tuple(v.shape)}, {tuple(t.shape)}"
        )
    if v_mask.shape != v.shape[:2] or t_mask.shape != t.shape[:2]:
        raise ValueError(
            f"cico_similarity: masks must be (b, T) and (n, L), got {tuple(v_mask.shape)}, {tuple(t_mask.shape)}"
        )


def cico_similarity(v, v_mask, t, t_mask, tau: float = 0.07, part: str = "mean") -> torch.Tensor:
    """Dispatch: the fused Triton kernels where they can run (see `_dispatch`), else the reference."""
    _check(v, v_mask, t, t_mask)
    w = _weights(part)
    if not use_triton(v, t):
        return cico_similarity_reference(v, v_mask, t, t_mask, tau, part)
    if v.shape[1] > MAX_TOKENS or t.shape[1] > MAX_TOKENS:
        raise ValueError(
            f"cico_similarity kernel: at most {MAX_TOKENS} tokens per clip/sentence, got "
            f"T={v.shape[1]}, L={t.shape[1]} (subsample frames or use SCLSLT_KERNELS=reference)"
        )
    return _CiCo.apply(v, v_mask, t, t_mask, float(tau), w)


# ---------------------------------------------------------------------------------------------
# Triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

TILE_ELEMS = 2048  # BLOCK_T * BLOCK_L (16 x 256 where L needs it): measured to fit without spills
CHUNK_ELEMS = 1 << 27  # the backward's G buffer, at most this many elements (256 MB in bf16)


def _pow2(x: int) -> int:
    return max(16, 1 << (max(int(x), 1) - 1).bit_length())


KERNELS = ("_cico_fwd", "_cico_grad")


def config(TT: int, LL: int, dtype: torch.dtype, kernel: str = "_cico_fwd") -> dict:
    """Tiles of `kernel` (the forward's or the backward's) for T clip and L sentence tokens: the whole
    (padded) sentence in one tile, clip tokens in blocks so that the tile holds at most TILE_ELEMS
    elements (16 rows at least: tl.dot's minimum); the d chunk shrinks as L grows (its address tile is
    BLOCK_K x BLOCK_L registers). Chosen from the sm_80/sm_90 resource table
    (benchmarks/kernel_resources.py), not from the interpreter."""
    if kernel not in KERNELS:
        raise ValueError(f"cico config: kernel {kernel!r}; use one of {KERNELS}")
    bl = _pow2(LL)
    bt = min(_pow2(TT), max(16, TILE_ELEMS // bl))
    tile = bt * bl
    if dtype == torch.float32:  # fp32 multiplies on FMA units ("ieee"): smaller chunks, no pipelining
        warps = 4 if tile < 512 else 8
        if kernel == "_cico_grad" and (bt, bl) in ((32, 32), (16, 64)):
            # 8 warps: the backward's aligned variant spills 8 bytes on sm_80 (64 and 80 registers, one over
            # ptxas's -O3 occupancy targets); 4 warps: 72-176 registers on sm_80/sm_90, no stack
            warps = 4
        return dict(BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=16, num_warps=warps, num_stages=1)
    bk = max(16, min(64, 4096 // bl))
    if kernel == "_cico_grad" and (bt, bl) == (64, 16):
        # 64 x 16 tiles, 8 warps: with 64-wide d chunks the backward's aligned variant needs one register
        # more than ptxas's -O3 occupancy target on sm_80 (80 a thread: 3 blocks an SM) and spills it
        # (8 bytes, stored before the statistics pass, reloaded after). 32-wide chunks: 80 registers on
        # sm_80, 60 on sm_90, no stack, still double-buffered; the forward keeps 64.
        bk = 32
    return dict(
        BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, num_warps=4 if tile <= 512 else 8, num_stages=1 if tile >= 4096 else 2
    )


def chunk_sentences(b: int, n: int, TT: int, LL: int, budget: int | None = None) -> int:
    budget = CHUNK_ELEMS if budget is None else budget
    return max(1, min(n, budget // max(1, b * TT * LL)))


# Clips per launch: they go on grid axis y (at most 65,535); a multiple of 16, so that a group's slices
# of the inputs and outputs stay 16-byte aligned. Sentences (n, up to millions) go on axis x (2^31 - 1).
CLIP_GROUP = GRID_LIMITS[1] // 16 * 16


def clip_groups(b: int) -> list[tuple[int, int]]:
    """The launcher's clip ranges [i0, i1): one launch each, every one within grid axis y's limit."""
    return [(i0, min(b, i0 + CLIP_GROUP)) for i0 in range(0, b, CLIP_GROUP)]


def grids(b: int, n: int, TT: int, LL: int) -> list[tuple[str, tuple]]:
    """Every distinct (kernel, grid) the forward and backward launch for b clips of T tokens against n
    sentences of L tokens: pure, launches nothing. Grid (sentences of the launch, clips of the group)."""
    J = chunk_sentences(b, n, TT, LL)
    widths = sorted({J, n - (n - 1) // J * J})
    rows = sorted({i1 - i0 for i0, i1 in clip_groups(b)})
    return [("_cico_fwd", (n, r)) for r in rows] + [("_cico_grad", (w, r)) for w in widths for r in rows]


if triton is not None:

    @triton.jit
    def _dot_tile(
        V,
        T,
        i,
        j,
        t0,
        TT,
        LL,
        d,
        svb,
        svt,
        stn,
        stl,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """v_i[t0:t0+BLOCK_T] . t_j^T in fp32, accumulated over d in BLOCK_K chunks (pointers advanced,
        not recomputed; BLOCK_K * BLOCK_L is bounded by `config`: the address tiles live in registers)."""
        ts = t0 + tl.arange(0, BLOCK_T)
        ls = tl.arange(0, BLOCK_L)
        ks = tl.arange(0, BLOCK_K)
        v_ptr = V + i.to(tl.int64) * svb + ts[:, None] * svt + ks[None, :]
        t_ptr = T + j.to(tl.int64) * stn + ls[None, :] * stl + ks[:, None]
        acc = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
        for start in range(0, d, BLOCK_K):
            kmask = ks < d - start
            a = tl.load(v_ptr, mask=(ts < TT)[:, None] & kmask[None, :], other=0.0)
            bt = tl.load(t_ptr, mask=(ls < LL)[None, :] & kmask[:, None], other=0.0)
            if FP32_DOT:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            acc += tl.dot(a, bt, input_precision=DOT_PREC)
            v_ptr += BLOCK_K
            t_ptr += BLOCK_K
        return acc

    @triton.jit
    def _token_block(
        V,
        VM,
        T,
        i,
        j,
        t0,
        tm,
        TT,
        LL,
        d,
        svb,
        svt,
        stn,
        stl,
        inv_tau,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """Clip tokens t0.. of pair (i, j): their rows, validity, dot tile, masked logits x, the row
        softmax over L and f_t = sum_l dot p (all complete within the block)."""
        ts = t0 + tl.arange(0, BLOCK_T)
        vm = tl.load(VM + i * TT + ts, mask=ts < TT, other=0) != 0
        dot = _dot_tile(V, T, i, j, t0, TT, LL, d, svb, svt, stn, stl, FP32_DOT, DOT_PREC, BLOCK_T, BLOCK_L, BLOCK_K)
        valid = vm[:, None] & tm[None, :]
        x = tl.where(valid, dot * inv_tau, float("-inf"))
        mr = tl.max(x, axis=1)
        er = tl.exp(x - tl.where(mr == float("-inf"), 0.0, mr)[:, None])
        p_row = er / tl.maximum(tl.sum(er, axis=1), 1e-30)[:, None]
        return ts, vm, dot, x, p_row, tl.sum(p_row * dot, axis=1)

    @triton.jit
    def _pair_stats(
        V,
        VM,
        T,
        TM,
        i,
        j,
        TT,
        LL,
        d,
        svb,
        svt,
        stn,
        stl,
        inv_tau,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One pass over the clip's token blocks: sum_t f_t over valid t, the valid-token counts, and the
        column softmax's max m_l, normaliser z_l and pooled h_l = sum_t dot p_col."""
        ls = tl.arange(0, BLOCK_L)
        tm = tl.load(TM + j.to(tl.int64) * LL + ls, mask=ls < LL, other=0) != 0
        m = tl.full([BLOCK_L], float("-inf"), dtype=tl.float32)
        z = tl.zeros([BLOCK_L], dtype=tl.float32)
        w = tl.zeros([BLOCK_L], dtype=tl.float32)
        f_sum = 0.0
        n_t = 0.0
        for t0 in range(0, TT, BLOCK_T):
            ts, vm, dot, x, p_row, f = _token_block(
                V,
                VM,
                T,
                i,
                j,
                t0,
                tm,
                TT,
                LL,
                d,
                svb,
                svt,
                stn,
                stl,
                inv_tau,
                FP32_DOT,
                DOT_PREC,
                BLOCK_T,
                BLOCK_L,
                BLOCK_K,
            )
            f_sum += tl.sum(tl.where(vm, f, 0.0), axis=0)
            n_t += tl.sum(vm.to(tl.float32), axis=0)
            m_new = tl.maximum(m, tl.max(x, axis=0))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = tl.exp(m - m_safe)
            e = tl.exp(x - m_safe[None, :])
            z = z * alpha + tl.sum(e, axis=0)
            w = w * alpha + tl.sum(e * dot, axis=0)
            m = m_new
        h = w / tl.maximum(z, 1e-30)
        return f_sum, tl.maximum(n_t, 1.0), tm, m, z, h

    @triton.jit
    def _cico_fwd(
        V,
        VM,
        T,
        TM,
        S,
        n,
        TT,
        LL,
        d,
        svb,
        svt,
        stn,
        stl,
        inv_tau,
        w_i2t,
        w_t2i,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """S[i, j] for clip i of the launch's group (grid axis y) and sentence j (axis x)."""
        j = tl.program_id(0)
        i = tl.program_id(1)
        f_sum, n_t, tm, m, z, h = _pair_stats(
            V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau, FP32_DOT, DOT_PREC, BLOCK_T, BLOCK_L, BLOCK_K
        )
        # valid text tokens from the normaliser (z_l >= 1 exactly where l is valid and the clip has a valid
        # token, 0 elsewhere, where h_l = 0 too: the same t2i), not from tm: tm kept across the pass was what
        # ptxas spilled (sm_80/sm_90 -O3 occupancy targets)
        n_l = tl.maximum(tl.sum((z > 0).to(tl.float32), axis=0), 1.0)
        t2i = tl.sum(h, axis=0) / n_l
        tl.store(S + i.to(tl.int64) * n + j, w_i2t * (f_sum / n_t) + w_t2i * t2i)

    @triton.jit
    def _cico_grad(
        V,
        VM,
        T,
        TM,
        GUP,
        G,
        n,
        j0,
        J,
        TT,
        LL,
        d,
        svb,
        svt,
        stn,
        stl,
        inv_tau,
        w_i2t,
        w_t2i,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_T: tl.constexpr,
        BLOCK_L: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """G[i, t, jl, l] = g_ij d s(i, j) / d dot[t, l] for sentence j = j0 + jl of the chunk."""
        jl = tl.program_id(0)
        i = tl.program_id(1)
        j = j0 + jl
        f_sum, n_t, tm, m, z, h = _pair_stats(
            V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau, FP32_DOT, DOT_PREC, BLOCK_T, BLOCK_L, BLOCK_K
        )
        n_l = tl.maximum(tl.sum(tm.to(tl.float32), axis=0), 1.0)
        g = tl.load(GUP + i.to(tl.int64) * n + j)
        m_safe = tl.where(m == float("-inf"), 0.0, m)
        inv_z = 1.0 / tl.maximum(z, 1e-30)
        ls = tl.arange(0, BLOCK_L)
        for t0 in range(0, TT, BLOCK_T):
            ts, vm, dot, x, p_row, f = _token_block(
                V,
                VM,
                T,
                i,
                j,
                t0,
                tm,
                TT,
                LL,
                d,
                svb,
                svt,
                stn,
                stl,
                inv_tau,
                FP32_DOT,
                DOT_PREC,
                BLOCK_T,
                BLOCK_L,
                BLOCK_K,
            )
            gi = tl.where(vm[:, None], p_row * (1.0 + (dot - f[:, None]) * inv_tau), 0.0) * (w_i2t / n_t)
            p_col = tl.exp(x - m_safe[None, :]) * inv_z[None, :]
            gt = tl.where(tm[None, :], p_col * (1.0 + (dot - h[None, :]) * inv_tau), 0.0) * (w_t2i / n_l)
            out = G + ((i.to(tl.int64) * TT + ts[:, None]) * J + jl) * LL + ls[None, :]
            tl.store(out, ((gi + gt) * g).to(G.dtype.element_ty), mask=(ts < TT)[:, None] & (ls < LL)[None, :])


class _CiCo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, v_mask, t, t_mask, tau, weights):
        v = aligned(v.contiguous())
        t = aligned(t.contiguous().to(v.dtype))
        vm = aligned(v_mask.to(torch.int8).contiguous())
        tm = aligned(t_mask.to(torch.int8).contiguous())
        b, TT, d = v.shape
        n, LL, _ = t.shape
        s = torch.empty(b, n, device=v.device, dtype=torch.float32)
        for i0, i1 in clip_groups(b):  # group slices: offsets of i0 (a multiple of 16) rows, aligned
            _cico_fwd[(n, i1 - i0)](
                v[i0:i1],
                vm[i0:i1],
                t,
                tm,
                s[i0:i1],
                n,
                TT,
                LL,
                d,
                v.stride(0),
                v.stride(1),
                t.stride(0),
                t.stride(1),
                1.0 / tau,
                *weights,
                **dot_meta(v.dtype),
                **config(TT, LL, v.dtype, "_cico_fwd"),
            )
        ctx.save_for_backward(v, vm, t, tm)
        ctx.tau, ctx.weights = tau, weights
        return s

    @staticmethod
    def backward(ctx, grad):
        v, vm, t, tm = ctx.saved_tensors
        b, TT, d = v.shape
        n, LL, _ = t.shape
        gup = aligned(grad.float().contiguous())
        J = chunk_sentences(b, n, TT, LL)
        buf = torch.empty(b * TT * J * LL, device=v.device, dtype=v.dtype)
        v2 = v.reshape(b * TT, d)
        dv = torch.zeros(b * TT, d, device=v.device, dtype=torch.float32)
        dt = torch.empty(n, LL, d, device=v.device, dtype=t.dtype)
        meta = dict(**dot_meta(v.dtype), **config(TT, LL, v.dtype, "_cico_grad"))
        for j0 in range(0, n, J):
            w = min(J, n - j0)
            g = buf[: b * TT * w * LL]
            g4 = g.view(b, TT * w * LL)
            for i0, i1 in clip_groups(b):
                _cico_grad[(w, i1 - i0)](
                    v[i0:i1],
                    vm[i0:i1],
                    t,
                    tm,
                    gup[i0:i1],
                    g4[i0:i1],
                    n,
                    j0,
                    w,
                    TT,
                    LL,
                    d,
                    v.stride(0),
                    v.stride(1),
                    t.stride(0),
                    t.stride(1),
                    1.0 / ctx.tau,
                    *ctx.weights,
                    **meta,
                )
            gm = g.view(b * TT, w * LL)
            dv += mm32(gm, t[j0 : j0 + w].reshape(w * LL, d))  # fp32 out: not rounded to 16 bits per chunk
            dt[j0 : j0 + w] = (gm.t() @ v2).view(w, LL, d)
        return dv.view(b, TT, d).to(v.dtype), None, dt, None, None, None


def launch_variants():
    """Every compiled variant the launchers can launch on a GPU (kernels/resources.py compiles each for
    sm_80/sm_90): each kernel x dtype x configuration `config` can return for T, L up to MAX_TOKENS x
    integer variant, as dicts (kernel, dtype, types, constexprs, options, variant, divisible). Pointers
    are always 16-byte aligned (`aligned`, clip groups of a multiple of 16); "aligned": every integer
    argument (n, j0, J, T, L, d and the strides) a multiple of 16, "unaligned": none (d is not padded)."""
    ptr = {dt: "*" + name for dt, name in TRITON_TYPES.items()}
    seen = set()
    for dtype in ptr:
        base = {
            "V": ptr[dtype],
            "VM": "*i8",
            "T": ptr[dtype],
            "TM": "*i8",
            "inv_tau": "fp32",
            "w_i2t": "fp32",
            "w_t2i": "fp32",
        }
        for fn, types in ((_cico_fwd, {**base, "S": "*fp32"}), (_cico_grad, {**base, "GUP": "*fp32", "G": ptr[dtype]})):
            for LL in (16, 32, 64, 128, 256):
                for TT in (16, 32, 64, 128, 256):
                    cfg = config(TT, LL, dtype, fn.__name__)
                    key = (fn.__name__, dtype, *cfg.values())
                    if key in seen:
                        continue
                    seen.add(key)
                    blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
                    const = dict(FP32_DOT=False, DOT_PREC=dot_precision(dtype), **blocks)
                    opts = {k: cfg[k] for k in ("num_warps", "num_stages")}
                    for variant, divisible in int_variants(fn, types, const, ()):
                        yield dict(
                            kernel=fn.__name__,
                            dtype=dtype,
                            types=types,
                            constexprs=const,
                            options=opts,
                            variant=variant,
                            divisible=divisible,
                        )
