"""Screened pass 1 (diag): logZ and exact block bits, visiting only the component blocks that can matter.

The dense pass 1 (:func:`kernels.estep._logz_kernel`) computes every (row, component) logit. On clustered data
most (row tile, component block) pairs cannot reach the sparse pass 2's threshold (responsibility 2^-SKIP): on
the fit benchmark's state, 6.4 % of the pairs of a sorted row order are kept (bench_ann/results/v28_estep_floors).
Here each program takes BLOCK_M rows in a given order (the previous E-step's transient order, whose tiles hold
rows with the same few relevant blocks) and

1. *screens* every block with two of the four fp16 products, ``qh . P' + xh . A + cst'``: the squares' and A's
   second terms (``ql``, ``A_lo``, each within 2^-11 of its first term) are left out and covered by P' (P rounded
   down to at most (1 - 2^-9) P) and cst' = (1 - 2^-10) cst, so that the result is a lower bound of the exact
   distance (:func:`screen_params` has the derivation) and ``bias + coef * dist'`` (coef < 0) an upper bound ``ub``
   of every logit; its per (row, block) maxima stay in registers. Half the products, a maximum per pair and no
   exponentials;
2. computes the exact logits (the dense kernel's four fp16 products and online log-sum-exp) for the tile's
   most promising block first, then for every other block whose bound reaches the row's running maximum minus
   SKIP + MARGIN for some row of the tile. The running maximum only grows, so a skipped block stays below the
   final maximum minus SKIP: its terms (each < 2^-SKIP, the same terms pass 2 drops) are left out of logZ, and
   the row bits against the final maximum are exactly those of the dense kernel (the block holding a row's
   maximum is never skipped). MARGIN (log2 units) covers the fp32 rounding of the two sums.

Outputs as the dense kernel's transient form (logZ and row bits by row). Diag "tf32" (split A) only.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import (FLAG_K, FLAG_ROWS, LN2, Params, SKIP_LOG2, _component_logits, _dot, _final_row_bits, _indexed,
                    _interpret, _load_rows, _lse_update, _row_block, _row_operands)

MARGIN_LOG2 = 1.0


def _configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 2 * FLAG_ROWS, "BLOCK_KS": 2 * FLAG_K}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_KS": bks}, num_warps=w, num_stages=s)
            for bm, bks, w, s in ((64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (64, 128, 4, 2),
                                  (64, 128, 8, 2), (128, 128, 8, 2), (64, 128, 4, 3))]


@triton.jit
def _screen_logits(xh, qh, A, P_S, BIAS2, COEF2, CST_S, offs_k, mask_k, offs_d, mask_d, D: tl.constexpr,
                   EMU: tl.constexpr, EVEN_K: tl.constexpr):
    """Upper bounds (BM, BK) of the base-2 logits of a row tile against one component block: two fp16 products
    onto the lowered constant, ``bias + coef * (cst' + qh . P' + xh . A)``; components >= K get -inf."""
    t_ptrs = offs_d[:, None] + offs_k[None, :] * D            # (BD, BK): parameters read transposed
    if EVEN_K:
        t_mask = mask_d[:, None]
        bias = tl.load(BIAS2 + offs_k)
        coef = tl.load(COEF2 + offs_k)
        cst = tl.load(CST_S + offs_k)
    else:
        t_mask = mask_d[:, None] & mask_k[None, :]
        bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))
        coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
        cst = tl.load(CST_S + offs_k, mask=mask_k, other=0.0)
    p_t = tl.load(P_S + t_ptrs, mask=t_mask, other=0.0)
    a_t = tl.load(A + t_ptrs, mask=t_mask, other=0.0)
    acc = tl.zeros([xh.shape[0], p_t.shape[1]], tl.float32) + cst[None, :]
    acc = _dot(qh, p_t, acc, 1, EMU)
    acc = _dot(xh, a_t, acc, 1, EMU)
    return bias[None, :] + coef[None, :] * acc


@triton.autotune(configs=_configs(), key=["K", "D", "SKIP", "SCREEN_ONLY"])
@triton.heuristics({"EVEN_KS": lambda a: a["K"] % a["BLOCK_KS"] == 0})
@triton.jit
def _screened_logz_kernel(
    X, CENTER, ROWS, A, A_LO, P, P_S, BIAS2, COEF2, CST, CST_S, SCALES, LOGZ, ROWBITS, VISITS,
    N, K,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CENTER: tl.constexpr, SKIP: tl.constexpr,
    MARGIN: tl.constexpr, NB_PAD: tl.constexpr, EMU: tl.constexpr, COUNT: tl.constexpr, SCREEN_ONLY: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr, BLOCK_KS: tl.constexpr,
    EVEN_KS: tl.constexpr,
):
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    src = _indexed(ROWS, offs_m, mask_m, True)
    scale = tl.load(SCALES)
    sq_scale = tl.load(SCALES + 1)
    num_kb = tl.cdiv(K, BLOCK_K)
    cols = tl.arange(0, NB_PAD)

    # 1. screen: per (row, block) upper bound of the logits from two of the four products (see screen_params)
    x = _load_rows(X, CENTER, src, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, qh, ql, x2 = _row_operands(x, scale, sq_scale, True, 1, EMU)
    # (screen blocks of BLOCK_KS components: R flag blocks of BLOCK_K each)
    R: tl.constexpr = BLOCK_KS // BLOCK_K
    sub = tl.arange(0, R)
    ub = tl.full([BLOCK_M, NB_PAD], float("-inf"), tl.float32)
    for bs in range(0, tl.cdiv(K, BLOCK_KS)):
        offs_k = bs * BLOCK_KS + tl.arange(0, BLOCK_KS)
        s = _screen_logits(xh, qh, A, P_S, BIAS2, COEF2, CST_S, offs_k, offs_k < K, offs_d, mask_d, D, EMU,
                           EVEN_KS)
        smax = tl.max(tl.reshape(s, [BLOCK_M, R, BLOCK_K]), axis=2)                     # (BM, R)
        hit = cols[None, None, :] == (bs * R + sub)[None, :, None]                      # (1, R, NB_PAD)
        ub = tl.maximum(ub, tl.max(tl.where(hit, smax[:, :, None], float("-inf")), axis=1))
    ub = tl.where(mask_m[:, None], ub, float("-inf"))       # rows past N never ask for a block
    b_first = tl.argmax(tl.max(ub, axis=0), axis=0)

    # 2. exact logits of the first block, then of every block that can still reach the threshold
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    best = tl.zeros([BLOCK_M], tl.int32)
    bits = tl.zeros([BLOCK_M], tl.int64)
    bmax = tl.full([BLOCK_M, NB_PAD], float("-inf"), tl.float32)
    k0 = b_first * BLOCK_K
    offs_k = k0 + tl.arange(0, BLOCK_K)
    s, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P, BIAS2, COEF2, CST, offs_k, offs_k < K,
                              offs_d, mask_d, D, True, 1, EMU, EVEN_K, True)
    m_i, l_i, best, bits, bmax = _lse_update(s, k0, m_i, l_i, best, bits, bmax, False, False, True, SKIP,
                                             BLOCK_K, NB_PAD)
    visits = 1
    for b in range(0, num_kb):
        ub_b = tl.max(tl.where(cols[None, :] == b, ub, float("-inf")), axis=1)
        need = tl.max(ub_b - m_i, axis=0) >= -(SKIP + MARGIN)
        if need & (b != b_first) & (not SCREEN_ONLY):
            k0 = b * BLOCK_K
            offs_k = k0 + tl.arange(0, BLOCK_K)
            s, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P, BIAS2, COEF2, CST, offs_k,
                                      offs_k < K, offs_d, mask_d, D, True, 1, EMU, EVEN_K, True)
            m_i, l_i, best, bits, bmax = _lse_update(s, k0, m_i, l_i, best, bits, bmax, False, False, True,
                                                     SKIP, BLOCK_K, NB_PAD)
            visits += 1
    logz = (m_i + tl.log2(l_i)) * LN2
    tl.store(LOGZ + src, logz, mask=mask_m)
    rb = _final_row_bits(bmax, m_i, SKIP, NB_PAD)
    tl.store(ROWBITS + src, rb.to(ROWBITS.dtype.element_ty), mask=mask_m)
    if COUNT:
        tl.store(VISITS + tl.program_id(0), visits)


def screen_params(params: Params) -> tuple[torch.Tensor, torch.Tensor]:
    """The screen's operand P' (K, D) (fp16 values, in ``params.p``'s dtype) and constant cst' (K,) float32, from
    diag "tf32" parameters.

    In exact arithmetic over the represented values the kernels' distance is ``cst + (qh + ql) . P + xh . (A +
    A_lo)`` with ``cst = sum_d A~_d^2 / 4 w_d`` (A~ = A + A_lo, w = P sq_scale; prepare forms it so) and
    ``sum_d q_d P_d = sum_d x~_d^2 w_d``. Round to nearest gives ``qh + ql >= (1 - 2^-10) qh`` (squares >= 0) and
    ``|A_lo| <= 2^-10 |A~|``; Cauchy-Schwarz in the metric w and 2 sqrt(u v) <= u + v bound ``sum |xh| |A_lo|`` by
    ``2^-10 (sum q P + cst)``. Hence the distance is at least ``(1 - 2^-10) cst + (1 - 2^-10)^2 qh . P + xh . A``,
    which P' <= (1 - 2^-9) P and cst' = (1 - 2^-10) cst make a lower bound (fp32 rounding and fp16 subnormals
    are left to MARGIN_LOG2)."""
    target = params.p.double() * (1.0 - 2.0 ** -9)
    p_s = target.half()
    over = p_s.double() > target                               # round down: one fp16 step for those rounded up
    p_s = torch.where(over, (p_s.view(torch.int16) - 1).view(torch.float16), p_s)
    return p_s.to(params.p.dtype).contiguous(), (params.cst.double() * (1.0 - 2.0 ** -10)).float()


def screened_logz(x, params: Params, k, rows, center=None, skip=None, row_bits=None, count=False,
                  screen_only=False):
    """Screened pass 1 over the rows in the order ``rows`` (n,) int32 (position -> row): logZ (n,) float32 by
    row, and ``row_bits`` (n,) int32 / int64 (by row) filled with each row's exact block bits. ``count``: also
    return the number of exactly computed blocks per program (int32, on the device). ``screen_only`` (timing
    experiments only: wrong results) computes the screen and the first block alone."""
    n, d = x.shape
    skip = SKIP_LOG2["tf32"] if skip is None else float(skip)
    n_blocks = triton.cdiv(k, FLAG_K)
    if rows.shape != (n,) or rows.dtype != torch.int32:
        raise ValueError(f"rows must be int32 of shape ({n},), got {rows.dtype} {tuple(rows.shape)}")
    if row_bits is None or row_bits.shape != (n,) or n_blocks > (31 if row_bits.dtype == torch.int32 else 64):
        raise ValueError(f"row_bits must be int32 (at most 31 blocks) or int64 (at most 64) of shape ({n},)")
    p_s, cst_s = screen_params(params)
    logz = torch.empty(n, dtype=torch.float32, device=x.device)
    grid_max = triton.cdiv(n, 16)
    visits = torch.zeros(grid_max if count else 1, dtype=torch.int32, device=x.device)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _screened_logz_kernel[grid](x, x if center is None else center, rows, params.a, params.a_lo, params.p, p_s,
                                params.bias2, params.coef2, params.cst, cst_s, params.scales, logz, row_bits,
                                visits, n, k, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
                                HAS_CENTER=center is not None, SKIP=skip, MARGIN=MARGIN_LOG2,
                                NB_PAD=max(2, triton.next_power_of_2(n_blocks)), EMU=_interpret(), COUNT=count,
                                SCREEN_ONLY=bool(screen_only), BLOCK_K=FLAG_K, EVEN_K=k % FLAG_K == 0)
    return (logz, visits) if count else logz
