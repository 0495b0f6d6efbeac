"""Screened pass 1 of the diag E-step on a transient row order: cheap bounds first, exact logZ on the kept pairs.

What it computes
----------------
The first half of ``estep(sort_rows=True)`` for diag covariances in the 16-bit modes ("tf32", "bf16"), with the
same outputs as the unscreened :func:`.estep.transient_order`: per row the log-normaliser logZ and the argmax,
the order that sorts the rows by argmax, and that order's per-tile block bits (the sparse pass 2's work).

Why: the exact diag logits cost four 16-bit products per (row, component) pair in "tf32" (the squares and A each
as two fp16 terms, ``estep.DIAG_SPLIT_A``) and three in "bf16", against one for spherical. The unscreened pass 1
runs them, plus the exponentials, on every pair, although the sparse pass 2 then keeps ~13-16 % of the pairs.
Here:

1. ``_screen_kernel`` (every pair, rows in their own order): the logits with the two large products only,
   ``s^ = bias + coef (cst + qh . P + xh . A)``, and a rigorous bound of what they leave out, ``|s - s^| <= eps``
   with ``eps_ik = u_i V_k + w_i Z_k + C_k`` (Cauchy-Schwarz: ``|ql . P_k| <= ||ql_i|| ||P_k||`` and
   ``|xh . A_lo,k| <= ||xh_i|| ||A_lo,k||``, plus a 2^-15 relative slack for the fp32 accumulation of every
   term, see :func:`screen_bounds`). No exponentials. Per row it keeps each block's largest upper bound
   ``max (s^ + eps)`` in a register tile and the lower bound of the row maximum ``max (s^ - eps)``, and writes the
   row's block bits (every block whose upper bound is within SKIP of that lower bound: a superset of the exact
   bits of :func:`.estep._final_row_bits`) and the argmax of ``s^``;
2. the rows are sorted by that argmax and the tile bits formed (:func:`.estep.tile_bits`);
3. ``_sparse_logz_kernel`` (one program per FLAG_ROWS-row tile of the order): the exact logits (all products, as
   :func:`.estep._component_logits`) and the online log-sum-exp over the tile's kept blocks only; it writes
   logZ by row and by position (pass 2's input) and the exact argmax.

logZ then sums the kept blocks' terms only: every dropped term is below 2^-SKIP of the row's maximum (the same
terms the sparse pass 2 drops), so logZ is low by at most ``K 2^-SKIP`` relative (6e-5 at K=1024 in "tf32", far
less in practice) and the kept responsibilities of a row sum to one.

Cost model (N=1e6, K=1024, D=128, "tf32"): the screen runs 2 of the 4 products on every pair; the exact pass 4
on the kept ~15 %: about 2.6 products per pair instead of 4, and exponentials on the kept pairs only.

Caveats: diag and modes 1, 2 only (:func:`screens`); K <= 64 FLAG_K. Under a collapsed variance the bounds grow
(``||P_k||`` is large) and more blocks are kept: slower, never wrong. Reference: the unscreened
:func:`.estep.transient_order` (tests compare the bits, logZ and the statistics).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .estep import (_SMEM_BUDGET, _COPY_MODES, _MODES, FLAG_K, FLAG_ROWS, LN2, SKIP_LOG2, Params, _bit_or, _component_logits, _dot,
                    _final_row_bits, _indexed, _interpret, _load_rows, _lse_update, _row_block, _row_operands, _split_a, tile_bits)

# relative slack for the fp32 accumulation of each term (both the screen's and the exact pass's sums round at
# ~2^-24 per addition; D <= 256 additions stay far below 2^-15 of the terms' magnitude)
_SLACK = tl.constexpr(2.0 ** -15)
SLACK = 2.0 ** -15
# module switch (read at each call) for A/B runs: False restores the unscreened transient order for diag
SCREEN_DIAG = True


def screens(mode: int, diag: bool) -> bool:
    """Whether the transient order of this E-step is screened (diag, "tf32" or "bf16")."""
    return bool(SCREEN_DIAG and diag and mode in _COPY_MODES)


@triton.jit
def _screen_bounds_kernel(A, A_LO, P, BIAS2, COEF2, CST, OUT, K, NB, D: tl.constexpr, BLOCK_K: tl.constexpr,
                          BLOCK_D: tl.constexpr, SPLIT_A: tl.constexpr):
    # program b: the largest of each factor over component block b (BLOCK_K = FLAG_K components)
    offs_k = tl.program_id(0) * BLOCK_K + tl.arange(0, BLOCK_K)
    mask_k = offs_k < K
    offs_d = tl.arange(0, BLOCK_D)
    m2 = mask_k[:, None] & (offs_d < D)[None, :]
    ptrs = offs_k[:, None] * D + offs_d[None, :]
    p = tl.load(P + ptrs, mask=m2, other=0.0).to(tl.float32)
    a = tl.load(A + ptrs, mask=m2, other=0.0).to(tl.float32)
    pn = tl.sqrt(tl.sum(p * p, 1))
    an = tl.sqrt(tl.sum(a * a, 1))
    if SPLIT_A:
        al = tl.load(A_LO + ptrs, mask=m2, other=0.0).to(tl.float32)
        aln = tl.sqrt(tl.sum(al * al, 1))
    else:
        aln = tl.zeros([BLOCK_K], tl.float32)
    c = tl.abs(tl.load(COEF2 + offs_k, mask=mask_k, other=0.0))
    bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=0.0)
    bias = tl.where(tl.abs(bias) < float("inf"), tl.abs(bias), 0.0)     # a zero weight: logits -inf, no slack
    cst = tl.abs(tl.load(CST + offs_k, mask=mask_k, other=0.0))
    b = tl.program_id(0)
    tl.store(OUT + b, tl.max(c * pn, 0))
    tl.store(OUT + NB + b, tl.max(c * (aln + _SLACK * (an + aln)), 0))
    tl.store(OUT + 2 * NB + b, tl.max((c * cst + bias) * _SLACK, 0))


def screen_bounds(params: Params, k: int, mode: int) -> torch.Tensor:
    """(3, n_blocks) float32 factors of the screen's bound ``eps_ib = u_i V_b + w_i Z_b + C_b`` (base-2 logit
    units) per FLAG_K-component block b (kernel order), the largest over the block of ``V_k = |coef| ||P~_k||``,
    ``Z_k = |coef| (||A_lo,k|| + 2^-15 (||A~_k|| + ||A_lo,k||))`` and ``C_k = 2^-15 (|coef cst_k| + |bias_k|)``;
    the kernel's row factors are ``u_i = (1 + 2^-14) ||ql_i|| + 2^-15 ||qh_i||`` and ``w_i = ||xh_i||``. One
    launch, O(K D)."""
    d = params.a.shape[1]
    nb = triton.cdiv(k, FLAG_K)
    out = torch.empty((3, nb), dtype=torch.float32, device=params.a.device)
    _screen_bounds_kernel[(nb,)](params.a, params.a_lo, params.p, params.bias2, params.coef2, params.cst, out, k, nb,
                                 D=d, BLOCK_K=FLAG_K, BLOCK_D=max(16, triton.next_power_of_2(d)),
                                 SPLIT_A=_split_a(mode, True), num_warps=4)
    return out


@triton.jit
def _screen_logits(xh, qh, A, P, BIAS2, COEF2, CST, offs_k, mask_k, offs_d, mask_d, D: tl.constexpr,
                   MODE: tl.constexpr, EMU: tl.constexpr, EVEN_K: tl.constexpr):
    """Base-2 logits of the two large products (BM, BK) of one component block."""
    t_ptrs = offs_d[:, None] + offs_k[None, :] * D
    if EVEN_K:
        t_mask = mask_d[:, None]
        bias = tl.load(BIAS2 + offs_k)
        coef = tl.load(COEF2 + offs_k)
        cst = tl.load(CST + offs_k)
    else:
        t_mask = mask_d[:, None] & mask_k[None, :]
        bias = tl.load(BIAS2 + offs_k, mask=mask_k, other=float("-inf"))
        coef = tl.load(COEF2 + offs_k, mask=mask_k, other=0.0)
        cst = tl.load(CST + offs_k, mask=mask_k, other=0.0)
    p_t = tl.load(P + t_ptrs, mask=t_mask, other=0.0)
    a_t = tl.load(A + t_ptrs, mask=t_mask, other=0.0)
    acc = tl.zeros([xh.shape[0], p_t.shape[1]], tl.float32) + cst[None, :]
    acc = _dot(qh, p_t, acc, MODE, EMU)
    acc = _dot(xh, a_t, acc, MODE, EMU)
    return bias[None, :] + coef[None, :] * acc


@triton.jit
def _screen_update(s, BOUNDS, NB, u, w, j, m_lo, s_best, best, bmax, BLOCK_K: tl.constexpr, NB_PAD: tl.constexpr):
    """Block j: argmax of s^ (ties: the first), the lower bound of the row maximum (max s^ - eps), the block's
    upper bound (max s^ + eps) with the block's eps per row (BM,): one row reduction per element."""
    eps = u * tl.load(BOUNDS + j) + w * tl.load(BOUNDS + NB + j) + tl.load(BOUNDS + 2 * NB + j)
    s_max, s_arg = tl.max(s, axis=1, return_indices=True)
    best = tl.where(s_max > s_best, s_arg + j * BLOCK_K, best)
    s_best = tl.maximum(s_best, s_max)
    m_lo = tl.maximum(m_lo, s_max - eps)
    cols = tl.arange(0, NB_PAD)
    bmax = tl.where(cols[None, :] == j, (s_max + eps)[:, None], bmax)
    return m_lo, s_best, best, bmax


