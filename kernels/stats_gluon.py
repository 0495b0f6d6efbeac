"""Diag "tf32" sparse pass 2 on a transient row order, as a Gluon kernel for Hopper (sm_90).

The Triton pass 2 (:func:`kernels.estep._estep_stats_kernel`, SPARSE, HAS_ORDER, no operand copy) holds its
component block's three parameter tiles and both (64, D) accumulators in registers: 255 registers with spills, about
two programs per SM, and each program handles its row tiles strictly one after another (gather, convert, 4 products,
exponentials, 3 products). On a diag fit's state it runs at 30 % of the fp16 tensor-core rate, 3x the read floor of
the rows it gathers (bench_ann/results/v28_estep_floors). Here the parameter tiles sit in shared memory (one TMA
load per program), the row operands go through shared memory as the wgmma B operand, and the next tile's float32
rows and logZ are loaded into registers while the current tile's products run.

Same operands, products (in the same order) and outputs as the Triton kernel, which stays the reference and the only
form that runs under ``TRITON_INTERPRET=1``: per (component block, slab) program, the partial sums Nk (BLOCK_K,),
Sx = R xh and Sxx = R (ql + qh) ((BLOCK_K, D) each) of the kept (64-row tile, 64-component block) pairs in its share
of the block's work list.
"""
from __future__ import annotations

import torch
import triton
from triton.experimental import gluon
from triton.experimental.gluon import language as gl
from triton.experimental.gluon.language.nvidia.hopper import (fence_async_shared, mbarrier, tma, warpgroup_mma,
                                                               warpgroup_mma_wait)
from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

_LOG2E = gl.constexpr(1.4426950408889634)


@gluon.jit
def _load_tile(X, CENTER, ROWS, LZP, WORK, SCALES, j, j_hi, pid_k, WSTRIDE, N, D: gl.constexpr, DP: gl.constexpr,
               HAS_CENTER: gl.constexpr, FLAG_ROWS: gl.constexpr, BLOCK_M: gl.constexpr, rows: gl.constexpr,
               lz_layout: gl.constexpr):
    """Sub-tile j of the program's work (tile WORK[block, j // SUBS], rows (j % SUBS) * BLOCK_M onwards): its
    float32 rows (BLOCK_M, DP), centred and scaled (zeros past D, for positions past N, and when j >= j_hi), and
    log2(e) logZ (BLOCK_M,) (+inf there: r = 0)."""
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M
    live = j < j_hi
    t = gl.load(WORK + pid_k.to(gl.int64) * WSTRIDE + j // SUBS, mask=live, other=0).to(gl.int64)
    m0 = t * FLAG_ROWS + (j % SUBS) * BLOCK_M
    offs_m = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows))
    mask_m = (offs_m < N) & live
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, rows))
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    src = gl.load(ROWS + offs_m, mask=mask_m, other=0).to(gl.int64)
    x = gl.load(X + src[:, None] * D + offs_d[None, :], mask=mask, other=0.0)
    if HAS_CENTER:
        c = gl.load(CENTER + offs_d, mask=offs_d < D, other=0.0)
        x = gl.where(mask, x - c[None, :], 0.0)
    x = x * gl.load(SCALES)
    offs_l = m0 + gl.arange(0, BLOCK_M, layout=lz_layout)
    lz2 = gl.load(LZP + offs_l, mask=(offs_l < N) & live, other=float("inf")) * _LOG2E
    return x, lz2


@gluon.jit
def _store_operands(x, SCALES, xh_s, qh_s, ql_s):
    """The row operands of a scaled float32 tile into shared memory, as ``estep._row_operands`` (MODE 1, diag):
    xh = fp16(x), q = xh^2 * sq_scale, qh = fp16(q), ql = fp16(q - qh)."""
    xh = x.to(gl.float16)
    xv = xh.to(gl.float32)
    q = xv * xv * gl.load(SCALES + 1)
    qh = q.to(gl.float16)
    ql = (q - qh.to(gl.float32)).to(gl.float16)
    xh_s.store(xh)
    qh_s.store(qh)
    ql_s.store(ql)


