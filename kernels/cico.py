"""CiCo fine-grained video-text similarity, fused: the contract, its reference, and the Triton kernels.

`cico_similarity(v, v_mask, t, t_mask, tau=0.07)`: v (b, T, d) video tokens, t (n, L, d) text tokens,
both L2-normalised by the caller; boolean masks of valid tokens. For a pair (i, j), dot = v_i t_j^T
(T x L) and
    i2t = mean over valid t of  sum_l dot[t, l] * softmax_l(dot[t, :] / tau)[l]
    t2i = mean over valid l of  sum_t dot[t, l] * softmax_t(dot[:, l] / tau)[t]
    s(i, j) = (i2t + t2i) / 2                                       (../shared/PAPER.md)
Returns the (b, n) similarities in fp32, differentiable in v and t. A clip or sentence with no
valid token has similarity 0 (no NaN).

Kernels (never materialising b x n x T x L):
- forward: one program per pair, the T x L tile accumulated in fp32 over d chunks, both softmaxes
  and pooled sums in registers; T and L up to 256 tokens each.
- backward: with x = dot / tau, p the row softmax and f_t = sum_l dot p,
  d i2t / d dot[t, l] = p[t, l] (1 + (dot[t, l] - f_t) / tau) / n_valid_t   (and t2i alike over t);
  dv_i = sum_j g_ij G_ij t_j and dt_j = sum_i g_ij G_ij^T v_i, each in a race-free kernel (a program
  owns v_i's or t_j's gradient and loops over the other side, recomputing the tile), accumulated
  in fp32 buffers; the loop can be split over programs with a fixed-order sum of the partial
  buffers afterwards (more parallelism, still deterministic).
"""
from __future__ import annotations

import torch

from ._dispatch import dot_precision, fp32_dot, interpreting, use_triton

MAX_TOKENS = 256


def cico_similarity_reference(v: torch.Tensor, v_mask: torch.Tensor, t: torch.Tensor, t_mask: torch.Tensor,
                              tau: float = 0.07) -> torch.Tensor:
    """The spec: materialises (b, n, T, L); fp32 (fp64 stays fp64)."""
    _check(v, v_mask, t, t_mask)
    acc = torch.promote_types(v.dtype, torch.float32)
    dot = torch.einsum("btd,nld->bntl", v.to(acc), t.to(acc))
    vm = v_mask.bool()[:, None, :, None]
    tm = t_mask.bool()[None, :, None, :]
    valid = vm & tm
    x = (dot / tau).masked_fill(~valid, -1e30)
    p_row = torch.softmax(x, dim=-1).masked_fill(~valid, 0.0)       # over L, per video token
    p_col = torch.softmax(x, dim=-2).masked_fill(~valid, 0.0)       # over T, per text token
    f = (dot * p_row).sum(-1)                                        # (b, n, T)
    h = (dot * p_col).sum(-2)                                        # (b, n, L)
    n_t = v_mask.sum(-1).clamp_min(1).to(acc)[:, None]
    n_l = t_mask.sum(-1).clamp_min(1).to(acc)[None, :]
    i2t = (f * v_mask.bool()[:, None, :]).sum(-1) / n_t
    t2i = (h * t_mask.bool()[None, :, :]).sum(-1) / n_l
    return (i2t + t2i) / 2


def _check(v, v_mask, t, t_mask):
    if v.ndim != 3 or t.ndim != 3 or v.shape[-1] != t.shape[-1]:
        raise ValueError(f"cico_similarity: v must be (b, T, d) and t (n, L, d), got {tuple(v.shape)}, {tuple(t.shape)}")
    if v_mask.shape != v.shape[:2] or t_mask.shape != t.shape[:2]:
        raise ValueError(f"cico_similarity: masks must be (b, T) and (n, L), got {tuple(v_mask.shape)}, "
                         f"{tuple(t_mask.shape)}")


def cico_similarity(v, v_mask, t, t_mask, tau: float = 0.07) -> torch.Tensor:
    """Dispatch: the fused Triton kernels where they can run (see `_dispatch`), else the reference."""
    _check(v, v_mask, t, t_mask)
    if not use_triton(v, t):
        return cico_similarity_reference(v, v_mask, t, t_mask, tau)
    if v.shape[1] > MAX_TOKENS or t.shape[1] > MAX_TOKENS:
        raise ValueError(f"cico_similarity kernel: at most {MAX_TOKENS} tokens per clip/sentence, got "
                         f"T={v.shape[1]}, L={t.shape[1]} (subsample frames or use SCLSLT_KERNELS=reference)")
    return _CiCo.apply(v, v_mask, t, t_mask, float(tau))