def _screen_configs():
    if _interpret():
        return [triton.Config({"BLOCK_M": 2 * FLAG_ROWS, "BLOCK_K": FLAG_K}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": bm, "BLOCK_K": FLAG_K}, num_warps=w, num_stages=s)
            for bm, w, s in ((64, 4, 2), (64, 4, 3), (128, 8, 2), (128, 8, 3), (128, 4, 3), (256, 8, 2))]


def _prune_screen(configs, named_args, **kwargs):
    # two row tiles (xh, qh) and two parameter tiles per stage (P, A) in 16-bit operands; every program streams
    # all K D parameters, so its rows (BLOCK_M) set the L2 traffic: 256-row programs halve it
    named_args = {**named_args, **kwargs}
    bd = triton.next_power_of_2(named_args["D"])
    keep = [c for c in configs
            if 2 * c.kwargs["BLOCK_M"] * bd * 2 + c.num_stages * 2 * c.kwargs["BLOCK_K"] * bd * 2 <= _SMEM_BUDGET
            and c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_K"] <= 64 * 32 * c.num_warps]
    return keep or configs[:1]


@triton.autotune(configs=_screen_configs(), key=["K", "D", "MODE"], prune_configs_by={"early_config_prune": _prune_screen})
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _screen_kernel(
    X, CENTER, A, P, BIAS2, COEF2, CST, SCALES, BOUNDS, BEST, ROWBITS, N, K,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CENTER: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    SKIP: tl.constexpr, NB_PAD: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # rows in their own order; BEST[row] = argmax of s^, ROWBITS[row] = blocks whose upper bound is within SKIP of
    # the lower bound of the row maximum. Software-pipelined as the unscreened pass 1 (the product of block j + 1
    # is issued before block j's reductions).
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    x = _load_rows(X, CENTER, offs_m, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, _xl, qh, ql, x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), True, MODE, EMU)
    qhf = qh.to(tl.float32)
    qlf = ql.to(tl.float32)
    u = (1.0 + 2.0 * _SLACK) * tl.sqrt(tl.sum(qlf * qlf, axis=1)) + _SLACK * tl.sqrt(tl.sum(qhf * qhf, axis=1))
    w = tl.sqrt(x2)                   # ||xh||: x2 is formed from the rounded rows in the 16-bit modes
    num_kb = tl.cdiv(K, BLOCK_K)
    m_lo = tl.full([BLOCK_M], float("-inf"), tl.float32)
    s_best = tl.full([BLOCK_M], float("-inf"), tl.float32)
    best = tl.zeros([BLOCK_M], tl.int32)
    bmax = tl.full([BLOCK_M, NB_PAD], float("-inf"), tl.float32)
    offs_k = tl.arange(0, BLOCK_K)
    s_nxt = _screen_logits(xh, qh, A, P, BIAS2, COEF2, CST, offs_k, offs_k < K, offs_d, mask_d, D, MODE, EMU, EVEN_K)
    for j in range(1, num_kb):
        s = s_nxt
        offs_k = j * BLOCK_K + tl.arange(0, BLOCK_K)
        s_nxt = _screen_logits(xh, qh, A, P, BIAS2, COEF2, CST, offs_k, offs_k < K, offs_d, mask_d, D, MODE, EMU,
                               EVEN_K)
        m_lo, s_best, best, bmax = _screen_update(s, BOUNDS, num_kb, u, w, j - 1, m_lo, s_best, best, bmax,
                                                  BLOCK_K, NB_PAD)
    m_lo, s_best, best, bmax = _screen_update(s_nxt, BOUNDS, num_kb, u, w, num_kb - 1, m_lo, s_best, best, bmax,
                                              BLOCK_K, NB_PAD)
    tl.store(BEST + offs_m, best.to(BEST.dtype.element_ty), mask=mask_m)
    rb = _final_row_bits(bmax, m_lo, SKIP, NB_PAD)
    tl.store(ROWBITS + offs_m, rb.to(ROWBITS.dtype.element_ty), mask=mask_m)


def _sparse_logz_configs():
    if _interpret():      # two flag tiles per program, so that the union of their bits is exercised
        return [triton.Config({"BLOCK_M": 2 * FLAG_ROWS}, num_warps=4, num_stages=1)]
    return [triton.Config({"BLOCK_M": t * FLAG_ROWS}, num_warps=w, num_stages=s)
            for t, w, s in ((1, 4, 2), (1, 4, 3), (2, 4, 2), (2, 8, 2), (2, 8, 3))]


@triton.autotune(configs=_sparse_logz_configs(), key=["K", "D", "MODE", "SPLIT_A", "WITH_ARGMAX", "WRITE_X2"])
@triton.heuristics({"EVEN_K": lambda a: a["K"] % a["BLOCK_K"] == 0})
@triton.jit
def _sparse_logz_kernel(
    X, CENTER, ROWS, GAPS, A, A_LO, P, P_LO, BIAS2, COEF2, CST, SCALES, LOGZ, LZP, X2, BEST, N, K,
    D: tl.constexpr, BLOCK_D: tl.constexpr, HAS_CENTER: tl.constexpr, MODE: tl.constexpr, EMU: tl.constexpr,
    SPLIT_A: tl.constexpr, WITH_ARGMAX: tl.constexpr, WRITE_X2: tl.constexpr, NB_PAD: tl.constexpr,
    FLAG_ROWS: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_K: tl.constexpr, EVEN_K: tl.constexpr,
):
    # program p: positions [p BLOCK_M, (p + 1) BLOCK_M) of the order (BLOCK_M a multiple of FLAG_ROWS: whole flag
    # tiles), rows ROWS[position]; the blocks set in the union of its tiles' GAPS, in ascending order (the j-th set
    # bit from a rank over NB_PAD lanes: no branch in the loop). Writes LOGZ and BEST by row, LZP (and X2) by
    # position.
    offs_m, mask_m, offs_d, mask_d = _row_block(N, D, BLOCK_M, BLOCK_D)
    src = _indexed(ROWS, offs_m, mask_m, True)
    x = _load_rows(X, CENTER, src, mask_m, offs_d, mask_d, D, HAS_CENTER)
    xh, xl, qh, ql, x2 = _row_operands(x, tl.load(SCALES), tl.load(SCALES + 1), True, MODE, EMU)
    TILES: tl.constexpr = BLOCK_M // FLAG_ROWS
    ft = tl.program_id(0) * TILES + tl.arange(0, TILES)
    g = tl.reduce(tl.load(GAPS + ft, mask=ft < tl.cdiv(N, FLAG_ROWS), other=0), 0, _bit_or)
    cols = tl.arange(0, NB_PAD)
    on = ((g >> cols.to(tl.int64)) & 1).to(tl.int32)
    rank = tl.cumsum(on, 0) - 1
    cnt = tl.sum(on, 0)
    m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_M], tl.float32)
    best = tl.zeros([BLOCK_M], tl.int32)
    no_bits = tl.zeros([BLOCK_M], tl.int64)
    no_bmax = tl.zeros([1, 1], tl.float32)
    for j in range(0, cnt):
        k0 = tl.sum(tl.where((on > 0) & (rank == j), cols, 0), 0) * BLOCK_K
        offs_k = k0 + tl.arange(0, BLOCK_K)
        s, _d = _component_logits(xh, xl, qh, ql, x2, A, A_LO, P, P_LO, BIAS2, COEF2, CST, offs_k, offs_k < K,
                                  offs_d, mask_d, D, True, MODE, EMU, EVEN_K, SPLIT_A)
        m_i, l_i, best, no_bits, no_bmax = _lse_update(s, k0, m_i, l_i, best, no_bits, no_bmax, WITH_ARGMAX, False,
                                                       False, 0.0, BLOCK_K, NB_PAD)
    logz = (m_i + tl.log2(l_i)) * LN2
    tl.store(LOGZ + src, logz, mask=mask_m)
    tl.store(LZP + offs_m, logz, mask=mask_m)
    if WRITE_X2:
        tl.store(X2 + offs_m, x2, mask=mask_m)
    if WITH_ARGMAX:
        tl.store(BEST + src, best.to(BEST.dtype.element_ty), mask=mask_m)


