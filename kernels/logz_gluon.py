"""Diag pass 1 as a Gluon kernel for Hopper (sm_90): explicit asynchronous wgmma and a TMA ring.

The Triton pass 1 (:func:`kernels.estep._logz_kernel`) computes four fp16 products per (row tile, component
block) for diag "tf32" logits, ``ql . P + qh . P + xh . A_lo + xh . A`` (the squares and A each as two fp16
terms), and three bf16 products for diag bf16 ones, ``ql . P + qh . P + xh . A`` (MODE 2: unscaled rows, A in
one term). Triton 3.6 waits for each product's tensor-core group before issuing the next (``wgmma.wait_group 0``
after every product), so the tensor cores and the exponentials of a warpgroup never overlap. Here the four
products of block j + 1 are issued asynchronously before the log-sum-exp of block j, with one wait per block at
the end of the iteration; the row operands are the wgmma A operand in registers (``A_REG``; or in shared memory)
and the parameter tiles, with each block's constants (cst, bias, coef; v36), arrive through a TMA ring with one
mbarrier per stage. H100: pass 1 -9 to -12 %
(bench_ann/results/v21_gluon_pass1).

Scope: every diag "tf32" pass 1 without the argmax (``estep.launch_logz`` dispatches to it on Hopper GPUs): the
transient orders' (per row logZ, ||x~||^2 and exact block bits), ``assign``'s (logZ alone, for the top-k
responsibilities) and, behind ``estep.GLUON_PASS1_KEPT`` (off: no gain measured, v22), the kept orders' steady
iterations (rows in a given order from their hinted block, logZ by row and position, the operand copy, the 64-row
tiles' block bits for the sparse pass 2); and the diag bf16 pass 1 of the transient orders (bf16 logZ alone,
``assign``'s, stays on the Triton kernel: Gluon was no faster there, NOTES.md v30).
Same operands, same products in the same order and the same log-sum-exp as the Triton kernel, which stays the
reference (and the only form that runs under ``TRITON_INTERPRET=1``: Gluon kernels do not), and runs everything
else (the argmax of the order rebuilds, ``score``/``predict``). D from 16 to 128 in steps of 8: the features are
padded to a power of two DP (masked row loads; the TMA's zero fill past D for the parameter tiles), as the Triton
kernel pads them (v26: D=96 at D=128's cost).
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_LN2 = gl.constexpr(0.6931471805599453)


@gluon.jit
def _issue_block(xh_s, qh_s, ql_s, a_s, alo_s, p_s, stage, cst, BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr,
                 SPLIT_A: gl.constexpr, mma: gl.constexpr):
    """Issues (asynchronously) the 16-bit products of one component block, accumulated onto its constant ``cst``
    (BLOCK_K,): cst + ql . P + qh . P (+ xh . A_lo if SPLIT_A) + xh . A, (BLOCK_M, BLOCK_K) fp32 in the wgmma
    layout."""
    acc = gl.broadcast(cst[None, :], gl.zeros([BLOCK_M, BLOCK_K], gl.float32, mma))[0]
    at = a_s.index(stage).permute((1, 0))
    pt = p_s.index(stage).permute((1, 0))
    acc = warpgroup_mma(ql_s, pt, acc, is_async=True)
    acc = warpgroup_mma(qh_s, pt, acc, is_async=True)
    if SPLIT_A:
        alot = alo_s.index(stage).permute((1, 0))
        acc = warpgroup_mma(xh_s, alot, acc, is_async=True)
    acc = warpgroup_mma(xh_s, at, acc, is_async=True)
    return acc


@gluon.jit
def _block_cst(cst_s, slot, mma: gl.constexpr):
    """One block's accumulator constants (BLOCK_K,), from slot ``slot`` of the constants' ring (zeros past K)."""
    return cst_s.index(slot).load(gl.SliceLayout(0, mma))


@gluon.jit
def _block_bias(bias_s, coef_s, slot, k0, K, EVEN_K: gl.constexpr, BLOCK_K: gl.constexpr, mma: gl.constexpr):
    """One block's (bias, coef) (BLOCK_K,) each, from slot ``slot`` of the constants' ring; components >= K get
    bias -inf (their logits are -inf; the TMA filled zeros there) unless EVEN_K (K a multiple of BLOCK_K)."""
    bias = bias_s.index(slot).load(gl.SliceLayout(0, mma))
    if not EVEN_K:
        offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
        bias = gl.where(offs_k < K, bias, float("-inf"))
    return bias, coef_s.index(slot).load(gl.SliceLayout(0, mma))


@gluon.jit
def _load_block(a_desc, alo_desc, p_desc, cst_desc, bias_desc, coef_desc, a_s, alo_s, p_s, cst_s, bias_s, coef_s,
                bars, stage, slot, k0, pred, SPLIT_A: gl.constexpr):
    """TMA of one block's parameter tiles (A, P, and A_lo if SPLIT_A) into ring stage ``stage`` and of its
    constants (cst, bias, coef) into slot ``slot`` of the constants' ring, completing on the stage's mbarrier."""
    bar = bars.index(stage)
    nbytes: gl.constexpr = 2 * a_desc.block_type.nbytes + 3 * cst_desc.block_type.nbytes
    if SPLIT_A:
        mbarrier.expect(bar, nbytes + a_desc.block_type.nbytes, pred=pred)
        tma.async_copy_global_to_shared(alo_desc, [k0, 0], bar, alo_s.index(stage), pred=pred)
    else:
        mbarrier.expect(bar, nbytes, pred=pred)
    tma.async_copy_global_to_shared(a_desc, [k0, 0], bar, a_s.index(stage), pred=pred)
    tma.async_copy_global_to_shared(p_desc, [k0, 0], bar, p_s.index(stage), pred=pred)
    tma.async_copy_global_to_shared(cst_desc, [k0], bar, cst_s.index(slot), pred=pred)
    tma.async_copy_global_to_shared(bias_desc, [k0], bar, bias_s.index(slot), pred=pred)
    tma.async_copy_global_to_shared(coef_desc, [k0], bar, coef_s.index(slot), pred=pred)


@gluon.jit
def _wrap(i, n):
    """``i % n`` for 0 <= i < 2 n, without a division."""
    return i - n * (i >= n).to(i.dtype)


@gluon.jit
def _lse_block(dist, blk, bias, coef, m_i, l_i, bits, bmax, WRITE_GAPS: gl.constexpr, ROW_BITS: gl.constexpr,
               SKIP: gl.constexpr, BLOCK_K: gl.constexpr, mma: gl.constexpr):
    """Base-2 logits of component block ``blk``, the online log-sum-exp, and (WRITE_GAPS) the block's bit in the
    rows' running-maximum bits ``bits`` (BLOCK_M,) int64 or (ROW_BITS) the block's row maxima in column ``blk`` of
    ``bmax`` (BLOCK_M, BLOCK_K), as ``estep._lse_update``."""
    s = bias[None, :] + coef[None, :] * dist
    s_max = gl.max(s, axis=1)
    m_new = gl.maximum(m_i, s_max)
    l_i = l_i * gl.exp2(m_i - m_new) + gl.sum(gl.exp2(s - m_new[:, None]), axis=1)
    if WRITE_GAPS:
        bits = bits | gl.where(s_max - m_new >= -SKIP, gl.full_like(bits, 1) << blk.to(gl.int64), 0)
    if ROW_BITS:
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
        bmax = gl.where(cols[None, :] == blk, s_max[:, None], bmax)
    return m_new, l_i, bits, bmax


@gluon.jit
def _or(a, b):
    return a | b


@gluon.jit(do_not_specialize=["N"])    # chunks of any row count share one compiled kernel
def _diag_logz_kernel(
    X, CENTER, ROWS, HINT, a_desc, alo_desc, p_desc, cst_desc, bias_desc, coef_desc, SCALES, LOGZ, LZP, X2, XO, XQ,
    XQL, GAPS, ROWBITS, N, K,
    D: gl.constexpr, DP: gl.constexpr, HAS_CENTER: gl.constexpr, HAS_ORDER: gl.constexpr, WRITE_X2: gl.constexpr,
    WRITE_COPY: gl.constexpr, WRITE_GAPS: gl.constexpr, ROW_BITS: gl.constexpr, SKIP: gl.constexpr,
    MODE: gl.constexpr, EVEN_K: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, STAGES: gl.constexpr, A_REG: gl.constexpr, num_warps: gl.constexpr,
):
    # Outputs as estep._logz_kernel's: position m processes row ROWS[m] (HAS_ORDER) or row m; LOGZ is written at
    # the row, LZP (logZ again), X2 and the operand copy (XO, XQ, XQL) at the position. WRITE_GAPS (BLOCK_M = the
    # flag tile's 64 rows): GAPS[program] = the OR of its rows' running-maximum block bits. ROW_BITS: ROWBITS[row] =
    # the row's block bits against its final maximum.
    rows: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    mma: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                  instr_shape=[16, BLOCK_K, 16])
    op_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SPLIT_A: gl.constexpr = MODE == 1       # "tf32": fp16 operands, scaled rows, A in two terms; 2: bf16, A in one
    op_ty: gl.constexpr = a_desc.dtype
    ALO_STAGES: gl.constexpr = STAGES if SPLIT_A else 1     # without SPLIT_A, A_lo's ring is a placeholder
    pid = gl.program_id(0)

    # component blocks are visited from the block of the tile's hinted component (as the Triton kernel); the ring's
    # first copies are issued before the row tile is read, so that they overlap its loads
    num_kb = gl.cdiv(K, BLOCK_K)
    if HAS_ORDER:
        b0 = gl.load(HINT + pid.to(gl.int64) * BLOCK_M) // BLOCK_K
    else:
        b0 = pid * 0
    # the parameter ring: STAGES x (A, A_lo, P) tiles of (BLOCK_K, DP), one mbarrier per stage (the TMA fills
    # the columns past D, and the rows past K, with zeros); without SPLIT_A a one-stage placeholder for A_lo. The
    # blocks' constants (cst, bias, coef: BLOCK_K floats each) arrive with the tiles, in a ring of STAGES + 1
    # slots: block j's bias and coef are read after block j's stage is refilled (at the start of iteration j)
    a_s = gl.allocate_shared_memory(op_ty, [STAGES, BLOCK_K, DP], a_desc.layout)
    alo_s = gl.allocate_shared_memory(op_ty, [ALO_STAGES, BLOCK_K, DP], a_desc.layout)
    p_s = gl.allocate_shared_memory(op_ty, [STAGES, BLOCK_K, DP], a_desc.layout)
    CSLOTS: gl.constexpr = STAGES + 1
    cst_s = gl.allocate_shared_memory(gl.float32, [CSLOTS, BLOCK_K], cst_desc.layout)
    bias_s = gl.allocate_shared_memory(gl.float32, [CSLOTS, BLOCK_K], cst_desc.layout)
    coef_s = gl.allocate_shared_memory(gl.float32, [CSLOTS, BLOCK_K], cst_desc.layout)
    bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
    for i in gl.static_range(STAGES):
        mbarrier.init(bars.index(i), count=1)
    fence_async_shared()
    gl.thread_barrier()
    for i in gl.static_range(STAGES):
        _load_block(a_desc, alo_desc, p_desc, cst_desc, bias_desc, coef_desc, a_s, alo_s, p_s, cst_s, bias_s, coef_s,
                    bars, i, i, ((b0 + i) % num_kb) * BLOCK_K, i < num_kb, SPLIT_A)

    # the row tile's operands (as _row_operands, diag)
    offs_m = pid.to(gl.int64) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows))
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, rows))      # DP = D padded to a power of two: zeros
    mask = (offs_m < N)[:, None] & (offs_d < D)[None, :]
    if HAS_ORDER:
        src = gl.load(ROWS + offs_m, mask=offs_m < N, other=0).to(gl.int64)
    else:
        src = offs_m
    x = gl.load(X + src[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if HAS_CENTER:
        c = gl.load(CENTER + offs_d, mask=offs_d < D, other=0.0)
        x = gl.where(mask, x - c[None, :], 0.0)
    if MODE == 1:
        x = x * gl.load(SCALES)
    xh = x.to(op_ty)
    xv = xh.to(gl.float32)
    x2 = gl.sum(xv * xv, axis=1)
    if MODE == 1:
        q = xv * xv * gl.load(SCALES + 1)
    else:
        q = xv * xv
    qh = q.to(op_ty)
    ql = (q - qh.to(gl.float32)).to(op_ty)
    if WRITE_X2:
        gl.store(X2 + offs_m, x2, mask=offs_m < N)
    if WRITE_COPY:
        cp = offs_m[:, None] * D + offs_d[None, :]
        gl.store(XO + cp, xh, mask=mask)
        gl.store(XQ + cp, qh, mask=mask)
        gl.store(XQL + cp, ql, mask=mask)
    if A_REG:       # the wgmma A operands in registers (half the shared-memory reads of the products)
        dot_a: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma, k_width=2)
        xh_s = gl.convert_layout(xh, dot_a)
        qh_s = gl.convert_layout(qh, dot_a)
        ql_s = gl.convert_layout(ql, dot_a)
    else:
        xh_s = gl.allocate_shared_memory(op_ty, [BLOCK_M, DP], op_layout, xh)
        qh_s = gl.allocate_shared_memory(op_ty, [BLOCK_M, DP], op_layout, qh)
        ql_s = gl.allocate_shared_memory(op_ty, [BLOCK_M, DP], op_layout, ql)

    m_i = gl.full([BLOCK_M], float("-inf"), gl.float32, gl.SliceLayout(1, mma))
    l_i = gl.zeros([BLOCK_M], gl.float32, gl.SliceLayout(1, mma))
    bits = gl.zeros([BLOCK_M], gl.int64, gl.SliceLayout(1, mma))
    bmax = gl.full([BLOCK_M, BLOCK_K], float("-inf"), gl.float32, mma)
    mbarrier.wait(bars.index(0), 0)
    acc = _issue_block(xh_s, qh_s, ql_s, a_s, alo_s, p_s, 0, _block_cst(cst_s, 0, mma), BLOCK_M, BLOCK_K, SPLIT_A,
                       mma)
    dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
    # Iteration j: refill the stage block j used, issue block j + 1's products, block j's log-sum-exp, wait. The
    # wait closes the iteration, so that the loop-carried tile is complete at the back edge (a carried accumulator
    # of products in flight is copied by plain moves there, and ptxas then serialises every wgmma). Measured on an
    # H100 against other orders: the refill after the issue, or the next block's constants carried, were slower.
    # The block index blk = (b0 + j) % num_kb is carried and wrapped without a division (v36).
    blk = b0
    for j in range(0, num_kb - 1):
        gl.thread_barrier()      # every warp is done with stage j % STAGES (block j, waited): refill it
        _load_block(a_desc, alo_desc, p_desc, cst_desc, bias_desc, coef_desc, a_s, alo_s, p_s, cst_s, bias_s, coef_s,
                    bars, j % STAGES, (j + STAGES) % CSLOTS, _wrap(blk + STAGES, num_kb) * BLOCK_K,
                    j + STAGES < num_kb, SPLIT_A)
        nxt = (j + 1) % STAGES
        mbarrier.wait(bars.index(nxt), ((j + 1) // STAGES) & 1)
        acc = _issue_block(xh_s, qh_s, ql_s, a_s, alo_s, p_s, nxt, _block_cst(cst_s, (j + 1) % CSLOTS, mma), BLOCK_M,
                           BLOCK_K, SPLIT_A, mma)
        bias, coef = _block_bias(bias_s, coef_s, j % CSLOTS, blk * BLOCK_K, K, EVEN_K, BLOCK_K, mma)
        m_i, l_i, bits, bmax = _lse_block(dist, blk, bias, coef, m_i, l_i, bits, bmax, WRITE_GAPS, ROW_BITS, SKIP,
                                          BLOCK_K, mma)
        dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        blk = _wrap(blk + 1, num_kb)
    bias, coef = _block_bias(bias_s, coef_s, (num_kb - 1) % CSLOTS, blk * BLOCK_K, K, EVEN_K, BLOCK_K, mma)
    m_i, l_i, bits, bmax = _lse_block(dist, blk, bias, coef, m_i, l_i, bits, bmax, WRITE_GAPS, ROW_BITS, SKIP,
                                      BLOCK_K, mma)
    for i in gl.static_range(STAGES):
        mbarrier.invalidate(bars.index(i))

    offs_r = pid.to(gl.int64) * BLOCK_M + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, mma))
    mask_r = offs_r < N
    logz = (m_i + gl.log2(l_i)) * _LN2
    if HAS_ORDER:
        src_r = gl.convert_layout(src, gl.SliceLayout(1, mma))
        gl.store(LOGZ + src_r, logz, mask=mask_r)
        gl.store(LZP + offs_r, logz, mask=mask_r)
    else:
        src_r = offs_r
        gl.store(LOGZ + offs_r, logz, mask=mask_r)
    if ROW_BITS:
        cols = gl.arange(0, BLOCK_K, layout=gl.SliceLayout(0, mma))
        one = gl.full([BLOCK_K], 1, gl.int64, gl.SliceLayout(0, mma)) << cols.to(gl.int64)
        rb = gl.sum(gl.where(bmax - m_i[:, None] >= -SKIP, one[None, :], 0), axis=1)
        gl.store(ROWBITS + src_r, rb.to(ROWBITS.dtype.element_ty), mask=mask_r)
    if WRITE_GAPS:      # rows past N keep bits 0
        gl.store(GAPS + pid, gl.reduce(gl.where(mask_r, bits, 0), 0, _or))


def supported(x, k, d) -> bool:
    """Whether :func:`launch_diag_logz` applies to diag rows x (n, d): a Hopper GPU (sm_90), 16 <= D <= 128 and a
    multiple of 8 (one tile of features padded to a power of two, 16-byte aligned parameter rows for the TMA), at
    most 64 component blocks of 64."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and 16 <= d <= 128 and d % 8 == 0
            and triton.cdiv(k, 64) <= 64)


