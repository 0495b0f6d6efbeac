"""Diag "tf32" sparse pass 2 on a transient row order, as a software-pipelined Gluon kernel for Hopper (sm_90).

The Triton pass 2 (:func:`kernels.estep._estep_stats_kernel` with SPARSE, HAS_ORDER, no operand copy) waits for
every one of its seven tensor-core products per 32-row sub-tile before it issues the next (``wgmma.wait_group 0``
after each), so a program's products, exponentials and row conversions never overlap: on a diag fit's state it
runs at ~30 % of the fp16 rate, ~3x its product and read floors (bench_ann/results/v28_estep_floors). v28's first
Gluon form (commit 9a8fffd) issued the products in two groups but was slower still (703 vs 522 us): it waited for
both groups in turn, passed two CTA barriers per sub-tile and loaded each sub-tile's rows after a chain of three
dependent global loads (work list, row index, row) that only one sub-tile of work covered.

Here (v39) iteration j of a program overlaps, within one warpgroup:

* the four logit products of sub-tile j + 1 (issued first) with the exponentials of sub-tile j;
* the three statistics products of sub-tile j with the next sub-tile's logZ load;

and waits once. The row operands are double-buffered in shared memory (sub-tile j + 2's are written into the buffer
sub-tile j used, once its products are done), and the loads run ahead: the float32 rows one sub-tile ahead of their
conversion, the row indices two, the work-list entries three, so that no load waits on another in the same
iteration. Nothing asynchronous crosses the loop's back edge (an accumulator in flight there makes ptxas serialise
the products; kernels/logz_gluon.py).

Same operands, products (in the same order) and partial sums as the Triton kernel, which stays the reference and the
only form that runs under ``TRITON_INTERPRET=1``: per (component block, slab) program, Nk (BLOCK_K,), Sx = R xh and
Sxx = R (ql + qh) ((BLOCK_K, D) each) over the kept (64-row tile, 64-component block) pairs of its share of the
block's work list. Not bitwise equal to it (the same products, but not the same instruction sequence).
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
def _base(WORK, wrow, j, j_hi, FLAG_ROWS: gl.constexpr, BLOCK_M: gl.constexpr):
    """Position of sub-tile j's first row: its work-list tile times FLAG_ROWS plus (j % SUBS) BLOCK_M (0 when
    j >= j_hi: a dead sub-tile, whose loads are masked)."""
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M
    t = gl.load(WORK + wrow + j // SUBS, mask=j < j_hi, other=0)
    return t.to(gl.int64) * FLAG_ROWS + (j % SUBS) * BLOCK_M


@gluon.jit
def _tile_of(WORK, wrow, j, j_hi, FLAG_ROWS: gl.constexpr, BLOCK_M: gl.constexpr):
    """Sub-tile j's work-list tile (0 when j >= j_hi), loaded ahead of :func:`_base_from_tile`."""
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M
    return gl.load(WORK + wrow + j // SUBS, mask=j < j_hi, other=0).to(gl.int64)


@gluon.jit
def _base_from_tile(t, j, FLAG_ROWS: gl.constexpr, BLOCK_M: gl.constexpr):
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M
    return t * FLAG_ROWS + (j % SUBS) * BLOCK_M


@gluon.jit
def _sources(ROWS, base, live, N, BLOCK_M: gl.constexpr, rows: gl.constexpr):
    """Source rows (BLOCK_M,) int32 of the positions from ``base`` (0 where masked: past N, or a dead sub-tile),
    and their mask, in the row tile's slice layout."""
    offs = base + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, rows))
    mask = (offs < N) & live
    return gl.load(ROWS + offs, mask=mask, other=0), mask


@gluon.jit
def _load_x(X, src, mask_m, D: gl.constexpr, DP: gl.constexpr, rows: gl.constexpr):
    """Float32 rows (BLOCK_M, DP) of X at ``src``, zeros past D and where ``mask_m`` is off."""
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, rows))
    mask = mask_m[:, None] & (offs_d < D)[None, :]
    return gl.load(X + src.to(gl.int64)[:, None] * D + offs_d[None, :], mask=mask, other=0.0)


@gluon.jit
def _load_lz(LZP, base, live, N, BLOCK_M: gl.constexpr, lz_layout: gl.constexpr):
    """log2(e) logZ (BLOCK_M,) of the positions from ``base``; +inf past N and for a dead sub-tile (r = 0)."""
    offs = base + gl.arange(0, BLOCK_M, layout=lz_layout)
    return gl.load(LZP + offs, mask=(offs < N) & live, other=float("inf")) * _LOG2E