def screen_rows(x, params: Params, k, precision, skip, center=None, best=None, row_bits=None):
    """The screen alone: fills ``best`` (n,) int32 (argmax of the screened logits, kernel component index) and
    ``row_bits`` (n,) int32 or int64 (the blocks that may hold a responsibility >= 2^-skip: a superset of the
    exact bits), by row. Diag, "tf32" or "bf16" (:func:`screens`). Returns (best, row_bits)."""
    n, d = x.shape
    mode = _MODES[precision]
    if mode not in _COPY_MODES:
        raise ValueError(f"the screen is for diag covariances in 'tf32' or 'bf16', got precision={precision!r}")
    n_blocks = triton.cdiv(k, FLAG_K)
    if best is None:
        best = torch.empty(n, dtype=torch.int32, device=x.device)
    if row_bits is None:
        row_bits = torch.empty(n, dtype=torch.int32 if n_blocks <= 31 else torch.int64, device=x.device)
    bounds = screen_bounds(params, k, mode)

    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _screen_kernel[grid](x, x if center is None else center, params.a, params.p, params.bias2, params.coef2,
                         params.cst, params.scales, bounds, best, row_bits, n, k, D=d,
                         BLOCK_D=max(16, triton.next_power_of_2(d)), HAS_CENTER=center is not None, MODE=mode,
                         EMU=_interpret(), SKIP=float(skip), NB_PAD=max(2, triton.next_power_of_2(n_blocks)))
    return best, row_bits


