"""Masked InfoNCE over gathered columns, fused: the contract, its reference, and the Triton kernels.

`infonce(q, k, logit_scale, pos_offset=0, q_ids=None, k_ids=None)`: q (b, d) local rows, k (n, d)
gathered columns, logit_scale the multiplier (not its log; the model clamps it as CLIP does).
Row i's positive is column `pos_offset + i`; a column j with k_ids[j] == q_ids[i] and
j != pos_offset + i is a known false negative and leaves row i's softmax. Returns the mean over rows
of -log softmax(scale q k^T)[i, pos], in fp32 whatever the input dtype; differentiable in q, k and
logit_scale. The positive is never masked, so no row's softmax is empty (no NaN, even when every
negative of a row is a duplicate).

Design (for the GPU; the b x n logits never exist whole):
- forward (`_infonce_fwd`): grid (row blocks, column splits). A program folds its split's column
  tiles (logits tile = q k^T on tensor cores, fp32 accumulation over d) into an online log-sum-exp
  and picks up the positive's logit. Splitting the columns (flash-decoding) fills the GPU when
  b = n / world is small; the splits' (max, sum, positive) are combined in a fixed order (torch),
  so the result is bitwise reproducible. Saves lse per row (O(b)).
- backward: dS = p - onehot(pos) (masked) in column chunks of at most `CHUNK_ELEMS` elements
  (memory O((b + n) d)): `_infonce_dlogits` recomputes the chunk's logits tile by tile (one program
  per row block x column tile, flattened on grid axis x: a small b's chunk has millions of column
  tiles) and writes dS in the input dtype (the constant factor coef * scale is applied after the
  products), then two cuBLAS GEMMs with fp32 output (`mm32`: a chunk's product is never rounded to
  16 bits, its part of G cancels against the other chunks') give G += dS_c k_c and dk_c = dS_c^T q.
  dq = coef scale G and d scale = coef sum(q * G), since sum_ij dS_ij q_i.k_j = sum_i q_i.(dS k)_i.
  No atomics: deterministic.
- launch shapes (`grids`, pure): every grid axis within CUDA's limits at any n (the forward's column
  splits are at most two waves of SMs). q and k are zero-padded to d a multiple of 16 when it is not
  one, pointers are 16-byte aligned: the launchers only launch the integer variants of
  `launch_variants` (see ALWAYS_ALIGNED), each compiled offline (the unpadded-d variant spilled).
Cost: forward 2bnd FLOPs, backward 6bnd (one recompute, two products), against 6bnd for the three
plain matmuls; memory O((b + n) d) plus one chunk.
Tile configurations come from `config()`, which only returns members of `CONFIGS`; every member is
compiled for sm_80 and sm_90 by tests/e2e/test_kernel_compile.py (no spills, shared memory fits).
"""

from __future__ import annotations

import torch

from ._dispatch import GRID_LIMITS, TRITON_TYPES, aligned, dot_meta, dot_precision, int_variants, mm32, use_triton


def masked_ce(
    logits: torch.Tensor, pos_offset: int = 0, q_ids: torch.Tensor | None = None, k_ids: torch.Tensor | None = None
) -> torch.Tensor:
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


def infonce_reference(
    q: torch.Tensor,
    k: torch.Tensor,
    logit_scale: torch.Tensor,
    pos_offset: int = 0,
    q_ids: torch.Tensor | None = None,
    k_ids: torch.Tensor | None = None,
) -> torch.Tensor:
    """The spec: materialised logits, fp32 (fp64 stays fp64)."""
    _check(q, k, pos_offset, q_ids, k_ids)
    acc = torch.promote_types(q.dtype, torch.float32)
    logits = logit_scale.to(acc) * (q.to(acc) @ k.to(acc).t())
    return masked_ce(logits, pos_offset, q_ids, k_ids)


def _check(q, k, pos_offset, q_ids, k_ids):
    if q.ndim != 2 or k.ndim != 2 or q.shape[1] != k.shape[1]:
        raise ValueError(f"infonce: q must be (b, d) and k (n, d), got {tuple(q.shape)} and {tuple(k.shape)}")
    if pos_offset < 0 or k.shape[0] < pos_offset + q.shape[0]:
        raise ValueError(
            f"infonce: positives at columns {pos_offset}..{pos_offset + q.shape[0] - 1} but k has {k.shape[0]} rows"
        )
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
except ImportError:  # the reference still works without Triton
    triton = None