_OPERAND_MODES = {torch.float16: (1, gl.float16), torch.bfloat16: (2, gl.bfloat16)}


def launch_diag_logz(x, params, k, center, skip, row_bits=None, x2=None, logz=None, order=None, lzp=None, copy=None,
                     gaps=None, block_m=64, stages=2, num_warps=4, a_reg=True):
    """Diag "tf32" or bf16 pass 1 without the argmax, as ``estep.launch_logz(x, params, k, True, precision,
    center=center, skip=skip, row_bits=row_bits, x2=x2, order=order, lzp=lzp, copy=copy, gaps=gaps)`` (which calls
    it on Hopper GPUs) and with the same outputs bit for bit: logZ (n,) float32 by row (a new tensor, or ``logz``),
    and filled in place when given: ``x2`` (n,) float32, ``lzp`` (n,) float32 and the operand copy
    ``copy = (xo, xq, xql)`` ((n, D) float16 each; "tf32" only) by position, ``row_bits`` (n,) int16/int32/int64 by row,
    ``gaps`` (cdiv(n, 64),) int64. x (n, D) float32 contiguous; params from ``estep.prepare`` (diag; "tf32" with A
    in two fp16 terms, or bf16: the precision follows the operands' dtype); order an ``estep.RowOrder``."""
    n, d = x.shape
    block_k = 64
    if params.a.dtype not in _OPERAND_MODES:
        raise ValueError(f"diag parameters of the fp16 (\"tf32\") or bf16 mode expected, got {params.a.dtype}")
    mode, op_ty = _OPERAND_MODES[params.a.dtype]
    if gaps is not None and block_m != 64:
        raise ValueError("gaps are per 64-row flag tile: block_m must be 64")
    if order is not None and lzp is None:
        raise ValueError("a row order needs lzp, the position-ordered logZ buffer")
    if copy is not None and mode != 1:
        raise ValueError("the operand copy is written by the \"tf32\" pass 1 only")
    logz = torch.empty(n, dtype=torch.float32, device=x.device) if logz is None else logz
    dp = max(16, triton.next_power_of_2(d))
    layout = gl.NVMMASharedLayout.get_default_for([block_k, dp], op_ty)
    descs = [TensorDescriptor.from_tensor(t, [block_k, dp], layout) for t in (params.a, params.a_lo, params.p)]
    c_layout = gl.NVMMASharedLayout.get_default_for([block_k], gl.float32)
    descs += [TensorDescriptor.from_tensor(t, [block_k], c_layout) for t in (params.cst, params.bias2, params.coef2)]
    rows, hint = order if order is not None else (logz, logz)
    xo, xq, xql = copy if copy is not None else (logz, logz, logz)
    grid = (triton.cdiv(n, block_m),)
    _diag_logz_kernel[grid](x, x if center is None else center, rows, hint, *descs, params.scales, logz,
                            logz if lzp is None else lzp, logz if x2 is None else x2, xo, xq, xql,
                            logz if gaps is None else gaps, logz if row_bits is None else row_bits, n, k,
                            D=d, DP=dp, HAS_CENTER=center is not None, HAS_ORDER=order is not None,
                            WRITE_X2=x2 is not None,
                            WRITE_COPY=copy is not None, WRITE_GAPS=gaps is not None, ROW_BITS=row_bits is not None,
                            SKIP=float(skip), MODE=mode, EVEN_K=k % block_k == 0, BLOCK_M=block_m,
                            BLOCK_K=block_k, STAGES=stages, A_REG=a_reg, num_warps=num_warps)
    return logz