def sparse_logz(x, params: Params, k, precision, rows, gaps, center=None, x2=None, best=None):
    """Exact logZ over each tile's kept blocks under the order ``rows`` (n,) int32 with tile bits ``gaps``
    (cdiv(n, FLAG_ROWS),) int64: returns ``(logz, lzp)``, (n,) float32 by row and by position; fills ``best``
    (n,) int32 or int64 with the exact argmax (by row) and ``x2`` (n,) with ||x||^2 (by position) when given."""
    n, d = x.shape
    mode = _MODES[precision]
    n_blocks = triton.cdiv(k, FLAG_K)
    logz = torch.empty(n, dtype=torch.float32, device=x.device)
    lzp = torch.empty(n, dtype=torch.float32, device=x.device)
    def grid(meta):
        return (triton.cdiv(n, meta["BLOCK_M"]),)

    _sparse_logz_kernel[grid](
        x, x if center is None else center, rows, gaps, params.a, params.a_lo, params.p, params.p_lo, params.bias2,
        params.coef2, params.cst, params.scales, logz, lzp, logz if x2 is None else x2,
        logz if best is None else best, n, k, D=d, BLOCK_D=max(16, triton.next_power_of_2(d)),
        HAS_CENTER=center is not None, MODE=mode, EMU=_interpret(), SPLIT_A=_split_a(mode, True),
        WITH_ARGMAX=best is not None, WRITE_X2=x2 is not None, NB_PAD=max(2, triton.next_power_of_2(n_blocks)),
        FLAG_ROWS=FLAG_ROWS, BLOCK_K=FLAG_K)
    return logz, lzp


def screened_order(x, params: Params, k, precision, center=None, x2=None, skip=None):
    """:func:`.estep.transient_order` for diag "tf32" / "bf16", screened: returns ``(logz, best, rows, gaps,
    lzp)`` with logZ (n,) float32 and best (n,) int32 (exact argmax, kernel index) by row, rows (n,) int32
    (position -> row), the tile bits (cdiv(n, FLAG_ROWS),) int64 and logZ by position; ``x2`` filled by position."""
    skip = SKIP_LOG2[precision] if skip is None else skip
    best, row_bits = screen_rows(x, params, k, precision, skip, center=center)
    rows = torch.argsort(best.to(torch.int16) if k <= 2**15 else best, stable=True).int()
    gaps = tile_bits(row_bits, rows)
    del row_bits
    logz, lzp = sparse_logz(x, params, k, precision, rows, gaps, center=center, x2=x2, best=best)
    return logz, best, rows, gaps, lzp


__all__ = ["SCREEN_DIAG", "screen_bounds", "screen_rows", "screened_order", "screens", "sparse_logz"]