# ---------------------------------------------------------------------------------------------
# Triton

try:
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:
    from ._dispatch import accumulate_rows

    @triton.jit
    def _pair_tile(V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau,
                   FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
        """dot (fp32), masks, and both softmax-pooled sums of the pair (i, j)."""
        ts = tl.arange(0, BLOCK_T)
        ls = tl.arange(0, BLOCK_L)
        vm = tl.load(VM + i * TT + ts, mask=ts < TT, other=0) != 0
        tm = tl.load(TM + j * LL + ls, mask=ls < LL, other=0) != 0
        dot = tl.zeros([BLOCK_T, BLOCK_L], dtype=tl.float32)
        for start in range(0, d, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            kmask = ks < d
            a = tl.load(V + i * svb + ts[:, None] * svt + ks[None, :], mask=(ts < TT)[:, None] & kmask[None, :], other=0.0)
            bt = tl.load(T + j * stn + ls[None, :] * stl + ks[:, None], mask=(ls < LL)[None, :] & kmask[:, None], other=0.0)
            if FP32_DOT:
                a = a.to(tl.float32)
                bt = bt.to(tl.float32)
            dot += tl.dot(a, bt, input_precision=DOT_PREC)
        valid = vm[:, None] & tm[None, :]
        x = tl.where(valid, dot * inv_tau, float("-inf"))
        mr = tl.max(x, axis=1)
        er = tl.exp(x - tl.where(mr == float("-inf"), 0.0, mr)[:, None])
        p_row = er / tl.maximum(tl.sum(er, axis=1), 1e-30)[:, None]
        mc = tl.max(x, axis=0)
        ec = tl.exp(x - tl.where(mc == float("-inf"), 0.0, mc)[None, :])
        p_col = ec / tl.maximum(tl.sum(ec, axis=0), 1e-30)[None, :]
        f = tl.sum(p_row * dot, axis=1)
        h = tl.sum(p_col * dot, axis=0)
        n_t = tl.maximum(tl.sum(vm.to(tl.float32), axis=0), 1.0)
        n_l = tl.maximum(tl.sum(tm.to(tl.float32), axis=0), 1.0)
        return dot, vm, tm, p_row, p_col, f, h, n_t, n_l

    @triton.jit
    def _cico_fwd(V, VM, T, TM, S, n, TT, LL, d, svb, svt, stn, stl, inv_tau,
                  FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
        i = tl.program_id(0)
        j = tl.program_id(1)
        dot, vm, tm, p_row, p_col, f, h, n_t, n_l = _pair_tile(
            V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau, FP32_DOT, DOT_PREC, BLOCK_T, BLOCK_L, BLOCK_K)
        i2t = tl.sum(tl.where(vm, f, 0.0), axis=0) / n_t
        t2i = tl.sum(tl.where(tm, h, 0.0), axis=0) / n_l
        tl.store(S + i * n + j, (i2t + t2i) * 0.5)

    @triton.jit
    def _pair_grad(dot, vm, tm, p_row, p_col, f, h, n_t, n_l, g, tau):
        """d s(i, j) / d dot, times the upstream gradient g (T x L, fp32)."""
        gi = tl.where(vm[:, None], p_row * (1.0 + (dot - f[:, None]) / tau), 0.0) / n_t
        gt = tl.where(tm[None, :], p_col * (1.0 + (dot - h[None, :]) / tau), 0.0) / n_l
        return (gi + gt) * (0.5 * g)

    @triton.jit
    def _cico_bwd_v(V, VM, T, TM, GUP, DV, b, n, TT, LL, d, svb, svt, stn, stl, inv_tau, tau, per_split,
                    FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
        """DV[split, i] = sum over this split's j of g_ij G_ij t_j."""
        i = tl.program_id(0)
        split = tl.program_id(1)
        ts = tl.arange(0, BLOCK_T)
        ls = tl.arange(0, BLOCK_L)
        out = DV + (split * b + i) * TT * d
        for j in range(split * per_split, tl.minimum(n, (split + 1) * per_split)):
            dot, vm, tm, p_row, p_col, f, h, n_t, n_l = _pair_tile(
                V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau, FP32_DOT, DOT_PREC,
                BLOCK_T, BLOCK_L, BLOCK_K)
            g = tl.load(GUP + i * n + j)
            G = _pair_grad(dot, vm, tm, p_row, p_col, f, h, n_t, n_l, g, tau)
            accumulate_rows(out, ts, ts < TT, d, G, T + j * stn, ls, ls < LL, stl, DOT_PREC, BLOCK_K)

    @triton.jit
    def _cico_bwd_t(V, VM, T, TM, GUP, DT, b, n, TT, LL, d, svb, svt, stn, stl, inv_tau, tau, per_split,
                    FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                    BLOCK_T: tl.constexpr, BLOCK_L: tl.constexpr, BLOCK_K: tl.constexpr):
        """DT[split, j] = sum over this split's i of g_ij G_ij^T v_i."""
        j = tl.program_id(0)
        split = tl.program_id(1)
        ts = tl.arange(0, BLOCK_T)
        ls = tl.arange(0, BLOCK_L)
        out = DT + (split * n + j) * LL * d
        for i in range(split * per_split, tl.minimum(b, (split + 1) * per_split)):
            dot, vm, tm, p_row, p_col, f, h, n_t, n_l = _pair_tile(
                V, VM, T, TM, i, j, TT, LL, d, svb, svt, stn, stl, inv_tau, FP32_DOT, DOT_PREC,
                BLOCK_T, BLOCK_L, BLOCK_K)
            g = tl.load(GUP + i * n + j)
            Gt = tl.trans(_pair_grad(dot, vm, tm, p_row, p_col, f, h, n_t, n_l, g, tau))
            accumulate_rows(out, ls, ls < LL, d, Gt, V + i * svb, ts, ts < TT, svt, DOT_PREC, BLOCK_K)


def _cfg(TT: int, LL: int, d: int) -> dict:
    bt = max(16, triton.next_power_of_2(TT))
    bl = max(16, triton.next_power_of_2(LL))
    if interpreting():
        return dict(BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=16, num_warps=1)
    bk = 32 if bt * bl >= 128 * 64 else 64
    return dict(BLOCK_T=bt, BLOCK_L=bl, BLOCK_K=bk, num_warps=4 if bt * bl <= 64 * 64 else 8)


def _splits(programs: int, loop: int, device: torch.device) -> int:
    """Split a backward loop over more programs when there are too few to fill the GPU."""
    if interpreting() or device.type != "cuda":
        return 1
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(loop, (2 * sms + programs - 1) // programs, 16))


class _CiCo(torch.autograd.Function):
    @staticmethod
    def forward(ctx, v, v_mask, t, t_mask, tau):
        v = v.contiguous()
        t = t.contiguous().to(v.dtype)
        vm = v_mask.to(torch.int8).contiguous()
        tm = t_mask.to(torch.int8).contiguous()
        b, TT, d = v.shape
        n, LL, _ = t.shape
        s = torch.empty(b, n, device=v.device, dtype=torch.float32)
        cfg = _cfg(TT, LL, d)
        _cico_fwd[(b, n)](v, vm, t, tm, s, n, TT, LL, d, v.stride(0), v.stride(1), t.stride(0), t.stride(1),
                          1.0 / tau, FP32_DOT=fp32_dot(v.dtype), DOT_PREC=dot_precision(v.dtype), **cfg)
        ctx.save_for_backward(v, vm, t, tm)
        ctx.tau = tau
        return s

    @staticmethod
    def backward(ctx, grad):
        v, vm, t, tm = ctx.saved_tensors
        tau = ctx.tau
        b, TT, d = v.shape
        n, LL, _ = t.shape
        g = grad.float().contiguous()
        cfg = _cfg(TT, LL, d)
        common = dict(FP32_DOT=fp32_dot(v.dtype), DOT_PREC=dot_precision(v.dtype), **cfg)
        args = (b, n, TT, LL, d, v.stride(0), v.stride(1), t.stride(0), t.stride(1), 1.0 / tau, tau)
        sv = _splits(b, n, v.device)
        per_v = -(-n // sv)
        dv = torch.zeros(sv, b, TT, d, device=v.device, dtype=torch.float32)
        _cico_bwd_v[(b, sv)](v, vm, t, tm, g, dv, *args, per_v, **common)
        st = _splits(n, b, v.device)
        per_t = -(-b // st)
        dt = torch.zeros(st, n, LL, d, device=v.device, dtype=torch.float32)
        _cico_bwd_t[(n, st)](v, vm, t, tm, g, dt, *args, per_t, **common)
        # fixed-order sums of the partial buffers: deterministic
        return dv.sum(0).to(v.dtype), None, dt.sum(0).to(t.dtype), None, None
