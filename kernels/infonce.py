"""Masked InfoNCE over gathered columns, fused: the contract, its reference, and the Triton kernels.

`infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None)`: q (b, d) local rows, k (n, d)
gathered columns, logit_scale the multiplier (not its log; the model clamps it as CLIP does).
Row i's positive is column `pos_offset + i`; a column j with k_ids[j] == q_ids[i] and
j != pos_offset + i is a known false negative and leaves row i's softmax. Returns the mean over rows
of -log softmax(scale q k^T)[i, pos], in fp32 whatever the input dtype; differentiable in q, k and
logit_scale. The positive is never masked, so no row's softmax is empty (no NaN, even when every
negative of a row is a duplicate).

Kernels (never materialising the b x n logits):
- forward, one program per block of rows: loop over column tiles, logits tile = scale * q k^T
  accumulated in fp32 over d chunks, masked, folded into an online log-sum-exp; the positive's
  logit is picked up in the same pass. Saves lse and the positive logit per row (O(b)).
- backward recomputes the logits tile by tile (flash-attention style) in two race-free kernels:
  row-parallel for dq and the per-row scale gradient, column-parallel for dk. Each program owns
  its output rows and accumulates them over the tiles in an fp32 buffer in global memory (it stays
  in L2): no atomics, so results are deterministic, and d is not limited by registers.
Cost: forward 2bnd FLOPs, backward 8bnd (two recomputes + two gradient products), against 6bnd for
the three plain matmuls; memory O((b + n) d).
"""
from __future__ import annotations

import torch

from ._dispatch import dot_precision, fp32_dot, interpreting, use_triton


def masked_ce(logits: torch.Tensor, pos_offset: int = 0, q_ids: torch.Tensor | None = None,
              k_ids: torch.Tensor | None = None) -> torch.Tensor:
    """Mean over rows of -log softmax(logits)[i, pos_offset + i], known false negatives removed.

    The loss part of the contract on a given (b, n) logits matrix (used where the similarity is not
    a plain dot product, e.g. CiCo).
    """
    b = logits.shape[0]
    rows = torch.arange(b, device=logits.device)
    pos = rows + pos_offset
    if q_ids is not None and k_ids is not None:
        same = q_ids[:, None] == k_ids[None, :]
        same[rows, pos] = False
        logits = logits.masked_fill(same, float("-inf"))
    return (torch.logsumexp(logits, dim=1) - logits[rows, pos]).mean()


def infonce_reference(q: torch.Tensor, k: torch.Tensor, logit_scale: torch.Tensor, pos_offset: int = 0,
                      q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None) -> torch.Tensor:
    """The spec: materialised logits, fp32 (fp64 stays fp64)."""
    _check(q, k, pos_offset, q_ids, k_ids)
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = logit_scale.to(acc) * (q.to(acc) @ k.to(acc).t())
    return masked_ce(logits, pos_offset, q_ids, k_ids)


def _check(q, k, pos_offset, q_ids, k_ids):
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"infonce: q must be (b, d) and k (n, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if pos_offset < 0 or k.shape[0] < pos_offset + q.shape[0]:
        raise ValueError(f"infonce: positives at columns {pos_offset}..{pos_offset + q.shape[0] - 1} "
                         f"but k has {k.shape[0]} rows")
    if (q_ids is None) != (k_ids is None):
        raise ValueError("infonce: give both q_ids and k_ids, or neither")
    if q_ids is not None and (q_ids.shape != (q.shape[0],) or k_ids.shape != (k.shape[0],)):
        raise ValueError(f"infonce: ids must be (b,) and (n,), got {tuple(q_ids.shape)}, {tuple(k_ids.shape)}")


def infonce(q, k, logit_scale, pos_offset: int = 0, q_ids=None, k_ids=None) -> torch.Tensor:
    """Dispatch: the fused Triton kernels where they can run (see `_dispatch`), else the reference."""
    _check(q, k, pos_offset, q_ids, k_ids)
    if not use_triton(q, k):
        return infonce_reference(q, k, logit_scale, pos_offset, q_ids, k_ids)
    scale = logit_scale if torch.is_tensor(logit_scale) else torch.tensor(float(logit_scale), device=q.device)
    return _InfoNCE.apply(q, k, scale, int(pos_offset), q_ids, k_ids)