@gluon.jit
def _store_operands(x, c, scale, sq_scale, xh_s, qh_s, ql_s, HAS_CENTER: gl.constexpr):
    """The row operands of a float32 tile into shared memory, as ``estep._row_operands`` (MODE 1, diag): x
    centred and scaled, xh = fp16(x), q = xh^2 sq_scale, qh = fp16(q), ql = fp16(q - qh). Masked rows (zeros)
    give finite operands; their logZ of +inf makes their r zero."""
    if HAS_CENTER:
        x = x - c[None, :]
    x = x * scale
    xh = x.to(gl.float16)
    xv = xh.to(gl.float32)
    q = xv * xv * sq_scale
    qh = q.to(gl.float16)
    ql = (q - qh.to(gl.float32)).to(gl.float16)
    xh_s.store(xh)
    qh_s.store(qh)
    ql_s.store(ql)


@gluon.jit
def _issue_logits(a_s, alo_s, p_s, xh_s, qh_s, ql_s, cst, BLOCK_K: gl.constexpr, BLOCK_M: gl.constexpr,
                  mma_l: gl.constexpr):
    """Issues (asynchronously) one sub-tile's logits (BLOCK_K, BLOCK_M): cst + ql . P + qh . P + xh . A_lo + xh . A
    (``estep._stats_tile``'s order)."""
    acc = gl.broadcast(cst[:, None], gl.zeros([BLOCK_K, BLOCK_M], gl.float32, mma_l))[0]
    acc = warpgroup_mma(p_s, ql_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(p_s, qh_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(alo_s, xh_s.permute((1, 0)), acc, is_async=True)
    acc = warpgroup_mma(a_s, xh_s.permute((1, 0)), acc, is_async=True)
    return acc


@gluon.jit(do_not_specialize=["N", "WSTRIDE"])
def _diag_stats_kernel(
    X, CENTER, ROWS, LZP, SCALES, a_desc, alo_desc, p_desc, BIAS2, COEF2, CST, WORK, COUNTS, WSTRIDE, ORDER,
    NK_PART, SX_PART, SQ_PART, N, K, N_SLABS,
    D: gl.constexpr, DP: gl.constexpr, HAS_CENTER: gl.constexpr, HAS_ORDER: gl.constexpr, FLAG_ROWS: gl.constexpr,
    BLOCK_M: gl.constexpr, BLOCK_K: gl.constexpr, num_warps: gl.constexpr,
):
    rows: gl.constexpr = gl.BlockedLayout([1, 4], [1, 32], [num_warps, 1], [1, 0])
    mma_l: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, BLOCK_M, 16])      # logits (BLOCK_K, BLOCK_M)
    mma_s: gl.constexpr = gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[num_warps, 1],
                                                    instr_shape=[16, DP, 16])           # statistics (BLOCK_K, DP)
    dot_r: gl.constexpr = gl.DotOperandLayout(operand_index=0, parent=mma_s, k_width=2)
    op_layout: gl.constexpr = gl.NVMMASharedLayout(swizzle_byte_width=128, element_bitwidth=16, rank=2)
    lz_layout: gl.constexpr = gl.SliceLayout(0, mma_l)
    SUBS: gl.constexpr = FLAG_ROWS // BLOCK_M

    pid = gl.program_id(0)
    num_kb = gl.cdiv(K, BLOCK_K)
    if HAS_ORDER:     # the blocks' programs in ORDER (longest work lists first), a block's slabs side by side
        pid_k = gl.load(ORDER + pid // N_SLABS)
        pid_s = pid % N_SLABS
    else:
        pid_k = pid % num_kb
        pid_s = pid // num_kb
    k0 = pid_k * BLOCK_K
    cnt = gl.load(COUNTS + pid_k)
    j_lo = ((pid_s * cnt) // N_SLABS) * SUBS
    j_hi = (((pid_s + 1) * cnt) // N_SLABS) * SUBS
    wrow = pid_k.to(gl.int64) * WSTRIDE

    # the block's parameter tiles: one TMA load (zeros past D and past K)
    a_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    alo_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    p_s = gl.allocate_shared_memory(gl.float16, [BLOCK_K, DP], a_desc.layout)
    bar = gl.allocate_shared_memory(gl.int64, [1, 1], mbarrier.MBarrierLayout())
    mbarrier.init(bar.index(0), count=1)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.expect(bar.index(0), 3 * a_desc.block_type.nbytes)
    tma.async_copy_global_to_shared(a_desc, [k0, 0], bar.index(0), a_s)
    tma.async_copy_global_to_shared(alo_desc, [k0, 0], bar.index(0), alo_s)
    tma.async_copy_global_to_shared(p_desc, [k0, 0], bar.index(0), p_s)

    offs_k = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma_l))
    mask_k = offs_k < K
    bias = gl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))     # invalid components: r = 0
    coef = gl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
    cst = gl.load(CST + offs_k, mask=mask_k, other=0.0)
    offs_d = gl.arange(0, DP, layout=gl.SliceLayout(0, rows))
    c = gl.load(CENTER + offs_d, mask=offs_d < D, other=0.0)
    scale = gl.load(SCALES)
    sq_scale = gl.load(SCALES + 1)

    # double-buffered row operands: sub-tile j's in buffer j % 2
    xh_b = gl.allocate_shared_memory(gl.float16, [2, BLOCK_M, DP], op_layout)
    qh_b = gl.allocate_shared_memory(gl.float16, [2, BLOCK_M, DP], op_layout)
    ql_b = gl.allocate_shared_memory(gl.float16, [2, BLOCK_M, DP], op_layout)

    # prologue: sub-tiles j_lo and j_lo + 1 converted into their buffers, j_lo + 2's rows and j_lo + 3's row
    # indices loading, j_lo + 4's work-list tile loading, j_lo's logZ, j_lo's logits
    b0 = _base(WORK, wrow, j_lo, j_hi, FLAG_ROWS, BLOCK_M)
    b1 = _base(WORK, wrow, j_lo + 1, j_hi, FLAG_ROWS, BLOCK_M)
    b2 = _base(WORK, wrow, j_lo + 2, j_hi, FLAG_ROWS, BLOCK_M)
    b3 = _base(WORK, wrow, j_lo + 3, j_hi, FLAG_ROWS, BLOCK_M)
    t4 = _tile_of(WORK, wrow, j_lo + 4, j_hi, FLAG_ROWS, BLOCK_M)
    src, m = _sources(ROWS, b0, j_lo < j_hi, N, BLOCK_M, rows)
    x0 = _load_x(X, src, m, D, DP, rows)
    src, m = _sources(ROWS, b1, j_lo + 1 < j_hi, N, BLOCK_M, rows)
    x1 = _load_x(X, src, m, D, DP, rows)
    src, m = _sources(ROWS, b2, j_lo + 2 < j_hi, N, BLOCK_M, rows)
    x_nx = _load_x(X, src, m, D, DP, rows)
    src3, m3 = _sources(ROWS, b3, j_lo + 3 < j_hi, N, BLOCK_M, rows)
    lz = _load_lz(LZP, b0, j_lo < j_hi, N, BLOCK_M, lz_layout)
    _store_operands(x0, c, scale, sq_scale, xh_b.index(j_lo % 2), qh_b.index(j_lo % 2), ql_b.index(j_lo % 2),
                    HAS_CENTER)
    _store_operands(x1, c, scale, sq_scale, xh_b.index((j_lo + 1) % 2), qh_b.index((j_lo + 1) % 2),
                    ql_b.index((j_lo + 1) % 2), HAS_CENTER)
    fence_async_shared()
    gl.thread_barrier()
    mbarrier.wait(bar.index(0), 0)
    acc = _issue_logits(a_s, alo_s, p_s, xh_b.index(j_lo % 2), qh_b.index(j_lo % 2), ql_b.index(j_lo % 2), cst,
                        BLOCK_K, BLOCK_M, mma_l)
    dist = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))

    acc_nk = gl.zeros([BLOCK_K], gl.float32, gl.SliceLayout(1, mma_l))
    acc_sx = gl.zeros([BLOCK_K, DP], gl.float32, mma_s)
    acc_sq = gl.zeros([BLOCK_K, DP], gl.float32, mma_s)
    bb1 = b1
    bb2 = b2
    bb3 = b3
    for j in range(j_lo, j_hi):
        cur = j % 2
        nxt = 1 - cur
        # the logits of sub-tile j + 1 on the tensor cores while sub-tile j's exponentials run
        acc = _issue_logits(a_s, alo_s, p_s, xh_b.index(nxt), qh_b.index(nxt), ql_b.index(nxt), cst, BLOCK_K,
                            BLOCK_M, mma_l)
        r = gl.exp2(bias[:, None] + coef[:, None] * dist - lz[None, :])
        acc_nk += gl.sum(r, axis=1)
        ro = gl.convert_layout(r.to(gl.float16), dot_r)
        # sub-tile j's statistics, then sub-tile j + 1's logZ while they run
        acc_sx = warpgroup_mma(ro, xh_b.index(cur), acc_sx, is_async=True)
        acc_sq = warpgroup_mma(ro, ql_b.index(cur), acc_sq, is_async=True)
        acc_sq = warpgroup_mma(ro, qh_b.index(cur), acc_sq, is_async=True)
        lz = _load_lz(LZP, bb1, j + 1 < j_hi, N, BLOCK_M, lz_layout)
        dist, acc_sx, acc_sq = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc_sx, acc_sq))
        gl.thread_barrier()      # every warp is past the wait: buffer cur is free
        _store_operands(x_nx, c, scale, sq_scale, xh_b.index(cur), qh_b.index(cur), ql_b.index(cur), HAS_CENTER)
        fence_async_shared()
        gl.thread_barrier()
        # loads ahead: rows of j + 3, row indices of j + 4, work-list tile of j + 5
        x_nx = _load_x(X, src3, m3, D, DP, rows)
        bb4 = _base_from_tile(t4, j + 4, FLAG_ROWS, BLOCK_M)
        src3, m3 = _sources(ROWS, bb4, j + 4 < j_hi, N, BLOCK_M, rows)
        t4 = _tile_of(WORK, wrow, j + 5, j_hi, FLAG_ROWS, BLOCK_M)
        bb1 = bb2
        bb2 = bb3
        bb3 = bb4
    mbarrier.invalidate(bar.index(0))

    base = pid_s.to(gl.int64) * K
    gl.store(NK_PART + base + offs_k, acc_nk, mask=mask_k)
    offs_ks = k0 + gl.arange(0, BLOCK_K, layout=gl.SliceLayout(1, mma_s))
    offs_do = gl.arange(0, DP, layout=gl.SliceLayout(0, mma_s))
    out = (base + offs_ks)[:, None] * D + offs_do[None, :]
    omask = (offs_ks < K)[:, None] & (offs_do < D)[None, :]
    gl.store(SX_PART + out, acc_sx, mask=omask)
    gl.store(SQ_PART + out, acc_sq, mask=omask)