# Tile configurations the launcher may choose (BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages) by input
# dtype; the last one is the fallback for small b. Each is compiled for sm_80/sm_90 in the test suite.
CONFIGS = {
    "16bit": [
        dict(BLOCK_M=128, BLOCK_N=64, BLOCK_K=64, num_warps=8, num_stages=3),
        dict(BLOCK_M=64, BLOCK_N=64, BLOCK_K=64, num_warps=4, num_stages=3),
    ],
    "fp32": [dict(BLOCK_M=64, BLOCK_N=32, BLOCK_K=16, num_warps=4, num_stages=2)],
}
CHUNK_ELEMS = 1 << 27  # the backward's dS chunk, at most this many elements (256 MB in bf16)


def config(b: int, dtype: torch.dtype) -> dict:
    """The tile configuration for b local rows of `dtype` (a member of CONFIGS)."""
    if dtype == torch.float32:
        return dict(CONFIGS["fp32"][0])
    big, small = CONFIGS["16bit"]
    return dict(big if b >= 4 * big["BLOCK_M"] else small)


def device_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (4 elsewhere: the interpreter's splits)."""
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 4


def _cdiv(a: int, b: int) -> int:
    return -(-a // b)


def column_splits(row_blocks: int, col_tiles: int, sms: int) -> int:
    """Column splits of the forward: enough programs for two waves over `sms` SMs (grid axis y: at most
    65,535)."""
    return max(1, min(col_tiles, _cdiv(2 * sms, row_blocks), GRID_LIMITS[1]))


def fwd_launch(b: int, n: int, cfg: dict, sms: int) -> tuple[tuple[int, int], int]:
    """The forward's grid (row blocks on axis x, column splits on y) and the columns of one split."""
    row_blocks, col_tiles = _cdiv(b, cfg["BLOCK_M"]), _cdiv(n, cfg["BLOCK_N"])
    split_cols = _cdiv(col_tiles, column_splits(row_blocks, col_tiles, sms)) * cfg["BLOCK_N"]
    return (row_blocks, _cdiv(n, split_cols)), split_cols


def dlogits_grid(b: int, w: int, cfg: dict) -> tuple[int]:
    """One program per (row block, column tile) of a w-column chunk, flattened onto grid axis x (at most
    2^31 - 1; a chunk of a small b has millions of column tiles, past axis y's 65,535), row blocks fastest."""
    return (_cdiv(b, cfg["BLOCK_M"]) * _cdiv(w, cfg["BLOCK_N"]),)


def chunk_widths(n: int, c: int) -> list[int]:
    """The distinct widths of the backward's column chunks of at most c columns (the last may be narrower)."""
    return sorted({c if n >= c else n, n - (n - 1) // c * c})


def grids(b: int, n: int, dtype: torch.dtype, device_sms: int) -> list[tuple[str, tuple]]:
    """Every distinct (kernel, grid) the forward and backward launch for b rows against n columns of
    `dtype` on a GPU with `device_sms` SMs (d does not change a grid): pure, launches nothing."""
    cfg = config(b, dtype)
    fwd, _ = fwd_launch(b, n, cfg, device_sms)
    c = chunk_columns(b, n, cfg["BLOCK_N"])
    return [("_infonce_fwd", fwd)] + [("_infonce_dlogits", dlogits_grid(b, w, cfg)) for w in chunk_widths(n, c)]


def chunk_columns(b: int, n: int, block_n: int, budget: int | None = None) -> int:
    """Columns per backward chunk: a multiple of the tile width, b * chunk <= the element budget."""
    budget = CHUNK_ELEMS if budget is None else budget
    c = max(block_n, budget // max(b, 1) // block_n * block_n)
    return min(c, -(-n // block_n) * block_n)


if triton is not None:

    @triton.jit
    def _logits_tile(
        Q,
        K,
        rows,
        cols,
        rmask,
        cmask,
        d,
        stride_q,
        stride_k,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """q[rows] . k[cols]^T in fp32, accumulated over d in BLOCK_K chunks (pointers advanced, not
        recomputed: the 64-bit address tiles are what made the first version spill)."""
        acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
        ks = tl.arange(0, BLOCK_K)
        q_ptr = Q + rows.to(tl.int64)[:, None] * stride_q + ks[None, :]
        k_ptr = K + cols.to(tl.int64)[None, :] * stride_k + ks[:, None]
        for start in range(0, d, BLOCK_K):
            kmask = ks < d - start
            q = tl.load(q_ptr, mask=rmask[:, None] & kmask[None, :], other=0.0)
            kt = tl.load(k_ptr, mask=cmask[None, :] & kmask[:, None], other=0.0)
            if FP32_DOT:
                q = q.to(tl.float32)
                kt = kt.to(tl.float32)
            acc += tl.dot(q, kt, input_precision=DOT_PREC)
            q_ptr += BLOCK_K
            k_ptr += BLOCK_K
        return acc

    @triton.jit
    def _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS: tl.constexpr, DOT_PREC: tl.constexpr):
        """(valid, is_pos): columns in the row's softmax, and the row's positive."""
        if DOT_PREC == "ieee":
            # the same test, written so that fp32's forward with ids compiles without stack on sm_80 in
            # its unaligned variant (`rows + pos_offset` there: 128 registers, 8 bytes spilled, ptxas's -O3
            # occupancy target); the 16-bit forward with ids spills the other way round (168 registers,
            # 8 bytes, aligned, sm_80), so each keeps the form that fits
            is_pos = (cols - pos_offset)[None, :] == rows[:, None]
        else:
            is_pos = cols[None, :] == (rows + pos_offset)[:, None]
        valid = rmask[:, None] & cmask[None, :]
        if HAS_IDS:  # int64 ids as (low, high) int32 words: exact, half the width of an int64 tile
            q_lo = tl.load(QID + 2 * rows, mask=rmask, other=0)
            q_hi = tl.load(QID + 2 * rows + 1, mask=rmask, other=0)
            k_lo = tl.load(KID + 2 * cols, mask=cmask, other=0)
            k_hi = tl.load(KID + 2 * cols + 1, mask=cmask, other=0)
            same = (k_lo[None, :] == q_lo[:, None]) & (k_hi[None, :] == q_hi[:, None])
            valid = valid & (~same | is_pos)
        return valid, is_pos

    @triton.jit
    def _infonce_fwd(
        Q,
        K,
        QID,
        KID,
        SCALE,
        MAX,
        SUM,
        POS,
        b,
        n,
        d,
        pos_offset,
        stride_q,
        stride_k,
        split_cols,
        HAS_IDS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """One row block against one split of the columns: the split's running max, sum of exp and positive."""
        rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
        split = tl.program_id(1)
        rmask = rows < b
        s = tl.load(SCALE).to(tl.float32)
        m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
        l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        p_i = tl.zeros([BLOCK_M], dtype=tl.float32)
        lo = split * split_cols
        hi = tl.minimum(n, lo + split_cols)
        for start_n in range(lo, hi, BLOCK_N):
            cols = start_n + tl.arange(0, BLOCK_N)
            cmask = cols < hi
            logits = s * _logits_tile(
                Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k, FP32_DOT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K
            )
            valid, is_pos = _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS, DOT_PREC)
            logits = tl.where(valid, logits, float("-inf"))
            p_i += tl.sum(tl.where(is_pos & valid, logits, 0.0), axis=1)
            m_new = tl.maximum(m_i, tl.max(logits, axis=1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # nothing valid yet
            l_i = l_i * tl.exp(m_i - m_safe) + tl.sum(tl.exp(logits - m_safe[:, None]), axis=1)
            m_i = m_new
        out = split * b + rows
        tl.store(MAX + out, m_i, mask=rmask)
        tl.store(SUM + out, l_i, mask=rmask)
        tl.store(POS + out, p_i, mask=rmask)

    @triton.jit
    def _infonce_dlogits(
        Q,
        K,
        QID,
        KID,
        SCALE,
        LSE,
        DS,
        b,
        n,
        d,
        pos_offset,
        col0,
        stride_q,
        stride_k,
        stride_ds,
        HAS_IDS: tl.constexpr,
        FP32_DOT: tl.constexpr,
        DOT_PREC: tl.constexpr,
        BLOCK_M: tl.constexpr,
        BLOCK_N: tl.constexpr,
        BLOCK_K: tl.constexpr,
    ):
        """DS[rows, cols - col0] = softmax - onehot(positive) over the valid columns (0 elsewhere); one
        program per (row block, column tile), flattened on grid axis x (`dlogits_grid`)."""
        row_blocks = tl.cdiv(b, BLOCK_M)
        pid = tl.program_id(0)
        rows = (pid % row_blocks) * BLOCK_M + tl.arange(0, BLOCK_M)
        cols = col0 + (pid // row_blocks) * BLOCK_N + tl.arange(0, BLOCK_N)
        rmask = rows < b
        cmask = cols < n
        s = tl.load(SCALE).to(tl.float32)
        lse = tl.load(LSE + rows, mask=rmask, other=0.0)
        dots = _logits_tile(
            Q, K, rows, cols, rmask, cmask, d, stride_q, stride_k, FP32_DOT, DOT_PREC, BLOCK_M, BLOCK_N, BLOCK_K
        )
        valid, is_pos = _valid_tile(rows, cols, rmask, cmask, QID, KID, pos_offset, HAS_IDS, DOT_PREC)
        p = tl.where(valid, tl.exp(s * dots - lse[:, None]), 0.0)
        dlog = p - tl.where(is_pos & valid, 1.0, 0.0)
        ptr = DS + rows.to(tl.int64)[:, None] * stride_ds + (cols - col0)[None, :]
        tl.store(ptr, dlog.to(DS.dtype.element_ty), mask=rmask[:, None] & cmask[None, :])


def _words(ids: torch.Tensor | None, like: torch.Tensor) -> torch.Tensor:
    """Sentence ids (the product's are 63-bit hashes) as int32 word pairs for the kernels: a view, no
    copy of int64 ids and no host synchronisation; a placeholder without ids."""
    if ids is None:
        return like.new_empty(2, dtype=torch.int32)
    return aligned(ids.to(torch.int64).contiguous()).view(torch.int32)


def _pad16(x: torch.Tensor) -> torch.Tensor:
    """x (rows, d) zero-padded to d a multiple of 16 (x itself when it is one): the kernels are launched
    with d and the row strides divisible by 16 only, the variant that compiles without spills; zero
    columns leave every dot product, the loss and the gradients' first d columns unchanged."""
    return aligned(x) if x.shape[1] % 16 == 0 else torch.nn.functional.pad(x, (0, -x.shape[1] % 16))


class _InfoNCE(torch.autograd.Function):
    @staticmethod
    def forward(ctx, q, k, scale, pos_offset, q_ids, k_ids):
        d0 = q.shape[1]
        q, k = _pad16(q.contiguous()), _pad16(k.contiguous().to(q.dtype))
        b, d = q.shape
        n = k.shape[0]
        has_ids = q_ids is not None
        qid, kid = _words(q_ids, q), _words(k_ids, q)
        scale32 = aligned(scale.detach().reshape(1).float().contiguous())
        cfg = config(b, q.dtype)
        grid, split_cols = fwd_launch(b, n, cfg, device_sms(q.device))
        count = grid[1] * b  # (splits, b) per statistic, each 16-byte aligned
        part = torch.empty(3, _cdiv(count, 4) * 4, device=q.device, dtype=torch.float32)
        mx, sm, ps = (part[i, :count].view(grid[1], b) for i in range(3))
        _infonce_fwd[grid](
            q,
            k,
            qid,
            kid,
            scale32,
            mx,
            sm,
            ps,
            b,
            n,
            d,
            pos_offset,
            q.stride(0),
            k.stride(0),
            split_cols,
            HAS_IDS=has_ids,
            **dot_meta(q.dtype),
            **cfg,
        )
        m = mx.max(0).values  # finite: every row's positive is in some split
        lse = m + torch.log((sm * torch.exp(mx - m)).sum(0))
        pos = ps.sum(0)
        ctx.save_for_backward(q, k, qid, kid, scale32, lse)
        ctx.meta = (pos_offset, has_ids, scale.dtype, scale.shape, d0)
        return (lse - pos).mean()

    @staticmethod
    def backward(ctx, grad):
        q, k, qid, kid, scale32, lse = ctx.saved_tensors
        pos_offset, has_ids, scale_dtype, scale_shape, d0 = ctx.meta
        b, d = q.shape  # d: padded to a multiple of 16, d0 the caller's
        n = k.shape[0]
        coef = grad.float() / b
        cfg = config(b, q.dtype)
        c = chunk_columns(b, n, cfg["BLOCK_N"])
        ds = torch.empty(b, c, device=q.device, dtype=q.dtype)
        g = torch.zeros(b, d, device=q.device, dtype=torch.float32)  # dS k, accumulated over chunks
        dk = torch.empty(n, d0, device=q.device, dtype=k.dtype)
        s = scale32[0]
        for col0 in range(0, n, c):
            w = min(c, n - col0)
            _infonce_dlogits[dlogits_grid(b, w, cfg)](
                q,
                k,
                qid,
                kid,
                scale32,
                lse,
                ds,
                b,
                n,
                d,
                pos_offset,
                col0,
                q.stride(0),
                k.stride(0),
                ds.stride(0),
                HAS_IDS=has_ids,
                **dot_meta(q.dtype),
                **cfg,
            )
            part = ds[:, :w]
            g += mm32(part, k[col0 : col0 + w])  # fp32 out: not rounded to 16 bits before the sum
            dk[col0 : col0 + w] = coef * s * mm32(part.t(), q)[:, :d0]
        dscale = (coef * (q.float() * g).sum()).to(scale_dtype).reshape(scale_shape)
        return (coef * s * g[:, :d0]).to(q.dtype), dk, dscale, None, None, None


# Integer arguments the launcher only ever passes as multiples of 16 (d padded by `_pad16`, the strides
# that follow from it, tile-multiple column counts): the JIT always specialises them as divisible by 16.
ALWAYS_ALIGNED = {
    "_infonce_fwd": ("d", "stride_q", "stride_k", "split_cols"),
    "_infonce_dlogits": ("d", "col0", "stride_q", "stride_k", "stride_ds"),
}


def launch_variants():
    """Every compiled variant the launchers can launch on a GPU (kernels/resources.py compiles each for
    sm_80/sm_90): each kernel x dtype x configuration `config` can return x id masking x integer
    variant, as dicts (kernel, dtype, types, constexprs, options, variant, divisible). Pointers are always
    16-byte aligned (`aligned`); "aligned": every integer argument a multiple of 16 (b, n, pos_offset
    too), "unaligned": only the ALWAYS_ALIGNED ones."""
    ptr = {dt: "*" + name for dt, name in TRITON_TYPES.items()}
    for dtype in ptr:
        cfgs = CONFIGS["fp32"] if dtype == torch.float32 else CONFIGS["16bit"]
        for cfg in cfgs:
            blocks = {k: v for k, v in cfg.items() if k.startswith("BLOCK")}
            opts = {k: cfg[k] for k in ("num_warps", "num_stages")}
            for has_ids in (True, False):
                const = dict(HAS_IDS=has_ids, FP32_DOT=False, DOT_PREC=dot_precision(dtype), **blocks)
                base = {"Q": ptr[dtype], "K": ptr[dtype], "QID": "*i32", "KID": "*i32", "SCALE": "*fp32"}  # id words
                for fn, types in (
                    (_infonce_fwd, {**base, "MAX": "*fp32", "SUM": "*fp32", "POS": "*fp32"}),
                    (_infonce_dlogits, {**base, "LSE": "*fp32", "DS": ptr[dtype]}),
                ):
                    for variant, divisible in int_variants(fn, types, const, ALWAYS_ALIGNED[fn.__name__]):
                        yield dict(
                            kernel=fn.__name__,
                            dtype=dtype,
                            types=types,
                            constexprs=const,
                            options=opts,
                            variant=variant,
                            divisible=divisible,
                        )