@gluon.jit(do_not_specialize=["N", "WSTRIDE"])
def _diag_stats_kernel(
    X, CENTER, ROWS, LZP, SCALES, a_desc, alo_desc, p_desc, BIAS2, COEF2, CST, WORK, COUNTS, WSTRIDE,
    NK_PART, SX_PART, SQ_PART, N, K, N_SLABS,
    D: gl.constexpr, DP: gl.constexpr, HAS_CENTER: gl.constexpr, FLAG_ROWS: gl.constexpr, BLOCK_M: gl.constexpr,
    BLOCK_K: gl.constexpr, num_warps: gl.constexpr,
):
    rows: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_M, 16])      # logits (BLOCK_K, BLOCK_M)
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, DP, 16])           # statistics (BLOCK_K, DP)
    dot_r: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=2)
    op_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M

    pid = gl.program_id(0)
    num_kb = gl.cdiv(K, BLOCK_K)
    pid_k = pid % num_kb
    pid_s = pid // num_kb
    k0 = pid_k * BLOCK_K
    cnt = gl.load(COUNTS + pid_k)
    j_lo = ((pid_s * cnt) // N_SLABS) * SUBS
    j_hi = (((pid_s + 1) * cnt) // N_SLABS) * SUBS

    # the block's parameter tiles: one TMA load (zeros past D and past K)
    a_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    alo_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    fence_async_shared()
    mbarrier.expect(bar.index(0), 3 * a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [k0, 0], bar.index(0), a_s)
    tma.async_copy_global_to_shared(alo_desc, [k0, 0], bar.index(0), alo_s)
    tma.async_copy_global_to_shared(p_desc, [k0, 0], bar.index(0), p_s)

    offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma_l))
    mask_k = offs_k < K
    bias = gl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))     # invalid components: r = 0
    coef = gl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
    cst = gl.load(CST + offs_k, mask=mask_k, other=0.0)

    xh_s = gl.allocate_shared_memory(gl.float16, [BLOCK_M, DP], op_layout)
    qh_s = gl.allocate_shared_memory(gl.float16, [BLOCK_M, DP], op_layout)
    ql_s = gl.allocate_shared_memory(gl.float16, [BLOCK_M, DP], op_layout)
    lz_layout: gl.constexpr = gl.SliceLayout(0, mma_l)

    acc_nk = gl.zeros([BLOCK_K], gl.float32, gl.SliceLayout(1, mma_l))
    acc_sx = gl.zeros([BLOCK_K, DP], gl.float32, mma_s)
    acc_sq = gl.zeros([BLOCK_K, DP], gl.float32, mma_s)

    x, lz2 = _load_tile(X, CENTER, ROWS, LZP, WORK, SCALES, j_lo, j_hi, pid_k, WSTRIDE, N, D, DP, HAS_CENTER,
                        FLAG_ROWS, BLOCK_M, rows, lz_layout)
    _store_operands(x, SCALES, xh_s, qh_s, ql_s)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bar.index(0), 0)
    for j in range(j_lo, j_hi):
        # the next sub-tile's rows and logZ: in flight while this one's products run
        x_nx, lz2_nx = _load_tile(X, CENTER, ROWS, LZP, WORK, SCALES, j + 1, j_hi, pid_k, WSTRIDE, N, D, DP,
                                  HAS_CENTER, FLAG_ROWS, BLOCK_M, rows, lz_layout)
        # logits (BLOCK_K, BLOCK_M): cst + ql . P + qh . P + xh . A_lo + xh . A (estep._stats_tile's order)
        acc = gl.zeros([BLOCK_K, BLOCK_M], gl.float32, mma_l) + cst[:, None]
        acc = warpgroup_mma(p_s, ql_s.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(p_s, qh_s.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(alo_s, xh_s.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma(a_s, xh_s.permute((1, 0)), acc, is_async=True)
        acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
        r = gl.exp2(bias[:, None] + coef[:, None] * acc - lz2[None, :])
        acc_nk += gl.sum(r, axis=1)
        ro = gl.convert_layout(r.to(gl.float16), dot_r)
        acc_sx = warpgroup_mma(ro, xh_s, acc_sx, is_async=True)
        acc_sq = warpgroup_mma(ro, ql_s, acc_sq, is_async=True)
        acc_sq = warpgroup_mma(ro, qh_s, acc_sq, is_async=True)
        acc_sx, acc_sq = warpgroup_mma_wait(num_outstanding=0, deps=(acc_sx, acc_sq))
        gl.thread_barrier()      # every warp is past the wait: the products have read the operands
        _store_operands(x_nx, SCALES, xh_s, qh_s, ql_s)
        lz2 = lz2_nx
        fence_async_shared()
        gl.thread_barrier()
    mbarrier.invalidate(bar.index(0))

    base = pid_s.to(gl.int64) * K
    gl.store(NK_PART + base + offs_k, acc_nk, mask=mask_k)
    offs_ks = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma_s))
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, mma_s))
    out = (base + offs_ks)[:, None] * D + offs_d[None, :]
    omask = (offs_ks < K)[:, None] & (offs_d < D)[None, :]
    gl.store(SX_PART + out, acc_sx, mask=omask)
    gl.store(SQ_PART + out, acc_sq, mask=omask)


def supported(x, k, d) -> bool:
    """Whether :func:`launch_diag_stats` applies: a Hopper GPU (sm_90), 64 <= D <= 128 and a multiple of 8 (rows
    of at least 128 bytes in fp16 for the 128-byte swizzle of the row operands, 16-byte aligned parameter rows for
    the TMA), at most 64 component blocks of 64."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and 64 <= d <= 128 and d % 8 == 0
            and triton.cdiv(k, 64) <= 64)


def launch_diag_stats(x, center, rows, lzp, params, work, counts, nk_part, sx_part, sq_part, k, slabs,
                      flag_rows=64, block_m=32, num_warps=4):
    """The sparse diag "tf32" pass 2 on a row order, as ``estep``'s ``_estep_stats_kernel`` launch with SPARSE,
    HAS_ORDER and no operand copy, into the same partials: x (n, D) float32, center (D,) float32 or None, rows (n,)
    int32 (position -> row), lzp (n,) float32 logZ by position, params from ``estep.prepare`` (diag, "tf32"), work
    (n_blocks, WSTRIDE) int32 and counts (n_blocks,) int32 from ``estep._work_lists``; fills nk_part (slabs, K),
    sx_part and sq_part (slabs, K, D) float32."""
    n, d = x.shape
    block_k = 64
    if flag_rows % block_m:
        raise ValueError(f"block_m={block_m} must divide the flag tile's {flag_rows} rows")
    dp = max(16, triton.next_power_of_2(d))
    layout = gl.NVMMASharedLayout.get_default_for([block_k, dp], gl.float16)
    descs = [TensorDescriptor.from_tensor(t, [block_k, dp], layout) for t in (params.a, params.a_lo, params.p)]
    grid = (triton.cdiv(k, block_k) * slabs,)
    _diag_stats_kernel[grid](x, x if center is None else center, rows, lzp, params.scales, *descs, params.bias2,
                             params.coef2, params.cst, work, counts, work.shape[-1], nk_part, sx_part, sq_part, n, k,
                             slabs, D=d, DP=dp, HAS_CENTER=center is not None, FLAG_ROWS=flag_rows, BLOCK_M=block_m,
                             BLOCK_K=block_k, num_warps=num_warps)