def supported(x, k, d) -> bool:
    """Whether :func:`launch_diag_stats` applies: a Hopper GPU (sm_90), 64 <= D <= 128 and a multiple of 8 (rows
    of at least 128 bytes in fp16 for the 128-byte swizzle of the row operands, 16-byte aligned parameter rows for
    the TMA), at most 64 component blocks of 64."""
    return (x.is_cuda and torch.cuda.get_device_capability(x.device)[0] == 9 and 64 <= d <= 128 and d % 8 == 0
            and triton.cdiv(k, 64) <= 64)


def launch_diag_stats(x, center, rows, lzp, params, work, counts, nk_part, sx_part, sq_part, k, slabs,
                      flag_rows=64, block_m=32, num_warps=4, block_order=None):
    """The sparse diag "tf32" pass 2 on a row order, as ``estep``'s ``_estep_stats_kernel`` launch with SPARSE,
    HAS_ORDER and no operand copy, into the same partials: x (n, D) float32, center (D,) float32 or None, rows (n,)
    int32 (position -> row), lzp (n,) float32 logZ by position, params from ``estep.prepare`` (diag, "tf32"), work
    (n_blocks, WSTRIDE) int32 and counts (n_blocks,) int32 from ``estep._work_lists``; fills nk_part (slabs, K),
    sx_part and sq_part (slabs, K, D) float32."""
    n, d = x.shape
    block_k = 64
    if flag_rows % block_m:
        raise ValueError(f"block_m={block_m} must divide the flag tile's {flag_rows} rows")
    if params.a.dtype != torch.float16:
        raise ValueError(f"diag \"tf32\" parameters (fp16 operands) expected, got {params.a.dtype}")
    dp = max(16, triton.next_power_of_2(d))
    layout = gl.NVMMASharedLayout.get_default_for([block_k, dp], gl.float16)
    descs = [TensorDescriptor.from_tensor(t, [block_k, dp], layout) for t in (params.a, params.a_lo, params.p)]
    grid = (triton.cdiv(k, block_k) * slabs,)
    _diag_stats_kernel[grid](x, x if center is None else center, rows, lzp, params.scales, *descs, params.bias2,
                             params.coef2, params.cst, work, counts, work.shape[-1],
                             counts if block_order is None else block_order, nk_part, sx_part, sq_part,
                             n, k, slabs, D=d, DP=dp, HAS_CENTER=center is not None, HAS_ORDER=block_order is not None,
                             FLAG_ROWS=flag_rows, BLOCK_M=block_m, BLOCK_K=block_k, num_warps=num_warps)