# ---------------------------------------------------------------------------------------------
# Triton

try:
    import triton
    import triton.language as tl
except ImportError:          # the reference still works without Triton
    triton = None

if triton is not None:
    from ._dispatch import accumulate_rows

    @triton.jit
    def _logits_tile(Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k,
                     FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                     BLOCK_K: tl.constexpr):
        """q[rows] . k[cols]^T in fp32, accumulated over d in BLOCK_K chunks."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        for start in range(0, d, BLOCK_K):
            ks = start + tl.arange(0, BLOCK_K)
            kmask = ks < d
            q = tl.load(Q + rows[:, None] * stride_q + ks[None, :], mask=rmask[:, None] & kmask[None, :], other=0.0)
            kt = tl.load(K + cols[None, :] * stride_k + ks[:, None], mask=cmask[None, :] & kmask[:, None], other=0.0)
            if FP32_DOT:
                q = q.to(tl.float32)
                kt = kt.to(tl.float32)
            acc += tl.dot(q, kt, input_precision=DOT_PREC)
        return acc

    @triton.jit
    def _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS: tl.constexpr):
        """(valid, is_pos): columns in the row's softmax, and the row's positive."""
        is_pos = cols[None, :] == (rows + pos_offset)[:, None]
        valid = rmask[:, None] & cmask[None, :]
        if HAS_IDS:
            qid = tl.load(QID + rows, mask=rmask, other=-1)
            kid = tl.load(KID + cols, mask=cmask, other=-2)
            valid = valid & ((kid[None, :] != qid[:, None]) | is_pos)
        return valid, is_pos

    @triton.jit
    def _infonce_fwd(Q, K, QID, KID, SCALE, LSE, POS, b, n, d, pos_offset, stride_q, stride_k,
                     HAS_IDS: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < b
        s = tl.load(SCALE).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, n, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            cmask = cols < n
            logits = s * _logits_tile(Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k,
                                      FP32_DOT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            valid, is_pos = _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS)
            logits = tl.where(valid, logits, float("-inf"))
            p_i += tl.sum(tl.where(is_pos & valid, logits, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)   # a tile with nothing valid yet
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
            m_i = m_new
        lse = tl.where(rmask, m_i + tl.log(tl.where(rmask, l_i, 1.0)), 0.0)
        tl.store(LSE + rows, lse, mask=rmask)
        tl.store(POS + rows, p_i, mask=rmask)

    @triton.jit
    def _infonce_bwd_rows(Q, K, QID, KID, SCALE, LSE, COEF, DQ, DSCALE, b, n, d, pos_offset, stride_q, stride_k,
                          HAS_IDS: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """dq = scale * dS k and the per-row scale gradient sum_j dS_ij (q_i . k_j)."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        rmask = rows < b
        s = tl.load(SCALE).to(tl.float32)
        coef = tl.load(COEF).to(tl.float32)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        ds_row = tl.zeros([BLOCK_M], dtype=tl.float32)
        for start_n in range(0, n, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            cmask = cols < n
            dots = _logits_tile(Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k,
                                FP32_DOT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            valid, is_pos = _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS)
            p = tl.where(valid, tl.exp(s * dots - lse[:, None]), 0.0)
            dlog = (p - tl.where(is_pos & valid, 1.0, 0.0)) * coef        # d loss / d logit
            ds_row += tl.sum(dlog * dots, axis=1)
            accumulate_rows(DQ, rows, rmask, d, dlog * s, K, cols, cmask, stride_k, DOT_PREC, BLOCK_K)
        tl.store(DSCALE + rows, ds_row, mask=rmask)

    @triton.jit
    def _infonce_bwd_cols(Q, K, QID, KID, SCALE, LSE, COEF, DK, b, n, d, pos_offset, stride_q, stride_k,
                          HAS_IDS: tl.constexpr, FP32_DOT: tl.constexpr, DOT_PREC: tl.constexpr,
                          BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
        """dk = scale * dS^T q, one program per block of columns."""
        cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        cmask = cols < n
        s = tl.load(SCALE).to(tl.float32)
        coef = tl.load(COEF).to(tl.float32)
        for start_m in range(0, b, BLOCK_M):
            rows = start_m + tl.arange(0, BLOCK_M)
            rmask = rows < b
            lse = tl.load(LSE + rows, mask=rmask, other=0.0)
            dots = _logits_tile(Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k,
                                FP32_DOT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K)
            valid, is_pos = _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS)
            p = tl.where(valid, tl.exp(s * dots - lse[:, None]), 0.0)
            dlog_s = (p - tl.where(is_pos & valid, 1.0, 0.0)) * (coef * s)
            accumulate_rows(DK, cols, cmask, d, tl.trans(dlog_s), Q, rows, rmask, stride_q, DOT_PREC, BLOCK_K)


def _blocks(d: int) -> dict:
    """Tile sizes: small under the interpreter (it runs programs one by one in Python)."""
    if interpreting():
        return dict(BLOCK_M=16, BLOCK_N=16, BLOCK_K=16, num_warps=1)
    bk = 64 if d >= 64 else max(16, triton.next_power_of_2(d))
    return dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=bk, num_warps=4)


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, pos_offset, q_ids, k_ids):
        q, k = q.contiguous(), k.contiguous()
        if k.dtype != q.dtype:
            k = k.to(q.dtype)
        b, d = q.shape
        n = k.shape[0]
        has_ids = q_ids is not None
        qid = q_ids.contiguous() if has_ids else q.new_empty(1, dtype=torch.long)
        kid = k_ids.contiguous() if has_ids else q.new_empty(1, dtype=torch.long)
        scale32 = scale.detach().reshape(1).float().contiguous()
        lse = torch.empty(b, device=q.device, dtype=torch.float32)
        pos = torch.empty(b, device=q.device, dtype=torch.float32)
        blk = _blocks(d)
        _infonce_fwd[(triton.cdiv(b, blk["BLOCK_M"]),)](
            q, k, qid, kid, scale32, lse, pos, b, n, d, pos_offset, q.stride(0), k.stride(0),
            HAS_IDS=has_ids, FP32_DOT=fp32_dot(q.dtype), DOT_PREC=dot_precision(q.dtype), **blk)
        ctx.save_for_backward(q, k, qid, kid, scale32, lse)
        ctx.meta = (pos_offset, has_ids, scale.dtype, scale.shape)
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad):
        q, k, qid, kid, scale32, lse = ctx.saved_tensors
        pos_offset, has_ids, scale_dtype, scale_shape = ctx.meta
        b, d = q.shape
        n = k.shape[0]
        coef = (grad.float() / b).reshape(1).contiguous()
        dq = torch.zeros(b, d, device=q.device, dtype=torch.float32)
        dk = torch.zeros(n, d, device=q.device, dtype=torch.float32)
        ds_rows = torch.empty(b, device=q.device, dtype=torch.float32)
        blk = _blocks(d)
        common = dict(HAS_IDS=has_ids, FP32_DOT=fp32_dot(q.dtype), DOT_PREC=dot_precision(q.dtype), **blk)
        _infonce_bwd_rows[(triton.cdiv(b, blk["BLOCK_M"]),)](
            q, k, qid, kid, scale32, lse, coef, dq, ds_rows, b, n, d, pos_offset, q.stride(0), k.stride(0), **common)
        _infonce_bwd_cols[(triton.cdiv(n, blk["BLOCK_N"]),)](
            q, k, qid, kid, scale32, lse, coef, dk, b, n, d, pos_offset, q.stride(0), k.stride(0), **common)
        dscale = ds_rows.sum().to(scale_dtype).reshape(scale_shape)
        return dq.to(q.dtype), dk.to(k.dtype), dscale, None, None, None
